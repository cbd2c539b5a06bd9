"""Fast checks (no vLLM engine): presets, checkpoint layout, tokenizer ids, parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from planner.configuration import (
    ARCHITECTURE,
    QWEN25_ARCHITECTURE,
    Mammothmoda2Qwen2_5_VLConfig,
    Mammothmoda2Qwen3VLConfig,
    moe_layer_enabled,
)
from planner.presets import PRESETS, count_parameters, stage_config, write_random_checkpoint
from planner.tokens import TokenLayout, visual_token


def test_presets_have_official_keys():
    for name in PRESETS:
        cfg = stage_config(name)
        assert cfg["architectures"] == [QWEN25_ARCHITECTURE if "preview" in name else ARCHITECTURE]
        for key in ("gen_vocab_size", "gen_vocab_start_index", "moe_type", "extra_gen_vocab"):
            assert key in cfg and key in cfg["text_config"]
        # logit index == token id
        assert cfg["text_config"]["vocab_size"] == cfg["gen_vocab_start_index"] == 152064
    tiny = stage_config("tiny-mammoth2")
    assert tiny["text_config"]["head_dim"] >= 32 and tiny["text_config"]["hidden_size"] == 128
    assert tiny["text_config"]["num_hidden_layers"] >= 17  # default condition layers exist
    assert tiny["vision_config"]["out_hidden_size"] == 128


def test_config_class_reads_official_layout():
    cfg = Mammothmoda2Qwen3VLConfig(**stage_config("tiny-mammoth2"))
    assert cfg.text_config.gen_vocab_start_index == 152064
    assert cfg.text_config.rope_parameters["mrope_section"] == [6, 5, 5]


def test_preview_config_class_reads_the_official_qwen25_layout():
    cfg = Mammothmoda2Qwen2_5_VLConfig(**stage_config("tiny-mammoth2-preview"))
    assert cfg.text_config.gen_vocab_start_index == 152064 and cfg.text_config.moe_type == "ffn-2:18"
    assert cfg.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    assert cfg.vision_config.patch_size == 14 and cfg.vision_config.fullatt_block_indexes == [1]
    real = stage_config("mammoth2-preview")
    assert real["text_config"]["hidden_size"] == 3584 and real["text_config"]["moe_type"] == "ffn-14:28"


def test_preview_parameter_counts():
    """Qwen2.5-VL-7B (~8.3B with its ViT) + FFN experts in layers 14..27 (~2.85B, the "3B")."""
    counts = count_parameters("mammoth2-preview")
    assert 7.0e9 < counts["active"] < 8.0e9
    assert 2.5e9 < counts["total"] - counts["active"] - 0.7e9 - 0.24e9 < 3.2e9


def test_moe_type_ranges():
    assert moe_layer_enabled("ffn", 0) and moe_layer_enabled("ffn", 40)
    assert not moe_layer_enabled("ffn-14:28", 13) and moe_layer_enabled("ffn-14:28", 14)
    assert not moe_layer_enabled("ffn-14:28", 28) and not moe_layer_enabled("none", 3)
    with pytest.raises(ValueError):
        moe_layer_enabled("mlp", 0)


def test_parameter_counts():
    tiny = count_parameters("tiny-mammoth2")
    assert 0 < tiny["active"] < tiny["total"]
    dev = count_parameters("mammoth2-dev")
    # Qwen3-VL-8B text (~8.2B incl. embeddings) + ~3.3B generation experts (README: "3B").
    assert 7.5e9 < dev["active"] < 9e9
    assert 3.0e9 < dev["total"] - dev["active"] - 0.6e9 < 4.5e9


def test_checkpoint_layout_and_determinism(tiny_planner_dir, tmp_path):
    names = safe_open(str(tiny_planner_dir / "model.safetensors"), "pt").keys()
    assert "model.language_model.layers.5.gen_mlp.gate_proj.weight" in names
    assert "model.language_model.layers.0.gen_mlp.gate_proj.weight" not in names  # moe from layer 2
    for key in ("model.language_model.gen_embed_tokens.weight", "gen_head.weight", "lm_head.weight",
                "model.visual.patch_embed.proj.weight", "model.language_model.layers.0.self_attn.q_norm.weight"):
        assert key in names
    again = write_random_checkpoint("tiny-mammoth2", tmp_path / "again", seed=0)
    other = write_random_checkpoint("tiny-mammoth2", tmp_path / "other", seed=1)
    key = "model.language_model.layers.3.mlp.up_proj.weight"

    def get(d):
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return f.get_tensor(key)

    assert torch.equal(get(tiny_planner_dir), get(again))
    assert not torch.equal(get(tiny_planner_dir), get(other))
    vision_lines = (tiny_planner_dir / "mammothu_vision_tokens.txt").read_text().splitlines()
    # official MammothUTokenizer: ranks + 3 + 23 Qwen specials + 181 extras + 214 margins + 5, then these
    assert 151643 + 3 + 23 + 181 + 214 + 5 + len(vision_lines) == 152064 + 32800
    gcfg = json.loads((tiny_planner_dir / "t2i_generation_config.json").read_text())
    assert gcfg["eol_token_id"] == 152064


def test_tokenizer_vocabulary(tiny_planner_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_planner_dir))
    lay = TokenLayout()
    assert len(tok) == lay.full_vocab_size == 152064 + 32800
    assert tok.convert_tokens_to_ids("<|endofline|>") == lay.eol_id
    assert tok.convert_tokens_to_ids("<|image start|>") == lay.image_start_id
    assert tok.decode([lay.visual_start_id]) == visual_token(0)
    assert tok.decode([lay.visual_start_id + 32767]) == visual_token(32767)
    marker = tok.encode("<|image start|>32*32<|image token|>", add_special_tokens=False)
    assert (marker[0], marker[-1]) == (lay.image_start_id, lay.image_token_id)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]  # real Qwen BPE
