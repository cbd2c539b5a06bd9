"""``mammoth convert`` on tiny official-layout checkpoints: every official tensor lands in its
stage (values equal), ids and defaults come from the checkpoint's files, the stages load the
result, and anything unmapped / missing / mis-shaped is refused naming the tensor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.convert import ConvertError, convert
from services.model_dir import read_index

from .official_layout import (
    GEN_DIT_T2I,
    MOE,
    REFINER,
    write_official_mammothmoda2,
    write_official_mammothmoda25,
)

OVERRIDES = {"moe": MOE, "refiner": REFINER}


def _stage_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def official2(tmp_path_factory):
    src = tmp_path_factory.mktemp("official2")
    return src, write_official_mammothmoda2(src)


@pytest.fixture(scope="module")
def converted2(official2, tmp_path_factory):
    src, tensors = official2
    dst = tmp_path_factory.mktemp("served2") / "model"
    return src, tensors, convert(src, dst, "mammothmoda2", shard_bytes=1 << 20)


def _variant(src: Path, dst: Path, *, extra=None, drop=()) -> Path:
    """A copy of the official folder (hard links) with tensors added (own shard) or dropped."""
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in drop:
        shard = index["weight_map"].pop(name)
        kept = {n: t for n, t in _stage_tensors_of(dst / shard).items() if n != name}
        (dst / shard).unlink()
        save_file(kept, str(dst / shard))
    if extra:
        save_file({n: torch.zeros(s) for n, s in extra.items()}, str(dst / "extra.safetensors"))
        index["weight_map"].update({n: "extra.safetensors" for n in extra})
    index_path.unlink()  # a hard link: never write through it into the shared original
    index_path.write_text(json.dumps(index))
    return dst


def _stage_tensors_of(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def test_every_official_mammothmoda2_tensor_lands_in_its_stage(converted2):
    _, official, index = converted2
    routes = {"planner": ("llm_model.", index.stage_path("planner")),
              "dit": ("gen_transformer.", index.stage_path("dit")),
              "vae": ("gen_vae.", index.stage_path("vae")),
              "mammothtok": ("gen_tokenizer.image_tokenizer.", index.stage_path("vae") / "mammothtok")}
    landed: set[str] = set()
    for stage, (prefix, directory) in routes.items():
        served = _stage_tensors(directory)
        assert served, stage
        for name, tensor in served.items():
            assert torch.equal(tensor, official[prefix + name]), name
            landed.add(prefix + name)
    ignored = {n for n in official if n.startswith("gen_tokenizer.image_tokenizer.")
               and n.split("image_tokenizer.")[1].startswith(("s2ddecoder.", "decoder.", "post_quant_conv."))}
    assert landed | ignored == set(official) and not landed & ignored
    assert sum(json.loads((index.root / "model_index.json").read_text())["ignored"].values()) == len(ignored)
    assert len(list(index.stage_path("planner").glob("model-*-of-*.safetensors"))) > 1  # sharded
    assert (index.stage_path("planner") / "model.safetensors.index.json").is_file()


def test_ids_and_defaults_come_from_the_checkpoint_files(converted2):
    from transformers import AutoTokenizer

    from planner.tokens import TokenLayout

    _, _, index = converted2
    planner_dir = index.stage_path("planner")
    layout = TokenLayout.from_checkpoint(planner_dir)
    assert (layout.visual_start_id, layout.num_visual_codes, layout.eol_id) == (
        GEN_DIT_T2I["visual_token_start_id"], GEN_DIT_T2I["visual_token_end_id"], GEN_DIT_T2I["eol_token_id"])
    assert index.defaults["ar_top_k"] == 2048 and index.defaults["ar_temperature"] == pytest.approx(0.9)
    assert index.defaults["ar_top_p"] == pytest.approx(0.95)
    assert json.loads((planner_dir / "planner_settings.json").read_text())["condition_layers"] == [-2, -4, -6, -8]
    tok = AutoTokenizer.from_pretrained(str(planner_dir))
    assert tok.convert_tokens_to_ids(["<|image start|>", "<|endofline|>"]) == [
        GEN_DIT_T2I["image_start_token_id"], GEN_DIT_T2I["eol_token_id"]]
    assert tok.decode([GEN_DIT_T2I["visual_token_start_id"] + 7]) == "<|visual token 000007|>"
    config = json.loads((planner_dir / "config.json").read_text())
    assert config["architectures"] == ["Mammothmoda2Qwen3VLForConditionalGeneration"]
    assert config["text_config"]["moe_type"] == "ffn-2:18"


def test_converted_stages_load_with_the_serving_loaders(converted2):
    from dit_worker.engine import DiTEngine
    from vae_worker.loading import load_vae
    from vae_worker.mammothtok import load_mammothtok

    _, official, index = converted2
    engine = DiTEngine.from_pretrained(index.stage_path("dit"))
    assert torch.equal(engine.model.x_embedder.weight, official["gen_transformer.x_embedder.weight"])
    vae, _ = load_vae(index.stage_path("vae"), "AutoencoderKL")
    assert vae.config.latent_channels == 16
    tok = load_mammothtok(index.stage_path("vae") / "mammothtok")
    codes = tok(torch.rand(1, 3, 28, 42) * 2 - 1)
    assert codes.shape == (1, 2, 3) and int(codes.max()) < tok.config.codebook_size


@pytest.mark.parametrize("change,message", [
    ({"extra": {"gen_transformer.bogus.weight": (4,)}}, "gen_transformer.bogus.weight"),
    ({"extra": {"something_else.weight": (4,)}}, "something_else.weight"),
    ({"drop": ("gen_transformer.layers.1.attn.to_q.weight",)}, "gen_transformer.layers.1.attn.to_q.weight"),
    ({"drop": ("gen_vae.decoder.conv_in.weight",)}, "gen_vae.decoder.conv_in.weight"),
    ({"drop": ("gen_tokenizer.image_tokenizer.quant_conv.bias",)}, "quant_conv.bias"),
    ({"drop": ("llm_model.gen_head.weight",)}, "gen_head.weight"),
    ({"extra": {"gen_transformer.x_embedder.bias": (4,)}, "drop": ("gen_transformer.x_embedder.bias",)},
     "gen_transformer.x_embedder.bias' has shape"),
])
def test_unmapped_missing_or_misshaped_official_tensors_are_refused_by_name(official2, tmp_path, change, message):
    src = _variant(official2[0], tmp_path / "src", **change)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        convert(src, tmp_path / "dst", "mammothmoda2")
    assert not (tmp_path / "dst").exists()  # nothing half-written is left


def test_tensors_the_official_model_class_does_not_use_are_ignored_and_reported(official2, tmp_path):
    src = _variant(official2[0], tmp_path / "src", extra={"gen_image_condition_refiner.layers.0.weight": (4, 4)})
    index = convert(src, tmp_path / "dst", "mammothmoda2")
    ignored = json.loads((index.root / "model_index.json").read_text())["ignored"]
    assert ignored["not part of the official MammothModa2 model class"] == 1


def test_a_wrong_visual_start_in_the_generation_config_is_refused(official2, tmp_path):
    src = _variant(official2[0], tmp_path / "src")
    (src / "t2i_generation_config.json").unlink()
    (src / "t2i_generation_config.json").write_text(json.dumps({**GEN_DIT_T2I, "visual_token_start_id": 152071}))
    with pytest.raises(ValueError, match="visual_token_start_id"):
        convert(src, tmp_path / "dst", "mammothmoda2")


def test_mammothmoda25_converts_with_every_tensor_and_the_schedulers_shift(tmp_path):
    from dit_worker.engine import DiTEngine
    from services.cli import main
    from vae_worker.loading import load_vae

    parts = write_official_mammothmoda25(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--from", "mammothmoda25",
                 "--dit-overrides", json.dumps(OVERRIDES)]) == 0  # the `mammoth convert` entry point
    index = read_index(tmp_path / "dst")
    for part, stage in (("text_encoder", "planner"), ("transformer", "dit"), ("vae", "vae")):
        served = _stage_tensors(index.stage_path(stage))
        assert set(served) == set(parts[part]), stage
        assert all(torch.equal(served[n], parts[part][n]) for n in served)
    assert index.family == "mammoth25" and index.defaults["flow_shift"] == 5.0
    engine = DiTEngine.from_pretrained(index.stage_path("dit"))
    assert engine.family.scheduler_config["shift"] == 5.0
    assert engine.model.config.moe.moe_router_topk == MOE["moe_router_topk"]
    load_vae(index.stage_path("vae"), "AutoencoderKLWan")
    planner_cfg = json.loads((index.stage_path("planner") / "config.json").read_text())
    assert planner_cfg["extra_gen_vocab"] is False and planner_cfg["text_config"]["moe_type"] == "none"
    assert (index.stage_path("planner") / "tokenizer.json").is_file()
    assert read_index(index.root).stages == {"planner": "planner", "dit": "dit", "vae": "vae"}


def test_mammothmoda25_moe_sizes_follow_the_official_head_count_rule(tmp_path):
    """Without overrides the official constants apply (20B-A3B for 2 heads), which do not fit
    the tiny checkpoint: refused naming the mismatch, never loaded wrongly."""
    write_official_mammothmoda25(tmp_path / "src")
    with pytest.raises(ConvertError, match="moe.hidden_size 3072"):
        convert(tmp_path / "src", tmp_path / "dst", "mammothmoda25")
