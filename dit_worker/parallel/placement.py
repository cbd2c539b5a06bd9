"""Expert -> rank placement: contiguous by default, balanced (EPLB-style) from measured loads.

A placement lists, per MoE layer, the experts each rank holds (its *slots*, in the order its
local expert weights are stacked). Every expert lives on at least one rank; a hot expert may
live on several (replicas), and its tokens are then split evenly between them. All ranks hold
the same number of slots, so the dispatch tables are rectangular.

The file format (JSON) is what ``mammoth dit placement --from-metrics`` writes::

    {"num_experts": 16, "world_size": 2,
     "default": [[0, 1, ...], [8, 9, ...]],          # layers not listed below
     "layers": {"blocks.0.ffn": [[...], [...]]}}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Slots = list[list[int]]  # per rank, the expert ids it holds


class PlacementError(ValueError):
    """A placement that cannot be applied to this model / group; the message names the field."""


@dataclass
class ExpertPlacement:
    num_experts: int
    world_size: int
    default: Slots
    layers: dict[str, Slots] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check("default", self.default)
        for name, slots in self.layers.items():
            self._check(f"layers.{name}", slots)

    def _check(self, where: str, slots: Slots) -> None:
        if len(slots) != self.world_size:
            raise PlacementError(f"{where}: {len(slots)} ranks listed, the group has {self.world_size}")
        widths = {len(s) for s in slots}
        if len(widths) != 1:
            raise PlacementError(f"{where}: ranks hold {sorted(widths)} experts; every rank needs the same count")
        for rank, experts in enumerate(slots):
            if len(set(experts)) != len(experts):
                raise PlacementError(f"{where}: rank {rank} lists an expert twice")
            bad = [e for e in experts if not 0 <= e < self.num_experts]
            if bad:
                raise PlacementError(f"{where}: rank {rank} lists expert {bad[0]} outside 0..{self.num_experts - 1}")
        missing = sorted(set(range(self.num_experts)) - {e for s in slots for e in s})
        if missing:
            raise PlacementError(f"{where}: expert {missing[0]} is on no rank")

    def for_layer(self, name: str) -> Slots:
        return self.layers.get(name, self.default)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Rank r holds experts ``[r*E/N, (r+1)*E/N)``."""
        if num_experts % world_size:
            raise PlacementError(f"world_size: {num_experts} experts do not split evenly over {world_size} ranks "
                                 "(use a placement file with replicas)")
        per = num_experts // world_size
        return cls(num_experts, world_size, [list(range(r * per, (r + 1) * per)) for r in range(world_size)])

    @classmethod
    def balanced(cls, loads: Mapping[str, Sequence[float]] | Sequence[float], world_size: int, *,
                 replicas: int = 0) -> ExpertPlacement:
        """Balance measured per-expert loads; per layer when ``loads`` maps layer -> loads."""
        if isinstance(loads, Mapping):
            if not loads:
                raise PlacementError("loads: no layers")
            layers = {name: balance(list(v), world_size, replicas=replicas) for name, v in loads.items()}
            total = [sum(col) for col in zip(*loads.values())]
            return cls(len(total), world_size, balance(total, world_size, replicas=replicas), layers)
        return cls(len(loads), world_size, balance(list(loads), world_size, replicas=replicas))

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "world_size": self.world_size, "default": self.default,
                "layers": self.layers}

    @classmethod
    def from_dict(cls, data: Mapping) -> ExpertPlacement:
        unknown = sorted(set(data) - {"num_experts", "world_size", "default", "layers"})
        if unknown:
            raise PlacementError(f"{unknown[0]}: unknown placement key")
        for key in ("num_experts", "world_size", "default"):
            if key not in data:
                raise PlacementError(f"{key}: missing from the placement")
        return cls(int(data["num_experts"]), int(data["world_size"]), [list(map(int, s)) for s in data["default"]],
                   {k: [list(map(int, s)) for s in v] for k, v in dict(data.get("layers") or {}).items()})

    @classmethod
    def load(cls, path: str | Path) -> ExpertPlacement:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlacementError(f"placement_file: cannot read {path} ({exc})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def balance(loads: list[float], world_size: int, *, replicas: int = 0) -> Slots:
    """Greedy EPLB: give the ``replicas`` extra slots to the experts with the highest load per
    copy, then place copies busiest first on the least-loaded rank with a free slot (never two
    copies of one expert on one rank)."""
    num_experts = len(loads)
    if (num_experts + replicas) % world_size:
        raise PlacementError(f"replicas: {num_experts} experts + {replicas} replicas do not split evenly over "
                             f"{world_size} ranks")
    if replicas < 0 or num_experts + replicas > num_experts * world_size:
        raise PlacementError(f"replicas: {replicas} is outside 0..{num_experts * (world_size - 1)}")
    copies = [1] * num_experts
    for _ in range(replicas):
        candidates = [e for e in range(num_experts) if copies[e] < world_size]
        hot = max(candidates, key=lambda e: (loads[e] / copies[e], -e))
        copies[hot] += 1
    units = sorted(((loads[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                   key=lambda u: (-u[0], u[1]))
    per_rank = (num_experts + replicas) // world_size
    slots: Slots = [[] for _ in range(world_size)]
    rank_load = [0.0] * world_size
    for load, expert in units:
        free = [r for r in range(world_size) if len(slots[r]) < per_rank and expert not in slots[r]]
        rank = min(free, key=lambda r: (rank_load[r], r))
        slots[rank].append(expert)
        rank_load[rank] += load
    return [sorted(s) for s in slots]


def rank_loads(loads: Sequence[float], slots: Slots) -> list[float]:
    """Load each rank serves under ``slots`` (a replicated expert's load split evenly)."""
    copies = [0] * len(loads)
    for experts in slots:
        for e in experts:
            copies[e] += 1
    return [sum(loads[e] / copies[e] for e in experts) for experts in slots]


def imbalance(values: Sequence[float]) -> float:
    """max / mean (1.0 = perfectly even; 0 loads count as even)."""
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


_PROM_LINE = re.compile(r'^mammoth_expert_tokens_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+-]+)')
_PROM_EXPERT = re.compile(r'expert="(\d+)"')


def loads_from_metrics(text: str) -> dict[str, list[float]] | list[float]:
    """Per-expert loads from a metrics file: the DiT's ``expert_metrics()`` JSON (per layer:
    ``{"expert_counts": {layer: [...]}}`` or ``{layer: [...]}``) or Prometheus text with
    ``mammoth_expert_tokens_total{expert="i",...}`` samples (summed over layers and models)."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        data = json.loads(stripped)
        counts = data.get("expert_counts", data)
        if not isinstance(counts, dict) or not counts:
            raise PlacementError("expert_counts: no per-layer counts in the metrics file")
        return {str(k): [float(c) for c in v] for k, v in counts.items()}
    totals: dict[int, float] = {}
    for line in text.splitlines():
        match = _PROM_LINE.match(line.strip())
        if match and (expert := _PROM_EXPERT.search(match["labels"])):
            totals[int(expert[1])] = totals.get(int(expert[1]), 0.0) + float(match["value"])
    if not totals:
        raise PlacementError("metrics: no mammoth_expert_tokens_total samples and no JSON counts")
    return [totals.get(e, 0.0) for e in range(max(totals) + 1)]


def summarize(loads: Mapping[str, Sequence[float]] | Sequence[float], before: ExpertPlacement,
              after: ExpertPlacement) -> dict[str, float]:
    """Rank-load imbalance (max/mean) under two placements, worst layer."""
    layers = loads.items() if isinstance(loads, Mapping) else [("default", loads)]
    worst = {"before": 1.0, "after": 1.0}
    for name, values in layers:
        worst["before"] = max(worst["before"], imbalance(rank_loads(values, before.for_layer(name))))
        worst["after"] = max(worst["after"], imbalance(rank_loads(values, after.for_layer(name))))
    return {"rank_imbalance_before": worst["before"], "rank_imbalance_after": worst["after"]}
