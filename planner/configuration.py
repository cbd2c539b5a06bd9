"""HF config classes for the planner LLMs: one per backbone, one architecture each.

* ``mammothmoda2_qwen3_vl`` (MammothModa2-Dev, 2.5's prompt encoder): transformers' Qwen3-VL
  configs plus the generation-expert keys of the official ``Mammothmoda2Qwen3VLConfig``.
* ``mammothmoda2_qwen2_5_vl`` (MammothModa2-Preview): transformers' Qwen2.5-VL configs plus the
  same keys, as the official ``Mammothmoda2Qwen2_5_VLConfig`` (``qwen25vl`` branch) has them.

The generation keys are ``extra_gen_vocab``, ``gen_vocab_size``, ``gen_vocab_start_index`` and
``moe_type``. Subclassing the stock configs keeps vLLM's multimodal processing (which checks
``isinstance(..., Qwen3VLConfig / Qwen2_5_VLConfig)``) working, and the official code reads
the same config.json.
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen3_vl.configuration_qwen3_vl import (
    Qwen3VLConfig,
    Qwen3VLTextConfig,
    Qwen3VLVisionConfig,
)

MODEL_TYPE = "mammothmoda2_qwen3_vl"
ARCHITECTURE = "Mammothmoda2Qwen3VLForConditionalGeneration"
QWEN25_MODEL_TYPE = "mammothmoda2_qwen2_5_vl"
QWEN25_ARCHITECTURE = "Mammothmoda2Qwen2_5_VLForConditionalGeneration"
# Architecture -> the vLLM model class implementing it (``module:Class``), for the plugin.
ARCHITECTURES = {
    ARCHITECTURE: "planner.model:Mammothmoda2Qwen3VLForConditionalGeneration",
    QWEN25_ARCHITECTURE: "planner.model_qwen25:Mammothmoda2Qwen2_5_VLForConditionalGeneration",
}
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


class Mammothmoda2Qwen2_5_VLVisionConfig(Qwen2_5_VLVisionConfig):
    model_type = QWEN25_MODEL_TYPE
    base_config_key = "vision_config"


class Mammothmoda2Qwen2_5_VLTextConfig(Qwen2_5_VLTextConfig):
    model_type = "mammothmoda2_qwen2_5_vl_text"
    base_config_key = "text_config"

    def __init__(self, **kwargs):
        gen = {k: kwargs.pop(k, v) for k, v in GEN_DEFAULTS.items()}
        super().__init__(**kwargs)
        for k, v in gen.items():
            setattr(self, k, v)


class Mammothmoda2Qwen2_5_VLConfig(Qwen2_5_VLConfig):
    """The nested form (``text_config``); ``planner_config_from_official`` nests a flat one."""

    model_type = QWEN25_MODEL_TYPE
    sub_configs = {"vision_config": Mammothmoda2Qwen2_5_VLVisionConfig,
                   "text_config": Mammothmoda2Qwen2_5_VLTextConfig}

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
    """Make AutoConfig (used by vLLM's config loader) know the model types; idempotent."""
    for cls in (Mammothmoda2Qwen3VLConfig, Mammothmoda2Qwen3VLTextConfig,
                Mammothmoda2Qwen2_5_VLConfig, Mammothmoda2Qwen2_5_VLTextConfig):
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
# Checkpoints saved by transformers < 4.52 (or with its legacy key mapping) name the Qwen2.5-VL
# parts as the official ``_checkpoint_conversion_mapping`` lists them: legacy prefix -> ours.
QWEN25_LEGACY_PREFIXES = {"visual.": "model.visual.", "model.": "model.language_model."}
# Keys of transformers' Qwen2.5-VL text config: what a flat official ``llm_config`` (the text
# keys at the top level, the official config class's backward-compatible form) nests.
QWEN25_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
)


def official_planner_names(names: list[str], *, qwen25_legacy: bool = False) -> dict[str, str]:
    """Our tensor name -> the official one, for the official names under ``llm_model.``
    (the official ``Mammothmoda2Qwen3VLForConditionalGeneration`` / ``...Qwen2_5_VL...`` keys
    are ours; ``qwen25_legacy`` also accepts the legacy Qwen2.5-VL names)."""
    out: dict[str, str] = {}
    for name in names:
        if not name.startswith(OFFICIAL_PREFIX):
            continue
        ours = name[len(OFFICIAL_PREFIX):]
        if qwen25_legacy and not ours.startswith(("model.language_model.", "model.visual.")):
            for legacy, new in QWEN25_LEGACY_PREFIXES.items():
                if ours.startswith(legacy):
                    ours = new + ours[len(legacy):]
                    break
        if ours in out:
            raise ValueError(f"official tensors '{out[ours]}' and '{name}' are the same planner tensor '{ours}'")
        out[ours] = name
    return out


def planner_config_from_official(llm_config: dict, *, gen_vocab: bool, dtype: str | None = None) -> dict:
    """The planner ``config.json`` from an official ``llm_config`` (MammothModa2-Dev: Qwen3-VL;
    -Preview: Qwen2.5-VL, nested or flat) or a Qwen3-VL text encoder's config (MammothModa2.5,
    ``gen_vocab=False``: no generation vocabulary)."""
    config = {k: v for k, v in llm_config.items() if not k.startswith("_")}
    qwen25 = config.get("model_type") in (QWEN25_MODEL_TYPE, "qwen2_5_vl")
    text = dict(config.get("text_config") or {})
    if qwen25 and not text:  # flat form
        text = {k: config.pop(k) for k in QWEN25_TEXT_KEYS if k in config}
    vision = dict(config.get("vision_config") or {})
    if not text or not vision:
        raise ValueError("official llm config: needs text_config and vision_config")
    gen = {k: text.get(k, config.get(k, v)) for k, v in GEN_DEFAULTS.items()}
    if gen["gen_vocab_start_index"] is None:  # the official default: right after the text vocabulary
        gen["gen_vocab_start_index"] = int(text["vocab_size"])
    if not gen_vocab:
        gen.update(extra_gen_vocab=False, moe_type="none")
    if "attention" in str(gen["moe_type"]):
        raise ValueError(f"official llm config: moe_type {gen['moe_type']!r} has attention experts, "
                         "which the planner does not implement")
    model_type, architecture = (QWEN25_MODEL_TYPE, QWEN25_ARCHITECTURE) if qwen25 else (MODEL_TYPE, ARCHITECTURE)
    text.update(gen, model_type=f"{model_type}_text")
    vision["model_type"] = model_type
    config.update(gen, text_config=text, vision_config=vision, architectures=[architecture], model_type=model_type)
    if dtype is not None:
        config["torch_dtype"] = dtype
    return config
