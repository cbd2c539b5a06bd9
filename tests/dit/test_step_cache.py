"""Step cache (per request, per row) and mixed-size packed batches of the DiT engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dit_worker import presets
from dit_worker.engine import DiTEngine, DiTEngineConfig
from dit_worker.families import ImageFamily, VideoFamily
from dit_worker.models.transformer_mammoth2 import Mammoth2DiTConfig, Mammoth2Transformer
from dit_worker.models.transformer_mammoth25 import Mammoth25DiTConfig, Mammoth25Transformer
from dit_worker.requests import ImageDenoiseRequest, SamplingParams, VideoDenoiseRequest
from dit_worker.step_cache import StepCacheParams

ALWAYS = 10.0  # a threshold no relative change reaches: every allowed step is cached


@pytest.fixture(scope="module")
def image_model() -> Mammoth2Transformer:
    torch.manual_seed(0)
    model = Mammoth2Transformer(Mammoth2DiTConfig.tiny())
    presets._perturb(model, seed=1)
    return model


@pytest.fixture(scope="module")
def image_engine(image_model) -> DiTEngine:
    return DiTEngine(image_model, ImageFamily())


@pytest.fixture(scope="module")
def video_engine() -> DiTEngine:
    torch.manual_seed(0)
    model = Mammoth25Transformer(Mammoth25DiTConfig.tiny())
    presets._perturb(model, seed=2)
    return DiTEngine(model, VideoFamily(scheduler_config={"shift": 3.0}))


def _image(rid: str, *, seed: int, steps: int = 8, size: tuple[int, int] = (8, 8), text_len: int = 5,
           cache: StepCacheParams | None = None, text_guidance: float = 5.0) -> ImageDenoiseRequest:
    g = torch.Generator().manual_seed(seed + 100)
    return ImageDenoiseRequest(
        request_id=rid, text=torch.randn(text_len, 128, generator=g), image=torch.randn(9, 128, generator=g),
        negative=torch.randn(4, 128, generator=g), latent_height=size[0], latent_width=size[1],
        text_guidance=text_guidance,
        sampling=SamplingParams(steps=steps, seed=seed, step_cache=cache or StepCacheParams()))


def _video(rid: str, *, seed: int, frames: int = 2, cache: StepCacheParams | None = None) -> VideoDenoiseRequest:
    g = torch.Generator().manual_seed(seed + 50)
    return VideoDenoiseRequest(
        request_id=rid, prompt=torch.randn(5, 128, generator=g), negative=torch.randn(3, 128, generator=g),
        latent_frames=frames, latent_height=4, latent_width=6, guidance=5.0,
        sampling=SamplingParams(steps=8, seed=seed, step_cache=cache or StepCacheParams()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class _CountForwards:
    """Counts the model's forward calls and the latent sizes each one carried."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[list[tuple[int, ...]]] = []
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        latents = args[0]
        shapes = [tuple(x.shape) for x in latents] if isinstance(latents, list) else [tuple(latents.shape[1:])]
        self.calls.append(sorted(set(shapes)))

    def close(self) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------- step cache


def test_cache_off_is_bit_identical_to_no_cache(image_engine):
    plain = image_engine.generate([_image("plain", seed=1)])[0]
    off = image_engine.generate([_image("off", seed=1, cache=StepCacheParams(threshold=0.0, warmup=0.0))])[0]
    # on, but never allowed to cache (warm-up covers every step): the split forward is exact too
    never = image_engine.generate([_image("never", seed=1, cache=StepCacheParams(threshold=ALWAYS, warmup=1.0))])[0]
    assert torch.equal(plain.latents, off.latents) and torch.equal(plain.latents, never.latents)
    assert (plain.computed_steps, plain.cached_steps) == (8, 0) == (never.computed_steps, never.cached_steps)


def test_cache_on_skips_steps_with_warmup_and_max_run(image_engine):
    """12 steps, warm-up 0.25 (steps 0-2 computed), runs of at most 3 cached steps:
    computed 0 1 2 | cached 3 4 5 | computed 6 | cached 7 8 9 | computed 10 | cached 11."""
    cache = StepCacheParams(threshold=ALWAYS, warmup=0.25, max_cached_steps=3)
    plain = image_engine.generate([_image("p", seed=2, steps=12)])[0]
    cached = image_engine.generate([_image("c", seed=2, steps=12, cache=cache)])[0]
    assert (cached.computed_steps, cached.cached_steps) == (5, 7)
    assert cached.forward_rows == plain.forward_rows == 2 * 12  # every step still steps both CFG branches
    err = _rel(cached.latents, plain.latents)
    assert 0 < err < 1.0 and torch.isfinite(cached.latents).all()


def test_a_tight_threshold_computes_more_steps_than_a_loose_one(image_engine):
    counts = []
    for threshold in (1e-6, 0.5, ALWAYS):
        out = image_engine.generate([_image("t", seed=3, steps=10,
                                            cache=StepCacheParams(threshold=threshold, warmup=0.0,
                                                                  max_cached_steps=100))])[0]
        counts.append(out.computed_steps)
        assert out.computed_steps + out.cached_steps == 10
    assert counts[0] == 10 and counts[0] >= counts[1] >= counts[2] and counts[2] == 1


def test_rows_of_one_forward_cache_independently(image_engine):
    """Three requests step in the same forwards: cache off, cache on, cache on with a later
    warm-up; each gets exactly its own result and counts, as if it ran alone."""
    requests = [_image("off", seed=4),
                _image("on", seed=5, cache=StepCacheParams(threshold=ALWAYS, warmup=0.0, max_cached_steps=2)),
                _image("late", seed=6, cache=StepCacheParams(threshold=ALWAYS, warmup=0.5, max_cached_steps=2),
                       text_guidance=1.0)]
    counter = _CountForwards(image_engine.model)
    try:
        together = image_engine.generate(requests)
    finally:
        counter.close()
    assert len(counter.calls) == 8  # one forward per step for all three
    assert [(o.computed_steps, o.cached_steps) for o in together] == [(8, 0), (3, 5), (5, 3)]
    for request, batched in zip(requests, together):
        alone = image_engine.generate([dataclasses.replace(request)])[0]
        assert (alone.computed_steps, alone.cached_steps) == (batched.computed_steps, batched.cached_steps)
        torch.testing.assert_close(batched.latents, alone.latents, atol=2e-5, rtol=1e-4)


def test_video_cache_counts_and_batch_invariance(video_engine):
    cache = StepCacheParams(threshold=ALWAYS, warmup=0.25, max_cached_steps=1)
    plain = video_engine.generate([_video("p", seed=1)])[0]
    requests = [_video("c", seed=1, cache=cache), _video("o", seed=2)]
    together = video_engine.generate(requests)
    # 8 steps: 0 1 computed, then cached / computed alternating from step 2: 2 4 6 cached
    assert (together[0].computed_steps, together[0].cached_steps) == (5, 3)
    assert (together[1].computed_steps, together[1].cached_steps) == (8, 0)
    assert 0 < _rel(together[0].latents, plain.latents) < 1.0
    for request, batched in zip(requests, together):
        torch.testing.assert_close(batched.latents, video_engine.generate([request])[0].latents,
                                   atol=2e-5, rtol=1e-4)


def test_bad_cache_knobs_are_rejected_naming_the_field(image_engine):
    for params, field in ((StepCacheParams(threshold=-1.0), "step_cache_threshold"),
                          (StepCacheParams(threshold=0.1, warmup=2.0), "step_cache_warmup"),
                          (StepCacheParams(threshold=0.1, max_cached_steps=-1), "step_cache_max_cached_steps")):
        with pytest.raises(ValueError, match=field):
            image_engine.generate([_image("bad", seed=1, cache=params)])


# --------------------------------------------------------------------------- mixed sizes


@pytest.fixture(scope="module")
def packing_engine(image_model) -> DiTEngine:
    return DiTEngine(image_model, ImageFamily(), DiTEngineConfig(max_padding=1.0))  # pack every size


def test_a_packed_batch_of_mixed_sizes_equals_each_alone(packing_engine):
    """8x8, 16x16 and 8x12 latents (one with a longer text) step in one padded forward."""
    image_engine = packing_engine
    requests = [_image("small", seed=1, size=(8, 8)), _image("big", seed=2, size=(16, 16), text_len=11),
                _image("wide", seed=3, size=(8, 12), steps=5)]
    counter = _CountForwards(image_engine.model)
    try:
        together = image_engine.generate(requests)
    finally:
        counter.close()
    assert len(counter.calls) == 8 and counter.calls[0] == [(16, 8, 8), (16, 8, 12), (16, 16, 16)]
    for request, batched in zip(requests, together):
        assert batched.latents.shape == (16, *(request.latent_height, request.latent_width))
        torch.testing.assert_close(batched.latents, image_engine.generate([request])[0].latents,
                                   atol=2e-5, rtol=1e-4)


def test_the_token_budget_cuts_forwards_largest_first(image_model):
    # big: 2 rows x (64 image + ~14 context) tokens; small: 2 x (16 + ~13): together over 200
    engine = DiTEngine(image_model, ImageFamily(), DiTEngineConfig(max_batch_tokens=200, max_padding=1.0))
    requests = [_image("small", seed=1, size=(8, 8), steps=2), _image("big", seed=2, size=(16, 16), steps=2)]
    counter = _CountForwards(image_model)
    try:
        together = engine.generate(requests)
    finally:
        counter.close()
    assert counter.calls == [[(16, 16, 16)], [(16, 8, 8)]] * 2
    for request, batched in zip(requests, together):
        torch.testing.assert_close(batched.latents, engine.generate([request])[0].latents, atol=2e-5, rtol=1e-4)


def test_rows_much_shorter_than_the_longest_get_their_own_forward_in_the_same_step(image_engine):
    requests = [_image("small", seed=1, size=(8, 8), steps=3), _image("near", seed=2, size=(14, 16), steps=3),
                _image("big", seed=3, size=(16, 16), steps=3)]
    counter = _CountForwards(image_engine.model)
    try:
        together = image_engine.generate(requests)
    finally:
        counter.close()
    assert counter.calls == [[(16, 14, 16), (16, 16, 16)], [(16, 8, 8)]] * 3  # default max_padding 0.5
    for request, batched in zip(requests, together):
        torch.testing.assert_close(batched.latents, image_engine.generate([request])[0].latents,
                                   atol=2e-5, rtol=1e-4)


def test_a_small_request_joins_a_running_big_batch_and_leaves_first(image_engine):
    big = _image("big", seed=1, size=(16, 16), steps=8)
    small = _image("small", seed=2, size=(8, 8), steps=2,
                   cache=StepCacheParams(threshold=ALWAYS, warmup=0.0, max_cached_steps=1))
    queue, done = [[], [small]], []
    outputs = image_engine.generate([big], admit=lambda free: queue.pop(0) if queue else [],
                                    on_done=lambda r: done.append(r.request_id), max_requests=2)
    assert done == ["small", "big"]
    for request, batched in zip([big, small], outputs):
        torch.testing.assert_close(batched.latents, image_engine.generate([request])[0].latents,
                                   atol=2e-5, rtol=1e-4)
    assert (outputs[1].computed_steps, outputs[1].cached_steps) == (1, 1)


def test_video_mixed_frame_counts_step_together_one_forward_per_shape(video_engine):
    requests = [_video("two", seed=1, frames=2), _video("three", seed=2, frames=3)]
    counter = _CountForwards(video_engine.model)
    try:
        together = video_engine.generate(requests)
    finally:
        counter.close()
    assert len(counter.calls) == 2 * 8 and {tuple(c) for c in counter.calls} == {((16, 2, 4, 6),), ((16, 3, 4, 6),)}
    for request, batched in zip(requests, together):
        torch.testing.assert_close(batched.latents, video_engine.generate([request])[0].latents,
                                   atol=2e-5, rtol=1e-4)
