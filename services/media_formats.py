"""The one table of output formats and resize policies: names, proto enum values, MIME types.

The gRPC enums (``protos/common.proto``), the HTTP body's ``output_format`` / ``resize_policy``
strings, the VAE's encoder names and the MIME type a result carries are four views of the
same rows; every module reads them from here, so adding a format is one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protos import common_pb2

MediaKind = Literal["image", "video"]
DEFAULT_QUALITY = 90  # JPEG/WEBP/MP4 quality when a request sets none


@dataclass(frozen=True)
class OutputFormat:
    name: str  # what HTTP clients send and the VAE's encoders take
    kind: MediaKind
    proto: int  # common_pb2.ImageFormat / VideoFormat value
    mime_type: str


OUTPUT_FORMATS: tuple[OutputFormat, ...] = (
    OutputFormat("png", "image", common_pb2.IMAGE_FORMAT_PNG, "image/png"),
    OutputFormat("jpeg", "image", common_pb2.IMAGE_FORMAT_JPEG, "image/jpeg"),
    OutputFormat("webp", "image", common_pb2.IMAGE_FORMAT_WEBP, "image/webp"),
    OutputFormat("mp4", "video", common_pb2.VIDEO_FORMAT_MP4, "video/mp4"),
    OutputFormat("gif", "video", common_pb2.VIDEO_FORMAT_GIF, "image/gif"),
)
DEFAULT_FORMAT: dict[MediaKind, str] = {"image": "png", "video": "mp4"}  # an UNSPECIFIED (0) enum

# resize policy name -> common_pb2.ResizePolicy value; UNSPECIFIED (0) means the first one
RESIZE_POLICY_IDS: dict[str, int] = {"resize": common_pb2.RESIZE_POLICY_RESIZE,
                                     "center_crop": common_pb2.RESIZE_POLICY_CENTER_CROP,
                                     "pad": common_pb2.RESIZE_POLICY_PAD}
DEFAULT_RESIZE_POLICY = "resize"


def format_ids(kind: MediaKind) -> dict[str, int]:
    """Format name -> proto enum value for one media kind."""
    return {f.name: f.proto for f in OUTPUT_FORMATS if f.kind == kind}


def format_names(kind: MediaKind) -> dict[int, str]:
    """Proto enum value -> format name, with UNSPECIFIED (0) as the kind's default."""
    return {0: DEFAULT_FORMAT[kind], **{f.proto: f.name for f in OUTPUT_FORMATS if f.kind == kind}}


IMAGE_FORMAT_IDS = format_ids("image")
VIDEO_FORMAT_IDS = format_ids("video")
IMAGE_FORMATS = format_names("image")
VIDEO_FORMATS = format_names("video")
RESIZE_POLICIES: dict[int, str] = {0: DEFAULT_RESIZE_POLICY, **{v: k for k, v in RESIZE_POLICY_IDS.items()}}
MIME: dict[str, str] = {f.name: f.mime_type for f in OUTPUT_FORMATS}
