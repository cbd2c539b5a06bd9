"""All media that enters or leaves the system: bounded decoding of untrusted bytes, grid fitting,
and deterministic encoding of results."""

import os

# imageio-ffmpeg starts ffmpeg with ``preexec_fn=os.setpgrp`` unless this is set. A preexec_fn
# makes Python fork() rather than vfork(), and in a process running gRPC's threads (every Ray
# worker, any gRPC client) the forked child can stall in gRPC's fork handlers before it execs
# ffmpeg (imageio-ffmpeg issue #58): reading then fails after 10 s with "Could not load meta
# information". Without it ffmpeg stays in the caller's process group, which a Ray worker is.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

from vae_worker.media.decode import decode_image, decode_video, sniff_format
from vae_worker.media.encode import encode_image, encode_video
from vae_worker.media.errors import (
    CorruptMedia,
    EmptyMedia,
    MediaError,
    MediaTimeout,
    MediaTooLarge,
    MediaTooSmall,
    UnsupportedMedia,
)
from vae_worker.media.grid import (
    POLICIES,
    fit_to_grid,
    grid_size,
    grid_size_for_area,
    prepare_reference_image,
    prepare_source_video,
    trim_to_4k1,
)
from vae_worker.media.limits import MediaLimits

__all__ = [
    "POLICIES",
    "CorruptMedia",
    "EmptyMedia",
    "MediaError",
    "MediaLimits",
    "MediaTimeout",
    "MediaTooLarge",
    "MediaTooSmall",
    "UnsupportedMedia",
    "decode_image",
    "decode_video",
    "encode_image",
    "encode_video",
    "fit_to_grid",
    "grid_size",
    "grid_size_for_area",
    "prepare_reference_image",
    "prepare_source_video",
    "sniff_format",
    "trim_to_4k1",
]
