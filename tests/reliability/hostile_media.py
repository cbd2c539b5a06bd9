"""Hostile videos for the reliability tests, built in memory in well under a second."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
from PIL import Image


def many_frame_gif(frames: int = 10_000, size: int = 8) -> bytes:
    """A valid animated GIF of ``frames`` tiny frames (~480 KB): two frames saved by PIL, the
    second and third frame blocks repeated, so nothing encodes 10,000 images."""
    buffer = io.BytesIO()
    dark, light = Image.new("L", (size, size), 0), Image.new("L", (size, size), 255)
    dark.save(buffer, "GIF", save_all=True, append_images=[light, dark], duration=40, loop=0)
    data = buffer.getvalue()
    starts = [i for i in range(len(data)) if data.startswith(b"\x21\xf9\x04", i)]  # graphic control blocks
    assert len(starts) == 3, starts
    head, pair = data[:starts[1]], data[starts[1]:-1]
    return head + pair * (frames // 2) + b";"


def mp4(frames: int = 9, size: int = 64, fps: int = 8) -> bytes:
    """A real H.264 MP4 written by ffmpeg (imageio-ffmpeg's bundled binary)."""
    import imageio_ffmpeg

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        writer = imageio_ffmpeg.write_frames(path, (size, size), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             macro_block_size=16)
        writer.send(None)
        for _ in range(frames):
            writer.send(rng.integers(0, 255, (size, size, 3), dtype=np.uint8).tobytes())
        writer.close()
        with open(path, "rb") as handle:
            return handle.read()


def mp4_with_unknown_codec() -> bytes:
    """A well-formed MP4 container whose video track names a codec no decoder has ("zzzz")."""
    data = mp4()
    assert data.count(b"avc1") >= 1
    return data.replace(b"avc1", b"zzzz")


def mp4_with_garbage_stream() -> bytes:
    """The MP4's boxes intact, the coded frames (the ``mdat`` payload) replaced by noise."""
    data = bytearray(mp4())
    start = data.index(b"mdat") + 4
    size = int.from_bytes(data[start - 8:start - 4], "big") - 8
    data[start:start + size] = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8).tobytes()
    return bytes(data)
