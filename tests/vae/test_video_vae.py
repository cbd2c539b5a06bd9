"""VideoVAE: 4k+1 round trips, causality of the encoder, batching, tiling tolerance, preview."""

from __future__ import annotations

import pytest
import torch

from tests.vae.conftest import smooth_images
from tests.vae.test_image_vae import TILE_MAX_MEAN_ABS_LEVELS, TILE_MIN_PSNR_DB, psnr_and_mean_abs
from vae_worker.engine import VideoVAE
from vae_worker.presets import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD


def moving_video(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """A smooth image panning one pixel per frame: uint8 [1,F,size,size,3]."""
    big = smooth_images(1, size, size + frames, seed=seed)[0]
    return torch.stack([big[:, i:i + size] for i in range(frames)])[None]


def test_properties(video_vae):
    assert video_vae.latent_channels == 16
    assert video_vae.spatial_compression == 8
    assert video_vae.temporal_compression == 4
    assert video_vae.num_latent_frames(17) == 5 and video_vae.num_frames(5) == 17


@pytest.mark.parametrize("frames", [1, 9])
def test_round_trip_shapes(video_vae, frames):
    video = moving_video(frames, 32)
    latents = video_vae.encode(video)
    assert latents.shape == (1, 16, (frames - 1) // 4 + 1, 4, 4)
    decoded = video_vae.decode(latents)
    assert decoded.shape == (1, frames, 32, 32, 3) and decoded.dtype == torch.uint8


def test_normalisation_matches_official_formulas(video_vae):
    """2.5 pipeline: z = (mode - latents_mean) * (1 / latents_std); decode: z / (1/std) + mean."""
    video = moving_video(5, 32)
    mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(WAN21_LATENTS_STD).view(1, 16, 1, 1, 1)
    x = video.permute(0, 4, 1, 2, 3).float() / 255.0 * 2.0 - 1.0
    with torch.no_grad():
        mode = video_vae.model.encode(x).latent_dist.mode()
        latents = video_vae.encode(video)
        torch.testing.assert_close(latents, (mode - mean) * inv_std, atol=1e-5, rtol=1e-5)
        raw = video_vae.model.decode(latents / inv_std + mean).sample
    expected = ((raw / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    decoded = video_vae.decode(latents)
    assert (decoded.int() - expected.int()).abs().max() <= 1  # z*std vs z/(1/std) rounding


def test_encoder_is_causal(video_vae):
    """Latent t sees only frames <= 4t: changing later frames leaves earlier latents untouched."""
    video = moving_video(9, 32)
    base = video_vae.encode(video)
    late = video.clone()
    late[:, 5:] = 255 - late[:, 5:]  # frames of latent 2 only
    changed = video_vae.encode(late)
    torch.testing.assert_close(changed[:, :, :2], base[:, :, :2], atol=1e-6, rtol=0)
    assert (changed[:, :, 2] - base[:, :, 2]).abs().max() > 1e-3
    middle = video.clone()
    middle[:, 1:5] = 255 - middle[:, 1:5]  # frames of latent 1
    changed = video_vae.encode(middle)
    torch.testing.assert_close(changed[:, :, 0], base[:, :, 0], atol=1e-6, rtol=0)
    assert (changed[:, :, 1] - base[:, :, 1]).abs().max() > 1e-3


def test_decoder_is_causal(video_vae):
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    base = video_vae.decode_float(latents)
    edited = latents.clone()
    edited[:, :, 2] += 1.0
    changed = video_vae.decode_float(edited)
    torch.testing.assert_close(changed[:, :, :5], base[:, :, :5], atol=1e-6, rtol=0)
    assert not torch.equal(changed[:, :, 5:], base[:, :, 5:])


def test_rejects_frame_counts_other_than_4k_plus_1(video_vae):
    with pytest.raises(ValueError, match="4k\\+1"):
        video_vae.encode(moving_video(8, 32))


def test_batched_equals_single(video_vae):
    latents = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    batched = video_vae.decode_float(latents)
    singles = torch.cat([video_vae.decode_float(latents[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=0)
    items = video_vae.decode_many([latents[:1], latents[1:]])
    assert [tuple(i.shape) for i in items] == [(1, 5, 32, 32, 3)] * 2


def test_tiled_decode_within_tolerance(video_ckpt):
    latents = torch.randn(1, 16, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    untiled_vae = VideoVAE.from_pretrained(video_ckpt)
    untiled = untiled_vae.decode_float(latents)
    assert untiled_vae.last_plan.tile is None
    tiled_vae = VideoVAE.from_pretrained(video_ckpt, memory_budget_mb=1)
    tiled = tiled_vae.decode_float(latents)
    assert tiled_vae.last_plan.tile == 128 and tiled_vae.last_plan.stride == 96
    assert tiled.shape == untiled.shape == (1, 3, 1, 160, 160)
    assert not torch.equal(tiled, untiled)
    psnr, mean_abs = psnr_and_mean_abs(tiled, untiled)
    assert psnr >= TILE_MIN_PSNR_DB and mean_abs <= TILE_MAX_MEAN_ABS_LEVELS, (psnr, mean_abs)


def test_plan_follows_memory_budget(video_vae):
    video_vae.memory_budget_mb = 64 * 1024
    assert video_vae.plan_for(2, 81, 480, 832).tile is None
    video_vae.memory_budget_mb = 256
    plan = video_vae.plan_for(1, 81, 480, 832)
    assert plan.slice_batch and plan.tile is not None and plan.tile < 832


def test_preview(video_vae):
    latents = video_vae.encode(moving_video(5, 32))
    preview = video_vae.preview(latents)
    assert preview.shape == (1, 2, 4, 4, 3) and preview.dtype == torch.uint8
    assert video_vae.preview(latents, upsample=8).shape == (1, 2, 32, 32, 3)
