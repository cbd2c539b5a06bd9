"""A reference image -> its MammothTok code grid, sized as the official processor sizes it.

The official processor reads an edit's ``image_gen`` item at the image's own resolution,
each side rounded to the tokenizer patch (``smart_resize`` with factor 14, at least 4 and at
most 16384 patches), maps pixels to [-1, 1] and tokenizes that: the grid is not fixed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .model import MammothTokEncoder

MIN_PATCHES = 4
MAX_PATCHES = 16384


def tokenizer_size(height: int, width: int, patch: int, *, min_patches: int = MIN_PATCHES,
                   max_patches: int = MAX_PATCHES) -> tuple[int, int]:
    """``(height, width)`` rounded to multiples of ``patch`` at the aspect ratio, with the pixel
    count kept within ``[min_patches, max_patches] * patch**2`` (the official rule)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"reference_images: empty image {width}x{height}")
    h = max(patch, round(height / patch) * patch)
    w = max(patch, round(width / patch) * patch)
    if h * w > max_patches * patch * patch:
        beta = math.sqrt(height * width / (max_patches * patch * patch))
        h = max(patch, math.floor(height / beta / patch) * patch)
        w = max(patch, math.floor(width / beta / patch) * patch)
    elif h * w < min_patches * patch * patch:
        beta = math.sqrt(min_patches * patch * patch / (height * width))
        h = math.ceil(height * beta / patch) * patch
        w = math.ceil(width * beta / patch) * patch
    return h, w


def tokenizer_input(pixels: np.ndarray, patch: int) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> ``[1, 3, h, w]`` in [-1, 1] at ``tokenizer_size`` (bicubic, as PIL's
    default resize in the official fetch)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"reference_images: expected [H, W, 3] pixels, got {tuple(pixels.shape)}")
    h, w = tokenizer_size(pixels.shape[0], pixels.shape[1], patch)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    if (h, w) != pixels.shape[:2]:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return x / 127.5 - 1.0


def encode_reference(tokenizer: MammothTokEncoder, pixels: np.ndarray) -> np.ndarray:
    """One fitted reference -> int32 ``[rows, cols]`` codes (row-major, as the prompt reads them)."""
    device = next(tokenizer.parameters()).device  # on CUDA the tokenizer sits on the GPU, pixels come from numpy
    with torch.inference_mode():
        codes = tokenizer(tokenizer_input(pixels, tokenizer.config.patch_size).to(device))[0]
    return np.ascontiguousarray(codes.cpu().numpy().astype(np.int32))
