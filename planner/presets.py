"""Planner presets: HF config dicts, parameter counts and random-weight checkpoints.

``stage_config(preset)`` is the ``config.json`` of the planner LLM, in the layout of the official
``Mammothmoda2Qwen3VLConfig`` (architecture ``Mammothmoda2Qwen3VLForConditionalGeneration``) or,
for the Preview presets, ``Mammothmoda2Qwen2_5_VLConfig`` (Qwen2.5-VL backbone), so the same
directory loads in vLLM (through ``planner.plugin``) and in the official code.
``vocab_size`` equals ``gen_vocab_start_index`` so that logit index == token id.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .configuration import ARCHITECTURE, MODEL_TYPE, QWEN25_ARCHITECTURE, QWEN25_MODEL_TYPE
from .tokens import CHAT_TEMPLATE, TokenLayout, write_tokenizer

DEFAULT_CONDITION_LAYERS = [-2, -5, -8, -11, -14, -17]

_TINY_TEXT = dict(
    vocab_size=152064,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=18,  # >= 17 so the official condition layers [-2 ... -17] exist
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # vLLM's CPU attention needs head_dim >= 32
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=5000000.0,
    rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
    attention_bias=False,
    tie_word_embeddings=False,
)
_TINY_VISION = dict(
    depth=2,
    hidden_size=64,
    hidden_act="gelu_pytorch_tanh",
    intermediate_size=128,
    num_heads=2,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=128,
    num_position_embeddings=256,
    deepstack_visual_indexes=[1],
)
_8B_TEXT = dict(
    vocab_size=152064,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    rope_theta=5000000.0,
    rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    attention_bias=False,
    tie_word_embeddings=False,
)
_8B_VISION = dict(
    depth=27,
    hidden_size=1152,
    hidden_act="gelu_pytorch_tanh",
    intermediate_size=4304,
    num_heads=16,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=4096,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
)

# MammothModa2-Preview: Qwen2.5-VL (q/k/v bias, sectioned M-RoPE, windowed ViT, patch 14).
_TINY_TEXT_25 = dict(
    vocab_size=152064,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=18,
    num_attention_heads=4,  # head_dim 32 = hidden / heads (Qwen2 has no head_dim key)
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6]},
    use_sliding_window=False,
    tie_word_embeddings=False,
)
_TINY_VISION_25 = dict(
    depth=2,
    hidden_size=64,
    hidden_act="silu",
    intermediate_size=128,
    num_heads=2,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    window_size=56,
    out_hidden_size=128,
    fullatt_block_indexes=[1],
)
_7B_TEXT_25 = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    hidden_act="silu",
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]},
    use_sliding_window=False,
    tie_word_embeddings=False,
)
_7B_VISION_25 = dict(
    depth=32,
    hidden_size=1280,
    hidden_act="silu",
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    window_size=112,
    out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
)


def _config(text: dict, vision: dict, *, moe_type: str, gen: bool, qwen25: bool = False, **extra: Any) -> dict:
    gen_keys = {
        "extra_gen_vocab": gen,
        "gen_vocab_size": 32800,
        "gen_vocab_start_index": 152064,
        "moe_type": moe_type if gen else "none",
    }
    model_type = QWEN25_MODEL_TYPE if qwen25 else MODEL_TYPE
    return {
        "architectures": [QWEN25_ARCHITECTURE if qwen25 else ARCHITECTURE],
        "model_type": model_type,
        "text_config": {**copy.deepcopy(text), **gen_keys, "model_type": f"{model_type}_text"},
        "vision_config": {**copy.deepcopy(vision), "model_type": model_type},
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        **gen_keys,
        **extra,
    }


PRESETS: dict[str, dict] = {
    # Tiny random-weight planner for tests / CPU: gen experts from layer 2 on (a range, like
    # the paper's "from layer 14"), so both routing paths run.
    "tiny-mammoth2": _config(_TINY_TEXT, _TINY_VISION, moe_type="ffn-2:18", gen=True, torch_dtype="float32", dtype="float32"),
    # 2.5 uses the planner only as prompt encoder; the gen experts are not needed.
    "tiny-mammoth25": _config(_TINY_TEXT, _TINY_VISION, moe_type="none", gen=True, torch_dtype="float32", dtype="float32"),
    # README: "Qwen3VL-8B + 3B gen experts" = FFN experts in layers 14..35 (the paper's ablation).
    "mammoth2-dev": _config(_8B_TEXT, _8B_VISION, moe_type="ffn-14:36", gen=True),
    "mammoth25-6b-a1b": _config(_8B_TEXT, _8B_VISION, moe_type="none", gen=True),
    "mammoth25-20b-a3b": _config(_8B_TEXT, _8B_VISION, moe_type="none", gen=True),
    # MammothModa2-Preview: gen experts from layer 2 on (tiny), from layer 14 on (real size:
    # Qwen2.5-VL-7B has 28 layers; 14 FFN experts of 3x3584x18944 are its ~3B gen experts).
    "tiny-mammoth2-preview": _config(_TINY_TEXT_25, _TINY_VISION_25, moe_type="ffn-2:18", gen=True, qwen25=True,
                                     torch_dtype="float32", dtype="float32"),
    "mammoth2-preview": _config(_7B_TEXT_25, _7B_VISION_25, moe_type="ffn-14:28", gen=True, qwen25=True),
}
# The official Preview code conditions the DiT on the planner's last (normed) hidden state.
PREVIEW_CONDITION_LAYERS = [-1]
# Planner-side settings of each preset that are not HF config keys.
PLANNER_SETTINGS: dict[str, dict] = {
    "tiny-mammoth2": {"mode": "mammoth2", "condition_layers": DEFAULT_CONDITION_LAYERS},
    "tiny-mammoth25": {"mode": "mammoth25", "prompt_max_length": 512},
    "mammoth2-dev": {"mode": "mammoth2", "condition_layers": DEFAULT_CONDITION_LAYERS},
    "mammoth25-6b-a1b": {"mode": "mammoth25", "prompt_max_length": 512},
    "mammoth25-20b-a3b": {"mode": "mammoth25", "prompt_max_length": 512},
    "tiny-mammoth2-preview": {"mode": "mammoth2", "condition_layers": PREVIEW_CONDITION_LAYERS},
    "mammoth2-preview": {"mode": "mammoth2", "condition_layers": PREVIEW_CONDITION_LAYERS},
}


def stage_config(preset: str) -> dict:
    if preset not in PRESETS:
        raise KeyError(f"unknown planner preset {preset!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])


def count_parameters(preset: str) -> dict[str, int]:
    """Parameters on the meta device.

    ``active`` = what one *text* token touches: everything except the gen experts
    (``gen_mlp``), the generation embedding/head and the vision tower. (A visual token touches
    ``gen_mlp`` instead of ``mlp`` in the expert layers, the same count in total.)
    """
    from .reference import ReferencePlanner

    with torch.device("meta"):
        model = ReferencePlanner(stage_config(preset))
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".gen_mlp." in name or "gen_embed_tokens" in name or name.startswith("gen_head") or ".visual." in name:
            continue
        active += p.numel()
    return {"total": total, "active": active}


def generation_config(layout: TokenLayout) -> dict:
    """The official ``t2i_generation_config.json`` keys (scope end is a *count*, as there)."""
    return {
        "visual_token_start_id": layout.visual_start_id,
        "visual_token_end_id": layout.num_visual_codes,
        "eol_token_id": layout.eol_id,
        "image_start_token_id": layout.image_start_id,
        "image_end_token_id": layout.image_end_id,
        "image_token_token_id": layout.image_token_id,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
    }


def write_random_checkpoint(preset: str, directory: str | Path, seed: int = 0) -> Path:
    """config.json + model.safetensors + tokenizer + processor + generation configs.

    Deterministic per seed (weights drawn on CPU from one generator, in parameter order).
    """
    from .reference import ReferencePlanner

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = stage_config(preset)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = ReferencePlanner(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            t = torch.ones_like(p) + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias") and not name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            t = torch.zeros_like(p)  # (Qwen2.5-VL's q/k/v biases are drawn: their loading is checked)
        else:
            t = 0.02 * torch.randn(p.shape, generator=gen)
            if "embed_tokens" in name or name.endswith("_head.weight"):
                t = t * 5.0  # well separated logits: greedy checks are not decided by rounding
        tensors[name] = t.to(torch.float32 if config.get("torch_dtype") == "float32" else torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    layout = TokenLayout(config["gen_vocab_start_index"], config["gen_vocab_size"])
    write_tokenizer(layout, directory)
    gcfg = generation_config(layout)
    (directory / "t2i_generation_config.json").write_text(json.dumps(gcfg, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [151645, 151643], "pad_token_id": 151643}, indent=2)
    )
    v = config["vision_config"]
    qwen25 = config["model_type"] == QWEN25_MODEL_TYPE
    proc = {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen2_5_VLProcessor" if qwen25 else "Qwen3VLProcessor",
        "patch_size": v["patch_size"],
        "temporal_patch_size": v["temporal_patch_size"],
        "merge_size": v["spatial_merge_size"],
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}
        if preset.startswith("tiny")
        else {"shortest_edge": 65536, "longest_edge": 16777216},
    }
    if qwen25:  # Qwen2.5-VL's processor: CLIP normalisation, 28-px merged patches
        proc.update(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
        if not preset.startswith("tiny"):
            proc["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    (directory / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))
    video = {**proc, "video_processor_type": "Qwen2VLVideoProcessor" if qwen25 else "Qwen3VLVideoProcessor",
             "fps": 2, "do_sample_frames": True}
    video.pop("image_processor_type")
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (directory / "planner_settings.json").write_text(json.dumps(PLANNER_SETTINGS[preset], indent=2))
    return directory
