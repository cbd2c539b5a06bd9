"""vLLM v1 logits processor: visual-grid planning with AR classifier-free guidance.

One instance lives next to the model in each worker and sees the whole batch. For a planning
request (``extra_args["mammoth"]["kind"] == "plan"``) at output position ``t``:

* ``t`` at a row end (``t % (W+1) == W``): the end-of-line token is forced;
* ``t >= H*(W+1)``: ``<|image end|>`` is forced (two extra steps, so the last end-of-line and
  ``<|image end|>`` themselves pass through the model and their hidden states are exported);
* otherwise a visual code is *sampled here*, over the visual range only, from
  ``uncond + (cond - uncond) * cfg_scale`` (the official formula) when the pair's unconditional
  request sits in the same batch at the same position, with temperature / top-k / top-p and a
  per-pair seeded generator; the chosen token is then forced on both rows (one finite logit), so
  vLLM's own sampler (run greedy) just reads it off and both sequences stay identical.

A token chosen for a pair is remembered, so a partner that falls behind (scheduled in a later
step) is forced to the same tokens; steps sampled without the partner present are counted in
``runtime`` stats (``unguided_steps``) instead of failing silently. Understanding requests get
the generation vocabulary masked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

from .runtime import EXTRA_KEY, get_runtime


@dataclass
class PairState:
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    unguided_steps: int = 0


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Official AR-CFG: ``uncond + (cond - uncond) * scale``; no guidance without a partner."""
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


class MammothLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.runtime = get_runtime()
        self.pairs: dict[str, PairState] = {}
        hf = vllm_config.model_config.hf_config
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        self.gen_start = int(getattr(text, "gen_vocab_start_index", getattr(hf, "gen_vocab_start_index", 0)) or 0)

    def is_argmax_invariant(self) -> bool:
        return False

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if spec and spec.get("kind") == "plan":
            if int(spec["ar_height"]) < 1 or int(spec["ar_width"]) < 1:
                raise ValueError("ar_height and ar_width must be >= 1")

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rt = self.runtime
        with rt.lock:
            for index in batch_update.removed:
                rt.remove(index)
            for index, params, prompt_ids, output_ids in batch_update.added:
                spec = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
                rt.add(index, spec, prompt_ids, output_ids)
            for a, b, direction in batch_update.moved:
                rt.move(a, b, direction == MoveDirectionality.SWAP)
            live = {r.spec.get("pair") for r in rt.rows.values()}
            for key in [k for k in self.pairs if k not in live]:
                del self.pairs[key]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        if not rt.rows:
            return logits
        plan_rows: dict[str, dict[str, tuple[int, object]]] = {}
        for i, row in rt.rows.items():
            if i >= logits.shape[0]:
                continue
            if row.kind == "plan":
                plan_rows.setdefault(row.spec["pair"], {})[row.spec.get("role", "cond")] = (i, row)
            elif row.kind == "understand" and self.gen_start:
                logits[i, self.gen_start:] = float("-inf")
        for pair, members in plan_rows.items():
            self._apply_pair(logits, pair, members)
        return logits

    def _apply_pair(self, logits: torch.Tensor, pair: str, members: dict) -> None:
        any_row = next(iter(members.values()))[1]
        spec = any_row.spec
        state = self.pairs.get(pair)
        if state is None:
            state = self.pairs[pair] = PairState()
            state.generator = torch.Generator(device="cpu").manual_seed(int(spec.get("seed", 0)))
        h, w = int(spec["ar_height"]), int(spec["ar_width"])
        grid_len = h * (w + 1)
        cond = members.get("cond")
        uncond = members.get("uncond")
        # Rows whose position already has a chosen token (a lagging partner) are just forced.
        pending: list[tuple[str, int, int]] = []
        for role, (i, row) in members.items():
            t = len(row.output_ids)
            if t < len(state.tokens):
                _force(logits, i, state.tokens[t])
            elif t >= grid_len:
                _force(logits, i, int(spec["image_end_id"]))
            elif t % (w + 1) == w:
                state.tokens.append(int(spec["eol_id"]))
                _force(logits, i, int(spec["eol_id"]))
            else:
                pending.append((role, i, t))
        if not pending:
            return
        start, n = int(spec["visual_start"]), int(spec["num_visual"])
        t = pending[0][2]
        rows = {role: i for role, i, tt in pending if tt == t}
        scale = float(spec.get("cfg_scale", 1.0))
        c_i = rows.get("cond", rows.get("uncond"))
        u_i = rows.get("uncond") if "cond" in rows else None
        if scale > 1.0 and (cond is None or uncond is None or u_i is None):
            state.unguided_steps += 1
            spec["_unguided_steps"] = state.unguided_steps
        cond_vis = logits[c_i, start : start + n].float()
        uncond_vis = logits[u_i, start : start + n].float() if u_i is not None else None
        scores = guided_logits(cond_vis, uncond_vis, scale)
        temperature = float(spec.get("temperature", 1.0))
        if temperature <= 0:
            code = int(scores.argmax())
        else:
            scores = filter_top_k_top_p(scores / temperature, int(spec.get("top_k", 0)), float(spec.get("top_p", 1.0)))
            code = int(torch.multinomial(scores.softmax(-1), 1, generator=state.generator))
        token = start + code
        state.tokens.append(token)
        for _role, i, _t in pending:
            _force(logits, i, state.tokens[_t] if _t < len(state.tokens) else token)


def _force(logits: torch.Tensor, row: int, token: int) -> None:
    logits[row].fill_(float("-inf"))
    logits[row, token] = 0.0
