"""Worker-side per-request state shared by the logits processor and the model.

vLLM v1 gives a logits processor the batch make-up (row index -> SamplingParams, prompt ids, a
live reference to the output ids) before every forward pass; the model itself only sees flat
tokens. Both live in the same worker process (with or without multiprocessing), so the
processor publishes what it learned in a process-global ``WorkerRuntime`` and the model reads it:

* which rows are planning requests on the visual grid (``compute_logits`` then skips the text head);
* which rows export hidden states, into which shared-memory block, from which layers.

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

EXTRA_KEY = "mammoth"


@dataclass
class RowState:
    """One running request as seen by the worker."""

    spec: dict[str, Any]
    prompt_len: int
    output_ids: list[int]
    written: int = 0  # hidden-state rows written so far
    shm: shared_memory.SharedMemory | None = None
    buf: torch.Tensor | None = None

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
            arr = np.ndarray((rows, dim), dtype=np.float32, buffer=self.shm.buf)
            self.buf = torch.from_numpy(arr)
        return self.buf

    def close(self) -> None:
        self.buf = None
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

    # ---- batch bookkeeping (called by the logits processor) ----
    def add(self, index: int, spec: dict[str, Any] | None, prompt_ids: list[int] | None, output_ids: list[int]):
        old = self.rows.pop(index, None)
        if old is not None:
            old.close()
        if spec:
            self.rows[index] = RowState(dict(spec), len(prompt_ids or ()), output_ids)

    def remove(self, index: int) -> None:
        # A row leaving the batch may come back later (not scheduled this step), so the
        # shared-memory handle is closed but the written count lives in the spec.
        row = self.rows.pop(index, None)
        if row is not None:
            row.spec["_written"] = row.written
            row.close()

    def move(self, a: int, b: int, swap: bool) -> None:
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if swap and rb is not None:
            self.rows[a] = rb
        elif rb is not None:
            rb.close()

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


def write_captured(row: RowState, chunk: torch.Tensor) -> None:
    """Write this step's rows for one request at their offset in its sequence.

    The offset is normally the count written so far; when vLLM recomputes a preempted request
    from scratch the chunk reaches the end of the known sequence, which gives the offset.
    """
    buf = row.capture_buffer()
    if buf is None:
        return
    n = chunk.shape[0]
    total_known = row.prompt_len + len(row.output_ids)
    written = max(row.written, int(row.spec.get("_written", 0)))
    offset = written if total_known - n >= written else max(total_known - n, 0)
    end = min(offset + n, buf.shape[0])
    if end > offset:
        buf[offset:end].copy_(chunk[: end - offset].to(device="cpu", dtype=torch.float32))
    row.written = offset + n
    row.spec["_written"] = row.written
