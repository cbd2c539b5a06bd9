"""HTTP (OpenAI-style) request bodies and their conversion to the public protos.

Every HTTP body becomes the same proto message a gRPC client would send, so both ingresses
share one validation path (``services.jobs``) and one set of error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers

from protos import common_pb2, generation_pb2

from . import model_routing
from .errors import RequestTooLarge, Unauthenticated
from .flows import Decoding, Planning, Queued, Result, Step
from .jobs import InvalidArgument
from .media_formats import IMAGE_FORMAT_IDS as FORMATS_IMAGE  # one table: services.media_formats
from .media_formats import RESIZE_POLICY_IDS as POLICIES
from .media_formats import VIDEO_FORMAT_IDS as FORMATS_VIDEO
from .understanding import UnderstandDone


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


ImageQuality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]


class ImageGenerationBody(_Body):
    """``/v1/images/generations`` and ``/v1/images/edits``: every OpenAI field (the README's
    table says which are honoured, accepted and ignored, or refused) plus Mammoth's own knobs."""

    prompt: str
    model: str | None = None
    n: int | None = Field(None, description="images per prompt, 1..ingress.limits.max_images")
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels (multiples of 16) or auto")
    quality: ImageQuality | None = None  # accepted, ignored (steps set the cost)
    background: Literal["transparent", "opaque", "auto"] | None = None
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None
    output_compression: int | None = Field(None, description="0..100 for jpeg/webp")
    response_format: Literal["b64_json", "url"] | None = None
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=3)
    moderation: Literal["low", "auto"] | None = None  # accepted, ignored
    user: str | None = None  # accepted, ignored
    safety_identifier: str | None = None  # accepted, ignored
    style: Literal["vivid", "natural"] | None = None  # legacy (DALL-E); accepted, ignored
    complexity: Literal["low", "medium", "high"] | None = None  # accepted, ignored
    input_fidelity: Literal["high", "low"] | None = None  # edits; accepted, ignored
    frame_count: int | None = None  # GIF output only: refused with it
    frame_duration_ms: int | None = None
    svg: dict[str, Any] | None = None  # SVG output: refused
    mask: Any = None  # edits: refused (no inpainting)
    markup: Any = None  # edits: refused
    # Mammoth's own
    negative_prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    cfg_range: tuple[float, float] | None = None
    ar_cfg_scale: float | None = None
    preview: bool = False
    progress_events: bool = False  # stream: also send queued/planning/denoise_step/decoding events
    resize_policy: Literal["resize", "center_crop", "pad"] = "resize"
    images: list[str | dict[str, Any]] = Field(default_factory=list,
                                               description="edits: base64, data: URLs or {image_url}")


class VideoBody(_Body):
    """``POST /v1/videos`` (JSON or multipart): OpenAI's fields plus Mammoth's own."""

    prompt: str
    model: str | None = None
    size: str | None = None
    seconds: str | float | None = None  # OpenAI sends a string ("4"); frames = seconds x fps (4k+1)
    input_reference: Any = None  # JSON {image_url}: image-to-video is refused; multipart file: see below
    frames: int | None = None
    fps: int | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    context_guidance_scale: float | None = None
    output_format: Literal["mp4", "gif"] = "mp4"
    resize_policy: Literal["resize", "center_crop", "pad"] = "resize"
    video: str | None = Field(None, description="video editing: base64 or data: URL of the source video")


class ChatBody(_Body):
    """Chat Completions: the fields Mammoth honours; every other field OpenAI documents is
    accepted and ignored (clients send many), those it cannot honour are refused (``chat_refusals``)."""

    model_config = ConfigDict(extra="ignore")
    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    response_format: dict[str, Any] | None = None


class Refused(InvalidArgument):
    """A documented OpenAI field or value this server does not support: HTTP 400 with ``code``
    (OpenAI answers unsupported values with 400 ``invalid_request_error``)."""

    http_status = 400

    def __init__(self, field: str, message: str, code: str = "unsupported_value"):
        super().__init__(field, message)
        self.code = code

    def __reduce__(self):
        return type(self), (self.field, self.detail, self.code)


ModelNotFound = model_routing.ModelNotFound  # the request's ``model`` names no served model (404)


def image_refusals(body: ImageGenerationBody, *, edit: bool) -> None:
    """OpenAI image fields whose values this server refuses (each with the reason)."""
    if body.background == "transparent":
        raise Refused("background", "transparent backgrounds are not supported (images are opaque)")
    if body.output_format in ("gif", "svg"):
        raise Refused("output_format", f"{body.output_format} output is not supported; use png, jpeg or webp")
    if body.frame_count is not None or body.frame_duration_ms is not None:
        raise Refused("frame_count" if body.frame_count is not None else "frame_duration_ms",
                      "only for gif output, which is not supported")
    if body.svg is not None:
        raise Refused("svg", "svg output is not supported")
    if body.mask is not None:
        raise Refused("mask", "masked edits (inpainting) are not supported; describe the edit in the prompt")
    if body.markup is not None:
        raise Refused("markup", "markup edits are not supported")
    if not edit and body.images:
        raise InvalidArgument("images", "only for /v1/images/edits")
    if body.partial_images and not body.stream:
        raise Refused("partial_images", "needs stream: true", "invalid_value")


_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_refusals(body: ChatBody) -> None:
    """Chat fields this server cannot honour are refused, not silently dropped."""
    if body.logprobs:
        raise Refused("logprobs", "log probabilities are not returned")
    if body.tools or body.functions:
        raise Refused("tools" if body.tools else "functions", "tool calling is not supported")
    if body.modalities and set(body.modalities) - {"text"}:
        raise Refused("modalities", "only text output is supported")
    if body.audio is not None:
        raise Refused("audio", "audio output is not supported")
    kind = (body.response_format or {}).get("type", "text")
    if kind != "text":
        raise Refused("response_format", f"{kind!r} is not supported (no constrained decoding); use text")


# Public proto field -> the HTTP body field a client actually sent.
_HTTP_FIELDS = {"text_guidance": "guidance_scale", "guidance": "guidance_scale",
                "image_guidance": "image_guidance_scale", "context_guidance": "context_guidance_scale",
                "reference_images": "images", "source_video": "video", "quality": "output_compression",
                "width": "size", "height": "size", "instruction": "prompt", "num_images": "n"}


def http_field(name: str) -> str:
    """``reference_images[0]`` -> ``images[0]``: error messages name what the HTTP client sent."""
    head, bracket, rest = name.partition("[")
    return _HTTP_FIELDS.get(head, head) + bracket + rest


def http_message(message: str) -> str:
    field, sep, rest = message.partition(": ")
    return f"{http_field(field)}: {rest}" if sep and " " not in field else message


def parse_body(model: type[BaseModel], data: Any) -> Any:
    """Validate a JSON/form body; the first problem becomes an ``InvalidArgument`` naming its field."""
    if not isinstance(data, dict):
        raise InvalidArgument("body", "expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidArgument(field, first["msg"]) from None


def decode_b64(field: str, value: str, max_bytes: int | None = None) -> bytes:
    """Base64 or a ``data:...;base64,`` URL; remote URLs are refused (the server fetches nothing).

    ``max_bytes`` bounds the decoded size and is checked from the text's length, before any
    byte is decoded."""
    if not isinstance(value, str):
        raise InvalidArgument(field, "must be a base64 string or a data: URL")
    if value.startswith(("http://", "https://")):
        raise InvalidArgument(field, "remote URLs are not fetched; send base64 or a data: URL")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise InvalidArgument(field, "data: URL must be base64-encoded")
    if max_bytes is not None and (len(value) // 4) * 3 > max_bytes + 2:
        raise InvalidArgument(field, f"about {(len(value) // 4) * 3} bytes exceed the limit {max_bytes}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(field, "not valid base64") from None


def parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None or value == "auto":
        return None
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InvalidArgument("size", f"expected WIDTHxHEIGHT, got {value!r}")
    return int(width), int(height)


def _set_common(msg: Any, body: Any, *, image: bool) -> None:
    size = parse_size(body.size)
    if size is not None:
        msg.width, msg.height = size
    if body.model:
        msg.model = body.model  # routes to that served model (services.model_routing)
    for src, dst in (("negative_prompt", "negative_prompt"), ("steps", "steps"), ("seed", "seed")):
        if getattr(body, src) is not None:
            setattr(msg, dst, getattr(body, src))
    if body.guidance_scale is not None:
        setattr(msg, "text_guidance" if image else "guidance", body.guidance_scale)


def _reference(field: str, value: str | dict[str, Any], max_bytes: int | None) -> bytes:
    """An edit input in JSON: base64, a data: URL, or OpenAI's ``{"image_url": ...}`` object."""
    if isinstance(value, dict):
        if "file_id" in value:
            raise Refused(f"{field}.file_id", "the Files API is not served; send image_url as a data: URL")
        value = value.get("image_url", "")
        value = value.get("url", "") if isinstance(value, dict) else value
        field = f"{field}.image_url"
    return decode_b64(field, value, max_bytes)


def image_request(body: ImageGenerationBody, *, edit: bool, files: list[bytes] = (),
                  max_image_bytes: int | None = None) -> Any:
    image_refusals(body, edit=edit)
    if edit:
        msg = generation_pb2.EditImageRequest(instruction=body.prompt)
        images = list(files) + [_reference(f"images[{i}]", v, max_image_bytes) for i, v in enumerate(body.images)]
        msg.reference_images.extend(common_pb2.Media(data=data) for data in images)
        if body.image_guidance_scale is not None:
            msg.image_guidance = body.image_guidance_scale
        msg.resize_policy = POLICIES[body.resize_policy]
    else:
        msg = generation_pb2.GenerateImageRequest(prompt=body.prompt)
    if body.n is not None:
        msg.num_images = body.n
    _set_common(msg, body, image=True)
    if body.cfg_range is not None:
        msg.cfg_range.start, msg.cfg_range.end = body.cfg_range
    if body.ar_cfg_scale is not None:
        msg.ar_cfg_scale = body.ar_cfg_scale
    msg.format = FORMATS_IMAGE[body.output_format or "png"]
    if body.output_compression is not None:
        if not 0 <= body.output_compression <= 100:
            raise InvalidArgument("output_compression", f"must be in [0, 100], got {body.output_compression}")
        msg.quality = max(1, body.output_compression)
    msg.preview = body.preview or bool(body.partial_images)
    return msg


IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")


def is_image(data: bytes) -> bool:
    """Whether uploaded bytes are a still image (PNG, JPEG, GIF, BMP, WEBP) rather than a video."""
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def video_request(body: VideoBody, source: bytes | None = None, max_video_bytes: int | None = None) -> Any:
    """``source`` (an uploaded ``input_reference`` or ``video``): a video is edited; a still image
    (image-to-video start frame) is refused, the served video models have no start-frame input."""
    if body.input_reference is not None:
        raise Refused("input_reference", "image-to-video (a start frame) is not supported by the served model; "
                      "upload a video as input_reference (multipart) to edit it")
    if body.video is not None:
        source = decode_b64("video", body.video, max_video_bytes)
    if source is not None and is_image(source):
        raise Refused("input_reference", "image-to-video (a start frame) is not supported by the served model; "
                      "send a video to edit it")
    if source is not None:
        msg = generation_pb2.EditVideoRequest(instruction=body.prompt, source_video=common_pb2.Media(data=source))
        if body.context_guidance_scale is not None:
            msg.context_guidance = body.context_guidance_scale
        msg.resize_policy = POLICIES[body.resize_policy]
    else:
        msg = generation_pb2.GenerateVideoRequest(prompt=body.prompt)
    _set_common(msg, body, image=False)
    if body.fps is not None:
        msg.fps = body.fps
    if body.frames is not None:
        msg.frames = body.frames
    elif body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            raise InvalidArgument("seconds", f"expected a number of seconds, got {body.seconds!r}") from None
        if not 0 < seconds < 1e4:
            raise InvalidArgument("seconds", f"must be positive, got {body.seconds!r}")
        fps = body.fps or 16
        msg.frames = int(round(seconds * fps / 4)) * 4 + 1
    msg.format = FORMATS_VIDEO[body.output_format]
    return msg


def chat_request(body: ChatBody, max_image_bytes: int | None = None,
                 max_video_bytes: int | None = None) -> generation_pb2.UnderstandRequest:
    chat_refusals(body)
    msg = generation_pb2.UnderstandRequest()
    for i, message in enumerate(body.messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in _CHAT_ROLES:
            raise Refused(f"messages[{i}].role", f"{role!r} is not supported; use system, developer, user or "
                          "assistant", "invalid_value")
        out = msg.messages.add(role=_CHAT_ROLES[role])
        content = message.get("content")
        if isinstance(content, str):
            out.content.add(text=content)
            continue
        if not isinstance(content, list):
            raise InvalidArgument(f"messages[{i}].content", "must be a string or a list of parts")
        for j, part in enumerate(content):
            name = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out.content.add(text=str(part.get("text", "")))
            elif kind in ("image_url", "video_url"):
                url = part.get(kind, {})
                url = url.get("url", "") if isinstance(url, dict) else str(url)
                data = decode_b64(f"{name}.{kind}", url, max_image_bytes if kind == "image_url" else max_video_bytes)
                media = common_pb2.Media(data=data)
                out.content.add(image=media) if kind == "image_url" else out.content.add(video=media)
            elif kind in ("input_audio", "file", "refusal"):
                raise Refused(f"{name}.type", f"{kind} parts are not supported; send text, image_url or video_url")
            else:
                raise InvalidArgument(f"{name}.type", f"unsupported content part {kind!r}")
    if body.model:
        msg.model = body.model
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        msg.max_tokens = max_tokens
    for name in ("temperature", "top_p", "seed"):
        if getattr(body, name) is not None:
            setattr(msg, name, getattr(body, name))
    if body.stop is not None:
        msg.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    return msg


# ----------------------------------------------------------------------------- responses


def event_json(event: Any) -> dict[str, Any]:
    """A progress event (``progress_events: true``) as the JSON payload of an SSE ``data:`` line."""
    if isinstance(event, Queued):
        return {"type": "queued", "request_id": event.request_id}
    if isinstance(event, Planning):
        return {"type": "planning", "request_id": event.request_id, "planned_tokens": event.planned_tokens}
    if isinstance(event, Step):
        out = {"type": "denoise_step", "request_id": event.request_id, "step": event.step, "total": event.total,
               "index": event.index}
        if event.preview_png is not None:
            out["preview_b64_png"] = base64.b64encode(event.preview_png).decode()
        return out
    if isinstance(event, Decoding):
        return {"type": "decoding", "request_id": event.request_id}
    raise TypeError(f"not a progress event: {type(event).__name__}")


def _settings(body: ImageGenerationBody, result: Result) -> dict[str, Any]:
    """The OpenAI fields every image response and stream event repeats."""
    return {"background": "opaque", "output_format": body.output_format or "png",
            "quality": body.quality or "auto", "size": f"{result.media.width}x{result.media.height}"}


_RESPONSE_QUALITIES = ("low", "medium", "high", "xhigh", "max")


def image_usage(results: list[Result]) -> dict[str, Any]:
    """OpenAI's image ``usage``: output tokens are the visual tokens the planner generated; input
    tokens are not counted by the planner (reported as 0)."""
    output = sum(r.planned_tokens for r in results)
    return {"input_tokens": 0, "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
            "total_tokens": output}


def image_item(result: Result, url: str | None = None) -> dict[str, Any]:
    """One entry of ``data``: ``b64_json`` or (``response_format: url``) ``url``."""
    item: dict[str, Any] = {"url": url} if url is not None else {
        "b64_json": base64.b64encode(result.media.data).decode()}
    return {**item, "revised_prompt": None, "mime_type": result.media.mime_type, "index": result.index,
            "seed": result.seed}


def images_response(results: list[Result], body: ImageGenerationBody, items: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's ``ImagesResponse`` (images in index order) plus Mammoth's own fields."""
    first = results[0]
    media = first.media
    return {
        "created": int(time.time()), "data": items, **_settings(body, first),
        "quality": body.quality if body.quality in _RESPONSE_QUALITIES else None,  # the response has no "auto"
        "usage": image_usage(results),
        "request_id": first.request_id, "width": media.width, "height": media.height, "frames": media.frames,
        "fps": media.fps, "seed": first.seed, "seeds": [r.seed for r in results], "model": first.model,
        "steps": first.steps, "planned_tokens": first.planned_tokens, "timings": first.timings,
        "retries": sum(r.retries for r in results),
    }


def partial_image_event(step: Step, body: ImageGenerationBody, partial_index: int, *, edit: bool,
                        size: str) -> dict[str, Any]:
    """``image_generation.partial_image`` / ``image_edit.partial_image`` from a preview (a PNG)."""
    return {"type": f"{'image_edit' if edit else 'image_generation'}.partial_image",
            "b64_json": base64.b64encode(step.preview_png or b"").decode(), "background": "opaque",
            "created_at": int(time.time()), "output_format": "png", "quality": body.quality or "auto",
            "size": size, "partial_image_index": partial_index, "index": step.index,
            "request_id": step.request_id, "step": step.step, "total": step.total}


def completed_event(result: Result, body: ImageGenerationBody, *, edit: bool) -> dict[str, Any]:
    """``image_generation.completed`` / ``image_edit.completed``: one per image."""
    return {"type": f"{'image_edit' if edit else 'image_generation'}.completed",
            "b64_json": base64.b64encode(result.media.data).decode(), **_settings(body, result),
            "created_at": int(time.time()), "usage": image_usage([result]), "index": result.index,
            "request_id": result.request_id, "seed": result.seed, "model": result.model,
            "mime_type": result.media.mime_type, "width": result.media.width, "height": result.media.height,
            "frames": result.media.frames, "steps": result.steps, "timings": result.timings}


def chat_usage(dones: list[UnderstandDone]) -> dict[str, int]:
    """The prompt is counted once (``n`` choices share it), completions summed, as OpenAI does."""
    prompt = dones[0].prompt_tokens if dones else 0
    completion = sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(request_id: str, created: int, model: str, texts: list[str],
                    dones: list[UnderstandDone]) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": dones[i].finish_reason if i < len(dones) else "stop", "logprobs": None}
               for i, text in enumerate(texts)]
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": chat_usage(dones)}


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> str:
    payload: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                               "model": model, "choices": choices}
    if usage is not None:
        payload["usage"] = usage
    return sse(payload)


def video_model_fields(*, model: str, width: int, height: int, frames: int, fps: int, prompt: str) -> dict[str, Any]:
    """What a video object says from the moment it is created (OpenAI: ``model``, ``size``,
    ``seconds`` as a string, ``prompt``)."""
    return {"model": model, "size": f"{width}x{height}", "seconds": f"{frames / max(fps, 1):g}", "prompt": prompt,
            "width": width, "height": height, "frames": frames, "fps": fps}


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error shape, on every /v1 error."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# HTTP status -> OpenAI ``error.code`` when the error carries none of its own.
ERROR_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 409: "invalid_state",
               413: "request_too_large", 422: "invalid_value", 429: "rate_limit_exceeded",
               500: "internal_error", 503: "service_unavailable", 504: "timeout"}


def sse(payload: dict[str, Any] | str, event: str | None = None) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


# ------------------------------------------------------------------------------ ASGI guards


async def send_json_error(send: Any, status: int, message: str, kind: str, param: str | None,
                          headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """One complete ASGI answer in OpenAI's error shape (for middleware, before any app ran)."""
    body = json.dumps(error_body(message, kind, param, ERROR_CODES.get(status))).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class RequireKey:
    """ASGI middleware: every path but ``open_paths`` (probes) needs a key, the API docs too.

    ``check(headers)`` raises ``Unauthenticated``; the request body is never read for it."""

    def __init__(self, app: Any, check: Callable[[Headers], None], open_paths: Collection[str] = ()):
        self.app, self.check, self.open_paths = app, check, frozenset(open_paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "") not in self.open_paths:
            try:
                self.check(Headers(scope=scope))
            except Unauthenticated as exc:
                await send_json_error(send, 401, str(exc), "authentication_error", None)
                return
        await self.app(scope, receive, send)


class LimitedBody:
    """ASGI middleware: a body over ``max_bytes`` is refused from its Content-Length at once, or
    while it is being read (``RequestTooLarge``, a 413), never after being read whole."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            message = (f"body: request exceeds the limit of {self.max_bytes} bytes" if length.isdigit()
                       else "body: invalid Content-Length")
            await send_json_error(send, 413 if length.isdigit() else 400, message, "invalid_request_error", "body")
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge("body", self.max_bytes)
            return message

        await self.app(scope, limited, send)
