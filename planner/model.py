"""vLLM model: Qwen3-VL with MammothModa2 generation experts (out-of-tree, registered by the plugin).

Reuses vLLM's Qwen3-VL vision tower, multimodal processor and attention; the generation parts
(``gen_mlp`` routing, ``gen_embed_tokens`` / ``gen_head`` with grid rows computing only
``gen_head``, hidden-state export in the generating pass, the routing mask carried across the
embeddings path) are the shared mixins of ``gen_experts``. This file only stacks them on the
Qwen3-VL classes and adds Qwen3-VL's deepstack features to the layer loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.models.qwen3_vl import (
    Qwen3LLMForCausalLM,
    Qwen3LLMModel,
    Qwen3VLDecoderLayer,
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from . import hf_processor
from .gen_experts import GenExpertLayer, GenHeadLM, GenMaskCarrier, GenVocabModel


class MammothDecoderLayer(GenExpertLayer, Qwen3VLDecoderLayer):
    def __init__(self, *, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        self.init_gen_mlp(config, quant_config, prefix)


class MammothLLMModel(GenVocabModel, Qwen3LLMModel):
    """Qwen3-VL text decoder + gen vocabulary + gen experts + hidden-state capture."""

    decoder_layer_type = MammothDecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.init_gen_vocab(prefix)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        deepstack_input_embeds: IntermediateTensors | None = None,
        gen_mask: torch.Tensor | None = None,
    ):
        return self.run_layers(input_ids, positions, intermediate_tensors, inputs_embeds, gen_mask,
                               deepstack_input_embeds)


class MammothLLMForCausalLM(GenHeadLM, Qwen3LLMForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = MammothLLMModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.init_heads(config)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors


class MammothProcessingInfo(hf_processor.JoinedProcessorInfo, Qwen3VLProcessingInfo):
    """Qwen3-VL's processing info; the HF processor is joined around vLLM's tokenizer instead
    of reloading it (``hf_processor``: ~25 s of each planner start)."""

    hf_processor_name = "Qwen3VLProcessor"


@MULTIMODAL_REGISTRY.register_processor(
    Qwen3VLMultiModalProcessor, info=MammothProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class Mammothmoda2Qwen3VLForConditionalGeneration(GenMaskCarrier, Qwen3VLForConditionalGeneration):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.visual.": "visual.",
            "lm_head.": "language_model.lm_head.",
            "gen_head.": "language_model.gen_head.",
            "model.language_model.": "language_model.model.",
        }
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model"):
        # Build the stock Qwen3-VL (vision tower, deepstack buffers), then swap the text model.
        import vllm.model_executor.models.qwen3_vl as q3

        original = q3.Qwen3LLMForCausalLM
        q3.Qwen3LLMForCausalLM = MammothLLMForCausalLM
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            q3.Qwen3LLMForCausalLM = original
        assert isinstance(self.language_model, MammothLLMForCausalLM)
        self.init_gen_mask(self.config.text_config.gen_vocab_start_index)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        gen_mask = self.gen_mask_for(input_ids, inputs_embeds)
        if intermediate_tensors is not None:
            inputs_embeds = None
        deepstack = None
        if inputs_embeds is not None and get_pp_group().is_first_rank:
            deepstack = self._get_deepstack_input_embeds(inputs_embeds.size(0))
        hidden = self.language_model.model(
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
            deepstack_input_embeds=deepstack,
            gen_mask=gen_mask,
        )
        if inputs_embeds is not None and get_pp_group().is_first_rank:
            self._clear_deepstack_input_embeds(inputs_embeds.size(0))
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(weights)
