"""Encoding decoded frames for the client: PNG/JPEG/WebP images, MP4 (H.264) and GIF video.

Outputs are byte-for-byte deterministic for identical frames: Pillow writes no timestamps, and
ffmpeg runs with ``+bitexact`` flags and metadata stripped so no version/creation tags differ.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import numpy as np
from PIL import Image

IMAGE_OUTPUT_FORMATS = ("png", "jpeg", "webp")
VIDEO_OUTPUT_FORMATS = ("mp4", "gif")


def _as_frames(frames: Any, ndim: int) -> np.ndarray:
    """uint8 array/tensor/PIL -> contiguous uint8 ndarray with ``ndim`` dims (..., H, W, 3)."""
    if isinstance(frames, Image.Image):
        frames = np.asarray(frames.convert("RGB"))
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim == ndim + 1 and array.shape[0] == 1:
        array = array[0]
    if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames with {ndim} dims ending in 3 channels, got {array.dtype} "
                         f"{array.shape}")
    return np.ascontiguousarray(array)


def encode_image(frames: Any, format: str = "png", quality: int | None = 90) -> bytes:
    """uint8 [H,W,3] (or [1,H,W,3], or PIL) -> PNG/JPEG/WebP bytes. ``quality`` (1-100, None = 90)
    is for JPEG/WebP; PNG is lossless."""
    fmt = format.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in IMAGE_OUTPUT_FORMATS:
        raise ValueError(f"unsupported image format {format!r}; expected one of {IMAGE_OUTPUT_FORMATS}")
    quality = 90 if quality is None else quality
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    image = Image.fromarray(_as_frames(frames, 3), mode="RGB")
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=int(quality))
    else:
        image.save(buffer, format="WEBP", quality=int(quality), method=4)
    return buffer.getvalue()


def encode_video(frames: Any, fps: float = 16.0, format: str = "mp4", *, crf: int = 18) -> bytes:
    """uint8 [F,H,W,3] -> MP4 (H.264, yuv420p, ``crf`` 0-51) or looping GIF bytes at ``fps``.

    MP4 needs even width/height (yuv420p); GIF stores frame delays in 10 ms steps and, like every
    Pillow GIF, merges *identical consecutive* frames into one longer frame.
    """
    fmt = format.lower()
    if fmt not in VIDEO_OUTPUT_FORMATS:
        raise ValueError(f"unsupported video format {format!r}; expected one of {VIDEO_OUTPUT_FORMATS}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    video = _as_frames(frames, 4)
    if video.shape[0] == 0:
        raise ValueError("no frames to encode")
    if fmt == "gif":
        return _encode_gif(video, fps)
    return _encode_mp4(video, fps, crf)


def _encode_gif(video: np.ndarray, fps: float) -> bytes:
    images = [Image.fromarray(frame, mode="RGB") for frame in video]
    buffer = io.BytesIO()
    duration = max(10, int(round(1000.0 / fps / 10.0)) * 10)
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buffer.getvalue()


def _encode_mp4(video: np.ndarray, fps: float, crf: int) -> bytes:
    import imageio_ffmpeg

    frames, height, width, _ = video.shape
    if height % 2 or width % 2:
        raise ValueError(f"MP4 (yuv420p) needs even dimensions, got {width}x{height}")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in 0..51, got {crf}")
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            path, (width, height), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=2, ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf)), "-preset", "medium", "-movflags", "+faststart",
                           "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact"],
        )
        writer.send(None)
        for frame in video:
            writer.send(frame)
        writer.close()
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)
