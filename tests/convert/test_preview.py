"""``mammoth convert --from mammothmoda2-preview`` on tiny checkpoints in the official Preview
layout (``qwen25vl`` branch: Qwen2.5-VL planner under ``llm_model.``, the DiT under
``gen_transformer.``, its QFormer beside it as ``gen_image_condition_refiner.``, no MammothTok):
every official tensor lands in its stage with its value, the stages load and the DiT applies the
QFormer at the planner width; anything unmapped / missing / mis-shaped is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from services.convert import ConvertError, convert
from services.model_dir import read_index

from .official_layout import DIT2P, QFORMER, write_official_mammothmoda2_preview
from .test_convert import _stage_tensors, _variant

REFINER = "gen_image_condition_refiner."
QFORMER_OURS = "time_caption_embed.image_embedder."


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    src = tmp_path_factory.mktemp("official-preview")
    return src, write_official_mammothmoda2_preview(src)


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    from services.cli import main

    src, tensors = official
    dst = tmp_path_factory.mktemp("served-preview") / "model"
    assert main(["convert", str(src), str(dst), "--from", "mammothmoda2-preview"]) == 0  # the CLI entry point
    return src, tensors, read_index(dst)


def _official_name(stage: str, name: str) -> str:
    if stage == "planner":
        return "llm_model." + name
    if stage == "vae":
        return "gen_vae." + name
    if name.startswith(QFORMER_OURS):
        return REFINER + name[len(QFORMER_OURS):]
    return "gen_transformer." + name


def test_every_official_preview_tensor_lands_in_its_stage(converted):
    _, official, index = converted
    landed = set()
    for stage in ("planner", "dit", "vae"):
        served = _stage_tensors(index.stage_path(stage))
        for name, tensor in served.items():
            assert torch.equal(tensor, official[_official_name(stage, name)]), name
            landed.add(_official_name(stage, name))
    assert landed == set(official)  # nothing ignored, nothing left over
    assert any(n.startswith(REFINER) for n in landed)
    assert not (index.stage_path("vae") / "mammothtok").exists()  # the Preview has no MammothTok
    assert index.family == "mammoth2-preview" and index.preset == "mammoth2-preview"
    assert json.loads((index.root / "model_index.json").read_text())["ignored"] == {}


def test_the_converted_planner_is_the_qwen25_architecture(converted):
    from planner.tokens import TokenLayout

    _, _, index = converted
    planner_dir = index.stage_path("planner")
    config = json.loads((planner_dir / "config.json").read_text())
    assert config["architectures"] == ["Mammothmoda2Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == "mammothmoda2_qwen2_5_vl"
    assert config["text_config"]["moe_type"] == "ffn-2:18" and config["text_config"]["gen_vocab_start_index"] == 152064
    # the official Preview conditions on the last hidden state
    assert json.loads((planner_dir / "planner_settings.json").read_text())["condition_layers"] == [-1]
    assert TokenLayout.from_checkpoint(planner_dir).visual_start_id == 152072
    video = json.loads((planner_dir / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"


def test_the_dit_runs_the_qformer_at_the_planner_width_then_the_caption_projection(converted):
    from dit_worker.engine import DiTEngine
    from dit_worker.models.transformer_mammoth2 import Mammoth2Condition

    _, official, index = converted
    model = DiTEngine.from_pretrained(index.stage_path("dit")).model.float()
    assert model.config.image_refiner_at_llm_width and model.config.hidden_size == DIT2P["hidden_size"]
    embed = model.time_caption_embed
    assert torch.equal(embed.image_embedder.query, official[REFINER + "query"])
    assert embed.image_embedder.query.shape == (1, QFORMER["num_queries"], 128)  # LLM width, not the DiT's 64
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(5, 128, generator=g), torch.randn(7, 128, generator=g)
    seen = []
    handle = model.context_refiner[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.prepare([Mammoth2Condition(text=text, image=image)])
            # Official order: QFormer over the image states, then the caption projection over
            # [text tokens, queries] (a per-token map, so it is applied to each part alike).
            queries = embed.image_embedder(image[None], torch.ones(1, 7, dtype=torch.bool))[0]
            expected = embed.caption_embedder(torch.cat([text, queries]))
    finally:
        handle.remove()
    assert seen[0].shape[-1] == DIT2P["hidden_size"]
    torch.testing.assert_close(seen[0][0, : 5 + QFORMER["num_queries"]], expected)


@pytest.mark.parametrize("flat,legacy", [(True, False), (False, True)])
def test_the_flat_llm_config_and_the_legacy_qwen25_names_convert_alike(converted, tmp_path, flat, legacy):
    _, _, reference = converted
    src = tmp_path / "src"
    official = write_official_mammothmoda2_preview(src, flat_llm_config=flat, legacy_names=legacy)
    index = convert(src, tmp_path / "dst", "mammothmoda2-preview")
    assert json.loads((index.stage_path("planner") / "config.json").read_text())["text_config"]["hidden_size"] == 128
    served = _stage_tensors(index.stage_path("planner"))
    assert set(served) == set(_stage_tensors(reference.stage_path("planner")))
    if legacy:
        assert torch.equal(served["model.language_model.layers.3.gen_mlp.up_proj.weight"],
                           official["llm_model.model.layers.3.gen_mlp.up_proj.weight"])
        assert torch.equal(served["model.visual.blocks.0.attn.qkv.weight"],
                           official["llm_model.visual.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("change,message", [
    ({"extra": {"gen_image_condition_refiner.bogus.weight": (4,)}}, "gen_image_condition_refiner.bogus.weight"),
    ({"extra": {"gen_tokenizer.image_tokenizer.quant_conv.bias": (8,)}}, "gen_tokenizer.image_tokenizer.quant_conv"),
    ({"drop": ("gen_image_condition_refiner.layers.1.ffn.linear_2.weight",)}, "layers.1.ffn.linear_2.weight"),
    ({"drop": ("llm_model.model.language_model.layers.0.self_attn.q_proj.bias",)}, "layers.0.self_attn.q_proj.bias"),
    ({"extra": {"llm_model.model.language_model.layers.3.self_attn.gen_q_proj.weight": (128, 128)}},
     "gen_q_proj.weight"),
    ({"extra": {"gen_transformer.time_caption_embed.image_embedder.query": (1, 8, 128)}},
     "gen_transformer.time_caption_embed.image_embedder.query"),
])
def test_unmapped_missing_or_duplicated_preview_tensors_are_refused_by_name(official, tmp_path, change, message):
    src = _variant(official[0], tmp_path / "src", **change)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        convert(src, tmp_path / "dst", "mammothmoda2-preview")
    assert not (tmp_path / "dst").exists()


def test_a_checkpoint_of_the_other_backbone_is_refused_with_the_right_source(official, tmp_path):
    with pytest.raises(ConvertError, match="--from mammothmoda2-preview"):
        convert(official[0], tmp_path / "dst", "mammothmoda2")
    src = _variant(official[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["text_config"]["moe_type"] = "ffn_attention-2:18"
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="attention experts"):
        convert(src, tmp_path / "dst", "mammothmoda2-preview")
