"""Activation-memory estimates and the decode/encode plan they pick (batch slicing, spatial tiles).

The estimates are shape arithmetic, calibrated against peak-RSS measurements of the diffusers
models on CPU (see ``bench/vae.py``); they cover activations and outputs, not the weights.
A plan is the cheapest way to stay under the budget, in order: whole batch at once, one sample at
a time ("slicing"), then spatial tiles of the largest size that fits. Tiles are overlapped by a
quarter and blended by diffusers, so tiling changes the result slightly (see ``tests/vae``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Live full-size tensors per conv level of an AutoencoderKL (input kept for the residual, norm and
# activation outputs, conv outputs); measured 5.6-8.3 tensors at the widest level.
_KL_TENSORS_PER_CHANNEL = 3.0
# Floats per (output pixel x base channel) of one AutoencoderKLWan decode/encode step. On CPU the
# full-resolution causal conv3d runs as vol2col: a column buffer of 27 taps x 4 frames x C_in per
# pixel = 108 floats, which matched the measured decode working set of the tiny config (453 MB at
# 256 px); the Wan2.1 config measured about half that per channel. Conservative on GPU (cuDNN).
_WAN_FLOATS_PER_PIXEL_CHANNEL = 108.0
# The decoded video is assembled by repeated concatenation: ~3 copies of the float output live.
_WAN_OUTPUT_COPIES = 3.0
# Overlap factor 1/4 -> tiles cover the image ~(4/3)^2 times; diffusers keeps every decoded tile.
_TILE_OUTPUT_COPIES = 1.0 + (4.0 / 3.0) ** 2


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How one encode/decode call runs; ``tile`` is the tile side in pixels (None = untiled)."""

    slice_batch: bool
    tile: int | None
    estimate_bytes: int

    @property
    def stride(self) -> int | None:
        return None if self.tile is None else self.tile * 3 // 4


def kl_bytes(config: dict[str, Any], height: int, width: int, itemsize: int, *, decode: bool) -> int:
    """Peak activation bytes of one AutoencoderKL sample at pixel size ``height`` x ``width``."""
    chans = list(config["block_out_channels"])
    levels = len(chans)
    peak = 0.0
    for level in range(levels):
        if decode:  # up block `level` works at 1/2^(levels-1-level) of the output size
            c_in, c_out = chans[::-1][max(level - 1, 0)], chans[::-1][level]
            scale = 2 ** (levels - 1 - level)
        else:
            c_in, c_out = chans[max(level - 1, 0)], chans[level]
            scale = 2 ** level
        pixels = (height / scale) * (width / scale)
        peak = max(peak, _KL_TENSORS_PER_CHANNEL * (c_in + c_out) * pixels)
    return int(peak * itemsize + 3 * height * width * itemsize)


def wan_bytes(config: dict[str, Any], frames: int, height: int, width: int, itemsize: int) -> int:
    """Peak activation bytes of one AutoencoderKLWan sample (decode or encode: same order)."""
    base = int(config.get("decoder_base_dim") or config["base_dim"])
    step = _WAN_FLOATS_PER_PIXEL_CHANNEL * base * height * width
    video = _WAN_OUTPUT_COPIES * frames * 3 * height * width
    return int((step + video) * itemsize)


def _tiled_work(side: int, tile: int) -> int:
    """Pixels decoded along one side: diffusers starts a tile at every stride below ``side``."""
    stride = tile * 3 // 4
    return sum(min(tile, side - start) for start in range(0, side, stride))


def plan(per_sample: Any, batch: int, height: int, width: int, budget_bytes: int, *,
         output_bytes: int, min_tile: int = 128, tile_step: int = 32) -> MemoryPlan:
    """Pick slicing/tiling so that ``per_sample(h, w)`` (one sample's bytes) fits the budget.

    ``output_bytes`` is one sample's full-size output (it exists whatever the tiling). Among the
    tiles that fit, the one with the least decoded area (overlaps included) wins, then the larger.
    """
    whole = per_sample(height, width)
    if batch * whole <= budget_bytes:
        return MemoryPlan(False, None, batch * whole)
    if whole <= budget_bytes:
        return MemoryPlan(True, None, whole)
    best: tuple[int, int, int] | None = None  # (work, -tile, cost)
    for tile in range(min_tile, max(height, width), tile_step):
        cost = per_sample(min(tile, height), min(tile, width)) + int(_TILE_OUTPUT_COPIES * output_bytes)
        if cost > budget_bytes:
            break  # cost grows with the tile
        key = (_tiled_work(height, tile) * _tiled_work(width, tile), -tile, cost)
        best = key if best is None or key < best else best
    if best is None:  # nothing fits: the smallest tile is the least memory we can do
        cost = per_sample(min(min_tile, height), min(min_tile, width)) + int(_TILE_OUTPUT_COPIES * output_bytes)
        return MemoryPlan(True, min_tile, cost)
    return MemoryPlan(True, -best[1], best[2])
