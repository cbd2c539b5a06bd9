"""Decoding untrusted media bytes: sniff, bound, then decode -- never crash, never hang.

Order of checks: byte size, magic bytes (only PNG/JPEG/WebP/GIF images and MP4/WebM/GIF video
reach a parser, and each parser is restricted to the sniffed format so no exotic demuxer or
protocol is ever tried), header dimensions/duration against ``MediaLimits``, then the full
decode with per-frame counting. Images go through Pillow (with its decompression-bomb guard as a
second line behind our pixel check); MP4/WebM through imageio-ffmpeg with a frame cap, a CPU
time limit and a wall-clock deadline; GIF animations through Pillow frame by frame.
"""

from __future__ import annotations

import io
import os
import re
import struct
import tempfile
import time
import warnings
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from vae_worker.media.errors import (
    CorruptMedia,
    EmptyMedia,
    MediaError,
    MediaTimeout,
    MediaTooLarge,
    UnsupportedMedia,
)
from vae_worker.media.limits import MediaLimits

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
VIDEO_FORMATS = ("MP4", "WEBM", "GIF")
# Exceptions Pillow's parsers raise on malformed data.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError,
               KeyError, MemoryError)
_DEFAULT_LIMITS = MediaLimits()


def sniff_format(data: bytes) -> str | None:
    """The container format from magic bytes (PNG/JPEG/WEBP/GIF/MP4/WEBM), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[4:8] == b"ftyp":
        return "MP4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "WEBM"
    return None


def _check_bytes(data: Any, max_bytes: int, field: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnsupportedMedia(f"expected bytes, got {type(data).__name__}", field=field)
    data = bytes(data)
    if not data:
        raise EmptyMedia("no data", field=field)
    if len(data) > max_bytes:
        raise MediaTooLarge(f"{len(data)} bytes exceeds the limit of {max_bytes}", field=field, limit=max_bytes)
    return data


def _check_dims(width: int, height: int, *, max_width: int, max_height: int, max_pixels: int, field: str) -> None:
    if width <= 0 or height <= 0:
        raise CorruptMedia(f"invalid dimensions {width}x{height}", field=field)
    if width > max_width:
        raise MediaTooLarge(f"width {width} exceeds the limit of {max_width}", field=field, limit=max_width)
    if height > max_height:
        raise MediaTooLarge(f"height {height} exceeds the limit of {max_height}", field=field, limit=max_height)
    if width * height > max_pixels:
        raise MediaTooLarge(f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                            field=field, limit=max_pixels)


def _open_pil(data: bytes, fmt: str, field: str, max_pixels: int) -> Image.Image:
    """Parse the header only (no pixel data yet), restricted to the sniffed format."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLarge(f"decompression bomb ({exc})", field=field, limit=max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise CorruptMedia(f"malformed {fmt} header", field=field) from exc
    except _PIL_ERRORS as exc:
        raise CorruptMedia(f"malformed {fmt} data ({exc})", field=field) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency over white (as the official preprocessing does)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(data: bytes, limits: MediaLimits = _DEFAULT_LIMITS, field: str = "image", *,
                 exif_transpose: bool = True) -> Image.Image:
    """Untrusted PNG/JPEG/WebP/GIF (first frame) bytes -> an RGB PIL image, or a ``MediaError``.

    EXIF orientation is applied (what the user saw), transparency is composited over white.
    """
    data = _check_bytes(data, limits.max_bytes, field)
    fmt = sniff_format(data)
    if fmt not in IMAGE_FORMATS:
        raise UnsupportedMedia(f"not a supported image (accepted: {', '.join(IMAGE_FORMATS)})", field=field,
                               limit=IMAGE_FORMATS)
    image = _open_pil(data, fmt, field, limits.max_pixels)
    _check_dims(image.width, image.height, max_width=limits.max_width, max_height=limits.max_height,
                max_pixels=limits.max_pixels, field=field)
    try:
        image.seek(0)
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
        rgb.load()
    except _PIL_ERRORS as exc:
        raise CorruptMedia(f"truncated or corrupt {fmt} data ({exc})", field=field) from exc
    return rgb


def _decode_gif_video(data: bytes, limits: MediaLimits, field: str) -> tuple[np.ndarray, float]:
    image = _open_pil(data, "GIF", field, limits.max_video_pixels)
    _check_video_dims(image.width, image.height, limits, field)
    frames: list[np.ndarray] = []
    duration_ms = 0.0
    try:
        for frame in ImageSequence.Iterator(image):
            if len(frames) >= limits.max_frames:
                raise MediaTooLarge(f"more than {limits.max_frames} frames", field=field, limit=limits.max_frames)
            duration_ms += float(frame.info.get("duration") or 0)
            if duration_ms / 1000.0 > limits.max_duration_s:
                raise MediaTooLarge(f"longer than {limits.max_duration_s} s", field=field,
                                    limit=limits.max_duration_s)
            frames.append(np.asarray(_to_rgb(frame.convert("RGBA"))))
    except MediaError:
        raise
    except _PIL_ERRORS as exc:
        raise CorruptMedia(f"truncated or corrupt GIF data ({exc})", field=field) from exc
    if not frames:
        raise EmptyMedia("no frames", field=field)
    fps = len(frames) / (duration_ms / 1000.0) if duration_ms > 0 else 10.0
    return np.stack(frames), fps


def _check_video_dims(width: int, height: int, limits: MediaLimits, field: str) -> None:
    _check_dims(width, height, max_width=limits.max_video_width, max_height=limits.max_video_height,
                max_pixels=limits.max_video_pixels, field=field)


def _decode_ffmpeg_video(data: bytes, fmt: str, limits: MediaLimits, field: str) -> tuple[np.ndarray, float]:
    import imageio_ffmpeg

    demuxer = {"MP4": "mov", "WEBM": "matroska"}[fmt]
    deadline = time.monotonic() + limits.decode_timeout_s
    fd, path = tempfile.mkstemp(suffix="." + fmt.lower())
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        cpu_limit = max(1, int(limits.decode_timeout_s))
        gen = imageio_ffmpeg.read_frames(
            path,
            input_params=["-timelimit", str(cpu_limit), "-protocol_whitelist", "file", "-f", demuxer],
            output_params=["-an", "-sn", "-dn", "-frames:v", str(limits.max_frames + 1)],
        )
        try:
            return _read_ffmpeg_frames(gen, limits, field, deadline)
        finally:
            gen.close()
    finally:
        os.unlink(path)


def _decoder_said(exc: BaseException) -> str:
    """ffmpeg's first line, without the temporary file's path (clients never see our paths)."""
    lines = str(exc).splitlines()
    return re.sub(r"\S*/\S*", "<input>", lines[0] if lines else type(exc).__name__)[:200]


def _read_ffmpeg_frames(gen: Any, limits: MediaLimits, field: str, deadline: float) -> tuple[np.ndarray, float]:
    try:
        meta = next(gen)
    except StopIteration as exc:
        raise CorruptMedia("no video stream", field=field) from exc
    except Exception as exc:  # imageio-ffmpeg raises IOError/RuntimeError/ValueError on unparsable input
        raise CorruptMedia(f"unreadable video ({_decoder_said(exc)})", field=field) from exc
    try:
        width, height = (int(v) for v in meta["size"])
        fps = float(meta.get("fps") or 0.0)
        duration = float(meta.get("duration") or 0.0)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptMedia("video header without a usable size", field=field) from exc
    _check_video_dims(width, height, limits, field)
    if duration > limits.max_duration_s:
        raise MediaTooLarge(f"duration {duration:.2f} s exceeds the limit of {limits.max_duration_s} s",
                            field=field, limit=limits.max_duration_s)
    frame_bytes = width * height * 3
    expected = int(round(duration * fps)) if duration > 0 and fps > 0 else 0
    if expected > limits.max_frames:
        raise MediaTooLarge(f"~{expected} frames exceeds the limit of {limits.max_frames}", field=field,
                            limit=limits.max_frames)
    if expected * frame_bytes > limits.max_decoded_bytes:
        raise MediaTooLarge(f"would decode to ~{expected * frame_bytes} bytes", field=field,
                            limit=limits.max_decoded_bytes)
    frames: list[np.ndarray] = []
    try:
        for raw in gen:
            if time.monotonic() > deadline:
                raise MediaTimeout(f"decoding took longer than {limits.decode_timeout_s} s", field=field,
                                   limit=limits.decode_timeout_s)
            if len(frames) >= limits.max_frames:
                raise MediaTooLarge(f"more than {limits.max_frames} frames", field=field, limit=limits.max_frames)
            if (len(frames) + 1) * frame_bytes > limits.max_decoded_bytes:
                raise MediaTooLarge("decoded video exceeds the memory limit", field=field,
                                    limit=limits.max_decoded_bytes)
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
    except RuntimeError as exc:
        raise CorruptMedia(f"truncated or corrupt video ({_decoder_said(exc)})", field=field) from exc
    if not frames:
        raise CorruptMedia("no decodable frames", field=field)
    if fps > 0 and len(frames) / fps > limits.max_duration_s:
        raise MediaTooLarge(f"longer than {limits.max_duration_s} s", field=field, limit=limits.max_duration_s)
    # A cut-off file still demuxes, but yields far fewer frames than its header promises.
    if expected and len(frames) < expected - max(2, expected // 10):
        raise CorruptMedia(f"truncated video: decoded {len(frames)} of ~{expected} frames", field=field)
    return np.stack(frames), (fps if fps > 0 else 25.0)


def decode_video(data: bytes, limits: MediaLimits = _DEFAULT_LIMITS, field: str = "video") -> tuple[np.ndarray, float]:
    """Untrusted MP4/WebM/GIF bytes -> (uint8 frames [F,H,W,3], fps), or a ``MediaError``."""
    data = _check_bytes(data, limits.max_video_bytes, field)
    fmt = sniff_format(data)
    if fmt == "GIF":
        return _decode_gif_video(data, limits, field)
    if fmt not in ("MP4", "WEBM"):
        raise UnsupportedMedia(f"not a supported video (accepted: {', '.join(VIDEO_FORMATS)})", field=field,
                               limit=VIDEO_FORMATS)
    return _decode_ffmpeg_video(data, fmt, limits, field)
