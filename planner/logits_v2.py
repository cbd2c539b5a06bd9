"""Model Runner V2 logits processor: the same grid / AR-CFG decisions as ``logits`` (``guidance``).

V2 (vLLM's default where Triton exists) keys requests by a recycled slot: ``add_request`` gets
the slot and the SamplingParams, ``apply`` gets this step's batch (``LogitsContext``: batch
position -> slot, per-request sequence length on the host). The output position and whether a
row really samples (not a partial prefill chunk) come from the runner's own per-slot prompt and
prefill lengths (host copies), so no device sync is needed to classify rows.

Kept import-light like V2's own interface module: the frontend imports it to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from .guidance import GridGuidance, PlanRow, gen_vocab_start, request_spec, validate_params

if TYPE_CHECKING:
    import torch
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState


class MammothLogitsProcessorV2(LogitsProcessor):
    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self.req_states = req_states
        self.guidance = GridGuidance()
        self.gen_start = gen_vocab_start(vllm_config)
        self.specs: dict[int, dict[str, Any]] = {}  # slot -> planning / understanding spec

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_params(sampling_params)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        spec = request_spec(sampling_params)
        if spec is None or spec.get("kind") not in ("plan", "understand"):
            self.specs.pop(req_idx, None)
            return False
        self.specs[req_idx] = spec
        self.guidance.drop({s["pair"] for s in self.specs.values() if "pair" in s})
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.specs:
            return logits
        slots = ctx.idx_mapping_np
        if logits.shape[0] != len(slots):
            raise RuntimeError("the mammoth planner does not support speculative decoding (one logits row per request)")
        prompt_len = self.req_states.prompt_len.np
        prefill_len = self.req_states.prefill_len.np
        pairs: dict[str, tuple[dict, list[PlanRow]]] = {}
        for b, slot in enumerate(slots.tolist()):
            spec = self.specs.get(slot)
            if spec is None:
                continue
            if spec.get("kind") == "understand":
                if self.gen_start:
                    logits[b, self.gen_start:] = float("-inf")
                continue
            seq_len = int(ctx.seq_lens_upper_bound_np[b])
            row = PlanRow(b, spec.get("role", "cond"), seq_len - int(prompt_len[slot]), seq_len >= int(prefill_len[slot]))
            pairs.setdefault(spec["pair"], (spec, []))[1].append(row)
        for spec, rows in pairs.values():
            self.guidance.step(logits, spec, rows)
        return logits
