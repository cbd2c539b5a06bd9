"""One rank of a DiT group: its model shard, the step loop, and the leader's broadcast.

All ranks execute the same ``StepPlan`` sequence. The leader (rank 0) gets each plan from its
transport (``submit``), broadcasts it and executes it; followers sit in ``follow`` receiving
plans until ``stop``. ``prepare`` runs on every rank (dense weights are everywhere) and is
cached by id, so a step ships only row ids, latents and timesteps, never the conditions.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dit_worker.families import condition_to
from dit_worker.models.attention import set_attention_backend

from .expert import ExpertParallelMoE
from .group import GroupSpec, destroy_group, init_group
from .loader import load_rank_model, parameter_bytes
from .placement import ExpertPlacement
from .plan import StepPlan, split_rows
from .sequence import sequence_parallel_forward, ulysses_config

_KEEP_PREPARED = 2  # the running batch's conditions and the previous set (a join races a step)


class RankWorker:
    def __init__(self, directory: str | Path, spec: GroupSpec, *, dtype: str = "float32",
                 placement: ExpertPlacement | str | Path | None = None, attention_backend: str | None = None):
        self.spec = spec
        self.rank, self.world_size = spec.rank, spec.world_size
        self.device = init_group(spec)
        self.dtype = getattr(torch, dtype)
        if placement is not None and not isinstance(placement, ExpertPlacement):
            placement = ExpertPlacement.load(placement)
        self.model, self.family = load_rank_model(directory, placement, self.rank, self.world_size,
                                                  device=self.device, dtype=self.dtype)
        if attention_backend is not None:
            set_attention_backend(self.model, attention_backend)
        self.layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, ExpertParallelMoE)]
        heads = self.model.config.num_attention_heads
        self._cp = ulysses_config(self.world_size, self.rank, self.device) if heads % self.world_size == 0 else None
        self._prepared: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.steps = 0
        self.step_seconds = 0.0
        self.last_counts: dict[str, list[int]] = {}
        self.total_counts: dict[str, list[int]] = {name: [0] * m.num_experts for name, m in self.layers}
        self.last_rank_tokens: list[int] = [0] * self.world_size

    # -- the loop ---------------------------------------------------------------------------
    def submit(self, plan: StepPlan) -> Any:
        """Leader only: broadcast ``plan`` to the followers and run it here too."""
        if not self.spec.is_leader:
            raise RuntimeError("submit: only rank 0 takes plans")
        if plan.op == "stats":
            return self.stats()
        self._broadcast(plan)
        return self.execute(plan)

    def follow(self) -> None:
        """Followers: run broadcast plans until the leader sends ``stop``."""
        while True:
            plan = self._broadcast(None)
            self.execute(plan)
            if plan.op == "stop":
                return

    def _broadcast(self, plan: StepPlan | None) -> StepPlan:
        box = [plan]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def execute(self, plan: StepPlan) -> Any:
        if plan.op == "prepare":
            conditions = [self._to_device(c) for c in plan.conditions]
            prepared = self.model.prepare(conditions)
            self._prepared[plan.prepared_id] = prepared
            while len(self._prepared) > _KEEP_PREPARED:
                self._prepared.popitem(last=False)
            return prepared.batch_size
        if plan.op == "forward":
            return self._forward(plan)
        if plan.op in ("stop", "keepalive"):
            return None
        raise ValueError(f"op: unknown plan op {plan.op!r}")

    def close(self) -> None:
        destroy_group()

    # -- one step ---------------------------------------------------------------------------
    def _to_device(self, condition: Any) -> Any:
        return condition_to(condition, self.device, self.dtype)

    @torch.inference_mode()
    def _forward(self, plan: StepPlan) -> torch.Tensor | None:
        start = time.perf_counter()
        prepared = self._prepared[plan.prepared_id]
        if plan.rows != list(range(prepared.batch_size)):
            prepared = prepared.select(plan.rows)
        latents = plan.latents.to(self.device, self.dtype)
        timesteps = plan.timesteps.to(self.device, torch.float32)
        if plan.mode == "sp":
            if self._cp is None:
                raise ValueError(f"parallel.mode: sequence parallel needs heads divisible by {self.world_size}")
            out = sequence_parallel_forward(self.model, latents, timesteps, prepared, self._cp,
                                            self.rank, self.world_size)
        else:
            out = self._data_parallel(latents, timesteps, prepared)
        self._gather_stats()
        self.steps += 1
        self.step_seconds += time.perf_counter() - start
        return out.cpu() if self.spec.is_leader else None

    def _data_parallel(self, latents: torch.Tensor, timesteps: torch.Tensor, prepared: Any) -> torch.Tensor:
        bounds = split_rows(latents.shape[0], self.world_size)
        lo, hi = bounds[self.rank]
        local = self.model(latents[lo:hi], timesteps[lo:hi], prepared.select(list(range(lo, hi))))
        width = max(e - s for s, e in bounds)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: hi - lo] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: e - s] for p, (s, e) in zip(parts, bounds)])

    def _gather_stats(self) -> None:
        """One small all-gather per step: every rank's per-expert routing counts and rows run."""
        if not self.layers:
            return
        rows = [torch.cat([m.last_expert_counts.to(torch.long), m.last_received.sum().view(1).to(torch.long)])
                for _, m in self.layers]
        mine = torch.stack(rows).to(self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        stacked = torch.stack(parts).cpu()  # [N, L, E+1]
        counts = stacked[:, :, :-1].sum(0)
        self.last_counts = {name: counts[i].tolist() for i, (name, _) in enumerate(self.layers)}
        for i, (name, _) in enumerate(self.layers):
            self.total_counts[name] = [a + b for a, b in zip(self.total_counts[name], counts[i].tolist())]
        self.last_rank_tokens = stacked[:, :, -1].sum(1).tolist()

    def stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "steps": self.steps,
                "step_seconds": self.step_seconds, "expert_counts": self.last_counts,
                "total_expert_counts": self.total_counts, "rank_tokens": self.last_rank_tokens,
                "comm_seconds": sum(m.comm_seconds for _, m in self.layers),
                "parameter_bytes": parameter_bytes(self.model)}
