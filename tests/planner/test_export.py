"""Hidden-state export accounting on a real shared-memory block (no engine): chunked writes land
at their offsets, recomputed rows are not written twice, a missing row is an error on read."""

from __future__ import annotations

import os

import pytest
import torch

from planner.engine import ExportError, _SharedRows
from planner.runtime import RowState, WorkerRuntime, write_captured

ROWS, DIM = 12, 4


@pytest.fixture
def block():
    b = _SharedRows(ROWS, DIM)
    yield b
    b.free()


def _row(block, prompt_len=6):
    spec = {"kind": "plan", "shm": block.name, "shm_rows": ROWS, "hidden": DIM, "owner_pid": os.getpid()}
    return RowState(spec, prompt_len, [])


def test_chunks_preemption_recompute_and_rejoin_write_each_row_once(block):
    seq = torch.arange(ROWS * DIM, dtype=torch.float32).view(ROWS, DIM)
    row = _row(block)
    write_captured(row, seq[0:4], 0)  # prefill chunk 1
    write_captured(row, seq[4:6], 4)  # prefill chunk 2
    row.close()  # left the batch (preempted): the counts live in the block, not in the row
    row = _row(block)
    write_captured(row, seq[0:5] + 100, 0)  # recomputed after preemption: rows already written stay
    write_captured(row, seq[5:8], 5)  # ... the rest of the recompute, one new row
    write_captured(row, seq[8:9], 8)
    out = block.read(9)
    torch.testing.assert_close(out, seq[:9])
    assert block.written_prefix() == 9
    row.close()


def test_a_row_never_written_is_an_error_not_zeros(block):
    row = _row(block)
    write_captured(row, torch.ones(3, DIM), 0)
    write_captured(row, torch.ones(2, DIM), 4)  # row 3 was never computed
    with pytest.raises(ExportError, match="1 of 6 rows"):
        block.read(6)
    with pytest.raises(ExportError):
        block.read(ROWS + 1)
    row.close()


def test_runtime_reads_chunk_offsets_and_sampling_rows_from_the_batch():
    rt = WorkerRuntime()
    rt.add(0, {"kind": "plan"}, [1] * 10, [])
    rt.add(1, {"kind": "plan"}, [1] * 4, [7, 7])
    rt.note_batch([0, 6, 7], [6, 6])  # row 0: tokens 0..5 of 10 (partial); row 1: one decode token
    assert rt.chunk_offset(0) == 0 and rt.chunk_offset(1) == 5
    assert not rt.samples(0, rt.rows[0]) and rt.samples(1, rt.rows[1])


def test_blocks_of_dead_owners_are_swept_and_live_ones_kept(block):
    import subprocess
    from pathlib import Path

    from planner.engine import BLOCK_PREFIX, SHM_DIR, sweep_orphaned_blocks

    assert block.name.startswith(f"{BLOCK_PREFIX}-{os.getpid()}-")
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = Path(SHM_DIR) / f"{BLOCK_PREFIX}-{dead.pid}-0123abcd"
    orphan.write_bytes(b"\0" * 64)
    unrelated = Path(SHM_DIR) / "psm_not_ours"
    unrelated.write_bytes(b"\0")
    try:
        swept = sweep_orphaned_blocks()
        assert orphan.name in swept and not orphan.exists()
        assert (Path(SHM_DIR) / block.name).exists()  # this (live) process's block stays
        assert unrelated.exists()
        block.read(0)
    finally:
        orphan.unlink(missing_ok=True)
        unrelated.unlink(missing_ok=True)
