from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateImageRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "steps", "seed", "text_guidance", "cfg_range", "ar_cfg_scale", "ar_height", "ar_width", "ar_temperature", "ar_top_k", "ar_top_p", "format", "quality", "preview", "model", "num_images", "step_cache_threshold", "step_cache_warmup", "step_cache_max_cached_steps")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEXT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    CFG_RANGE_FIELD_NUMBER: _ClassVar[int]
    AR_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    AR_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    AR_WIDTH_FIELD_NUMBER: _ClassVar[int]
    AR_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    AR_TOP_K_FIELD_NUMBER: _ClassVar[int]
    AR_TOP_P_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_WARMUP_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_MAX_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    seed: int
    text_guidance: float
    cfg_range: _common_pb2.CfgRange
    ar_cfg_scale: float
    ar_height: int
    ar_width: int
    ar_temperature: float
    ar_top_k: int
    ar_top_p: float
    format: _common_pb2.ImageFormat
    quality: int
    preview: bool
    model: str
    num_images: int
    step_cache_threshold: float
    step_cache_warmup: float
    step_cache_max_cached_steps: int
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., text_guidance: _Optional[float] = ..., cfg_range: _Optional[_Union[_common_pb2.CfgRange, _Mapping]] = ..., ar_cfg_scale: _Optional[float] = ..., ar_height: _Optional[int] = ..., ar_width: _Optional[int] = ..., ar_temperature: _Optional[float] = ..., ar_top_k: _Optional[int] = ..., ar_top_p: _Optional[float] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., preview: _Optional[bool] = ..., model: _Optional[str] = ..., num_images: _Optional[int] = ..., step_cache_threshold: _Optional[float] = ..., step_cache_warmup: _Optional[float] = ..., step_cache_max_cached_steps: _Optional[int] = ...) -> None: ...

class EditImageRequest(_message.Message):
    __slots__ = ("instruction", "reference_images", "negative_prompt", "width", "height", "steps", "seed", "text_guidance", "image_guidance", "cfg_range", "ar_cfg_scale", "ar_height", "ar_width", "ar_temperature", "ar_top_k", "ar_top_p", "resize_policy", "format", "quality", "preview", "model", "num_images", "step_cache_threshold", "step_cache_warmup", "step_cache_max_cached_steps")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEXT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    CFG_RANGE_FIELD_NUMBER: _ClassVar[int]
    AR_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    AR_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    AR_WIDTH_FIELD_NUMBER: _ClassVar[int]
    AR_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    AR_TOP_K_FIELD_NUMBER: _ClassVar[int]
    AR_TOP_P_FIELD_NUMBER: _ClassVar[int]
    RESIZE_POLICY_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_WARMUP_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_MAX_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    instruction: str
    reference_images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Media]
    negative_prompt: str
    width: int
    height: int
    steps: int
    seed: int
    text_guidance: float
    image_guidance: float
    cfg_range: _common_pb2.CfgRange
    ar_cfg_scale: float
    ar_height: int
    ar_width: int
    ar_temperature: float
    ar_top_k: int
    ar_top_p: float
    resize_policy: _common_pb2.ResizePolicy
    format: _common_pb2.ImageFormat
    quality: int
    preview: bool
    model: str
    num_images: int
    step_cache_threshold: float
    step_cache_warmup: float
    step_cache_max_cached_steps: int
    def __init__(self, instruction: _Optional[str] = ..., reference_images: _Optional[_Iterable[_Union[_common_pb2.Media, _Mapping]]] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., text_guidance: _Optional[float] = ..., image_guidance: _Optional[float] = ..., cfg_range: _Optional[_Union[_common_pb2.CfgRange, _Mapping]] = ..., ar_cfg_scale: _Optional[float] = ..., ar_height: _Optional[int] = ..., ar_width: _Optional[int] = ..., ar_temperature: _Optional[float] = ..., ar_top_k: _Optional[int] = ..., ar_top_p: _Optional[float] = ..., resize_policy: _Optional[_Union[_common_pb2.ResizePolicy, str]] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., preview: _Optional[bool] = ..., model: _Optional[str] = ..., num_images: _Optional[int] = ..., step_cache_threshold: _Optional[float] = ..., step_cache_warmup: _Optional[float] = ..., step_cache_max_cached_steps: _Optional[int] = ...) -> None: ...

class GenerateVideoRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "frames", "fps", "steps", "seed", "guidance", "cfg_range", "format", "quality", "preview", "model", "step_cache_threshold", "step_cache_warmup", "step_cache_max_cached_steps")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    CFG_RANGE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_WARMUP_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_MAX_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    seed: int
    guidance: float
    cfg_range: _common_pb2.CfgRange
    format: _common_pb2.VideoFormat
    quality: int
    preview: bool
    model: str
    step_cache_threshold: float
    step_cache_warmup: float
    step_cache_max_cached_steps: int
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., fps: _Optional[int] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., guidance: _Optional[float] = ..., cfg_range: _Optional[_Union[_common_pb2.CfgRange, _Mapping]] = ..., format: _Optional[_Union[_common_pb2.VideoFormat, str]] = ..., quality: _Optional[int] = ..., preview: _Optional[bool] = ..., model: _Optional[str] = ..., step_cache_threshold: _Optional[float] = ..., step_cache_warmup: _Optional[float] = ..., step_cache_max_cached_steps: _Optional[int] = ...) -> None: ...

class EditVideoRequest(_message.Message):
    __slots__ = ("instruction", "source_video", "negative_prompt", "width", "height", "frames", "fps", "steps", "seed", "guidance", "context_guidance", "cfg_range", "resize_policy", "format", "quality", "preview", "model", "step_cache_threshold", "step_cache_warmup", "step_cache_max_cached_steps")
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VIDEO_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    CFG_RANGE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_POLICY_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_WARMUP_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_MAX_CACHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    instruction: str
    source_video: _common_pb2.Media
    negative_prompt: str
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    seed: int
    guidance: float
    context_guidance: float
    cfg_range: _common_pb2.CfgRange
    resize_policy: _common_pb2.ResizePolicy
    format: _common_pb2.VideoFormat
    quality: int
    preview: bool
    model: str
    step_cache_threshold: float
    step_cache_warmup: float
    step_cache_max_cached_steps: int
    def __init__(self, instruction: _Optional[str] = ..., source_video: _Optional[_Union[_common_pb2.Media, _Mapping]] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., fps: _Optional[int] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., guidance: _Optional[float] = ..., context_guidance: _Optional[float] = ..., cfg_range: _Optional[_Union[_common_pb2.CfgRange, _Mapping]] = ..., resize_policy: _Optional[_Union[_common_pb2.ResizePolicy, str]] = ..., format: _Optional[_Union[_common_pb2.VideoFormat, str]] = ..., quality: _Optional[int] = ..., preview: _Optional[bool] = ..., model: _Optional[str] = ..., step_cache_threshold: _Optional[float] = ..., step_cache_warmup: _Optional[float] = ..., step_cache_max_cached_steps: _Optional[int] = ...) -> None: ...

class GenerationEvent(_message.Message):
    __slots__ = ("request_id", "queued", "planning", "denoise_step", "decoding", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PLANNING_FIELD_NUMBER: _ClassVar[int]
    DENOISE_STEP_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: Queued
    planning: Planning
    denoise_step: DenoiseStep
    decoding: Decoding
    result: GenerationResult
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., planning: _Optional[_Union[Planning, _Mapping]] = ..., denoise_step: _Optional[_Union[DenoiseStep, _Mapping]] = ..., decoding: _Optional[_Union[Decoding, _Mapping]] = ..., result: _Optional[_Union[GenerationResult, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Planning(_message.Message):
    __slots__ = ("planned_tokens",)
    PLANNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    planned_tokens: int
    def __init__(self, planned_tokens: _Optional[int] = ...) -> None: ...

class DenoiseStep(_message.Message):
    __slots__ = ("step", "total", "preview", "index")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    preview: _common_pb2.Media
    index: int
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., preview: _Optional[_Union[_common_pb2.Media, _Mapping]] = ..., index: _Optional[int] = ...) -> None: ...

class Decoding(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerationResult(_message.Message):
    __slots__ = ("media", "width", "height", "frames", "fps", "seed", "model", "timings", "planned_tokens", "steps", "index")
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    media: _common_pb2.Media
    width: int
    height: int
    frames: int
    fps: int
    seed: int
    model: str
    timings: _common_pb2.Timings
    planned_tokens: int
    steps: int
    index: int
    def __init__(self, media: _Optional[_Union[_common_pb2.Media, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., fps: _Optional[int] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., planned_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class UnderstandRequest(_message.Message):
    __slots__ = ("messages", "max_tokens", "temperature", "top_p", "seed", "stop", "model")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image", "video")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: _common_pb2.Media
    video: _common_pb2.Media
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.Media, _Mapping]] = ..., video: _Optional[_Union[_common_pb2.Media, _Mapping]] = ...) -> None: ...

class UnderstandEvent(_message.Message):
    __slots__ = ("request_id", "text", "finish_reason", "usage", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    finish_reason: str
    usage: Usage
    timings: _common_pb2.Timings
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...
