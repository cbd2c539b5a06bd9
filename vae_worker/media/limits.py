"""Bounds applied to every piece of untrusted media before (and while) it is decoded."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    """Per-request bounds; the defaults fit the models with room to spare.

    Images are downscaled to <= 1 MP for the DiT anyway (official processor), so a 40 MP photo is
    the most worth decoding. Video is checked from its header first (size, duration), then frame
    by frame while decoding; ``max_decoded_bytes`` caps the raw RGB a video may expand to, and
    ``decode_timeout_s`` bounds the ffmpeg process in wall-clock time so nothing can hang.
    """

    max_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000
    max_width: int = 8192
    max_height: int = 8192
    max_video_bytes: int = 128 * 2**20
    max_video_width: int = 1920
    max_video_height: int = 1920
    max_video_pixels: int = 1920 * 1088
    max_frames: int = 241
    max_duration_s: float = 16.0
    max_decoded_bytes: int = 768 * 2**20
    decode_timeout_s: float = 60.0
