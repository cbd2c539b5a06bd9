"""Cheap progress previews: a fixed linear map latent -> RGB, no VAE pass.

The map is fitted once per VAE (least squares from the VAE's own encoder on a few synthetic,
smooth colour fields), so it works for any checkpoint -- real or random -- without hand-copied
factor tables. Applying it is one 16x3 matrix product per latent pixel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PREVIEW_FIT_SIZE = 64  # pixels per side of each synthetic fitting image
PREVIEW_FIT_IMAGES = 24


def synthetic_images(count: int = PREVIEW_FIT_IMAGES, size: int = PREVIEW_FIT_SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields + flat colours, uint8 [N, size, size, 3], fixed for a seed."""
    gen = torch.Generator().manual_seed(seed)
    grids = torch.rand(count, 3, 4, 4, generator=gen)
    fields = F.interpolate(grids, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)
    flat = torch.rand(count // 4, 3, 1, 1, generator=gen).expand(-1, -1, size, size)
    fields[: count // 4] = flat
    return (fields * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def fit_linear_map(encode: Callable[[torch.Tensor], torch.Tensor], factor: int, ridge: float = 1e-3, *,
                   count: int = PREVIEW_FIT_IMAGES, size: int = PREVIEW_FIT_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``rgb ~= latents @ weight + bias`` on synthetic images.

    ``encode`` maps uint8 [N,H,W,3] to normalised latents [N,C,H/f,W/f]; the target is the image
    average-pooled to latent resolution, in [-1, 1]. Returns (weight [C,3], bias [3]), float32.
    """
    images = synthetic_images(count, size)
    latents = encode(images).float()  # [N, C, h, w]
    target = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    target = F.avg_pool2d(target, factor)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    gram = x1.T @ x1 + ridge * torch.eye(x1.shape[1], dtype=torch.float64) * x1.shape[0]
    solution = torch.linalg.solve(gram, x1.T @ y.double()).float()
    return solution[:-1].contiguous(), solution[-1].contiguous()


def apply_linear_map(latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     upsample: int = 1) -> torch.Tensor:
    """latents [..., C, h, w] (channel dim third from last) -> uint8 [..., h*u, w*u, 3]."""
    rgb = torch.einsum("...chw,cr->...hwr", latents.float().cpu(), weight) + bias
    out = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if upsample > 1:
        out = out.repeat_interleave(upsample, dim=-3).repeat_interleave(upsample, dim=-2)
    return out
