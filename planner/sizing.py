"""vLLM engine sizes derived from the checkpoint and the config, not from vLLM's defaults.

vLLM's defaults fit an 8B model on a GPU box: a multi-modal warm-up and profiling at whatever
the processor allows, a KV cache of most of the memory (on CPU zeroed at start, so all of it
resident), a 4 GiB media cache in each of two processes. The planner's own inputs are bounded
by its checkpoint (``preprocessor_config.json`` / ``video_preprocessor_config.json``), so the
dummy media vLLM builds at start are bounded the same way and stated explicitly, and the KV
cache is a configured size that may be a fraction of a GiB (tiny models need megabytes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEDULER_CLS = "planner.scheduler.PairScheduler"  # AR-CFG rows admitted together (``scheduler``)
GIB = 1 << 30
DUMMY_VIDEO_FRAMES = 2  # vLLM's Qwen3-VL dummy video is two frames (one temporal patch)


def kv_cache_bytes(gib: float) -> int:
    """``kv_cache_memory_bytes`` for a KV cache of ``gib`` GiB (fractions allowed, > 0)."""
    if gib <= 0:
        raise ValueError(f"kv_cache_gib must be > 0, got {gib}")
    return int(gib * GIB)


def max_pixels(model_dir: str | Path, file: str = "preprocessor_config.json") -> int | None:
    """The largest image (pixels) the checkpoint's processor produces (``size.longest_edge`` or
    ``max_pixels``); None when the checkpoint states none."""
    path = Path(model_dir) / file
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    size = cfg.get("size") or {}
    value = size.get("longest_edge") or size.get("max_pixels") or cfg.get("max_pixels")
    return int(value) if value else None


def _square_side(pixels: int, multiple: int) -> int:
    return max(multiple, int(math.isqrt(pixels)) // multiple * multiple)


def mm_dummy_options(model_dir: str | Path, counts: dict[str, int]) -> dict[str, Any]:
    """``limit_mm_per_prompt``: the per-prompt counts plus the warm-up / profiling media size,
    the checkpoint's own largest image (and a two-frame video of the video processor's size).
    vLLM never builds a dummy bigger than the processor allows; here that bound is explicit."""
    out: dict[str, Any] = {}
    image_px = max_pixels(model_dir)
    video_px = max_pixels(model_dir, "video_preprocessor_config.json") or image_px
    for modality, count in counts.items():
        pixels = image_px if modality == "image" else video_px
        if count <= 0 or pixels is None:
            out[modality] = {"count": max(count, 0)}
            continue
        if modality == "video":
            side = _square_side(pixels // DUMMY_VIDEO_FRAMES, 32)
            out[modality] = {"count": count, "num_frames": DUMMY_VIDEO_FRAMES, "width": side, "height": side}
        else:
            side = _square_side(pixels, 32)
            out[modality] = {"count": count, "width": side, "height": side}
    return out
