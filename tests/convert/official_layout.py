"""Tiny checkpoints in the official layouts, named from the official module structure.

The names are spelled out here from the official code's modules (``Transformer2DModel``'s
Lumina blocks, ``SimpleQFormerImageEmbedder``, ``VQVitModel2DPlus_AIMv2``, the MammothModa2.5
``WanTransformer3DModel`` with its MoE and refiner), not from this project's modules, so a
converter test proves our names meet theirs. Third-party parts the official code takes as is
(transformers' Qwen3-VL, diffusers' VAEs) are named by those libraries.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from planner.presets import stage_config as planner_stage_config
from planner.tokens import IMAGE_MARKERS, NUM_VISUAL_CODES, _qwen_tiktoken_path, visual_token, write_tokenizer
from vae_worker.presets import build_model
from vae_worker.presets import stage_config as vae_stage_config

# Tiny sizes (the same the tiny presets use, so converted models run through the tiny stack).
DIT2 = dict(patch_size=2, in_channels=16, hidden_size=128, num_layers=2, num_refiner_layers=1,
            num_attention_heads=4, num_kv_heads=2, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
            axes_dim_rope=[8, 12, 12], axes_lens=[1024, 256, 256], text_feat_dim=128, timestep_scale=1.0)
QFORMER = {"num_queries": 8, "num_layers": 2}
LLM_HIDDEN = 128
GEN_DIT_T2I = {"visual_token_start_id": 152072, "visual_token_end_id": NUM_VISUAL_CODES, "eol_token_id": 152064,
               "image_start_token_id": 152069, "do_sample": True, "temperature": 0.9, "top_k": 2048, "top_p": 0.95}
TOK_EMBED, TOK_MLP, TOK_BLOCKS, TOK_CODES = 64, 96, 2, 512


def _lumina_block(prefix: str, d: int, heads: int, kv: int, ffn: int, modulated: bool) -> dict:
    hd = d // heads
    names = {f"{prefix}.attn.to_q.weight": (d, d), f"{prefix}.attn.to_k.weight": (kv * hd, d),
             f"{prefix}.attn.to_v.weight": (kv * hd, d), f"{prefix}.attn.to_out.0.weight": (d, d),
             f"{prefix}.attn.norm_q.weight": (hd,), f"{prefix}.attn.norm_k.weight": (hd,),
             f"{prefix}.feed_forward.linear_1.weight": (ffn, d), f"{prefix}.feed_forward.linear_2.weight": (d, ffn),
             f"{prefix}.feed_forward.linear_3.weight": (ffn, d), f"{prefix}.ffn_norm1.weight": (d,),
             f"{prefix}.norm2.weight": (d,), f"{prefix}.ffn_norm2.weight": (d,)}
    if modulated:  # LuminaRMSNormZero: a SiLU-Linear to 4 x d, then the RMSNorm
        names.update({f"{prefix}.norm1.linear.weight": (4 * d, min(d, 1024)), f"{prefix}.norm1.linear.bias": (4 * d,),
                      f"{prefix}.norm1.norm.weight": (d,)})
    else:
        names[f"{prefix}.norm1.weight"] = (d,)
    return names


def _lumina_ffn(d: int, multiple_of: int = 256) -> int:
    """The official ``LuminaFeedForward`` inner size for ``inner_dim = 4 * d``."""
    return multiple_of * ((4 * d + multiple_of - 1) // multiple_of)


def _qformer_shapes(prefix: str, d: int, llm: int, num_queries: int, num_layers: int) -> dict:
    """The official QFormer (``SimpleQFormerImageEmbedder`` / ``...Refiner``): inputs of width
    ``llm`` projected to ``d``, learned queries of width ``d``."""
    ffn = _lumina_ffn(d)
    s = {f"{prefix}.query": (1, num_queries, d), f"{prefix}.input_proj.0.weight": (llm,),
         f"{prefix}.input_proj.1.weight": (d, llm), f"{prefix}.input_proj.1.bias": (d,)}
    for i in range(num_layers):
        q = f"{prefix}.layers.{i}"
        for attn in ("self_attn", "cross_attn"):
            s.update({f"{q}.{attn}.in_proj_weight": (3 * d, d), f"{q}.{attn}.in_proj_bias": (3 * d,),
                      f"{q}.{attn}.out_proj.weight": (d, d), f"{q}.{attn}.out_proj.bias": (d,)})
        s.update({f"{q}.ln_q1.weight": (d,), f"{q}.ln_q2.weight": (d,), f"{q}.ln_ffn.weight": (d,),
                  f"{q}.ffn.linear_1.weight": (ffn, d), f"{q}.ffn.linear_2.weight": (d, ffn),
                  f"{q}.ffn.linear_3.weight": (ffn, d)})
    return s


def official_dit2_shapes(dit: dict | None = None, *, image_embedder: bool = True) -> dict[str, tuple[int, ...]]:
    """``gen_transformer.*`` of an official MammothModa2 checkpoint for ``dit`` (``DIT2``); the
    Preview's has no ``image_embedder`` (its QFormer sits beside the transformer)."""
    dit = dit or DIT2
    d, p, c = dit["hidden_size"], dit["patch_size"], dit["in_channels"]
    heads, kv, t = dit["num_attention_heads"], dit["num_kv_heads"], min(d, 1024)
    ffn = _lumina_ffn(d, dit["multiple_of"])
    s = {"x_embedder.weight": (d, p * p * c), "x_embedder.bias": (d,),
         "ref_image_patch_embedder.weight": (d, p * p * c), "ref_image_patch_embedder.bias": (d,),
         "image_index_embedding": (5, d),
         "time_caption_embed.timestep_embedder.linear_1.weight": (t, 256),
         "time_caption_embed.timestep_embedder.linear_1.bias": (t,),
         "time_caption_embed.timestep_embedder.linear_2.weight": (t, t),
         "time_caption_embed.timestep_embedder.linear_2.bias": (t,),
         # reinit_caption_embedder: RMSNorm + Linear(llm hidden -> d)
         "time_caption_embed.caption_embedder.0.weight": (LLM_HIDDEN,),
         "time_caption_embed.caption_embedder.1.weight": (d, LLM_HIDDEN),
         "time_caption_embed.caption_embedder.1.bias": (d,),
         "norm_out.linear_1.weight": (d, t), "norm_out.linear_1.bias": (d,),
         "norm_out.linear_2.weight": (p * p * c, d), "norm_out.linear_2.bias": (p * p * c,)}
    if image_embedder:  # reinit_image_embedder: SimpleQFormerImageEmbedder at the DiT width
        s.update(_qformer_shapes("time_caption_embed.image_embedder", d, LLM_HIDDEN, **QFORMER))
    for group, n, modulated in (("noise_refiner", dit["num_refiner_layers"], True),
                                ("ref_image_refiner", dit["num_refiner_layers"], True),
                                ("context_refiner", dit["num_refiner_layers"], False),
                                ("layers", dit["num_layers"], True)):
        for i in range(n):
            s.update(_lumina_block(f"{group}.{i}", d, heads, kv, ffn, modulated))
    return {"gen_transformer." + k: v for k, v in s.items()}


def official_mammothtok_shapes() -> dict[str, tuple[int, ...]]:
    """``gen_tokenizer.image_tokenizer.*``: the AIMv2 encoder, VQ, and (ignored) decoder parts."""
    e, h = TOK_EMBED, TOK_MLP
    s = {"encoder.preprocessor.patchifier.proj.weight": (e, 3, 14, 14),
         "encoder.preprocessor.patchifier.proj.bias": (e,),
         "encoder.preprocessor.patchifier.norm.weight": (e,),
         "encoder.trunk.post_trunk_norm.weight": (e,),
         "quant_conv.weight": (8, e, 1, 1), "quant_conv.bias": (8,),
         "quantize.embedding.weight": (TOK_CODES, 8),
         "post_quant_conv.weight": (e, 8, 1, 1), "post_quant_conv.bias": (e,),
         "s2ddecoder.decoder_embed.weight": (e, e), "decoder.conv_in.weight": (32, e, 3, 3)}
    for i in range(TOK_BLOCKS):
        b = f"encoder.trunk.blocks.{i}"
        s.update({f"{b}.attn.qkv.weight": (3 * e, e), f"{b}.attn.proj.weight": (e, e), f"{b}.norm_1.weight": (e,),
                  f"{b}.mlp.fc1.weight": (h, e), f"{b}.mlp.fc2.weight": (e, h), f"{b}.mlp.fc3.weight": (h, e),
                  f"{b}.norm_2.weight": (e,)})
    return {"gen_tokenizer.image_tokenizer." + k: v for k, v in s.items()}


def _llm_config() -> dict:
    """An official ``llm_config`` (``Mammothmoda2Qwen3VLConfig`` keys) for the tiny planner."""
    config = copy.deepcopy(planner_stage_config("tiny-mammoth2"))
    config.pop("architectures", None)
    return config


def official_llm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """``llm_model.*``: transformers' Qwen3-VL names plus the official generation parts."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = {k: v for k, v in config["text_config"].items() if k != "model_type"}
    vision = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision))
    s = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, g, inter = text["hidden_size"], config["gen_vocab_size"], text["intermediate_size"]
    s["model.language_model.gen_embed_tokens.weight"] = (g, d)
    s["gen_head.weight"] = (g, d)
    lo, hi = (int(x) for x in config["moe_type"].split("-")[1].split(":"))
    for i in range(lo, min(hi, text["num_hidden_layers"])):
        base = f"model.language_model.layers.{i}.gen_mlp"
        s.update({f"{base}.gate_proj.weight": (inter, d), f"{base}.up_proj.weight": (inter, d),
                  f"{base}.down_proj.weight": (d, inter)})
    return {"llm_model." + k: v for k, v in s.items()}


def _vae_shapes(config: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {prefix + k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: 0.05 * torch.randn(shape, generator=g) for name, shape in sorted(shapes.items())}


def _save_sharded(tensors: dict[str, torch.Tensor], directory: Path, stem: str, shards: int) -> None:
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _write_official_tokenizer(directory: Path, gen_size: int, start: int) -> None:
    """``MammothUTokenizer`` files and the T2I generation config (the same in -Dev and -Preview)."""
    shutil.copyfile(_qwen_tiktoken_path(), directory / "mammothu.tiktoken")
    lines = list(IMAGE_MARKERS) + [visual_token(i) for i in range(NUM_VISUAL_CODES)]
    lines += [f"<|reserved visual {i}|>" for i in range(gen_size - 5 - len(lines))]
    (directory / "mammothu_vision_tokens.txt").write_text("\n".join(lines) + "\n")
    assert start + 5 + 3 == GEN_DIT_T2I["visual_token_start_id"]
    (directory / "t2i_generation_config.json").write_text(json.dumps(GEN_DIT_T2I))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MammothUTokenizer"}))


def write_official_mammothmoda2(directory: Path, *, extra: dict[str, tuple[int, ...]] | None = None,
                                drop: tuple[str, ...] = (), seed: int = 0) -> dict[str, torch.Tensor]:
    """An official MammothModa2-Dev-layout folder; returns the tensors written."""
    directory.mkdir(parents=True, exist_ok=True)
    llm = _llm_config()
    vae = {k: v for k, v in vae_stage_config("tiny-mammoth2").items() if k != "_class_name"}
    config = {"architectures": ["Mammothmoda2Model"], "model_type": "mammothmoda2", "torch_dtype": "float32",
              "llm_config": llm, "gen_vae_config": {"_class_name": "AutoencoderKL", **vae},
              "gen_dit_config": {"_class_name": "Transformer2DModel", **DIT2},
              "gen_image_condition_refiner_config": QFORMER, "gen_condition_mode": "text_image",
              "gen_condition_layers": [-2, -4, -6, -8], "gen_axes_dim_rope": [40, 40, 40]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {**official_llm_shapes(llm), **official_dit2_shapes(), **official_mammothtok_shapes(),
              **_vae_shapes(vae_stage_config("tiny-mammoth2"), "gen_vae."), **(extra or {})}
    for name in drop:
        shapes.pop(name)
    tensors = _random(shapes, seed)
    _save_sharded(tensors, directory, "model", shards=3)
    _write_official_tokenizer(directory, llm["gen_vocab_size"], llm["gen_vocab_start_index"])
    vision = llm["vision_config"]  # the Qwen3-VL image processor of the checkpoint, tiny sizes
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
        "patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"], "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}}))
    return tensors


# --------------------------------------------------------------------------- MammothModa2-Preview

# The Preview's DiT is narrower than its planner here (64 vs 128), as in the tiny preset.
DIT2P = {**DIT2, "hidden_size": 64, "num_attention_heads": 2, "num_kv_heads": 1}
QWEN25_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                    "rope_scaling", "use_sliding_window", "tie_word_embeddings")


def _qwen25_llm_config(flat: bool) -> dict:
    """An official ``Mammothmoda2Qwen2_5_VLConfig`` dict for the tiny Preview planner: nested
    (``text_config``, what the config class serialises) or flat (text keys at the top level,
    which the official class also accepts)."""
    config = copy.deepcopy(planner_stage_config("tiny-mammoth2-preview"))
    config.pop("architectures", None)
    if flat:
        text = config.pop("text_config")
        config.update({k: text[k] for k in QWEN25_TEXT_KEYS if k in text})
    return config


def official_qwen25_llm_shapes(config: dict, *, legacy: bool = False) -> dict[str, tuple[int, ...]]:
    """``llm_model.*``: transformers' Qwen2.5-VL names plus the official generation parts
    (``legacy``: the pre-4.52 names ``visual.*`` / ``model.*`` the official mapping converts)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {k: v for k, v in (config.get("text_config") or config).items() if k in QWEN25_TEXT_KEYS}
    vision = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    s = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, g, inter = text["hidden_size"], config["gen_vocab_size"], text["intermediate_size"]
    s["model.language_model.gen_embed_tokens.weight"] = (g, d)
    s["gen_head.weight"] = (g, d)
    lo, hi = (int(x) for x in config["moe_type"].split("-")[1].split(":"))
    for i in range(lo, min(hi, text["num_hidden_layers"])):
        base = f"model.language_model.layers.{i}.gen_mlp"
        s.update({f"{base}.gate_proj.weight": (inter, d), f"{base}.up_proj.weight": (inter, d),
                  f"{base}.down_proj.weight": (d, inter)})
    if legacy:
        s = {("visual." + k[len("model.visual."):] if k.startswith("model.visual.") else
              "model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
             for k, v in s.items()}
    return {"llm_model." + k: v for k, v in s.items()}


def official_preview_refiner_shapes() -> dict[str, tuple[int, ...]]:
    """``gen_image_condition_refiner.*``: the Preview's ``SimpleQFormerImageRefiner``, at the
    planner width (its ``hidden_size`` is the LLM's)."""
    return _qformer_shapes("gen_image_condition_refiner", LLM_HIDDEN, LLM_HIDDEN, **QFORMER)


def write_official_mammothmoda2_preview(directory: Path, *, flat_llm_config: bool = False,
                                        legacy_names: bool = False, extra: dict | None = None,
                                        drop: tuple[str, ...] = (), seed: int = 0) -> dict[str, torch.Tensor]:
    """An official MammothModa2-Preview-layout folder (``qwen25vl`` branch); returns the tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    llm = _qwen25_llm_config(flat_llm_config)
    vae = {k: v for k, v in vae_stage_config("tiny-mammoth2").items() if k != "_class_name"}
    config = {"architectures": ["Mammothmoda2Model"], "model_type": "mammothmoda2", "torch_dtype": "float32",
              "llm_config": llm, "gen_vae_config": {"_class_name": "AutoencoderKL", **vae},
              "gen_dit_config": {"_class_name": "Transformer2DModel", **DIT2P},
              "gen_image_condition_refiner_config": QFORMER, "gen_condition_mode": "text_image",
              "gen_axes_dim_rope": [40, 40, 40]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {**official_qwen25_llm_shapes(llm, legacy=legacy_names),
              **official_dit2_shapes(DIT2P, image_embedder=False), **official_preview_refiner_shapes(),
              **_vae_shapes(vae_stage_config("tiny-mammoth2"), "gen_vae."), **(extra or {})}
    for name in drop:
        shapes.pop(name)
    tensors = _random(shapes, seed)
    _save_sharded(tensors, directory, "model", shards=3)
    _write_official_tokenizer(directory, llm["gen_vocab_size"], llm["gen_vocab_start_index"])
    vision = llm["vision_config"]  # the Qwen2.5-VL image processor of the checkpoint, tiny sizes
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"], "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "min_pixels": 56 * 56, "max_pixels": 256 * 256}))
    return tensors


# ------------------------------------------------------------------------------ MammothModa2.5

WAN = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
           text_dim=128, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
           rope_max_seq_len=256, pos_embed_seq_len=None, enable_byt5=False)
MOE = dict(num_layers=2, hidden_size=128, num_attention_heads=2, ffn_hidden_size=96, num_moe_experts=8,
           moe_router_topk=2, num_shared_experts=1, shared_expert_intermediate_size=64)
REFINER = dict(vlm_dim=128, transformer_config={"hidden_size": 128, "num_heads": 8, "ffn_dim": 128})


def official_wan_shapes(byt5: bool = False) -> dict[str, tuple[int, ...]]:
    """``transformer/`` of an official MammothModa2.5 checkpoint for ``WAN`` / ``MOE`` / ``REFINER``;
    ``byt5``: the glyph variant (``byt5_in``, whose fixed 4096 output sets ``text_dim``)."""
    d = WAN["num_attention_heads"] * WAN["attention_head_dim"]
    text_dim = BYT5_TEXT_DIM if byt5 else WAN["text_dim"]
    out = WAN["out_channels"] * 4
    s = {"patch_embedding.weight": (d, WAN["in_channels"], 1, 2, 2), "patch_embedding.bias": (d,),
         "condition_embedder.time_embedder.linear_1.weight": (d, 256),
         "condition_embedder.time_embedder.linear_1.bias": (d,),
         "condition_embedder.time_embedder.linear_2.weight": (d, d),
         "condition_embedder.time_embedder.linear_2.bias": (d,),
         "condition_embedder.time_proj.weight": (6 * d, d), "condition_embedder.time_proj.bias": (6 * d,),
         "proj_out.weight": (out, d), "proj_out.bias": (out,), "scale_shift_table": (1, 2, d),
         "in_context_proj.weight": (d, text_dim), "in_context_proj.bias": (d,), "vlm_pos_embed": (1, 512, d)}
    e, f = MOE["num_moe_experts"], MOE["ffn_hidden_size"]
    for i in range(WAN["num_layers"]):
        b = f"blocks.{i}"
        for proj in ("to_q", "to_k", "to_v"):
            s.update({f"{b}.attn1.{proj}.weight": (d, d), f"{b}.attn1.{proj}.bias": (d,)})
        s.update({f"{b}.attn1.to_out.0.weight": (d, d), f"{b}.attn1.to_out.0.bias": (d,),
                  f"{b}.attn1.norm_q.weight": (d,), f"{b}.attn1.norm_k.weight": (d,),
                  f"{b}.scale_shift_table": (1, 6, d),
                  # Megatron-style grouped experts: [hidden, E x ffn] / [E x ffn, hidden]
                  f"{b}.ffn.router.weight": (e, d), f"{b}.ffn.router.expert_bias": (e,),
                  f"{b}.ffn.experts.weight1": (d, e * f), f"{b}.ffn.experts.weight2": (e * f, d),
                  f"{b}.ffn.shared_experts.weight1": (MOE["shared_expert_intermediate_size"], d),
                  f"{b}.ffn.shared_experts.weight2": (d, MOE["shared_expert_intermediate_size"])})
    h, v = REFINER["transformer_config"]["hidden_size"], REFINER["vlm_dim"]
    ffn = REFINER["transformer_config"]["ffn_dim"]
    s.update({"converter_mlp.connector.0.weight": (h, v), "converter_mlp.connector.0.bias": (h,),
              "converter_mlp.connector.2.weight": (h, h), "converter_mlp.connector.2.bias": (h,)})
    for i in (3, 4):  # two bidirectional TransformerLayers after Linear, GELU, Linear
        c = f"converter_mlp.connector.{i}"
        s.update({f"{c}.norm1.weight": (h,), f"{c}.norm2.weight": (h,),
                  f"{c}.self_attn.in_proj_weight": (3 * h, h), f"{c}.self_attn.in_proj_bias": (3 * h,),
                  f"{c}.self_attn.out_proj.weight": (h, h), f"{c}.self_attn.out_proj.bias": (h,),
                  f"{c}.ffn.0.weight": (ffn, h), f"{c}.ffn.0.bias": (ffn,), f"{c}.ffn.3.weight": (h, ffn),
                  f"{c}.ffn.3.bias": (h,)})
    if text_dim != h:  # VLMTokenRefiner: a last Linear(hidden -> text_dim) after the layers
        s.update({"converter_mlp.connector.5.weight": (text_dim, h), "converter_mlp.connector.5.bias": (text_dim,)})
    if byt5:
        s.update({"byt5_in.layernorm.weight": (1472,), "byt5_in.layernorm.bias": (1472,),
                  "byt5_in.fc1.weight": (4096, 1472), "byt5_in.fc1.bias": (4096,),
                  "byt5_in.fc2.weight": (4096, 4096), "byt5_in.fc2.bias": (4096,),
                  "byt5_in.fc3.weight": (4096, 4096), "byt5_in.fc3.bias": (4096,)})
    return s


# A tiny ByT5 ``text_encoder_2`` (transformers ``T5EncoderModel``; d_model is the mapper's 1472).
BYT5 = dict(vocab_size=384, d_model=1472, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False, model_type="t5")
BYT5_TEXT_DIM = 4096


def official_byt5_shapes() -> dict[str, tuple[int, ...]]:
    """``text_encoder_2/``: transformers' T5 encoder names, the tied input embedding as
    ``shared.weight`` only (what ``save_pretrained`` writes)."""
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**BYT5))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def write_official_mammothmoda25(directory: Path, *, seed: int = 0, byt5: bool = False,
                                 text_encoder_2: bool | None = None,
                                 byt5_extra: dict[str, tuple[int, ...]] | None = None,
                                 byt5_drop: tuple[str, ...] = ()) -> dict[str, dict[str, torch.Tensor]]:
    """An official MammothModa2.5-layout diffusers folder; returns {part: tensors}. ``byt5``: the
    glyph DiT (``byt5_in``); ``text_encoder_2`` (default: as ``byt5``): the ByT5 encoder and
    tokenizer folders (``byt5_extra`` / ``byt5_drop`` add or remove encoder tensors)."""
    text_encoder_2 = byt5 if text_encoder_2 is None else text_encoder_2
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    llm = planner_stage_config("tiny-mammoth25")
    text = {k: v for k, v in llm["text_config"].items()
            if k not in ("model_type", "extra_gen_vocab", "gen_vocab_size", "gen_vocab_start_index", "moe_type")}
    vision = {k: v for k, v in llm["vision_config"].items() if k != "model_type"}
    qwen = Qwen3VLConfig(text_config=text, vision_config=vision)
    with torch.device("meta"):
        text_shapes = {k: tuple(v.shape) for k, v in Qwen3VLForConditionalGeneration(qwen).state_dict().items()}
    vae_cfg = vae_stage_config("tiny-mammoth25")
    wan = {**WAN, "text_dim": BYT5_TEXT_DIM, "enable_byt5": True} if byt5 else WAN
    parts = {"text_encoder": _random(text_shapes, seed),
             "transformer": _random(official_wan_shapes(byt5=byt5), seed + 1),
             "vae": _random(_vae_shapes(vae_cfg), seed + 2)}
    configs = {"text_encoder": {**qwen.to_dict(), "architectures": ["Qwen3VLForConditionalGeneration"]},
               "transformer": {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.1", **wan},
               "vae": vae_cfg}
    if text_encoder_2:
        from transformers import ByT5Tokenizer

        shapes = {**official_byt5_shapes(), **(byt5_extra or {})}
        for name in byt5_drop:
            shapes.pop(name)
        parts["text_encoder_2"] = _random(shapes, seed + 3)
        configs["text_encoder_2"] = {**BYT5, "architectures": ["T5EncoderModel"], "torch_dtype": "float32"}
        ByT5Tokenizer().save_pretrained(str(directory / "tokenizer_2"))
    for part, tensors in parts.items():
        (directory / part).mkdir(parents=True, exist_ok=True)
        (directory / part / "config.json").write_text(json.dumps(configs[part], indent=2))
        stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
        _save_sharded(tensors, directory / part, stem, shards=2)
    (directory / "scheduler").mkdir()
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0, "num_train_timesteps": 1000}))
    from planner.tokens import TokenLayout
    write_tokenizer(TokenLayout(), directory / "tokenizer")  # a Qwen BPE tokenizer.json
    (directory / "model_index.json").write_text(json.dumps(
        {"_class_name": "MammothModa25Pipeline", "boundary_ratio": None, "expand_timesteps": False,
         "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None]}))
    return parts
