"""Per-request step cache for the DiTs (FirstBlockCache / TeaCache style), off by default.

Why: late in a flow-matching schedule consecutive steps move the transformer's hidden states
little. When block 0's output residual (its output minus its input) over a row's generated
tokens changed less than ``threshold`` (relative L1) since the row's last *computed* step, the
remaining blocks would add about the residual they added then; the row reuses that residual
(final hidden - block 0 output) instead of running them.

Decisions are per request: every CFG branch of one request caches or computes together, so the
guidance combine never mixes a fresh branch with a stale one. Rows of different requests in one
forward decide independently; the remaining blocks run only for the rows that compute. Residuals
are kept over the generated tokens only (what the output head reads), in the row's own unpadded
layout, so a request may change batch (and padding) between steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# rest(rows): final hidden states [len(rows), S, D] of those rows after blocks 1..N-1;
# rows None = every row of the forward.
RunRest = Callable[[torch.Tensor | None], torch.Tensor]
MAX_THRESHOLD = 10.0  # relative L1 above 1 caches nearly every allowed step (tests, experiments)


@dataclass(frozen=True)
class StepCacheParams:
    """Knobs from the request (or the model's defaults); ``threshold`` 0 turns the cache off."""

    threshold: float = 0.0  # relative L1 change of block 0's residual under which a step is cached
    warmup: float = 0.1  # leading fraction of the steps that are always computed
    max_cached_steps: int = 3  # longest run of consecutive cached steps; then one is computed

    @property
    def enabled(self) -> bool:
        return self.threshold > 0.0

    def validate(self) -> StepCacheParams:
        """Raise ValueError naming the field (the engine's messages start with it)."""
        if not isinstance(self.threshold, int | float) or not math.isfinite(self.threshold) \
                or not 0.0 <= self.threshold <= MAX_THRESHOLD:
            raise ValueError(f"step_cache_threshold: must be in [0, {MAX_THRESHOLD}], got {self.threshold!r}")
        if not isinstance(self.warmup, int | float) or not math.isfinite(self.warmup) or not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"step_cache_warmup: must be in [0, 1], got {self.warmup!r}")
        if not isinstance(self.max_cached_steps, int) or not 0 <= self.max_cached_steps <= 1000:
            raise ValueError(f"step_cache_max_cached_steps: must be an integer in [0, 1000], "
                             f"got {self.max_cached_steps!r}")
        return self


@dataclass
class _BranchState:
    signal: torch.Tensor  # block 0 residual over the generated tokens at the last computed step
    residual: torch.Tensor  # final hidden - block 0 output there


@dataclass
class RequestCache:
    """One request's cache across its steps: per-branch state, the current run, the counts."""

    params: StepCacheParams
    branches: dict[int, _BranchState] = field(default_factory=dict)
    run: int = 0  # consecutive cached steps so far
    computed: int = 0
    cached: int = 0
    _may_cache: bool = False
    _cached_now: bool | None = None

    def begin_step(self, step: int, num_steps: int) -> None:
        """Before a step's forward: may this step be cached at all (warm-up, run length)?"""
        p = self.params
        self._may_cache = p.enabled and step >= p.warmup * num_steps and self.run < p.max_cached_steps
        self._cached_now = None

    def end_step(self) -> None:
        """After the step's forward: count it."""
        if self._cached_now:
            self.cached += 1
            self.run += 1
        else:
            self.computed += 1
            self.run = 0


def _relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    scale = before.abs().mean()
    return float((now - before).abs().mean() / scale.clamp_min(1e-12))


class ForwardCache:
    """The step cache's view of one forward: which request and branch every row belongs to.

    ``rows[i] = (cache, branch)``; all rows of one request must be in the same forward."""

    def __init__(self, rows: list[tuple[RequestCache, int]]):
        self.rows = rows

    def apply(self, block_in: torch.Tensor, block_out: torch.Tensor, start: int, lengths: list[int],
              rest: RunRest) -> torch.Tensor:
        """Final hidden states ``[B, S, D]``: computed rows from ``rest``, cached rows as block 0's
        output plus their residual over ``[start, start + lengths[i])`` (the rest of a cached row
        is block 0's output: nothing reads it)."""
        if len(self.rows) != block_out.shape[0] or len(lengths) != len(self.rows):
            raise ValueError(f"step cache: {len(self.rows)} rows for a batch of {block_out.shape[0]}")
        signals = [(block_out[i, start:start + n] - block_in[i, start:start + n]).float()
                   for i, n in enumerate(lengths)]
        worst: dict[int, float] = {}  # per request (by id): the largest change over its rows
        for i, (cache, branch) in enumerate(self.rows):
            key = id(cache)
            state = cache.branches.get(branch)
            if not cache._may_cache or state is None or state.signal.shape != signals[i].shape:
                worst[key] = math.inf
            elif worst.get(key, 0.0) != math.inf:
                worst[key] = max(worst.get(key, 0.0), _relative_l1(signals[i], state.signal))
        for cache, _ in self.rows:
            cache._cached_now = worst[id(cache)] < cache.params.threshold
        compute = [i for i, (cache, _) in enumerate(self.rows) if not cache._cached_now]
        if len(compute) == len(self.rows):
            out = rest(None)
        else:
            out = block_out.clone()
            if compute:
                index = torch.as_tensor(compute, dtype=torch.long, device=block_out.device)
                out[index] = rest(index)
        for i, (cache, branch) in enumerate(self.rows):
            n = lengths[i]
            if cache._cached_now:
                state = cache.branches[branch]
                out[i, start:start + n] = block_out[i, start:start + n] + state.residual.to(out.dtype)
            elif cache.params.enabled:  # a request without the cache keeps no state
                residual = (out[i, start:start + n] - block_out[i, start:start + n]).detach().clone()
                cache.branches[branch] = _BranchState(signals[i].detach().clone(), residual)
        return out


def select_rows(value: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Rows of a per-row tensor for the computed subset; a broadcast (size-1) batch stays as is."""
    if value is None or rows is None or value.shape[0] == 1:
        return value
    return value.index_select(0, rows)
