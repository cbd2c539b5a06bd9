"""Model Runner V1 logits processor: visual grid, EOL forcing, in-batch AR-CFG (``guidance``).

One instance lives next to the model in each worker and sees the whole batch. V1 hands it the
batch make-up (row -> SamplingParams, prompt ids, a live reference to the output ids) before
each forward; the model records each row's sequence length after the step (``runtime``), which
tells a row that samples from a partial prefill chunk (whose token vLLM throws away) apart from
one that really samples. Understanding requests get the generation vocabulary masked out.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

from .guidance import (
    GridGuidance,
    PlanRow,
    filter_top_k_top_p,
    gen_vocab_start,
    guided_logits,
    request_spec,
    validate_params,
)
from .runtime import get_runtime

__all__ = ["MammothLogitsProcessor", "filter_top_k_top_p", "guided_logits"]


class MammothLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.runtime = get_runtime()
        self.guidance = GridGuidance()
        self.gen_start = gen_vocab_start(vllm_config)

    def is_argmax_invariant(self) -> bool:
        return False

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_params(sampling_params)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rt = self.runtime
        with rt.lock:
            for index in batch_update.removed:
                rt.remove(index)
            for index, params, prompt_ids, output_ids in batch_update.added:
                rt.add(index, request_spec(params), prompt_ids, output_ids)
            for a, b, direction in batch_update.moved:
                rt.move(a, b, direction == MoveDirectionality.SWAP)
            self.guidance.drop({r.spec.get("pair") for r in rt.rows.values()})

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        if not rt.rows:
            return logits
        pairs: dict[str, tuple[dict, list[PlanRow]]] = {}
        for i, row in rt.rows.items():
            if i >= logits.shape[0]:
                continue
            if row.kind == "plan":
                t = len(row.output_ids)
                entry = pairs.setdefault(row.spec["pair"], (row.spec, []))
                entry[1].append(PlanRow(i, row.spec.get("role", "cond"), t, rt.samples(i, row), row.output_ids))
            elif row.kind == "understand" and self.gen_start:
                logits[i, self.gen_start:] = float("-inf")
        for spec, rows in pairs.values():
            self.guidance.step(logits, spec, rows)
        return logits
