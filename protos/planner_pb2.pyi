from protos import common_pb2 as _common_pb2
from protos import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanImageRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "reference_images", "ar_height", "ar_width", "cfg_scale", "seed", "temperature", "top_k", "top_p", "negative_prompt", "reference_codes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    AR_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    AR_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_CODES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    reference_images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Media]
    ar_height: int
    ar_width: int
    cfg_scale: float
    seed: int
    temperature: float
    top_k: int
    top_p: float
    negative_prompt: str
    reference_codes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., reference_images: _Optional[_Iterable[_Union[_common_pb2.Media, _Mapping]]] = ..., ar_height: _Optional[int] = ..., ar_width: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., negative_prompt: _Optional[str] = ..., reference_codes: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class PlanImageResponse(_message.Message):
    __slots__ = ("request_id", "visual_token_ids", "text_condition", "image_condition", "negative_condition", "prompt_tokens", "planned_tokens", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_CONDITION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CONDITION_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CONDITION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    visual_token_ids: _containers.RepeatedScalarFieldContainer[int]
    text_condition: _common_pb2.Tensor
    image_condition: _common_pb2.Tensor
    negative_condition: _common_pb2.Tensor
    prompt_tokens: int
    planned_tokens: int
    timings: _common_pb2.Timings
    def __init__(self, request_id: _Optional[str] = ..., visual_token_ids: _Optional[_Iterable[int]] = ..., text_condition: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., image_condition: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., negative_condition: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., planned_tokens: _Optional[int] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ...) -> None: ...

class EncodePromptRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "negative_prompt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    negative_prompt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ...) -> None: ...

class EncodePromptResponse(_message.Message):
    __slots__ = ("request_id", "hidden_states", "num_tokens", "timings", "negative_hidden_states")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    hidden_states: _common_pb2.Tensor
    num_tokens: int
    timings: _common_pb2.Timings
    negative_hidden_states: _common_pb2.Tensor
    def __init__(self, request_id: _Optional[str] = ..., hidden_states: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_tokens: _Optional[int] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., negative_hidden_states: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
