"""vLLM model: Qwen2.5-VL with MammothModa2 generation experts (MammothModa2-Preview).

Reuses vLLM's Qwen2.5-VL vision tower (windowed attention), multimodal processor, M-RoPE and
Qwen2 decoder layers (q/k/v bias, no q/k norm); the generation parts are the shared mixins of
``gen_experts``, exactly as on the Qwen3-VL planner (``model``). Qwen2.5-VL has no deepstack.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.fusion.mm_input_norm import build_mm_input_norm
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from . import hf_processor
from .gen_experts import GenExpertLayer, GenHeadLM, GenMaskCarrier, GenVocabModel


class MammothQwen2DecoderLayer(GenExpertLayer, Qwen2DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        self.init_gen_mlp(config, quant_config, prefix)


class MammothQwen2Model(GenVocabModel, Qwen2Model):
    """Qwen2.5-VL text decoder + gen vocabulary + gen experts + hidden-state capture."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=MammothQwen2DecoderLayer)
        self.init_gen_vocab(prefix)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        gen_mask: torch.Tensor | None = None,
    ):
        return self.run_layers(input_ids, positions, intermediate_tensors, inputs_embeds, gen_mask)


class MammothQwen2ForCausalLM(GenHeadLM, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = MammothQwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.init_heads(config)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors


class MammothPreviewProcessingInfo(hf_processor.JoinedProcessorInfo, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info with the HF processor joined around vLLM's tokenizer."""

    hf_processor_name = "Qwen2_5_VLProcessor"


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLMultiModalProcessor, info=MammothPreviewProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class Mammothmoda2Qwen2_5_VLForConditionalGeneration(GenMaskCarrier, Qwen2_5_VLForConditionalGeneration):
    # Our checkpoint names are transformers' current Qwen2.5-VL names (``planner.configuration``).
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.visual.": "visual.",
            "lm_head.": "language_model.lm_head.",
            "gen_head.": "language_model.gen_head.",
            "model.language_model.": "language_model.model.",
        }
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model"):
        # The stock __init__ builds its text model through the registry under the fixed name
        # "Qwen2ForCausalLM"; this is its body with our text model built directly instead.
        super(Qwen2_5_VLForConditionalGeneration, self).__init__()
        config = vllm_config.model_config.hf_config
        multimodal_config = vllm_config.model_config.get_multimodal_config()
        self.use_data_parallel = multimodal_config.mm_encoder_tp_mode == "data"
        self.config = config
        self.model_config = vllm_config.model_config
        self.vllm_config = vllm_config
        self.multimodal_config = multimodal_config
        self.video_pruning_rate = multimodal_config.video_pruning_rate
        self.is_multimodal_pruning_enabled = multimodal_config.is_multimodal_pruning_enabled()
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.visual = Qwen2_5_VisionTransformer(
                vision_config=config.vision_config,
                norm_eps=getattr(config, "rms_norm_eps", 1e-6),
                quant_config=self.quant_config,
                input_norm=build_mm_input_norm(self.model_config),
                prefix=maybe_prefix(prefix, "visual"),
            )
        with self._mark_language_model(vllm_config):
            self.language_model = MammothQwen2ForCausalLM(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self.init_gen_mask(self.config.text_config.gen_vocab_start_index)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        gen_mask = self.gen_mask_for(input_ids, inputs_embeds)
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
            gen_mask=gen_mask,
        )
