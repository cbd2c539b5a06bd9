"""The batched DiT engine: CFG batching, batch invariance, abort, schedules, validation."""

from __future__ import annotations

import pytest
import torch

from dit_worker import presets
from dit_worker.engine import DenoiseOutput, DiTEngine, DiTEngineConfig, RequestAborted
from dit_worker.families import ImageFamily, VideoFamily
from dit_worker.guidance import combine
from dit_worker.models.transformer_mammoth2 import Mammoth2Condition, Mammoth2DiTConfig, Mammoth2Transformer
from dit_worker.models.transformer_mammoth25 import Mammoth25DiTConfig, Mammoth25Transformer
from dit_worker.requests import ImageDenoiseRequest, SamplingParams, VideoDenoiseRequest
from dit_worker.sampling import image_sampler


@pytest.fixture(scope="module")
def image_engine() -> DiTEngine:
    torch.manual_seed(0)
    model = Mammoth2Transformer(Mammoth2DiTConfig.tiny())
    presets._perturb(model, seed=1)
    return DiTEngine(model, ImageFamily())


@pytest.fixture(scope="module")
def video_engine() -> DiTEngine:
    torch.manual_seed(0)
    model = Mammoth25Transformer(Mammoth25DiTConfig.tiny())
    presets._perturb(model, seed=2)
    return DiTEngine(model, VideoFamily(scheduler_config={"shift": 3.0}))


def _image_request(rid: str, *, text_len: int, seed: int, steps: int = 4, refs: int = 0, hidden: int = 128,
                   text_guidance: float = 5.0, cfg_range=(0.0, 1.0)) -> ImageDenoiseRequest:
    g = torch.Generator().manual_seed(seed + 100)
    return ImageDenoiseRequest(
        request_id=rid,
        text=torch.randn(text_len, hidden, generator=g),
        image=torch.randn(9, hidden, generator=g),
        negative=torch.randn(5, hidden, generator=g),
        latent_height=8, latent_width=8,
        ref_latents=[torch.randn(16, 8, 8, generator=g) for _ in range(refs)],
        text_guidance=text_guidance, image_guidance=2.0,
        sampling=SamplingParams(steps=steps, seed=seed, cfg_range=cfg_range),
    )


def test_t2i_output_is_the_same_alone_or_in_a_padded_batch(image_engine):
    requests = [_image_request("a", text_len=3, seed=1), _image_request("b", text_len=11, seed=2, steps=6),
                _image_request("c", text_len=7, seed=3)]
    together = image_engine.generate(requests)
    for request, batched in zip(requests, together):
        alone = image_engine.generate([request])[0]
        assert isinstance(batched, DenoiseOutput) and batched.latents.shape == (16, 8, 8)
        torch.testing.assert_close(batched.latents, alone.latents, atol=2e-5, rtol=1e-4)
    assert together[1].steps == 6 and together[0].steps == 4


def test_editing_three_way_cfg_equals_separate_passes(image_engine):
    request = _image_request("edit", text_len=6, seed=5, steps=3, refs=2)
    engine_out = image_engine.generate([request])[0]
    assert engine_out.forward_rows == 3 * 3  # 3 branches batched in each of 3 steps

    model = image_engine.model
    branches = [Mammoth2Condition(text=request.negative, image=None, ref_latents=[]),
                Mammoth2Condition(text=request.negative, image=None, ref_latents=request.ref_latents),
                Mammoth2Condition(text=request.text, image=request.image, ref_latents=request.ref_latents)]
    prepared = [model.prepare([b]) for b in branches]  # one branch at a time, unbatched
    sampler = image_sampler(8, 8, 3)
    x = torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        while not sampler.done:
            t = torch.tensor([sampler.model_timestep()])
            preds = [model(x[None], t, p)[0] for p in prepared]
            x = sampler.step(combine(preds, [request.image_guidance, request.text_guidance]), x)
    torch.testing.assert_close(engine_out.latents, x, atol=2e-5, rtol=1e-4)


def test_cfg_range_skips_unconditional_passes(image_engine):
    full = image_engine.generate([_image_request("f", text_len=4, seed=1, steps=4)])[0]
    half = image_engine.generate([_image_request("h", text_len=4, seed=1, steps=4, cfg_range=(0.0, 0.3))])[0]
    assert full.forward_rows == 8 and half.forward_rows == 2 * 2 + 2
    assert not torch.allclose(full.latents, half.latents)


def test_abort_drops_one_request_and_leaves_the_rest_untouched(image_engine):
    keep, drop = _image_request("keep", text_len=5, seed=7), _image_request("drop", text_len=5, seed=8)
    seen: list[tuple[str, int]] = []

    def progress(rid: str, step: int, total: int, latents: torch.Tensor) -> None:
        seen.append((rid, step))
        if rid == "drop" and step == 2:
            image_engine.abort("drop")

    out_keep, out_drop = image_engine.generate([keep, drop], progress=progress)
    assert isinstance(out_drop, RequestAborted)
    assert ("drop", 3) not in seen and ("keep", 4) in seen
    torch.testing.assert_close(out_keep.latents, image_engine.generate([keep])[0].latents, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("field,change", [
    ("text_guidance", {"text_guidance": float("nan")}),
    ("steps", {"sampling": SamplingParams(steps=0)}),
    ("negative_condition", {"negative": None}),
    ("height", {"latent_height": 7}),
    ("size", {"latent_height": 1024, "latent_width": 1024}),
])
def test_bad_requests_are_rejected_naming_the_field(image_engine, field, change):
    request = _image_request("bad", text_len=4, seed=1)
    for key, value in change.items():
        setattr(request, key, value)
    with pytest.raises(ValueError, match=field):
        image_engine.generate([request])


def _one_shape_engine(engine: DiTEngine) -> DiTEngine:
    return DiTEngine(engine.model, engine.family, DiTEngineConfig(mixed_shapes=False))


def test_mixed_latent_shapes_are_refused_without_mixed_shapes(image_engine):
    a, b = _image_request("a", text_len=4, seed=1), _image_request("b", text_len=4, seed=2)
    b.latent_width = 10
    with pytest.raises(ValueError, match="latent shape"):
        _one_shape_engine(image_engine).generate([a, b])


def _video_request(rid: str, *, seed: int, source: bool, context_guidance: float = 1.0) -> VideoDenoiseRequest:
    g = torch.Generator().manual_seed(seed + 50)
    return VideoDenoiseRequest(
        request_id=rid, prompt=torch.randn(6 + seed, 128, generator=g), negative=torch.randn(3, 128, generator=g),
        latent_frames=3, latent_height=4, latent_width=6,
        source_latents=torch.randn(16, 3, 4, 6, generator=g) if source else None,
        guidance=5.0, context_guidance=context_guidance, sampling=SamplingParams(steps=3, seed=seed))


def test_requests_join_a_running_batch_and_leave_it_as_soon_as_done(image_engine):
    """Continuous batching: b and c join a at step boundaries, every result is handed over the
    moment it is ready, and each equals the request denoised alone."""
    a = _image_request("a", text_len=3, seed=1, steps=6)
    b = _image_request("b", text_len=9, seed=2, steps=2)
    c = _image_request("c", text_len=5, seed=3, steps=3)
    queue, events = [[], [b], [], [c]], []

    def admit(free):
        events.append(("admit", free))
        return queue.pop(0) if queue else []

    outputs = image_engine.generate([a], lambda rid, step, total, _: events.append((rid, step)),
                                    on_done=lambda r: events.append(("done", r.request_id)), admit=admit,
                                    max_requests=2)
    assert [o.request_id for o in outputs] == ["a", "b", "c"]
    # b joined before a's 2nd step and left after its own 2nd; c waited for a free slot.
    assert events.index(("b", 1)) > events.index(("a", 1)) and events.index(("done", "b")) < events.index(("a", 4))
    assert events.index(("c", 1)) > events.index(("done", "b")) and ("admit", 0) not in events
    assert events.index(("done", "a")) < events.index(("done", "c"))
    for request, batched in zip([a, b, c], outputs):
        torch.testing.assert_close(batched.latents, image_engine.generate([request])[0].latents, atol=2e-5, rtol=1e-4)


def test_a_joining_request_of_another_shape_is_refused_without_mixed_shapes(image_engine):
    other = _image_request("big", text_len=3, seed=2)
    other.latent_height = 16
    with pytest.raises(ValueError, match="latent shape"):
        _one_shape_engine(image_engine).generate([_image_request("a", text_len=3, seed=1)], admit=lambda free: [other], max_requests=2)


def test_video_t2v_and_editing_batch_together(video_engine):
    requests = [_video_request("t2v", seed=1, source=False),
                _video_request("edit", seed=2, source=True, context_guidance=1.5)]
    outputs = video_engine.generate(requests)
    assert [o.latents.shape for o in outputs] == [(16, 3, 4, 6)] * 2
    assert outputs[0].forward_rows == 2 * 3 and outputs[1].forward_rows == 3 * 3
    for request, batched in zip(requests, outputs):
        torch.testing.assert_close(batched.latents, video_engine.generate([request])[0].latents,
                                   atol=2e-5, rtol=1e-4)
    load = video_engine.expert_load()
    assert load and all(sum(counts) > 0 for counts in load.values())


def test_engine_loads_a_written_checkpoint(tmp_path):
    presets.write_random_checkpoint("tiny-mammoth2", tmp_path / "dit", seed=3)
    engine = DiTEngine.from_pretrained(tmp_path / "dit", DiTEngineConfig())
    again = DiTEngine.from_pretrained(tmp_path / "dit", DiTEngineConfig())
    request = _image_request("r", text_len=4, seed=4, steps=2)
    torch.testing.assert_close(engine.generate([request])[0].latents, again.generate([request])[0].latents)


def test_bf16_load_keeps_the_reference_fp32_modules(tmp_path):
    presets.write_random_checkpoint("tiny-mammoth25", tmp_path / "dit", seed=1)
    engine = DiTEngine.from_pretrained(tmp_path / "dit", DiTEngineConfig(dtype="bfloat16"))
    dtypes = {name: p.dtype for name, p in engine.model.named_parameters()}
    assert dtypes["scale_shift_table"] == torch.float32
    assert all(d == torch.float32 for n, d in dtypes.items() if "time_embedder" in n)
    assert dtypes["proj_out.weight"] == torch.bfloat16
    out = engine.generate([_video_request("bf16", seed=1, source=False)])[0]
    assert out.latents.dtype == torch.bfloat16 and torch.isfinite(out.latents.float()).all()
