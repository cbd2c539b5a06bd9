"""Visual-grid planning with AR classifier-free guidance: the math both vLLM runners share.

``logits`` (Model Runner V1) and ``logits_v2`` (Model Runner V2) only translate their runner's
batch view into ``PlanRow`` s; everything that decides a token lives here.

For a planning request at grid index ``g = offset + t`` (``t`` = output position, ``offset`` =
guided tokens already in its prompt after a repair):

* ``g`` at a row end (``g % (W+1) == W``): end-of-line is forced;
* ``g >= H*(W+1)``: ``<|image end|>`` is forced (the last end-of-line and ``<|image end|>`` then
  pass through the model, so their hidden states are exported);
* otherwise a visual code is sampled over the visual range from
  ``uncond + (cond - uncond) * cfg_scale`` (the official formula) with temperature / top-k /
  top-p and a generator seeded per ``(seed, g)`` on the logits' device, and forced on both rows.

Guidance is never silently lost. A row whose sample vLLM discards (a partial prefill chunk) is
left alone. A row that must sample while its partner is not at the same position in this step
(preempted, cut by the token budget or ``max_num_seqs``) is *desynchronised*: it and its
partner (when it gets there) are forced to ``stop_id`` (a stop token of both requests), and the
engine repairs the pair by resubmitting both with the guided prefix in their prompts, or fails
the request loudly. A partner that lags behind already-chosen positions is forced to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

EXTRA_KEY = "mammoth"  # SamplingParams.extra_args key of a request's planning spec
# 64-bit mixing constant (splitmix64): one generator seed per (request seed, grid index).
_MIX = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class PlanRow:
    """One logits row of a planning request in this step."""

    row: int  # logits row index
    role: str  # "cond" or "uncond"
    t: int  # output position this row samples
    sampling: bool  # False: vLLM discards this sample (partial prefill chunk)
    history: Sequence[int] | None = None  # the row's output so far, where the runner offers it


@dataclass
class PairState:
    tokens: list[int] = field(default_factory=list)  # chosen tokens by output position
    desync_at: int | None = None  # first position that could not be guided
    generator: torch.Generator | None = None


@dataclass
class GuidanceStats:
    guided_steps: int = 0
    desyncs: int = 0


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Official AR-CFG: ``uncond + (cond - uncond) * scale``."""
    if uncond is None or scale <= 1.0:
        return cond
    return uncond + (cond - uncond) * scale


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float, min_keep: int = 3) -> torch.Tensor:
    """HF ``TopKLogitsWarper`` / ``TopPLogitsWarper`` semantics (min_tokens_to_keep=3, as the official)."""
    if top_k and top_k > 0:
        k = min(max(top_k, min_keep), logits.shape[-1])
        kth = torch.topk(logits, k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -min_keep:] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_index(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from the categorical ``probs`` (1-D, non-negative) by inverting its CDF with a
    single uniform. ``torch.multinomial`` draws one exponential per category instead: ~0.8 ms over
    the 32k visual codes on CPU, for every pair at every planning step."""
    cdf = probs.double().cumsum(0)  # float64: a float32 running sum over 32k terms drifts
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[-1]
    # first index whose CDF exceeds u: a zero-probability category never is
    return int(torch.searchsorted(cdf, u, right=True).clamp_(max=probs.numel() - 1))


def position_seed(seed: int, index: int) -> int:
    """Deterministic per-position seed: a repaired pair resamples exactly what it would have."""
    x = (int(seed) * _MIX + int(index) + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def force(logits: torch.Tensor, row: int, token: int) -> None:
    logits[row].fill_(float("-inf"))
    logits[row, token] = 0.0


def gen_vocab_start(vllm_config) -> int:
    """First generation-vocabulary id (understanding rows must not sample at or above it)."""
    hf = vllm_config.model_config.hf_config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return int(getattr(text, "gen_vocab_start_index", getattr(hf, "gen_vocab_start_index", 0)) or 0)


def request_spec(sampling_params) -> dict[str, Any] | None:
    """The ``extra_args["mammoth"]`` of a request (``None``: not ours)."""
    if sampling_params is None:
        return None
    return (sampling_params.extra_args or {}).get(EXTRA_KEY) or None


def validate_params(sampling_params) -> None:
    """Request-time checks (vLLM calls them at admission, before any sampling)."""
    spec = request_spec(sampling_params)
    if not spec or spec.get("kind") != "plan":
        return
    for key in ("pair", "ar_height", "ar_width", "eol_id", "image_end_id", "visual_start", "num_visual", "stop_id"):
        if key not in spec:
            raise ValueError(f"mammoth plan spec lacks {key!r}")
    if int(spec["ar_height"]) < 1 or int(spec["ar_width"]) < 1:
        raise ValueError("ar_height and ar_width must be >= 1")
    if spec.get("role", "cond") not in ("cond", "uncond"):
        raise ValueError(f"mammoth plan role must be 'cond' or 'uncond', got {spec.get('role')!r}")


class GridGuidance:
    """Per-pair planning state and the token decision for one step."""

    def __init__(self) -> None:
        self.pairs: dict[str, PairState] = {}
        self.stats = GuidanceStats()

    def drop(self, live_pairs: set[str]) -> None:
        for key in [k for k in self.pairs if k not in live_pairs]:
            del self.pairs[key]

    def step(self, logits: torch.Tensor, spec: dict[str, Any], rows: list[PlanRow]) -> None:
        """Decide this step's token for every sampling row of one pair (in place on ``logits``)."""
        state = self.pairs.get(spec["pair"])
        if state is None:
            state = self.pairs[spec["pair"]] = PairState()
        h, w = int(spec["ar_height"]), int(spec["ar_width"])
        grid_len = h * (w + 1)
        offset = int(spec.get("offset", 0))
        stop_id = int(spec["stop_id"])
        pending: list[PlanRow] = []
        for r in rows:
            if not r.sampling:
                continue
            g = offset + r.t
            if r.t > len(state.tokens) and r.history is not None and state.desync_at is None:
                # State dropped while the pair was out of the batch: every output token of a
                # planning row was decided here, so its history is the pair's history.
                state.tokens.extend(int(x) for x in r.history[len(state.tokens) : r.t])
            if state.desync_at is not None and r.t >= state.desync_at:
                force(logits, r.row, stop_id)
            elif r.t < len(state.tokens):
                force(logits, r.row, state.tokens[r.t])
            elif r.t > len(state.tokens):  # positions decided by a dropped state, history unknown
                state.desync_at = len(state.tokens)
                self.stats.desyncs += 1
                force(logits, r.row, stop_id)
            elif g >= grid_len:
                force(logits, r.row, int(spec["image_end_id"]))
            elif g % (w + 1) == w:
                state.tokens.append(int(spec["eol_id"]))
                force(logits, r.row, state.tokens[-1])
            else:
                pending.append(r)
        if not pending:
            return
        t = pending[0].t
        scale = float(spec.get("cfg_scale", 1.0))
        by_role = {r.role: r for r in pending}
        if scale > 1.0 and set(by_role) != {"cond", "uncond"}:
            # The partner is not at this position in this step: no guided sample is possible.
            state.desync_at = t
            self.stats.desyncs += 1
            for r in pending:
                force(logits, r.row, stop_id)
            return
        token = self._sample(logits, spec, state, by_role, offset + t, scale)
        state.tokens.append(token)
        self.stats.guided_steps += 1
        for r in pending:
            force(logits, r.row, token)

    def _sample(self, logits, spec, state: PairState, by_role: dict[str, PlanRow], index: int, scale: float) -> int:
        start, n = int(spec["visual_start"]), int(spec["num_visual"])
        cond_row = by_role.get("cond", by_role.get("uncond"))
        uncond_row = by_role.get("uncond") if scale > 1.0 else None
        cond = logits[cond_row.row, start : start + n].float()
        uncond = logits[uncond_row.row, start : start + n].float() if uncond_row is not None else None
        scores = guided_logits(cond, uncond, scale)
        temperature = float(spec.get("temperature", 1.0))
        if temperature <= 0:
            return start + int(scores.argmax())
        scores = filter_top_k_top_p(scores / temperature, int(spec.get("top_k", 0)), float(spec.get("top_p", 1.0)))
        if state.generator is None or state.generator.device != logits.device:
            state.generator = torch.Generator(device=logits.device)
        state.generator.manual_seed(position_seed(int(spec.get("seed", 0)), index))
        return start + sample_index(scores.softmax(-1), state.generator)
