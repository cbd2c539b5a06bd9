"""Classifier-free guidance as a chain of branches, shared by 2-way and 3-way CFG.

Both model families combine their branches as a chain ordered from least to most
conditioned, ``b_0 .. b_n`` with scales ``s_1 .. s_n``::

    pred = b_0 + sum_i s_i * (b_i - b_{i-1})

- 2-way (T2I / T2V):             [uncond, cond],             scales [text]
- 3-way (image / video editing): [uncond, ref_only, cond],   scales [image (or context), text]

Outside ``cfg_range`` (a fraction of the steps) a shorter chain runs, by default only the last,
fully conditioned branch; the engine then skips the other branches' forward passes entirely.
MammothModa2.5 editing keeps text guidance there (``outside=[source-only, cond]``): its
``cfg_range`` gates only the context guidance, as the official pipeline's does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

ConditionT = TypeVar("ConditionT")


@dataclass
class GuidanceChain(Generic[ConditionT]):
    """The branches of one request and how to combine them."""

    branches: list[ConditionT]
    scales: list[float] = field(default_factory=list)
    cfg_range: tuple[float, float] = (0.0, 1.0)
    # The chain outside cfg_range: branch indices (least to most conditioned) and their scales.
    # ``None``: the last branch alone. Indices may name branches the inside chain does not use.
    outside: list[int] | None = None
    outside_scales: list[float] = field(default_factory=list)
    inside: list[int] | None = None  # the chain inside cfg_range; None: every branch in order

    def __post_init__(self) -> None:
        if not self.branches:
            raise ValueError("guidance: need at least one branch")
        inside = self._inside()
        if len(self.scales) != len(inside) - 1:
            raise ValueError(f"guidance: {len(inside)} branches need {len(inside) - 1} scales")
        outside = self._outside()
        if len(self.outside_scales) != len(outside) - 1:
            raise ValueError(f"guidance: an outside chain of {len(outside)} branches needs {len(outside) - 1} scales")
        if any(not 0 <= i < len(self.branches) for i in (*inside, *outside)):
            raise ValueError("guidance: branch index out of range")

    def _inside(self) -> list[int]:
        return list(range(len(self.branches))) if self.inside is None else list(self.inside)

    def _outside(self) -> list[int]:
        return self._inside()[-1:] if self.outside is None else list(self.outside)

    def _in_range(self, step: int, num_steps: int) -> bool:
        return self.cfg_range[0] <= step / num_steps <= self.cfg_range[1]

    def active_branches(self, step: int, num_steps: int) -> list[int]:
        """Indices of the branches to run at ``step``, least to most conditioned."""
        return self._inside() if self._in_range(step, num_steps) else self._outside()

    def active_scales(self, step: int, num_steps: int) -> list[float]:
        """The scales that combine ``active_branches(step, num_steps)``."""
        return list(self.scales) if self._in_range(step, num_steps) else list(self.outside_scales)


def combine(predictions: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """Chain CFG combine; a single prediction is returned as is."""
    if len(predictions) == 1:
        return predictions[0]
    if len(scales) != len(predictions) - 1:
        raise ValueError("combine: need one scale per branch after the first")
    out = predictions[0]
    for scale, prev, cur in zip(scales, predictions[:-1], predictions[1:]):
        out = out + scale * (cur - prev)
    return out


def validate_scale(name: str, value: float, *, low: float = 0.0, high: float = 50.0) -> float:
    """Guidance scales come from users: finite and in a sane range, or a ValueError naming the field."""
    if not isinstance(value, int | float) or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name}: must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def validate_cfg_range(cfg_range: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(v) for v in cfg_range)
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise ValueError(f"cfg_range: need (start, end) with 0 <= start <= end <= 1, got {tuple(cfg_range)!r}")
    return values[0], values[1]
