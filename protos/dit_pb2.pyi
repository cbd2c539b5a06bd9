from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("request_id", "text_condition", "image_condition", "prompt_condition", "negative_condition", "ref_latents", "source_latents", "latent_frames", "latent_height", "latent_width", "steps", "sigmas", "seed", "text_guidance", "image_guidance", "guidance", "context_guidance", "cfg_range", "preview", "step_cache_threshold", "step_cache_warmup", "step_cache_max_cached_steps", "glyph_text", "negative_glyph_text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_CONDITION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CONDITION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CONDITION_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CONDITION_FIELD_NUMBER: _ClassVar[int]
    REF_LATENTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    LATENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    LATENT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SIGMAS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEXT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    CFG_RANGE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_WARMUP_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_MAX_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    GLYPH_TEXT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_GLYPH_TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text_condition: _common_pb2.Tensor
    image_condition: _common_pb2.Tensor
    prompt_condition: _common_pb2.Tensor
    negative_condition: _common_pb2.Tensor
    ref_latents: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    source_latents: _common_pb2.Tensor
    latent_frames: int
    latent_height: int
    latent_width: int
    steps: int
    sigmas: _containers.RepeatedScalarFieldContainer[float]
    seed: int
    text_guidance: float
    image_guidance: float
    guidance: float
    context_guidance: float
    cfg_range: _common_pb2.CfgRange
    preview: bool
    step_cache_threshold: float
    step_cache_warmup: float
    step_cache_max_cached_steps: int
    glyph_text: str
    negative_glyph_text: str
    def __init__(self, request_id: _Optional[str] = ..., text_condition: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., image_condition: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt_condition: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., negative_condition: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., ref_latents: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., source_latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., latent_frames: _Optional[int] = ..., latent_height: _Optional[int] = ..., latent_width: _Optional[int] = ..., steps: _Optional[int] = ..., sigmas: _Optional[_Iterable[float]] = ..., seed: _Optional[int] = ..., text_guidance: _Optional[float] = ..., image_guidance: _Optional[float] = ..., guidance: _Optional[float] = ..., context_guidance: _Optional[float] = ..., cfg_range: _Optional[_Union[_common_pb2.CfgRange, _Mapping]] = ..., preview: _Optional[bool] = ..., step_cache_threshold: _Optional[float] = ..., step_cache_warmup: _Optional[float] = ..., step_cache_max_cached_steps: _Optional[int] = ..., glyph_text: _Optional[str] = ..., negative_glyph_text: _Optional[str] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("request_id", "step", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step: DenoiseProgress
    result: DenoiseResult
    def __init__(self, request_id: _Optional[str] = ..., step: _Optional[_Union[DenoiseProgress, _Mapping]] = ..., result: _Optional[_Union[DenoiseResult, _Mapping]] = ...) -> None: ...

class DenoiseProgress(_message.Message):
    __slots__ = ("step", "total", "preview_latents")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_LATENTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    preview_latents: _common_pb2.Tensor
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., preview_latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DenoiseResult(_message.Message):
    __slots__ = ("latents", "timings")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    timings: _common_pb2.Timings
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ...) -> None: ...
