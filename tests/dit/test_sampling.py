"""Sampler schedules against hand-computed values, and the CFG chain against separate passes."""

import math

import numpy as np
import pytest
import torch

from dit_worker.guidance import GuidanceChain, combine, validate_cfg_range, validate_scale
from dit_worker.sampling import image_sampler, image_time_shift, validate_schedule, video_sampler


def _reference_image_schedule(steps: int, latent_h: int, latent_w: int) -> list[float]:
    """FACTS §6 by hand: t linear over [0, 1), warped by t' = t / (m - m t + t), then t = 1."""
    m = math.sqrt(latent_h * latent_w) / 40
    ts = [i / steps for i in range(steps)]
    return [t / (m - m * t + t) for t in ts] + [1.0]


@pytest.mark.parametrize("steps,h,w", [(4, 16, 16), (50, 128, 128), (7, 40, 24), (1, 32, 32)])
def test_image_schedule_matches_hand_computed_shift(steps, h, w):
    sampler = image_sampler(h, w, steps)
    got_t = (1.0 - sampler.scheduler.sigmas).tolist()
    np.testing.assert_allclose(got_t, _reference_image_schedule(steps, h, w), atol=1e-6)
    assert sampler.num_steps == steps


def test_shift_values_at_documented_resolutions():
    assert image_time_shift(40, 40) == pytest.approx(1.0)  # 320 px / 8
    assert image_time_shift(128, 128) == pytest.approx(3.2)  # 1024 px / 8


def test_image_euler_step_is_x_plus_dt_times_velocity():
    sampler = image_sampler(16, 16, 4)
    x = torch.randn(2, 16, 16, 16)
    v = torch.randn_like(x)
    expected_t = _reference_image_schedule(4, 16, 16)
    for i in range(4):
        assert sampler.model_timestep() == pytest.approx(expected_t[i], abs=1e-6)
        x_next = sampler.step(v, x)
        torch.testing.assert_close(x_next, x + (expected_t[i + 1] - expected_t[i]) * v, atol=1e-5, rtol=1e-5)
        x = x_next
    assert sampler.done


def test_explicit_few_step_sigmas_are_used_as_given():
    sigmas = [1.0, 0.75, 0.5, 0.25]
    sampler = image_sampler(64, 64, steps=50, sigmas=sigmas)
    assert sampler.num_steps == 4
    np.testing.assert_allclose(sampler.scheduler.sigmas.tolist(), sigmas + [0.0], atol=1e-7)
    video = video_sampler(50, {"shift": 5.0}, sigmas=sigmas)
    np.testing.assert_allclose(video.scheduler.sigmas.tolist(), sigmas + [0.0], atol=1e-7)


def test_video_sampler_uses_checkpoint_scheduler_config():
    sampler = video_sampler(10, {"shift": 3.0})
    assert sampler.scheduler.config.shift == 3.0
    assert sampler.model_timestep() == pytest.approx(1000.0, rel=1e-5)  # starts at pure noise
    x, out = torch.zeros(3), torch.ones(3)
    s0, s1 = float(sampler.scheduler.sigmas[0]), float(sampler.scheduler.sigmas[1])
    torch.testing.assert_close(sampler.step(out, x), x + (s1 - s0) * out)


@pytest.mark.parametrize("steps,sigmas", [(0, None), (201, None), (2.5, None), (4, [1.0, 1.2]),
                                          (4, [0.5, 0.7]), (4, [1.0, float("nan")]), (4, [])])
def test_bad_schedules_name_the_field(steps, sigmas):
    with pytest.raises(ValueError, match="steps|sigmas"):
        validate_schedule(steps, sigmas)


def test_cfg_chain_equals_separate_pass_formulas():
    uncond, ref, cond = (torch.randn(4, 8) for _ in range(3))
    # 2-way: uncond + s (cond - uncond)
    torch.testing.assert_close(combine([uncond, cond], [5.0]), uncond + 5.0 * (cond - uncond))
    # 3-way as in the reference editing pipeline
    expected = uncond + 2.0 * (ref - uncond) + 9.0 * (cond - ref)
    torch.testing.assert_close(combine([uncond, ref, cond], [2.0, 9.0]), expected)
    assert combine([cond], []) is cond


def test_cfg_range_runs_only_the_conditioned_branch_outside():
    chain = GuidanceChain(["u", "r", "c"], [2.0, 5.0], cfg_range=(0.0, 0.5))
    assert chain.active_branches(0, 10) == [0, 1, 2]
    assert chain.active_branches(5, 10) == [0, 1, 2]
    assert chain.active_branches(6, 10) == [2]
    with pytest.raises(ValueError):
        GuidanceChain(["u", "c"], [])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 1e6, "5"])
def test_bad_guidance_scale_is_rejected(value):
    with pytest.raises(ValueError, match="text_guidance"):
        validate_scale("text_guidance", value)


@pytest.mark.parametrize("value", [(0.5, 0.2), (0.0, 1.5), (float("nan"), 1.0), (0.1,)])
def test_bad_cfg_range_is_rejected(value):
    with pytest.raises(ValueError, match="cfg_range"):
        validate_cfg_range(value)
