"""Hostile videos refused by the media decoder, quickly, naming the field, with no path in the text."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from tests.reliability.hostile_media import (
    many_frame_gif,
    mp4,
    mp4_with_garbage_stream,
    mp4_with_unknown_codec,
)
from vae_worker.media import MediaLimits, decode_video
from vae_worker.media.errors import MediaError, MediaTooLarge

pytestmark = pytest.mark.reliability


def test_a_10000_frame_gif_is_refused_while_decoding_not_after():
    data = many_frame_gif()
    with Image.open(io.BytesIO(data)) as image:
        assert image.n_frames >= 10_000
    start = time.monotonic()
    with pytest.raises(MediaTooLarge) as info:
        decode_video(data, MediaLimits(max_frames=241), "source_video")
    assert info.value.field == "source_video" and "241" in str(info.value)
    assert time.monotonic() - start < 10  # stopped at frame 242, never decoded the rest


@pytest.mark.parametrize("make", [mp4_with_unknown_codec, mp4_with_garbage_stream], ids=["unknown-codec", "garbage"])
def test_an_mp4_the_decoder_refuses_is_a_media_error_naming_the_field(make):
    start = time.monotonic()
    try:
        frames, _ = decode_video(make(), MediaLimits(), "source_video")
    except MediaError as exc:
        assert exc.field == "source_video" and str(exc).startswith("source_video")
        assert "/" not in str(exc), str(exc)  # no temporary file path
    else:  # noise that ffmpeg conceals still decodes to exactly the frames the header promised
        assert frames.shape == (9, 64, 64, 3)
    assert time.monotonic() - start < 30
    assert decode_video(mp4(), MediaLimits(), "source_video")[0].shape == (9, 64, 64, 3)  # a normal one after
