"""HF config classes for the planner LLM (model_type ``mammothmoda2_qwen3_vl``).

They extend transformers' Qwen3-VL configs with the generation-expert keys of the official
``Mammothmoda2Qwen3VLConfig`` (``extra_gen_vocab``, ``gen_vocab_size``, ``gen_vocab_start_index``,
``moe_type``), so vLLM's Qwen3-VL multimodal processing (which checks ``isinstance(...,
Qwen3VLConfig)``) accepts them and the official code reads the same config.json.
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import (
    Qwen3VLConfig,
    Qwen3VLTextConfig,
    Qwen3VLVisionConfig,
)

MODEL_TYPE = "mammothmoda2_qwen3_vl"
ARCHITECTURE = "Mammothmoda2Qwen3VLForConditionalGeneration"
GEN_KEYS = ("extra_gen_vocab", "gen_vocab_size", "gen_vocab_start_index", "moe_type")
GEN_DEFAULTS = {"extra_gen_vocab": True, "gen_vocab_size": 32800, "gen_vocab_start_index": 152064, "moe_type": "ffn"}


class Mammothmoda2Qwen3VLVisionConfig(Qwen3VLVisionConfig):
    model_type = MODEL_TYPE
    base_config_key = "vision_config"


class Mammothmoda2Qwen3VLTextConfig(Qwen3VLTextConfig):
    model_type = "mammothmoda2_qwen3_vl_text"
    base_config_key = "text_config"

    def __init__(self, **kwargs):
        # The official config passes ``rope_scaling`` + ``rope_theta`` (transformers 4.x names).
        if "rope_parameters" not in kwargs and kwargs.get("rope_scaling") is not None:
            rope = dict(kwargs.pop("rope_scaling"))
            rope.setdefault("rope_theta", kwargs.pop("rope_theta", 5000000.0))
            kwargs["rope_parameters"] = rope
        gen = {k: kwargs.pop(k, v) for k, v in GEN_DEFAULTS.items()}
        super().__init__(**kwargs)
        for k, v in gen.items():
            setattr(self, k, v)


class Mammothmoda2Qwen3VLConfig(Qwen3VLConfig):
    model_type = MODEL_TYPE
    sub_configs = {"vision_config": Mammothmoda2Qwen3VLVisionConfig, "text_config": Mammothmoda2Qwen3VLTextConfig}

    def __init__(self, **kwargs):
        gen = {k: kwargs.pop(k, v) for k, v in GEN_DEFAULTS.items()}
        text = kwargs.get("text_config")
        if isinstance(text, dict):
            for k, v in gen.items():
                text.setdefault(k, v)
        super().__init__(**kwargs)
        for k, v in gen.items():
            setattr(self, k, v)


def register_config() -> None:
    """Make AutoConfig (used by vLLM's config loader) know the model type; idempotent."""
    for cls in (Mammothmoda2Qwen3VLConfig, Mammothmoda2Qwen3VLTextConfig):
        try:
            AutoConfig.register(cls.model_type, cls)
        except ValueError:
            pass


def moe_layer_enabled(moe_type: str, layer_idx: int) -> bool:
    """Whether decoder layer ``layer_idx`` has a ``gen_mlp`` (``"ffn"``, ``"ffn-14:28"``...)."""
    start, end = 0, float("inf")
    kind = moe_type
    if ":" in moe_type:
        kind, span = moe_type.split("-")
        lo, hi = span.split(":")
        start, end = int(lo), int(hi)
    if kind not in ("none", "attention", "ffn", "ffn_attention"):
        raise ValueError(f"unknown moe_type {moe_type!r}")
    return "ffn" in kind and start <= layer_idx < end


# --------------------------------------------------------------------- official checkpoints

OFFICIAL_PREFIX = "llm_model."  # where the planner sits in an official MammothModa2 checkpoint


def official_planner_names(names: list[str]) -> dict[str, str]:
    """Our tensor name -> the official one, for the official names under ``llm_model.``
    (the official ``Mammothmoda2Qwen3VLForConditionalGeneration`` keys are ours)."""
    return {n[len(OFFICIAL_PREFIX):]: n for n in names if n.startswith(OFFICIAL_PREFIX)}


def planner_config_from_official(llm_config: dict, *, gen_vocab: bool, dtype: str | None = None) -> dict:
    """The planner ``config.json`` from an official ``llm_config`` (MammothModa2) or a Qwen3-VL
    text encoder's config (MammothModa2.5, ``gen_vocab=False``: no generation vocabulary)."""
    config = {k: v for k, v in llm_config.items() if not k.startswith("_")}
    text = dict(config.get("text_config") or {})
    vision = dict(config.get("vision_config") or {})
    if not text or not vision:
        raise ValueError("official llm config: needs text_config and vision_config")
    gen = {k: text.get(k, config.get(k, v)) for k, v in GEN_DEFAULTS.items()}
    if not gen_vocab:
        gen.update(extra_gen_vocab=False, moe_type="none")
    text.update(gen, model_type="mammothmoda2_qwen3_vl_text")
    vision["model_type"] = MODEL_TYPE
    config.update(gen, text_config=text, vision_config=vision, architectures=[ARCHITECTURE], model_type=MODEL_TYPE)
    if dtype is not None:
        config["torch_dtype"] = dtype
    return config
