"""HTTP (OpenAI-style) request bodies and their conversion to the public protos.

Every HTTP body becomes the same proto message a gRPC client would send, so both ingresses
share one validation path (``services.jobs``) and one set of error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers

from protos import common_pb2, generation_pb2

from .errors import RequestTooLarge, Unauthenticated
from .flows import Decoding, Planning, Queued, Result, Step
from .jobs import InvalidArgument

FORMATS_IMAGE = {"png": common_pb2.IMAGE_FORMAT_PNG, "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
                 "webp": common_pb2.IMAGE_FORMAT_WEBP}
FORMATS_VIDEO = {"mp4": common_pb2.VIDEO_FORMAT_MP4, "gif": common_pb2.VIDEO_FORMAT_GIF}
POLICIES = {"resize": common_pb2.RESIZE_POLICY_RESIZE, "center_crop": common_pb2.RESIZE_POLICY_CENTER_CROP,
            "pad": common_pb2.RESIZE_POLICY_PAD}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageGenerationBody(_Body):
    prompt: str
    model: str | None = None
    n: Literal[1] = 1
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, multiples of 16")
    negative_prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    cfg_range: tuple[float, float] | None = None
    ar_cfg_scale: float | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, description="quality 1..100 for jpeg/webp")
    response_format: Literal["b64_json"] = "b64_json"
    stream: bool = False
    preview: bool = False
    resize_policy: Literal["resize", "center_crop", "pad"] = "resize"
    images: list[str] = Field(default_factory=list, description="edits: base64 or data: URLs")


class VideoBody(_Body):
    prompt: str
    model: str | None = None
    size: str | None = None
    frames: int | None = None
    fps: int | None = None
    seconds: float | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    context_guidance_scale: float | None = None
    output_format: Literal["mp4", "gif"] = "mp4"
    resize_policy: Literal["resize", "center_crop", "pad"] = "resize"
    video: str | None = Field(None, description="video editing: base64 or data: URL of the source video")


class ChatBody(_Body):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields
    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


# Public proto field -> the HTTP body field a client actually sent.
_HTTP_FIELDS = {"text_guidance": "guidance_scale", "guidance": "guidance_scale",
                "image_guidance": "image_guidance_scale", "context_guidance": "context_guidance_scale",
                "reference_images": "images", "source_video": "video", "quality": "output_compression",
                "width": "size", "height": "size", "instruction": "prompt"}


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
    for src, dst in (("negative_prompt", "negative_prompt"), ("steps", "steps"), ("seed", "seed")):
        if getattr(body, src) is not None:
            setattr(msg, dst, getattr(body, src))
    if body.guidance_scale is not None:
        setattr(msg, "text_guidance" if image else "guidance", body.guidance_scale)


def image_request(body: ImageGenerationBody, *, edit: bool, files: list[bytes] = (),
                  max_image_bytes: int | None = None) -> Any:
    if edit:
        msg = generation_pb2.EditImageRequest(instruction=body.prompt)
        images = list(files) + [decode_b64(f"images[{i}]", v, max_image_bytes) for i, v in enumerate(body.images)]
        msg.reference_images.extend(common_pb2.Media(data=data) for data in images)
        if body.image_guidance_scale is not None:
            msg.image_guidance = body.image_guidance_scale
        msg.resize_policy = POLICIES[body.resize_policy]
    else:
        if body.images:
            raise InvalidArgument("images", "only for /v1/images/edits")
        msg = generation_pb2.GenerateImageRequest(prompt=body.prompt)
    _set_common(msg, body, image=True)
    if body.cfg_range is not None:
        msg.cfg_range.start, msg.cfg_range.end = body.cfg_range
    if body.ar_cfg_scale is not None:
        msg.ar_cfg_scale = body.ar_cfg_scale
    msg.format = FORMATS_IMAGE[body.output_format]
    if body.output_compression is not None:
        msg.quality = body.output_compression
    msg.preview = body.preview
    return msg


def video_request(body: VideoBody, source: bytes | None = None, max_video_bytes: int | None = None) -> Any:
    if body.video is not None:
        source = decode_b64("video", body.video, max_video_bytes)
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
        fps = body.fps or 16
        msg.frames = int(round(body.seconds * fps / 4)) * 4 + 1
    msg.format = FORMATS_VIDEO[body.output_format]
    return msg


def chat_request(body: ChatBody, max_image_bytes: int | None = None,
                 max_video_bytes: int | None = None) -> generation_pb2.UnderstandRequest:
    msg = generation_pb2.UnderstandRequest()
    for i, message in enumerate(body.messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object")
        out = msg.messages.add(role=str(message.get("role", "")))
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
            else:
                raise InvalidArgument(f"{name}.type", f"unsupported content part {kind!r}")
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
    """A flow event as the JSON payload of an SSE ``data:`` line."""
    if isinstance(event, Queued):
        return {"type": "queued", "request_id": event.request_id}
    if isinstance(event, Planning):
        return {"type": "planning", "request_id": event.request_id, "planned_tokens": event.planned_tokens}
    if isinstance(event, Step):
        out = {"type": "denoise_step", "request_id": event.request_id, "step": event.step, "total": event.total}
        if event.preview_png is not None:
            out["preview_b64_png"] = base64.b64encode(event.preview_png).decode()
        return out
    if isinstance(event, Decoding):
        return {"type": "decoding", "request_id": event.request_id}
    return {"type": "completed", **result_json(event)}


def result_json(result: Result) -> dict[str, Any]:
    media = result.media
    return {
        "created": int(time.time()),
        "request_id": result.request_id,
        "data": [{"b64_json": base64.b64encode(media.data).decode(), "mime_type": media.mime_type}],
        "width": media.width, "height": media.height, "frames": media.frames, "fps": media.fps,
        "seed": result.seed, "model": result.model, "steps": result.steps,
        "planned_tokens": result.planned_tokens, "timings": result.timings, "retries": result.retries,
    }


def sse(payload: dict[str, Any] | str, event: str | None = None) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


# ------------------------------------------------------------------------------ ASGI guards


async def _send_json(send: Any, status: int, message: str, kind: str, param: str | None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": param}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
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
                await _send_json(send, 401, str(exc), "authentication_error", None)
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
            await _send_json(send, 413 if length.isdigit() else 400, message, "invalid_request_error", "body")
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
