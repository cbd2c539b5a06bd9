"""Edit references as MammothTok codes: the VAE stage tokenizes them (the same codes as the
encoder run directly), the stage messages carry them, and the planner's prompt builder splices
them where the official processor does. CPU, tiny configs, no vLLM."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from planner.tokens import TokenLayout
from planner.visual_refs import PLACEHOLDER, splice_references
from protos import common_pb2, generation_pb2, planner_pb2, vae_pb2
from protos.tensors import ndarray_from_proto, tensor_to_proto
from services import stage_messages as messages
from services.config import RequestLimits
from services.handoff import EncodedMedia
from services.jobs import InvalidArgument, image_job
from services.presets import get_preset
from services.stages.vae import VAEStage
from vae_worker.engine import ImageVAE
from vae_worker.mammothtok import (
    MammothTokConfig,
    MammothTokEncoder,
    load_mammothtok,
    tokenizer_input,
    tokenizer_size,
    visual_prompt_length,
)
from vae_worker.presets import write_random_checkpoint

DEFAULTS = get_preset("tiny-mammoth2").defaults
TOK = MammothTokConfig(image_size=28, patch_size=14, embed_dim=32, mlp_hidden_dim=48, num_blocks=1, num_heads=4,
                       codebook_size=64, codebook_embed_dim=8)


def _png(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _model_dir(root, with_tokenizer: bool):
    write_random_checkpoint("tiny-mammoth2", root / "vae", seed=0)
    if with_tokenizer:
        tok_dir = root / "vae" / "mammothtok"
        tok_dir.mkdir()
        torch.manual_seed(0)
        model = MammothTokEncoder(TOK)
        (tok_dir / "config.json").write_text(json.dumps(TOK.to_dict()))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tok_dir / "model.safetensors"))
    return root


def _edit_job(*images: bytes, width: int = 64, height: int = 48):
    msg = generation_pb2.EditImageRequest(instruction="make it blue", width=width, height=height, seed=1,
                                          reference_images=[common_pb2.Media(data=d) for d in images])
    return image_job(msg, DEFAULTS, RequestLimits(max_reference_images=3), edit=True)


@pytest.mark.parametrize("size,expected", [((64, 64), (70, 70)), ((48, 64), (42, 70)), ((10, 10), (28, 28)),
                                           ((14, 700), (14, 700))])
def test_tokenizer_size_follows_the_official_rounding(size, expected):
    assert tokenizer_size(*size, 14) == expected
    h, w = tokenizer_size(4000, 3000, 14)  # over 16384 patches: scaled down, aspect kept
    assert h % 14 == w % 14 == 0 and (h // 14) * (w // 14) <= 16384 and abs(h / w - 4 / 3) < 0.02


def test_vae_stage_returns_the_codes_the_encoder_gives_directly(tmp_path):
    root = _model_dir(tmp_path, with_tokenizer=True)
    stage = VAEStage.from_model_dir(root, ImageVAE)
    assert stage.tokenizer is not None
    job = _edit_job(_png(80, 60, 1), _png(50, 50, 2))
    encoded = asyncio.run(stage.encode_references(job))
    assert len(encoded.visual_codes) == 2 and "mammothtok_encode" in encoded.timings
    direct = load_mammothtok(root / "vae" / "mammothtok")
    for pixels, codes in zip(encoded.pixels, encoded.visual_codes):
        assert pixels.shape == (48, 64, 3)  # fitted to the edit's grid first
        expected = direct(tokenizer_input(pixels, 14))[0].numpy()
        assert codes.dtype == np.int32 and codes.shape == (42 // 14, 70 // 14)
        np.testing.assert_array_equal(codes, expected)
    # x / 127.5 - 1 at the official size: the encoder sees [-1, 1] pixels
    x = tokenizer_input(encoded.pixels[0], 14)
    assert x.shape == (1, 3, 42, 70) and x.min() >= -1 and x.max() <= 1
    merged = EncodedMedia.merge([encoded, encoded])
    assert len(merged.visual_codes) == 4


def test_vae_stage_without_a_mammothtok_returns_no_codes(tmp_path):
    stage = VAEStage.from_model_dir(_model_dir(tmp_path, with_tokenizer=False), ImageVAE)
    encoded = asyncio.run(stage.encode_references(_edit_job(_png(64, 48))))
    assert stage.tokenizer is None and encoded.visual_codes == [] and len(encoded.latents) == 1


def test_codes_ride_in_the_stage_messages():
    grids = [np.arange(6, dtype=np.int32).reshape(2, 3), np.full((3, 1), 7, dtype=np.int64)]
    job = _edit_job(b"a", b"b")
    request = messages.plan_image_request(job, grids)
    back = messages.reference_codes(planner_pb2.PlanImageRequest.FromString(request.SerializeToString()))
    assert [g.dtype for g in back] == [np.int32, np.int32]
    for got, want in zip(back, grids):
        np.testing.assert_array_equal(got, want)
    assert messages.reference_codes(messages.plan_image_request(job)) == []

    response = vae_pb2.EncodeResponse()
    tensor_to_proto(grids[0], out=response.visual_codes)
    again = vae_pb2.EncodeResponse.FromString(response.SerializeToString())
    np.testing.assert_array_equal(ndarray_from_proto(again.visual_codes), grids[0])
    assert not vae_pb2.EncodeResponse().HasField("visual_codes")


@pytest.mark.parametrize("grids,field", [([np.zeros(4, dtype=np.int32)], "reference_codes[0]"),
                                         ([np.zeros((2, 2), dtype=np.float32)], "reference_codes[0]"),
                                         ([np.zeros((2, 2), dtype=np.int32)] * 3, "reference_codes")])
def test_bad_codes_are_refused_naming_the_field(grids, field):
    request = planner_pb2.PlanImageRequest(prompt="x", reference_images=[common_pb2.Media(data=b"a")] * 2)
    for grid in grids:
        tensor_to_proto(grid, out=request.reference_codes.add())
    with pytest.raises(InvalidArgument) as info:
        messages.reference_codes(request)
    assert info.value.field == field


def _chars(text: str) -> list[int]:
    return [1000 + ord(ch) for ch in text]


def test_planner_splices_each_reference_at_its_placeholder():
    lay = TokenLayout()
    p = lay.gen_placeholder_id
    ids = [1, 2, p, 3, p, 4]
    a = np.array([[0, 1, 2], [3, 4, 5]])
    b = np.array([[9]])
    out = splice_references(ids, [a, b], lay, _chars)
    assert len(out) == len(ids) - 2 + visual_prompt_length(2, 3) + visual_prompt_length(1, 1)
    first = [lay.image_start_id, *_chars("2*3"), lay.image_token_id,
             *(lay.visual_start_id + a[0]), lay.eol_id, *(lay.visual_start_id + a[1]), lay.eol_id,
             lay.eof_id, lay.image_end_id]
    second = [lay.image_start_id, *_chars("1*1"), lay.image_token_id, lay.visual_start_id + 9, lay.eol_id,
              lay.eof_id, lay.image_end_id]
    assert out == [1, 2, *first, 3, *second, 4]
    assert PLACEHOLDER == "<|gen_placeholder|>"
    with pytest.raises(ValueError, match="reference_codes"):
        splice_references(ids, [a], lay, _chars)
    with pytest.raises(ValueError, match=r"reference_codes\[1\]"):
        splice_references(ids, [a, np.array([[lay.num_visual_codes]])], lay, _chars)


def test_planner_stage_takes_a_callers_codes_over_pixels():
    from services.stages.planner import PlannerStage

    stage = PlannerStage(engine=None)  # edit_inputs needs no engine
    job = _edit_job(_png(64, 48))
    codes = [np.ones((2, 2), dtype=np.int32)]
    encoded = EncodedMedia([np.zeros((16, 6, 8), np.float32)], [np.zeros((48, 64, 3), np.uint8)], 64, 48)
    with_codes = asyncio.run(stage.edit_inputs(job, encoded, codes))
    assert with_codes.visual_codes == codes and len(with_codes.pixels) == 1 and encoded.visual_codes == []
    assert asyncio.run(stage.edit_inputs(job, encoded, [])) is encoded
    only_codes = asyncio.run(stage.edit_inputs(job, None, codes))
    assert only_codes.pixels == [] and only_codes.visual_codes == codes
    fitted = asyncio.run(stage.edit_inputs(job, None, []))  # a caller with images only: the ViT sees them
    assert fitted.visual_codes == [] and fitted.pixels[0].shape == (48, 64, 3)
