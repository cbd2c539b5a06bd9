"""ImageVAE: shapes, the official normalisation, batching, memory plans, tiling tolerance, preview."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.vae.conftest import smooth_images
from vae_worker.engine import ImageVAE

# Tiled vs untiled decode of N(0,1) latents (what the DiT hands over), tile = half the image side,
# 1/4 overlap. diffusers' tiling is approximate by design: each tile has its own GroupNorm
# statistics and its own mid-block attention; a random-weight VAE amplifies that (measured
# ~30 dB / 5.4 levels for the tiny image VAE, ~32 dB / 4.5 levels for the tiny video VAE).
TILE_MIN_PSNR_DB = 25.0
TILE_MAX_MEAN_ABS_LEVELS = 8.0


def psnr_and_mean_abs(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """On float pixels in [-1, 1]: PSNR (dB, peak-to-peak 2) and mean |diff| in uint8 levels."""
    mse = ((a - b) ** 2).mean().item()
    return 10 * torch.log10(torch.tensor(4.0 / mse)).item(), ((a - b).abs().mean() * 127.5).item()


def test_properties(image_vae):
    assert image_vae.latent_channels == 16
    assert image_vae.spatial_compression == 8
    assert image_vae.temporal_compression == 1
    assert image_vae.shift_factor == pytest.approx(0.1159)
    assert image_vae.scaling_factor == pytest.approx(0.3611)


def test_round_trip_shapes(image_vae):
    pixels = smooth_images(2, 64, 96)
    latents = image_vae.encode(pixels)
    assert latents.shape == (2, 16, 8, 12) and latents.dtype == torch.float32
    decoded = image_vae.decode(latents)
    assert decoded.shape == (2, 64, 96, 3) and decoded.dtype == torch.uint8


def test_encode_accepts_pil_list(image_vae):
    pixels = smooth_images(2, 32, 48)
    pil = [Image.fromarray(p.numpy()) for p in pixels]
    torch.testing.assert_close(image_vae.encode(pil), image_vae.encode(pixels))


def test_normalisation_matches_official_formulas(image_vae):
    """z = (mode - shift) * scale on pixels/127.5 - 1; decode = vae.decode(z / scale + shift)."""
    pixels = smooth_images(1, 32, 32)
    model = image_vae.model
    x = pixels.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
    with torch.no_grad():
        mode = model.encode(x).latent_dist.mode()
        expected = (mode - 0.1159) * 0.3611
        latents = image_vae.encode(pixels)
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
        raw = model.decode(latents / 0.3611 + 0.1159).sample
    expected_u8 = ((raw / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(image_vae.decode(latents), expected_u8)


def test_encode_is_deterministic(image_vae):
    pixels = smooth_images(1, 32, 32)
    assert torch.equal(image_vae.encode(pixels), image_vae.encode(pixels))


def test_batched_equals_single(image_vae):
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    batched = image_vae.decode_float(latents)
    singles = torch.cat([image_vae.decode_float(latents[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=0)


def test_decode_many_groups_by_shape_and_keeps_order(image_vae):
    gen = torch.Generator().manual_seed(1)
    items = [torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 16, 4, 6, generator=gen),
             torch.randn(2, 16, 4, 4, generator=gen)]
    outs = image_vae.decode_many(items)
    assert [tuple(o.shape) for o in outs] == [(1, 32, 32, 3), (1, 32, 48, 3), (2, 32, 32, 3)]
    expected = image_vae.decode(torch.cat([items[0], items[2]]))
    assert (outs[0].int() - expected[:1].int()).abs().max() <= 1
    assert (outs[2].int() - expected[1:].int()).abs().max() <= 1
    assert (outs[1].int() - image_vae.decode(items[1]).int()).abs().max() <= 1


def test_plan_follows_memory_budget(image_vae):
    image_vae.memory_budget_mb = 4096
    plan = image_vae.plan_for(4, 256, 256, decode=True)
    assert not plan.slice_batch and plan.tile is None
    one = image_vae.plan_for(1, 256, 256, decode=True).estimate_bytes
    assert image_vae.plan_for(1, 512, 512, decode=True).estimate_bytes > 3 * one  # grows with the image
    image_vae.memory_budget_mb = 2 * one / 2**20
    plan = image_vae.plan_for(4, 256, 256, decode=True)
    assert plan.slice_batch and plan.tile is None
    image_vae.memory_budget_mb = one / 2 / 2**20
    plan = image_vae.plan_for(1, 256, 256, decode=True)
    assert plan.tile is not None and plan.tile < 256 and plan.tile % 32 == 0
    # the plan is applied on the next call
    image_vae.memory_budget_mb = 1
    image_vae.decode(torch.zeros(1, 16, 20, 20))
    assert image_vae.last_plan.tile == 128 and image_vae.model.use_tiling


def test_tiled_decode_within_tolerance(image_ckpt):
    latents = torch.randn(1, 16, 20, 20, generator=torch.Generator().manual_seed(1))
    untiled_vae = ImageVAE.from_pretrained(image_ckpt)
    untiled = untiled_vae.decode_float(latents)
    assert untiled_vae.last_plan.tile is None
    tiled_vae = ImageVAE.from_pretrained(image_ckpt, memory_budget_mb=1)
    tiled = tiled_vae.decode_float(latents)
    assert tiled_vae.last_plan.tile == 128
    assert tiled.shape == untiled.shape
    assert not torch.equal(tiled, untiled)  # the tiled path really ran
    psnr, mean_abs = psnr_and_mean_abs(tiled, untiled)
    assert psnr >= TILE_MIN_PSNR_DB and mean_abs <= TILE_MAX_MEAN_ABS_LEVELS, (psnr, mean_abs)


def test_tiled_encode_shape(image_ckpt):
    vae = ImageVAE.from_pretrained(image_ckpt, memory_budget_mb=1)
    latents = vae.encode(smooth_images(1, 160, 144))
    assert vae.last_plan.tile == 128
    assert latents.shape == (1, 16, 20, 18)


def test_preview_is_a_cheap_linear_map(image_vae):
    """The fitted latent->RGB map tracks colour even for a random VAE (a trained one does far better)."""
    colours = torch.tensor([[230, 20, 20], [20, 200, 40], [30, 30, 220]], dtype=torch.uint8)
    flat = colours[:, None, None, :].expand(3, 32, 32, 3).contiguous()
    preview = image_vae.preview(image_vae.encode(flat))
    assert preview.shape == (3, 4, 4, 3) and preview.dtype == torch.uint8
    assert preview.float().mean(dim=(1, 2)).argmax(dim=1).tolist() == [0, 1, 2]
    # held-out smooth images: each preview channel correlates with the downsampled image
    pixels = smooth_images(4, 64, 64, seed=5)
    latents = image_vae.encode(pixels)
    preview = image_vae.preview(latents).float()
    target = torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2).float(), 8).permute(0, 2, 3, 1)
    for c in range(3):
        corr = torch.corrcoef(torch.stack([preview[..., c].flatten(), target[..., c].flatten()]))[0, 1]
        assert corr > 0.3, (c, corr)
    assert image_vae.preview(latents, upsample=8).shape == (4, 64, 64, 3)
    assert torch.equal(image_vae.preview(latents), preview.to(torch.uint8))


@pytest.mark.parametrize("bad", [
    torch.zeros(1, 30, 32, 3, dtype=torch.uint8),  # not a multiple of 8
    torch.zeros(1, 32, 32, 3, dtype=torch.float32),  # not uint8
    torch.zeros(32, 32, 3, dtype=torch.uint8),  # no batch dim
])
def test_encode_rejects_bad_pixels(image_vae, bad):
    with pytest.raises(ValueError):
        image_vae.encode(bad)


def test_decode_rejects_bad_latents(image_vae):
    with pytest.raises(ValueError):
        image_vae.decode(torch.zeros(1, 4, 8, 8))
