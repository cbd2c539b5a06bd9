"""MammothModa2.5 glyph checkpoints (``enable_byt5``): the official ByT5 ``text_encoder_2/``
becomes the DiT stage's glyph encoder, which encodes as transformers' ``T5EncoderModel`` does,
and the glyph states change what the DiT denoises."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_worker.checkpoint import CheckpointError
from dit_worker.models.glyph_encoder import MAX_LENGTH, GlyphEncoder
from services.convert import ConvertError, convert
from services.model_dir import read_index

from .official_layout import MOE, REFINER, write_official_mammothmoda25

OVERRIDES = {"moe": MOE, "refiner": REFINER}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    src = tmp_path_factory.mktemp("official25-byt5")
    return src, write_official_mammothmoda25(src, byt5=True)


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    src, _ = official
    return convert(src, tmp_path_factory.mktemp("glyph") / "model", "mammothmoda25", dit_overrides=OVERRIDES)


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_every_glyph_encoder_tensor_lands_beside_the_dit(official, converted):
    _, parts = official
    glyph_dir = converted.stage_path("dit") / "glyph_encoder"
    served = _tensors(glyph_dir)
    assert set(served) == set(parts["text_encoder_2"])
    assert all(torch.equal(served[n], parts["text_encoder_2"][n]) for n in served)
    dit = _tensors(converted.stage_path("dit"))
    assert set(dit) == set(parts["transformer"]) and any(n.startswith("byt5_in.") for n in dit)
    assert json.loads((glyph_dir / "config.json").read_text())["d_model"] == 1472
    assert (glyph_dir / "tokenizer_config.json").is_file()  # the official tokenizer_2 files
    assert read_index(converted.root).defaults["glyph_text"] is True
    written = json.loads((converted.root / "model_index.json").read_text())
    assert written["tensors"]["glyph_encoder"] == len(served) and not written["ignored"]


def test_glyph_states_equal_the_official_t5_encoder_run(official, converted):
    """The official pads each text to 256 bytes and the DiT keeps the unmasked positions; a
    batch here pads only to its longest text and returns those positions unpadded."""
    from transformers import ByT5Tokenizer, T5EncoderModel

    src, _ = official
    encoder = GlyphEncoder.from_pretrained(converted.stage_path("dit") / "glyph_encoder")
    texts = ['Text "OPEN". ', None, 'Text "Grand Opening Sale". Text "50%". ', "Text \"" + "x" * 400 + "\". "]
    states = encoder.encode(texts)
    assert states[1] is None
    reference = T5EncoderModel.from_pretrained(str(src / "text_encoder_2")).eval()
    tokenizer = ByT5Tokenizer.from_pretrained(str(src / "tokenizer_2"))
    for text, got in zip(texts, states):
        if text is None:
            continue
        tokens = tokenizer(text, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        with torch.no_grad():
            want = reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.float())[0][0]
        want = want[: int(tokens.attention_mask.sum())]
        assert got.shape == (min(len(text.encode()) + 1, MAX_LENGTH), 1472)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_glyph_encoder_loads_strictly_naming_the_tensor(converted, tmp_path):
    glyph_dir = tmp_path / "glyph_encoder"
    shutil.copytree(converted.stage_path("dit") / "glyph_encoder", glyph_dir)
    state = load_file(str(glyph_dir / "model.safetensors"))
    name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    save_file({k: v for k, v in state.items() if k != name}, str(glyph_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        GlyphEncoder.from_pretrained(glyph_dir)
    save_file({**state, name: state[name][:, :-1].contiguous()}, str(glyph_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape"):
        GlyphEncoder.from_pretrained(glyph_dir)


def test_convert_refuses_a_glyph_encoder_that_does_not_fit(tmp_path):
    src = tmp_path / "src"
    write_official_mammothmoda25(src, byt5=True, byt5_drop=("encoder.final_layer_norm.weight",),
                                 byt5_extra={"encoder.extra.weight": (4,)})
    with pytest.raises(ConvertError, match="'encoder.extra.weight' has no place in the glyph encoder"):
        convert(src, tmp_path / "dst", "mammothmoda25", dit_overrides=OVERRIDES)
    assert not (tmp_path / "dst").exists()
    shutil.rmtree(src / "text_encoder_2")
    with pytest.raises(ConvertError, match="text_encoder_2/config.json"):
        convert(src, tmp_path / "dst", "mammothmoda25", dit_overrides=OVERRIDES)


def test_without_a_byt5_mapper_the_encoder_stays_ignored(tmp_path):
    """As the official pipeline: ``enable_byt5`` follows the DiT's weights; without them the
    ByT5 folders are unused and the prompt reaches the planner whole."""
    write_official_mammothmoda25(tmp_path / "src", text_encoder_2=True)
    index = convert(tmp_path / "src", tmp_path / "dst", "mammothmoda25", dit_overrides=OVERRIDES)
    assert not (index.stage_path("dit") / "glyph_encoder").exists()
    assert "glyph_text" not in index.defaults
    ignored = json.loads((index.root / "model_index.json").read_text())["ignored"]
    assert list(ignored.values()) == [2] and "byt5_in" in next(iter(ignored))  # text_encoder_2/, tokenizer_2/


def test_the_dit_stage_feeds_the_glyph_states_to_the_dit(converted):
    """A request with glyph text denoises differently from the same request without; negative
    glyph text is encoded only when CFG uses it."""
    from dit_worker.engine import DiTEngineConfig
    from protos import generation_pb2
    from services.handoff import DenoiseDone, PromptConditions
    from services.jobs import video_job
    from services.stages.dit import DiTStage

    stage = DiTStage.from_model_dir(converted.root, DiTEngineConfig())
    assert stage.glyph_encoder is not None and stage.engine.model.config.enable_byt5
    rng = np.random.default_rng(0)
    conditions = PromptConditions(rng.standard_normal((6, 128), dtype=np.float32),
                                  rng.standard_normal((3, 128), dtype=np.float32), {})
    msg = generation_pb2.GenerateVideoRequest(prompt='a sign "OPEN"', width=32, height=32, frames=1, steps=2,
                                              seed=5, guidance=3.0)
    job = video_job(msg, converted.defaults, read_limits(), edit=False)

    async def latents(job):
        events = [e async for e in stage.denoise(job, conditions)]
        assert isinstance(events[-1], DenoiseDone)
        return np.asarray(events[-1].latents)

    loop = asyncio.new_event_loop()
    try:
        glyph, negative = loop.run_until_complete(stage.glyph_states(job))
        assert glyph.shape == (len(b'Text "OPEN". ') + 1, 1472) and negative is None  # negative prompt ""
        with_glyph = loop.run_until_complete(latents(job))
        job.glyph_text = None
        without = loop.run_until_complete(latents(job))
        job.glyph_text, job.negative_glyph_text = 'Text "OPEN". ', 'Text "x". '
        first = loop.run_until_complete(stage.glyph_states(job))
        torch.testing.assert_close(first[1], stage.glyph_encoder.encode(['Text "x". '])[0])
        job.glyph_text = None
        cached = loop.run_until_complete(stage.glyph_states(job))
        assert cached[0] is None and cached[1] is first[1]  # kept, not re-encoded
        job.guidance, job.glyph_text = 1.0, 'Text "OPEN". '
        assert loop.run_until_complete(stage.glyph_states(job))[1] is None  # no CFG: no negative branch
        loop.run_until_complete(stage.close())
    finally:
        loop.close()
    assert with_glyph.shape == without.shape and not np.allclose(with_glyph, without)


def read_limits():
    from services.config import RequestLimits

    return RequestLimits()


def test_a_bad_glyph_encoder_config_is_refused_naming_the_key(tmp_path):
    from dit_worker.models.glyph_encoder import t5_config

    from .official_layout import BYT5

    assert t5_config(BYT5).d_model == 1472
    with pytest.raises(CheckpointError, match="'d_model'"):
        t5_config({**BYT5, "d_model": 0})
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        t5_config({**BYT5, "feed_forward_proj": "no-such-act-x"})
