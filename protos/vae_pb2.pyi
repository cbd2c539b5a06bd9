from protos import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_KIND_UNSPECIFIED: _ClassVar[MediaKind]
    MEDIA_KIND_IMAGE: _ClassVar[MediaKind]
    MEDIA_KIND_VIDEO: _ClassVar[MediaKind]
MEDIA_KIND_UNSPECIFIED: MediaKind
MEDIA_KIND_IMAGE: MediaKind
MEDIA_KIND_VIDEO: MediaKind

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "latents", "image_format", "video_format", "quality", "fps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    latents: _common_pb2.Tensor
    image_format: _common_pb2.ImageFormat
    video_format: _common_pb2.VideoFormat
    quality: int
    fps: int
    def __init__(self, request_id: _Optional[str] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., image_format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., video_format: _Optional[_Union[_common_pb2.VideoFormat, str]] = ..., quality: _Optional[int] = ..., fps: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("request_id", "media", "width", "height", "frames", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    media: _common_pb2.Media
    width: int
    height: int
    frames: int
    timings: _common_pb2.Timings
    def __init__(self, request_id: _Optional[str] = ..., media: _Optional[_Union[_common_pb2.Media, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "media", "width", "height", "resize_policy", "kind", "max_frames", "frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESIZE_POLICY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    media: _common_pb2.Media
    width: int
    height: int
    resize_policy: _common_pb2.ResizePolicy
    kind: MediaKind
    max_frames: int
    frames: int
    def __init__(self, request_id: _Optional[str] = ..., media: _Optional[_Union[_common_pb2.Media, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., resize_policy: _Optional[_Union[_common_pb2.ResizePolicy, str]] = ..., kind: _Optional[_Union[MediaKind, str]] = ..., max_frames: _Optional[int] = ..., frames: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("request_id", "latents", "width", "height", "frames", "fps", "timings", "visual_codes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_CODES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    latents: _common_pb2.Tensor
    width: int
    height: int
    frames: int
    fps: int
    timings: _common_pb2.Timings
    visual_codes: _common_pb2.Tensor
    def __init__(self, request_id: _Optional[str] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., fps: _Optional[int] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., visual_codes: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PreviewRequest(_message.Message):
    __slots__ = ("request_id", "latents", "format", "quality", "max_side")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    latents: _common_pb2.Tensor
    format: _common_pb2.ImageFormat
    quality: int
    max_side: int
    def __init__(self, request_id: _Optional[str] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., max_side: _Optional[int] = ...) -> None: ...
