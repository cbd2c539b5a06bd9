"""The DiT group behind the one-model interface ``DiTEngine`` drives.

``DiTEngine`` needs ``config``, ``prepare(conditions)``, ``model(latents, timestep,
prepared)`` and ``expert_counts()``; ``ParallelModel`` answers each with a ``StepPlan`` sent
to the leader rank through a ``Transport`` (a Ray actor handle in ``services``, the leader's
``RankWorker`` itself in-process). Prepared conditions stay on the ranks: the engine holds a
``GroupPrepared`` (an id plus row numbers), so its row selection for joins, leaves and
chunking costs nothing to ship. The engine itself runs unchanged next to the proxy, on CPU
tensors (latents and the samplers are small; the ranks hold the model).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .loader import read_family
from .plan import StepPlan, choose_mode


class Transport(Protocol):
    def submit(self, plan: StepPlan) -> Any:
        """Run ``plan`` on the group (through the leader); the leader's result."""


@dataclass(frozen=True)
class GroupPrepared:
    prepared_id: int
    rows: tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def select(self, indices: list[int]) -> GroupPrepared:
        return GroupPrepared(self.prepared_id, tuple(self.rows[i] for i in indices))


class ParallelModel:
    """Duck-typed stand-in for the DiT module (``DiTEngine`` calls only what is here)."""

    def __init__(self, config: Any, transport: Transport, *, world_size: int, mode: str = "auto"):
        choose_mode(1, world_size, mode)  # reject a bad mode now
        self.config = config
        self.transport = transport
        self.world_size = world_size
        self.mode = mode
        self._ids = itertools.count(1)

    def to(self, *args: Any, **kwargs: Any) -> ParallelModel:
        return self

    def eval(self) -> ParallelModel:
        return self

    def modules(self):
        """No local submodules: attention backends and compilation apply on the ranks."""
        return iter(())

    def prepare(self, conditions: list[Any]) -> GroupPrepared:
        prepared_id = next(self._ids)
        rows = self.transport.submit(StepPlan("prepare", prepared_id=prepared_id, conditions=list(conditions)))
        return GroupPrepared(prepared_id, tuple(range(rows)))

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, prepared: GroupPrepared) -> torch.Tensor:
        if prepared.batch_size != latents.shape[0]:
            raise ValueError(f"batch mismatch: latents {latents.shape[0]}, prepared {prepared.batch_size}")
        plan = StepPlan("forward", prepared_id=prepared.prepared_id, rows=list(prepared.rows),
                        latents=latents.detach().cpu(), timesteps=timestep.detach().float().cpu(),
                        mode=choose_mode(prepared.batch_size, self.world_size, self.mode))
        return self.transport.submit(plan).to(latents.device, latents.dtype)

    def stats(self) -> dict[str, Any]:
        return self.transport.submit(StepPlan("stats"))

    def expert_counts(self) -> dict[str, list[int]]:
        return self.stats()["expert_counts"]

    def check_health(self) -> None:
        check = getattr(self.transport, "check_health", None)
        if check is not None:
            check()


def parallel_engine(directory: str | Path, engine_config: Any, transport: Transport, *, world_size: int,
                    mode: str = "auto") -> Any:
    """A ``DiTEngine`` over the group behind ``transport`` (``<model>/dit`` gives config and family)."""
    from dit_worker.engine import DiTEngine

    config, family = read_family(directory)
    return DiTEngine(ParallelModel(config, transport, world_size=world_size, mode=mode), family, engine_config)
