"""MammothTok encoder pieces and the edit-prompt ids against hand computations; the token
layout and AR sampling defaults read from checkpoint files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from planner.tokens import TokenLayout
from vae_worker.mammothtok import (
    MammothTokConfig,
    MammothTokEncoder,
    PromptIds,
    visual_prompt,
    visual_prompt_ids,
    visual_prompt_length,
)
from vae_worker.mammothtok.model import sincos_positions

IDS = PromptIds(visual_start=1000, num_visual=64, image_start=1, image_token=2, end_of_line=3, end_of_file=4,
                image_end=5)


def _digits(text: str) -> list[int]:
    return [500 + (10 if ch == "*" else int(ch)) for ch in text]  # one token per character, like Qwen's digits


@pytest.mark.parametrize("rows,cols", [(2, 3), (12, 7), (32, 32)])
def test_prompt_ids_have_the_official_length_and_layout(rows, cols):
    codes = [[(r * cols + c) % 64 for c in range(cols)] for r in range(rows)]
    ids = visual_prompt_ids(codes, IDS, _digits)
    assert len(ids) == visual_prompt_length(rows, cols) == rows * (cols + 1) + 5 + len(str(rows)) + len(str(cols))
    size = _digits(f"{rows}*{cols}")
    assert ids[:len(size) + 2] == [IDS.image_start, *size, IDS.image_token]
    assert ids[-3:] == [IDS.end_of_line, IDS.end_of_file, IDS.image_end]
    body = ids[len(size) + 2:-2]
    for r in range(rows):
        row = body[r * (cols + 1):(r + 1) * (cols + 1)]
        assert row == [1000 + c for c in codes[r]] + [IDS.end_of_line]
    text = visual_prompt(codes)
    assert text.startswith(f"<|image start|>{rows}*{cols}<|image token|><|visual token {codes[0][0]:06d}|>")
    assert text.count("<|endofline|>") == rows and text.endswith("<|endofline|><|endoffile|><|image end|>")


def test_prompt_refuses_codes_outside_the_visual_range():
    with pytest.raises(ValueError, match="reference_images"):
        visual_prompt_ids([[64]], IDS, _digits)


def test_sincos_positions_by_hand():
    table = sincos_positions(rows=3, cols=4, dim=16)
    assert table.shape == (12, 16)
    r, c, i = 2, 3, 1  # token (row 2, col 3) is index 11; frequency i of 4
    omega = 1 / 10000 ** (i / 4)
    token = table[r * 4 + c]
    assert token[i].item() == pytest.approx(math.sin(c * omega), abs=1e-6)  # first half: column
    assert token[4 + i].item() == pytest.approx(math.cos(c * omega), abs=1e-6)
    assert token[8 + i].item() == pytest.approx(math.sin(r * omega), abs=1e-6)  # second half: row


def test_quantizer_picks_the_nearest_normalised_code():
    torch.manual_seed(0)
    config = MammothTokConfig(image_size=28, patch_size=14, embed_dim=32, mlp_hidden_dim=48, num_blocks=1,
                              num_heads=4, codebook_size=40, codebook_embed_dim=8)
    tok = MammothTokEncoder(config).eval()
    z = torch.randn(50, 8)
    got = tok.quantize(z)
    cosine = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(
        tok.quantize.embedding.weight, dim=-1).t()
    assert torch.equal(got, cosine.argmax(dim=1))
    codes = tok(torch.rand(2, 3, 28, 42) * 2 - 1)
    assert codes.shape == (2, 2, 3) and codes.dtype == torch.long
    with pytest.raises(ValueError, match="reference_images"):
        tok(torch.rand(1, 3, 27, 28))


def test_token_layout_reads_the_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"gen_vocab_start_index": 152064, "gen_vocab_size": 32800}))
    assert TokenLayout.from_checkpoint(tmp_path) == TokenLayout()  # no generation config: derived
    gen = {"visual_token_start_id": 152080, "visual_token_end_id": 16384, "eol_token_id": 152065}
    (tmp_path / "t2i_generation_config.json").write_text(json.dumps(gen))
    layout = TokenLayout.from_checkpoint(tmp_path)
    assert (layout.visual_start_id, layout.num_visual_codes, layout.eol_id) == (152080, 16384, 152065)
    (tmp_path / "t2i_generation_config.json").write_text(json.dumps({**gen, "visual_token_end_id": 40000}))
    with pytest.raises(ValueError, match="visual range"):
        TokenLayout.from_checkpoint(tmp_path)
    (tmp_path / "t2i_generation_config.json").write_text(json.dumps({"visual_token_start_id": 152080}))
    with pytest.raises(ValueError, match="visual_token_end_id"):
        TokenLayout.from_checkpoint(tmp_path)


def test_image_jobs_take_the_models_ar_sampling_defaults():
    from protos import generation_pb2
    from services.config import RequestLimits
    from services.jobs import image_job
    from services.presets import get_preset

    defaults = {**get_preset("tiny-mammoth2").defaults, "ar_temperature": 0.9, "ar_top_k": 2048, "ar_top_p": 0.95}
    job = image_job(generation_pb2.GenerateImageRequest(prompt="a cat"), defaults, RequestLimits(), edit=False)
    assert (job.ar_temperature, job.ar_top_k) == (pytest.approx(0.9), 2048) and job.ar_top_p == pytest.approx(0.95)
    job = image_job(generation_pb2.GenerateImageRequest(prompt="a cat", ar_top_k=7), defaults, RequestLimits(),
                    edit=False)
    assert job.ar_top_k == 7
