"""Classifier-free guidance as a chain of branches, shared by 2-way and 3-way CFG.

Both model families combine their branches as a chain ordered from least to most
conditioned, ``b_0 .. b_n`` with scales ``s_1 .. s_n``::

    pred = b_0 + sum_i s_i * (b_i - b_{i-1})

- 2-way (T2I / T2V):             [uncond, cond],             scales [text]
- 3-way (image / video editing): [uncond, ref_only, cond],   scales [image (or context), text]

Outside ``cfg_range`` (a fraction of the steps) only the last, fully conditioned branch runs:
the engine then skips the other branches' forward passes entirely.
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

    def __post_init__(self) -> None:
        if len(self.scales) != len(self.branches) - 1:
            raise ValueError(f"guidance: {len(self.branches)} branches need {len(self.branches) - 1} scales")

    def active_branches(self, step: int, num_steps: int) -> list[int]:
        """Indices of the branches to run at ``step`` (all inside cfg_range, else only the last)."""
        if len(self.branches) == 1:
            return [0]
        ratio = step / num_steps
        if self.cfg_range[0] <= ratio <= self.cfg_range[1]:
            return list(range(len(self.branches)))
        return [len(self.branches) - 1]


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
