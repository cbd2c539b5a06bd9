"""The step plan the leader broadcasts, and the rule that picks how a step is split.

The leader's engine owns the batch (joins, leaves, aborts, per-request timesteps); what the
ranks need from it each step is one ``StepPlan``: the rows of the cached prepared conditions
that run (a join re-prepares: ``op="prepare"`` carries the new conditions once), their
latents and timesteps, and the split mode.

Mode rule (``choose_mode``), per step from the batch:

* ``rows >= N`` -> ``"dp"``: rows (requests x CFG branches) split contiguously across ranks,
  so CFG branches of one request may run on different ranks; attention stays local, only the
  MoE layers talk (expert all-to-all).
* otherwise -> ``"sp"``: every row's sequence split across ranks (Ulysses attention), so one
  long video spreads its tokens over N ranks.
* ``parallel.mode: sp`` forces ``"sp"`` for every step (lowest activation memory per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Mode = Literal["dp", "sp"]
MODES = ("auto", "sp")


@dataclass
class StepPlan:
    # "keepalive": the leader's heartbeat while idle, so a follower waiting in its broadcast never
    # reaches the collective timeout just because no request came
    op: Literal["prepare", "forward", "stats", "keepalive", "stop"]
    prepared_id: int = 0
    conditions: list[Any] = field(default_factory=list)  # op == "prepare"
    rows: list[int] = field(default_factory=list)  # rows of the prepared batch that run
    latents: torch.Tensor | None = None  # [rows, C, F, H, W] on CPU
    timesteps: torch.Tensor | None = None  # [rows] fp32
    mode: Mode = "dp"


def choose_mode(rows: int, world_size: int, forced: str = "auto") -> Mode:
    if forced not in MODES:
        raise ValueError(f"parallel.mode: {forced!r} is not one of {MODES}")
    if forced == "sp" or rows < world_size:
        return "sp"
    return "dp"


def split_rows(rows: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` row ranges per rank, sizes differing by at most one."""
    base, extra = divmod(rows, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
