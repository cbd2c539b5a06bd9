"""Media in (untrusted bytes -> typed errors or pixels) and media out (deterministic files)."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from vae_worker.media import (
    CorruptMedia,
    EmptyMedia,
    MediaError,
    MediaLimits,
    MediaTimeout,
    MediaTooLarge,
    MediaTooSmall,
    UnsupportedMedia,
    decode_image,
    decode_video,
    encode_image,
    encode_video,
    fit_to_grid,
    grid_size,
    grid_size_for_area,
    trim_to_4k1,
)

DEFAULT = MediaLimits()


def gradient(height: int, width: int, shift: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([(xx * 4 + shift) % 256, (yy * 4) % 256, np.full_like(xx, (shift * 7) % 256)], -1).astype(np.uint8)


def clip(frames: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    return np.stack([gradient(height, width, shift=8 * i) for i in range(frames)])


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but holds almost no data (decompression bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 256))
            + chunk(b"IEND", b""))


def pil_bytes(fmt: str, size=(48, 32), **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gradient(size[1], size[0])).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_bytes(fmt: str, **kwargs) -> bytes:
    """Incompressible content, so cutting the file really removes pixel data."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def mp4_bytes(frames: int = 9, fps: float = 8, faststart: bool = True) -> bytes:
    data = encode_video(clip(frames), fps=fps)
    if faststart:
        return data
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:  # moov atom at the end, as most cameras write it
        writer = imageio_ffmpeg.write_frames(path, (48, 32), fps=fps, codec="libx264", macro_block_size=2,
                                             ffmpeg_log_level="error")
        writer.send(None)
        for frame in clip(frames):
            writer.send(frame)
        writer.close()
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


def webm_bytes(frames: int = 9) -> bytes:
    fd, path = tempfile.mkstemp(suffix=".webm")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(path, (48, 32), fps=8, codec="libvpx-vp9", macro_block_size=2,
                                             ffmpeg_log_level="error", output_params=["-deadline", "realtime"])
        writer.send(None)
        for frame in clip(frames):
            writer.send(frame)
        writer.close()
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


def gif_bytes(frames: int = 9) -> bytes:
    return encode_video(clip(frames), fps=10, format="gif")


def _corrupt_idat() -> bytes:
    good = pil_bytes("PNG")
    start = good.index(b"IDAT") + 4
    return good[:start] + bytes(b ^ 0x5A for b in good[start:start + 64]) + good[start + 64:]


# (case, data factory, limits, expected error type, expected .limit)
IMAGE_CASES = [
    ("empty", lambda: b"", DEFAULT, EmptyMedia, None),
    ("random bytes", lambda: np.random.default_rng(0).bytes(4096), DEFAULT, UnsupportedMedia, ("PNG", "JPEG", "WEBP", "GIF")),
    ("text file named .png", lambda: b"just some text, named cat.png\n", DEFAULT, UnsupportedMedia,
     ("PNG", "JPEG", "WEBP", "GIF")),
    ("not bytes", lambda: "a string", DEFAULT, UnsupportedMedia, None),
    ("truncated png", lambda: (lambda b: b[: len(b) // 2])(noise_bytes("PNG")), DEFAULT, CorruptMedia, None),
    ("truncated jpeg", lambda: (lambda b: b[: len(b) // 2])(noise_bytes("JPEG", quality=90)), DEFAULT,
     CorruptMedia, None),
    ("truncated webp", lambda: (lambda b: b[: len(b) // 2])(noise_bytes("WEBP")), DEFAULT, CorruptMedia, None),
    ("truncated gif", lambda: (lambda b: b[: len(b) // 2])(noise_bytes("GIF")), DEFAULT, CorruptMedia, None),
    ("png magic + garbage", lambda: b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(200), DEFAULT,
     CorruptMedia, None),
    ("corrupt png data", _corrupt_idat, DEFAULT, CorruptMedia, None),
    ("decompression bomb header", lambda: png_with_header(100_000, 100_000), DEFAULT, MediaTooLarge,
     DEFAULT.max_pixels),
    ("too many pixels", lambda: png_with_header(7000, 7000), DEFAULT, MediaTooLarge, DEFAULT.max_pixels),
    ("too wide", lambda: png_with_header(9000, 16), DEFAULT, MediaTooLarge, DEFAULT.max_width),
    ("too tall", lambda: png_with_header(16, 9000), DEFAULT, MediaTooLarge, DEFAULT.max_height),
    ("too many bytes", lambda: pil_bytes("PNG"), MediaLimits(max_bytes=100), MediaTooLarge, 100),
    ("mp4 as image", lambda: mp4_bytes(), DEFAULT, UnsupportedMedia, ("PNG", "JPEG", "WEBP", "GIF")),
]

VIDEO_CASES = [
    ("empty", lambda: b"", DEFAULT, EmptyMedia, None),
    ("random bytes", lambda: np.random.default_rng(0).bytes(4096), DEFAULT, UnsupportedMedia, ("MP4", "WEBM", "GIF")),
    ("text file named .mp4", lambda: b"definitely a video.mp4\n", DEFAULT, UnsupportedMedia, ("MP4", "WEBM", "GIF")),
    ("png as video", lambda: pil_bytes("PNG"), DEFAULT, UnsupportedMedia, ("MP4", "WEBM", "GIF")),
    ("ftyp + garbage", lambda: b"\0\0\0\x20ftypisom" + np.random.default_rng(2).bytes(2000), DEFAULT,
     CorruptMedia, None),
    ("truncated mp4 (moov at end)", lambda: mp4_bytes(faststart=False)[:-400], DEFAULT, CorruptMedia, None),
    ("truncated mp4 (faststart)", lambda: (lambda b: b[: len(b) // 2])(mp4_bytes(17)), DEFAULT, CorruptMedia,
     None),
    ("truncated webm", lambda: webm_bytes()[:300], DEFAULT, CorruptMedia, None),
    ("truncated gif", lambda: gif_bytes()[:100], DEFAULT, CorruptMedia, None),
    ("too many frames (mp4)", lambda: mp4_bytes(9), MediaLimits(max_frames=5), MediaTooLarge, 5),
    ("too many frames (gif)", lambda: gif_bytes(9), MediaLimits(max_frames=5), MediaTooLarge, 5),
    ("too long (mp4)", lambda: mp4_bytes(9, fps=4), MediaLimits(max_duration_s=1.0), MediaTooLarge, 1.0),
    ("too long (gif)", lambda: gif_bytes(9), MediaLimits(max_duration_s=0.5), MediaTooLarge, 0.5),
    ("too wide", lambda: mp4_bytes(), MediaLimits(max_video_width=32), MediaTooLarge, 32),
    ("too many bytes", lambda: mp4_bytes(), MediaLimits(max_video_bytes=1000), MediaTooLarge, 1000),
    ("decode deadline", lambda: mp4_bytes(), MediaLimits(decode_timeout_s=1e-9), MediaTimeout, 1e-9),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case,make,limits,error,limit", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_bad_images_raise_typed_errors(case, make, limits, error, limit):
    with pytest.raises(error) as info:
        decode_image(make(), limits, field="reference_image")
    assert isinstance(info.value, MediaError) and isinstance(info.value, ValueError)
    assert info.value.field == "reference_image" and info.value.limit == limit
    assert str(info.value).startswith("reference_image: ")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case,make,limits,error,limit", VIDEO_CASES, ids=[c[0] for c in VIDEO_CASES])
def test_bad_videos_raise_typed_errors(case, make, limits, error, limit):
    with pytest.raises(error) as info:
        decode_video(make(), limits, field="source_video")
    assert info.value.field == "source_video" and info.value.limit == limit


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_good_images_decode_to_rgb(fmt):
    image = decode_image(pil_bytes(fmt))
    assert image.mode == "RGB" and image.size == (48, 32)


def test_png_is_exact_and_transparency_goes_white():
    assert np.array_equal(np.asarray(decode_image(pil_bytes("PNG"))), gradient(32, 48))
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")  # fully transparent
    assert np.all(np.asarray(decode_image(buffer.getvalue())) == 255)


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(32, 48))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (32, 48)
    assert decode_image(buffer.getvalue(), exif_transpose=False).size == (48, 32)


@pytest.mark.parametrize("make,frames", [(mp4_bytes, 9), (webm_bytes, 9), (gif_bytes, 9)])
def test_good_videos_decode(make, frames):
    video, fps = decode_video(make())
    assert video.shape == (frames, 32, 48, 3) and video.dtype == np.uint8 and fps > 0


def test_mp4_decode_is_close_to_source():
    video, fps = decode_video(mp4_bytes(9, fps=8))
    assert fps == pytest.approx(8.0)
    assert np.abs(video.astype(int) - clip(9).astype(int)).mean() < 6  # lossy, crf 18


# ---- media out ----

@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_image_reads_back_and_is_deterministic(fmt):
    frame = gradient(32, 48)
    data = encode_image(frame, format=fmt, quality=90)
    assert data == encode_image(frame.copy(), format=fmt, quality=90)
    back = iio.imread(data)
    assert back.shape == (32, 48, 3)
    if fmt == "png":
        assert np.array_equal(back, frame)
    else:
        assert np.abs(back.astype(int) - frame.astype(int)).mean() < 8


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_knob(fmt):
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert len(encode_image(frame, format=fmt, quality=95)) > len(encode_image(frame, format=fmt, quality=30))


def test_encode_mp4_is_h264_yuv420p_with_declared_fps_and_frames():
    frames = clip(13)
    data = encode_video(frames, fps=12, format="mp4")
    assert data == encode_video(frames.copy(), fps=12, format="mp4")  # deterministic bytes
    meta = iio.immeta(data, extension=".mp4")
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == pytest.approx(12.0) and meta["size"] == (48, 32)
    back = iio.imread(data, extension=".mp4", index=None)
    assert back.shape == (13, 32, 48, 3)


def test_encode_gif_frames_and_delay():
    frames = clip(7)
    data = encode_video(frames, fps=10, format="gif")
    assert data == encode_video(frames.copy(), fps=10, format="gif")
    back = iio.imread(data, extension=".gif", index=None)
    assert back.shape[:3] == (7, 32, 48)
    assert iio.immeta(data, extension=".gif", index=0)["duration"] == 100


def test_encode_rejects_bad_arguments():
    with pytest.raises(ValueError):
        encode_image(gradient(8, 8), format="bmp")
    with pytest.raises(ValueError):
        encode_image(gradient(8, 8).astype(np.float32))
    with pytest.raises(ValueError):
        encode_video(clip(3, 31, 48), fps=8)  # odd height for yuv420p
    with pytest.raises(ValueError):
        encode_video(clip(3), fps=0)


# ---- grid fitting ----

def test_grid_size_mirrors_official_processor():
    assert grid_size(1000, 700) == (992, 688)  # no upscale, floor to 16
    assert grid_size(3000, 2000) == (1248, 832)  # <= 1 MP
    assert grid_size(4000, 500) == (2048, 256)  # <= 2048 per side
    with pytest.raises(MediaTooSmall):
        grid_size(10, 10)
    w, h = grid_size_for_area(1920, 1080, 480 * 832)
    assert (w % 16, h % 16) == (0, 0) and abs(w / h - 16 / 9) < 0.05


@pytest.mark.parametrize("policy", ["resize", "center_crop", "pad"])
def test_fit_to_grid_policies(policy):
    image = Image.fromarray(gradient(30, 50))
    out = fit_to_grid(image, 64, 32, policy)
    assert isinstance(out, Image.Image) and out.size == (64, 32)
    frames = fit_to_grid(clip(5, 30, 50), 64, 32, policy)
    assert frames.shape == (5, 32, 64, 3) and frames.dtype == np.uint8
    array = fit_to_grid(gradient(30, 50), 64, 32, policy)
    assert array.shape == (32, 64, 3)


def test_pad_and_crop_semantics():
    red = np.zeros((20, 40, 3), dtype=np.uint8)
    red[..., 0] = 255
    padded = np.asarray(fit_to_grid(red, 32, 32, "pad", pad_value=0))
    assert padded[0, 16].tolist() == [0, 0, 0] and padded[16, 16].tolist() == [255, 0, 0]
    cropped = np.asarray(fit_to_grid(red, 32, 32, "center_crop"))
    assert np.all(cropped[..., 0] == 255)


def test_fit_to_grid_rejects_bad_policy_and_size():
    with pytest.raises(MediaError) as info:
        fit_to_grid(gradient(16, 16), 16, 16, "stretch-ish")
    assert info.value.field == "resize_policy"
    with pytest.raises(ValueError):
        fit_to_grid(gradient(16, 16), 20, 16)


def test_trim_to_4k1():
    assert len(trim_to_4k1(list(range(10)))) == 9
    assert len(trim_to_4k1(list(range(9)))) == 9
    assert len(trim_to_4k1(list(range(4)))) == 1


def test_prepare_helpers_follow_official_sizing():
    from vae_worker.media import prepare_reference_image, prepare_source_video

    image = Image.fromarray(np.zeros((700, 1000, 3), dtype=np.uint8))
    assert prepare_reference_image(image).size == (992, 688)
    assert prepare_reference_image(image, 256, 128, "center_crop").size == (256, 128)
    frames = clip(10, 90, 160)
    out = prepare_source_video(frames, area=64 * 112)
    assert out.shape[0] == 9 and out.shape[1] % 16 == 0 and out.shape[2] % 16 == 0
    assert prepare_source_video(frames, 64, 32, "pad").shape == (9, 32, 64, 3)


def test_animated_gif_as_image_is_its_first_frame():
    image = decode_image(gif_bytes(5))
    assert image.size == (48, 32)
    first = iio.imread(gif_bytes(5), extension=".gif", index=0)[..., :3]
    assert np.abs(np.asarray(image).astype(int) - first.astype(int)).max() == 0


def test_encode_image_default_quality():
    assert encode_image(gradient(16, 16), "jpeg", None) == encode_image(gradient(16, 16), "jpeg", 90)


def test_ffmpeg_is_started_without_a_fork_handler():
    """A preexec_fn forces fork(), and gRPC's fork handlers can stall the child before it execs
    ffmpeg (a 10 s "Could not load meta information"): importing the media package turns
    imageio-ffmpeg's off, so subprocess may vfork."""
    from imageio_ffmpeg._utils import _popen_kwargs

    assert os.environ.get("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT") == "1"
    assert _popen_kwargs(prevent_sigint=True)["preexec_fn"] is None
