"""Worker-side per-request state shared by the logits processor and the model.

vLLM v1 gives a logits processor the batch make-up (row index -> SamplingParams, prompt ids, a
live reference to the output ids) before every forward pass; the model itself only sees flat
tokens. Both live in the same worker process (with or without multiprocessing), so the
processor publishes what it learned in a process-global ``WorkerRuntime`` and the model reads it:

* which rows are planning requests on the visual grid (``compute_logits`` then skips the text head);
* which rows export hidden states, into which shared-memory block, from which layers;
* (from the model, each forward) every row's sequence length after the step, so the processor
  knows which rows really sample (not a partial prefill chunk) and the capture knows each
  chunk's offset in the sequence.

Export accounting: a block is ``[rows, dim]`` float32 followed by ``[rows]`` int32 write counts.
A row already written (a preempted request recomputed, a repaired pair resubmitted) is not
written again; the engine checks that every row it reads was written exactly once.

Nothing here crosses a process boundary except the shared-memory blocks, named per request by the
engine (``extra_args``), so the same code works in-process and with the multiprocess engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch

from .guidance import EXTRA_KEY

__all__ = ["EXTRA_KEY", "RowState", "WorkerRuntime", "get_runtime"]



@dataclass
class RowState:
    """One running request as seen by the worker."""

    spec: dict[str, Any]
    prompt_len: int
    output_ids: list[int]
    shm: shared_memory.SharedMemory | None = None
    buf: torch.Tensor | None = None
    counts: np.ndarray | None = None  # per-row write counts in the block

    @property
    def kind(self) -> str:
        return self.spec.get("kind", "")

    @property
    def on_grid(self) -> bool:
        return self.kind == "plan"

    def capture_buffer(self) -> torch.Tensor | None:
        name = self.spec.get("shm")
        if not name:
            return None
        if self.buf is None:
            # The engine may have unlinked the block after a cancel; then nothing is written.
            try:
                self.shm = open_shared(name, int(self.spec.get("owner_pid", 0)))
            except FileNotFoundError:
                self.spec["shm"] = None
                return None
            rows, dim = int(self.spec["shm_rows"]), int(self.spec["hidden"])
            self.buf, self.counts = block_views(self.shm.buf, rows, dim)
        return self.buf

    def close(self) -> None:
        self.buf = None
        self.counts = None
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:
                pass
            self.shm = None


@dataclass
class WorkerRuntime:
    rows: dict[int, RowState] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    tp_rank: int = 0
    # This step's batch, from the model's attention metadata (row -> tokens after the step).
    seq_lens: list[int] | None = None
    query_start_loc: list[int] | None = None

    # ---- batch bookkeeping (called by the logits processor) ----
    def add(self, index: int, spec: dict[str, Any] | None, prompt_ids: list[int] | None, output_ids: list[int]):
        old = self.rows.pop(index, None)
        if old is not None:
            old.close()
        if spec:
            self.rows[index] = RowState(dict(spec), len(prompt_ids or ()), output_ids)

    def remove(self, index: int) -> None:
        # A row leaving the batch may come back later; what it wrote is counted in its block.
        row = self.rows.pop(index, None)
        if row is not None:
            row.close()

    def move(self, a: int, b: int, swap: bool) -> None:
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if swap and rb is not None:
            self.rows[a] = rb
        elif rb is not None:
            rb.close()

    # ---- this step's batch (recorded by the model's forward) ----
    def note_batch(self, query_start_loc: list[int] | None, seq_lens: list[int] | None) -> None:
        self.query_start_loc, self.seq_lens = query_start_loc, seq_lens

    def samples(self, index: int, row: RowState) -> bool:
        """Whether row ``index`` really samples this step: its sequence after the step reaches
        every known token (a partial prefill chunk does not; vLLM discards its sample)."""
        if self.seq_lens is None or index >= len(self.seq_lens):
            return True
        return self.seq_lens[index] >= row.prompt_len + len(row.output_ids)

    def chunk_offset(self, index: int) -> int | None:
        """Sequence position of the first token row ``index`` computes this step."""
        if self.seq_lens is None or self.query_start_loc is None or index + 1 >= len(self.query_start_loc):
            return None
        return self.seq_lens[index] - (self.query_start_loc[index + 1] - self.query_start_loc[index])

    # ---- queries (called by the model) ----
    def grid_rows(self, num_rows: int, device: torch.device) -> torch.Tensor | None:
        """Bool [num_rows]: rows whose next token is on the visual grid; None if there are none."""
        idx = [i for i, r in self.rows.items() if r.on_grid and i < num_rows]
        if not idx:
            return None
        mask = torch.zeros(num_rows, dtype=torch.bool)
        mask[idx] = True
        return mask.to(device)

    def capture_rows(self) -> list[tuple[int, RowState]]:
        return [(i, r) for i, r in self.rows.items() if r.spec.get("shm")]


_RUNTIME = WorkerRuntime()


def open_shared(name: str, owner_pid: int) -> shared_memory.SharedMemory:
    """Attach to the engine's block. vLLM spawns its processes from the engine process, so they
    share its resource tracker; a second registration of the same name is a no-op there and
    the engine's ``unlink`` is the single release."""
    del owner_pid
    return shared_memory.SharedMemory(name=name, create=False)


def get_runtime() -> WorkerRuntime:
    return _RUNTIME


def hidden_index_sets(rows: list[tuple[int, RowState]], num_layers: int) -> dict[tuple[int, ...], list[int]]:
    """Group capturing rows by their (normalised, 0..num_layers) hidden-state index set.

    Index k follows HF ``output_hidden_states``: 0 = embeddings, k = output of decoder layer
    k-1 (pre-norm, after deepstack), ``num_layers`` = final normed output; negatives count from
    the end (-1 = final normed output, -2 = output of the second-to-last layer...).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in rows:
        layers = tuple(sorted(int(k) % (num_layers + 1) for k in row.spec.get("layers", (-1,))))
        groups.setdefault(layers, []).append(i)
    return groups


def block_bytes(rows: int, dim: int) -> int:
    return rows * dim * 4 + rows * 4


def block_views(buffer, rows: int, dim: int) -> tuple[torch.Tensor, np.ndarray]:
    """The ``[rows, dim]`` float32 data and ``[rows]`` int32 write counts of one block."""
    data = np.ndarray((rows, dim), dtype=np.float32, buffer=buffer)
    counts = np.ndarray((rows,), dtype=np.int32, buffer=buffer, offset=rows * dim * 4)
    return torch.from_numpy(data), counts


def write_captured(row: RowState, chunk: torch.Tensor, offset: int) -> None:
    """Write this step's rows for one request at ``offset`` (its chunk's first sequence
    position); rows already written are skipped, so each is written exactly once."""
    buf = row.capture_buffer()
    if buf is None or row.counts is None:
        return
    end = min(offset + chunk.shape[0], buf.shape[0])
    if end <= offset:
        return
    fresh = np.flatnonzero(row.counts[offset:end] == 0)
    if fresh.size == 0:
        return
    host = chunk[: end - offset].to(device="cpu", dtype=torch.float32)
    if fresh.size == end - offset:
        buf[offset:end].copy_(host)
    else:
        idx = torch.from_numpy(fresh)
        buf[offset + idx] = host[idx]
    row.counts[offset + fresh] += 1
