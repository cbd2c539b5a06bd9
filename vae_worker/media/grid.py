"""Fitting pixels to the model grid (sides a multiple of 16 px: 8x VAE x patch 2).

``grid_size`` mirrors the official MammothModa2 VAE processor (downscale only, to <= 1 MP and
<= 2048 px per side, floor to the multiple); ``grid_size_for_area`` mirrors the 2.5 pipeline's
source-video sizing (keep aspect ratio at a target area). ``fit_to_grid`` then produces exactly
the requested size with the policy named in the request.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vae_worker.media.errors import MediaError, MediaTooSmall

POLICIES = ("resize", "center_crop", "pad")


def grid_size(width: int, height: int, *, max_pixels: int | None = 1024 * 1024, max_side: int | None = 2048,
              multiple: int = 16, field: str = "image") -> tuple[int, int]:
    """(width, height) on the grid: never upscaled, within ``max_pixels``/``max_side``."""
    ratio = 1.0
    if max_side is not None:
        ratio = min(ratio, max_side / max(width, height))
    if max_pixels is not None:
        ratio = min(ratio, (max_pixels / (width * height)) ** 0.5)
    new_w = int(width * ratio) // multiple * multiple
    new_h = int(height * ratio) // multiple * multiple
    if new_w == 0 or new_h == 0:
        raise MediaTooSmall(f"{width}x{height} is smaller than the {multiple} px grid", field=field, limit=multiple)
    return new_w, new_h


def grid_size_for_area(width: int, height: int, area: int, *, multiple: int = 16,
                       field: str = "video") -> tuple[int, int]:
    """(width, height) on the grid with about ``area`` pixels and the input's aspect ratio."""
    aspect = height / width
    new_h = int(math.sqrt(area * aspect) // multiple) * multiple
    new_w = int(math.sqrt(area / aspect) // multiple) * multiple
    if new_w == 0 or new_h == 0:
        raise MediaTooSmall(f"area {area} gives an empty grid for {width}x{height}", field=field, limit=multiple)
    return new_w, new_h


def trim_to_4k1(frames: Any, temporal: int = 4) -> Any:
    """Keep the longest prefix with 4k+1 frames (what the causal video VAE accepts)."""
    count = len(frames)
    if count == 0:
        raise ValueError("no frames")
    return frames[: (count - 1) // temporal * temporal + 1]


def _resize_pil(image: Image.Image, size: tuple[int, int], resample: str) -> Image.Image:
    method = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}[resample]
    return image if image.size == size else image.resize(size, resample=method)


def _resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear, no antialias: the 2.5 pipeline's resize of source videos."""
    if frames.shape[2] == size[0] and frames.shape[1] == size[1]:
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _fit_box(width: int, height: int, target_w: int, target_h: int, policy: str) -> tuple[int, int]:
    scale = (max if policy == "center_crop" else min)(target_w / width, target_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_to_grid(image_or_frames: Any, width: int, height: int, policy: str = "resize", multiple: int = 16, *,
                resample: str = "lanczos", pad_value: int = 0, field: str = "image") -> Any:
    """Bring a PIL image, uint8 [H,W,3] or uint8 frames [F,H,W,3] to exactly ``width`` x ``height``.

    Policies: ``resize`` stretches (the official default), ``center_crop`` scales to cover and
    crops the centre, ``pad`` scales to fit and pads with ``pad_value``. PIL/[H,W,3] inputs use
    Pillow (``resample``, default Lanczos as the official image processor); frames use bilinear
    interpolation as the official video pipeline. Returns the same kind it was given.
    """
    if policy not in POLICIES:
        raise MediaError(f"unknown resize policy {policy!r}; expected one of {POLICIES}", field="resize_policy",
                         limit=POLICIES)
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise ValueError(f"target {width}x{height} is not a positive multiple of {multiple}")
    if isinstance(image_or_frames, Image.Image):
        return _fit_pil(image_or_frames.convert("RGB"), width, height, policy, resample, pad_value)
    array = np.asarray(image_or_frames)
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H,W,3] or [F,H,W,3], got {array.dtype} {array.shape}")
    if array.ndim == 3:
        return np.asarray(_fit_pil(Image.fromarray(array), width, height, policy, resample, pad_value))
    return _fit_frames(array, width, height, policy, pad_value)


def _fit_pil(image: Image.Image, width: int, height: int, policy: str, resample: str, pad_value: int) -> Image.Image:
    if policy == "resize":
        return _resize_pil(image, (width, height), resample)
    new_w, new_h = _fit_box(image.width, image.height, width, height, policy)
    scaled = _resize_pil(image, (new_w, new_h), resample)
    if policy == "center_crop":
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height), (pad_value,) * 3)
    canvas.paste(scaled, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def _fit_frames(frames: np.ndarray, width: int, height: int, policy: str, pad_value: int) -> np.ndarray:
    if policy == "resize":
        return _resize_frames(frames, (width, height))
    new_w, new_h = _fit_box(frames.shape[2], frames.shape[1], width, height, policy)
    scaled = _resize_frames(frames, (new_w, new_h))
    if policy == "center_crop":
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return np.ascontiguousarray(scaled[:, top:top + height, left:left + width])
    out = np.full((frames.shape[0], height, width, 3), pad_value, dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[:, top:top + new_h, left:left + new_w] = scaled
    return out


def prepare_reference_image(image: Image.Image, width: int | None = None, height: int | None = None,
                            policy: str = "resize", *, max_pixels: int | None = 1024 * 1024,
                            max_side: int | None = 2048, field: str = "image") -> Image.Image:
    """A decoded reference image on the grid, ready for ``ImageVAE.encode``.

    Without a target size this is the official processor's behaviour (downscale to <= 1 MP and
    <= 2048 px, floor to 16, Lanczos stretch); with one, the request's policy decides.
    """
    if width is None or height is None:
        width, height = grid_size(image.width, image.height, max_pixels=max_pixels, max_side=max_side, field=field)
    return fit_to_grid(image, width, height, policy, field=field)


def prepare_source_video(frames: np.ndarray, width: int | None = None, height: int | None = None,
                         policy: str = "resize", *, area: int = 480 * 832, field: str = "video") -> np.ndarray:
    """Decoded source frames on the grid with 4k+1 frames, ready for ``VideoVAE.encode``.

    Without a target size the official 2.5 sizing applies (input aspect ratio at ``area`` pixels).
    """
    if width is None or height is None:
        width, height = grid_size_for_area(frames.shape[2], frames.shape[1], area, field=field)
    return fit_to_grid(trim_to_4k1(frames), width, height, policy, field=field)
