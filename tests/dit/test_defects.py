"""Regression tests for the DiT defects of issue 9: each one compares the engine with the
official pipeline's semantics written out by hand (which branches run, with which scale, in
which dtype), so it fails on the old behaviour."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_worker import presets
from dit_worker.checkpoint import WEIGHTS_NAME
from dit_worker.engine import DiTEngine, DiTEngineConfig
from dit_worker.families import VideoFamily
from dit_worker.guidance import combine
from dit_worker.models.transformer_mammoth25 import (
    BYT5_DIM,
    Mammoth25Condition,
    Mammoth25DiTConfig,
    Mammoth25Transformer,
)
from dit_worker.requests import SamplingParams, VideoDenoiseRequest
from dit_worker.sampling import video_sampler

SCHEDULER = {"shift": 3.0}


@pytest.fixture(scope="module")
def video_model() -> Mammoth25Transformer:
    torch.manual_seed(0)
    model = Mammoth25Transformer(Mammoth25DiTConfig.tiny())
    presets._perturb(model, seed=2)
    return model.eval()


@pytest.fixture(scope="module")
def video_engine(video_model) -> DiTEngine:
    return DiTEngine(video_model, VideoFamily(scheduler_config=SCHEDULER))


def _request(*, seed: int = 1, source: bool = True, guidance: float = 5.0, context: float = 1.0,
             steps: int = 4, cfg_range=(0.0, 1.0), width: int = 128, glyph_len: int | None = None,
             negative_glyph_len: int | None = None) -> VideoDenoiseRequest:
    g = torch.Generator().manual_seed(seed + 10)
    glyphs = {}
    if glyph_len is not None:
        glyphs["glyph"] = torch.randn(glyph_len, BYT5_DIM, generator=g)
    if negative_glyph_len is not None:
        glyphs["negative_glyph"] = torch.randn(negative_glyph_len, BYT5_DIM, generator=g)
    return VideoDenoiseRequest(
        request_id=f"r{seed}", prompt=torch.randn(7, width, generator=g), negative=torch.randn(4, width, generator=g),
        latent_frames=2, latent_height=4, latent_width=4,
        source_latents=torch.randn(16, 2, 4, 4, generator=g) if source else None,
        guidance=guidance, context_guidance=context,
        sampling=SamplingParams(steps=steps, seed=seed, cfg_range=cfg_range), **glyphs)


def _official_loop(model, req: VideoDenoiseRequest, branches_at) -> torch.Tensor:
    """Denoise one request branch by branch; ``branches_at(step, n) -> (conditions, scales)``."""
    sampler = video_sampler(req.sampling.steps, SCHEDULER)
    x = torch.randn((16, 2, 4, 4), generator=torch.Generator().manual_seed(req.sampling.seed))
    with torch.inference_mode():
        while not sampler.done:
            conditions, scales = branches_at(sampler.step_index, sampler.num_steps)
            t = torch.tensor([sampler.model_timestep()])
            preds = [model(x[None].to(model.dtype), t, model.prepare([c]))[0] for c in conditions]
            x = sampler.step(combine(preds, scales), x)
    return x


def test_video_edit_without_text_guidance_keeps_the_prompt(video_engine, video_model):
    """guidance <= 1 turns CFG off in the official pipeline: the conditioned prediction alone,
    whatever context_guidance says (the old chain dropped the prompt: uncond + c*(context - uncond))."""
    req = _request(guidance=1.0, context=3.0)
    out = video_engine.generate([req])[0]
    full = Mammoth25Condition(prompt=req.prompt, source_latents=req.source_latents)
    expected = _official_loop(video_model, req, lambda i, n: ([full], []))
    assert out.forward_rows == req.sampling.steps
    torch.testing.assert_close(out.latents, expected, atol=2e-5, rtol=1e-4)


def test_cfg_range_never_gates_text_to_video_guidance(video_engine, video_model):
    req = _request(source=False, cfg_range=(0.0, 0.3))
    out = video_engine.generate([req])[0]
    full = Mammoth25Condition(prompt=req.prompt)
    uncond = Mammoth25Condition(prompt=req.negative)
    expected = _official_loop(video_model, req, lambda i, n: ([uncond, full], [req.guidance]))
    assert out.forward_rows == 2 * req.sampling.steps
    torch.testing.assert_close(out.latents, expected, atol=2e-5, rtol=1e-4)


def test_cfg_range_gates_only_the_context_guidance_of_video_editing(video_engine, video_model):
    req = _request(context=2.0, cfg_range=(0.0, 0.3))
    out = video_engine.generate([req])[0]
    full = Mammoth25Condition(prompt=req.prompt, source_latents=req.source_latents)
    context = Mammoth25Condition(prompt=req.negative, source_latents=req.source_latents)
    uncond = Mammoth25Condition(prompt=req.negative)

    def branches(i: int, n: int):
        if i / n <= 0.3:  # 3-way inside the range
            return [uncond, context, full], [req.context_guidance, req.guidance]
        return [context, full], [req.guidance]  # text guidance against the source-only branch

    expected = _official_loop(video_model, req, branches)
    assert out.forward_rows == 3 + 3 + 2 + 2  # steps 0, 1 inside (0, 0.25); 2, 3 outside
    torch.testing.assert_close(out.latents, expected, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def glyph_model() -> Mammoth25Transformer:
    """Tiny model with the ByT5 mapper (its output width is fixed at 4096 by the official code)."""
    base = Mammoth25DiTConfig.tiny()
    config = base.replace(enable_byt5=True, text_dim=4096,
                          refiner=base.refiner.replace(vlm_dim=128))
    torch.manual_seed(0)
    model = Mammoth25Transformer(config)
    presets._perturb(model, seed=3)
    return model.eval()


def test_glyph_condition_reaches_the_dit_on_the_official_branches(glyph_model):
    engine = DiTEngine(glyph_model, VideoFamily(scheduler_config=SCHEDULER))
    req = _request(source=False, steps=2, glyph_len=5, negative_glyph_len=3)
    out = engine.generate([req])[0]
    full = Mammoth25Condition(prompt=req.prompt, glyph=req.glyph)
    uncond = Mammoth25Condition(prompt=req.negative, glyph=req.negative_glyph)
    expected = _official_loop(glyph_model, req, lambda i, n: ([uncond, full], [req.guidance]))
    torch.testing.assert_close(out.latents, expected, atol=2e-5, rtol=1e-4)
    without = engine.generate([_request(source=False, steps=2)])[0]
    assert not torch.allclose(out.latents, without.latents)


def test_glyph_on_a_checkpoint_without_byt5_is_rejected(video_engine):
    with pytest.raises(ValueError, match="glyph_condition"):
        video_engine.validate(_request(glyph_len=3))


def test_editing_glyph_follows_the_official_branches(glyph_model):
    """3-way: context and uncond branches carry no glyph; outside the range the text branch's
    negative does (the official 2-way call passes the negative glyph)."""
    engine = DiTEngine(glyph_model, VideoFamily(scheduler_config=SCHEDULER))
    req = _request(context=2.0, steps=3, cfg_range=(0.0, 0.4), glyph_len=4, negative_glyph_len=2)
    out = engine.generate([req])[0]
    full = Mammoth25Condition(prompt=req.prompt, source_latents=req.source_latents, glyph=req.glyph)
    context = Mammoth25Condition(prompt=req.negative, source_latents=req.source_latents)
    uncond = Mammoth25Condition(prompt=req.negative)
    text_uncond = Mammoth25Condition(prompt=req.negative, source_latents=req.source_latents,
                                     glyph=req.negative_glyph)

    def branches(i: int, n: int):
        if i / n <= 0.4:
            return [uncond, context, full], [req.context_guidance, req.guidance]
        return [text_uncond, full], [req.guidance]

    expected = _official_loop(glyph_model, req, branches)
    torch.testing.assert_close(out.latents, expected, atol=2e-5, rtol=1e-4)


def test_default_latent_limit_admits_the_25_presets_default_video(video_engine):
    from services.config import DiTEngine as DiTEngineSettings
    from services.presets import get_preset

    defaults = get_preset("mammoth25-6b-a1b").defaults
    spatial = defaults["vae_spatial_compression"]
    req = _request(source=False)
    req.latent_frames = (defaults["frames"] - 1) // 4 + 1
    req.latent_height, req.latent_width = defaults["height"] // spatial, defaults["width"] // spatial
    assert req.latent_frames * req.latent_height * req.latent_width == 32760
    engine = DiTEngine(video_engine.model, video_engine.family, DiTEngineConfig())
    engine.validate(req)  # raised "size: 32760 latent positions exceed the limit 16384"
    assert DiTEngineSettings().max_latent_tokens >= 32760


def test_fp32_modules_stored_in_bf16_are_upcast_on_load(tmp_path):
    directory = presets.write_random_checkpoint("tiny-mammoth25", tmp_path / "dit", seed=1)
    state = load_file(str(directory / WEIGHTS_NAME))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
              str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    engine = DiTEngine.from_pretrained(directory, DiTEngineConfig(dtype="bfloat16"))
    dtypes = {name: p.dtype for name, p in engine.model.named_parameters()}
    assert dtypes["scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert all(d == torch.float32 for n, d in dtypes.items() if ".time_embedder." in n)
    assert dtypes["proj_out.weight"] == torch.bfloat16
    # the upcast is exact: the kept modules hold the stored bf16 values
    assert torch.equal(engine.model.scale_shift_table.detach(), state["scale_shift_table"].to(torch.bfloat16).float())


def test_video_noise_stays_fp32_until_the_first_step(video_model):
    """The official pipeline draws fp32 latents and only the model input is cast to bf16."""
    model = Mammoth25Transformer(video_model.config)
    model.load_state_dict(video_model.state_dict())
    engine = DiTEngine(model, VideoFamily(scheduler_config=SCHEDULER), DiTEngineConfig(dtype="bfloat16"))
    req = _request(source=False, guidance=1.0, steps=2)
    seen: list[torch.Tensor] = []
    out = engine.generate([req], progress=lambda rid, step, n, x: seen.append(x.clone()))[0]
    full = Mammoth25Condition(prompt=req.prompt.to(torch.bfloat16))
    expected = _official_loop(engine.model, req, lambda i, n: ([full], []))
    assert torch.equal(out.latents, expected)
    noise = torch.randn((16, 2, 4, 4), generator=torch.Generator().manual_seed(req.sampling.seed))
    rounded = noise.to(torch.bfloat16)
    sampler = video_sampler(2, SCHEDULER)
    with torch.inference_mode():
        v = engine.model(rounded[None], torch.tensor([sampler.model_timestep()]), engine.model.prepare([full]))[0]
    assert torch.equal(seen[0], sampler.step(v, noise))  # stepped from the fp32 noise ...
    assert not torch.equal(seen[0], video_sampler(2, SCHEDULER).step(v, rounded))  # ... not a rounded copy


def test_default_image_negative_prompt_is_the_official_one():
    from services.presets import get_preset

    expected = ("deformed, blurry, over saturation, bad anatomy, disfigured, poorly drawn face, mutation, "
                "mutated, extra_limb, ugly, poorly drawn hands, fused fingers, messy drawing, broken legs "
                "censor, censored, censor_bar Create an image from the instruction.")
    assert get_preset("mammoth2-dev").defaults["negative_prompt"] == expected
    assert get_preset("tiny-mammoth2").defaults["negative_prompt"] == expected
