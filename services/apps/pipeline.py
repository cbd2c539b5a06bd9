"""The pipeline ingress: gRPC ``mammoth.v1.Generation`` and the OpenAI-style HTTP API.

It orchestrates the stage applications by handle (``services.flows``) and never holds a
tensor: each stage's DeploymentResponse goes straight into the next stage's call.
"""


import asyncio
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from starlette.responses import Response as StarletteResponse

from protos import common_pb2, generation_pb2, vae_pb2

from .. import flows
from .. import stage_messages as messages
from ..errors import Unauthenticated, classify
from ..handoff import MediaGeometry, MediaOutput
from ..http_api import (
    ChatBody,
    ImageGenerationBody,
    VideoBody,
    chat_request,
    event_json,
    http_field,
    http_message,
    image_request,
    parse_body,
    result_json,
    sse,
    video_request,
)
from ..jobs import ImageJob, InvalidArgument, UnderstandJob, VideoJob, image_job, understand_job, video_job
from ..local import ensure_model
from ..render import stage_app_name
from .common import config_from_args, deployment_options
from .grpc_util import grpc_abort, timings_proto

MAX_VIDEO_JOBS = 256


class _ForwardToASGI(StarletteResponse):
    """Lets a plain (non-``serve.ingress``) deployment answer HTTP with a whole ASGI app.

    Ray Serve 2.60 treats every method of a ``@serve.ingress`` class as ASGI, so such a class
    cannot also answer gRPC; a plain class can, and hands HTTP to FastAPI through this."""

    def __init__(self, app: FastAPI):  # noqa: D107 - no body/headers of its own
        self.app = app
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    field_name = ".".join(str(p) for p in first["loc"] if p != "body")
    return _error_json(422, f"{field_name}: {first['msg']}", "invalid_request_error", field_name)


def _error_json(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


class RayStages:
    """``flows.Stages`` over Serve handles of one model's stage applications.

    Each call carries the stage's own request message (``services.stage_messages``); what an
    earlier stage produced rides beside it as that stage's DeploymentResponse, which Ray
    resolves in the receiving replica, so no tensor passes through the ingress.
    """

    def __init__(self, model_name: str, model: str):
        self.model_name = model_name
        self.planner = serve.get_deployment_handle("Planner", app_name=stage_app_name(model, "planner"))
        self.dit = serve.get_deployment_handle("DiT", app_name=stage_app_name(model, "dit"))
        self.vae = serve.get_deployment_handle("VAE", app_name=stage_app_name(model, "vae"))

    def plan_image(self, job: ImageJob, references: list[Any] | None) -> Any:
        return self.planner.plan_image.remote(messages.plan_image_request(job), *(references or []))

    def encode_prompts(self, job: VideoJob) -> Any:
        return self.planner.encode_prompts.remote(messages.encode_prompt_request(job))

    async def encode_references(self, job: ImageJob) -> list[Any]:
        """One VAE call per image, so several replicas can encode them at once."""
        first = self.vae.encode.remote(messages.reference_encode_request(job, 0, sized=not job.size_from_reference))
        if job.size_from_reference:
            size = await self.geometry(first)
            job.width, job.height = size.width, size.height
        rest = [self.vae.encode.remote(messages.reference_encode_request(job, i, sized=True))
                for i in range(1, len(job.reference_images))]
        return [first, *rest]

    def encode_source_video(self, job: VideoJob) -> Any:
        return self.vae.encode.remote(messages.source_encode_request(job))

    def denoise(self, job: ImageJob | VideoJob, conditions: Any, media: Any) -> Any:
        media = [] if media is None else media if isinstance(media, list) else [media]
        return self.dit.options(stream=True).denoise.remote(messages.denoise_request(job), conditions, *media)

    async def decode(self, latents: Any, job: ImageJob | VideoJob) -> MediaOutput:
        return await self.vae.decode.remote(messages.decode_request(job), latents)

    async def preview(self, latents: Any) -> bytes:
        media = await self.vae.preview.remote(vae_pb2.PreviewRequest(format=common_pb2.IMAGE_FORMAT_PNG), latents)
        return media.data

    async def geometry(self, encoded: Any) -> MediaGeometry:
        """Asked of the VAE that holds the encoding: the ingress reads a few numbers, not tensors."""
        return await self.vae.geometry.remote(encoded)

    def understand(self, job: UnderstandJob) -> Any:
        return self.planner.options(stream=True).understand.remote(messages.understand_request(job))


@dataclass
class VideoTask:
    id: str
    created_at: int
    status: str = "queued"  # queued -> in_progress -> completed | failed
    progress: int = 0
    result: flows.Result | None = None
    error: dict[str, Any] | None = None
    task: asyncio.Task | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "video", "status": self.status, "progress": self.progress,
                               "created_at": self.created_at}
        if self.result is not None:
            media = self.result.media
            out.update(model=self.result.model, seed=self.result.seed, width=media.width, height=media.height,
                       frames=media.frames, fps=media.fps, mime_type=media.mime_type, timings=self.result.timings)
        if self.error is not None:
            out["error"] = self.error
        return out


@serve.deployment(name="Ingress")
class IngressDeployment:
    def __init__(self, args: dict[str, Any]):
        self.cfg = config_from_args(args)
        self.limits = self.cfg.ingress.limits
        self.stages: dict[str, RayStages] = {}
        self.defaults: dict[str, dict[str, Any]] = {}
        for name in self.cfg.models:
            index = ensure_model(self.cfg, name)
            self.stages[index.family] = RayStages(index.preset, name)
            self.defaults[index.family] = index.defaults
        keys = list(self.cfg.ingress.api_keys)
        env = self.cfg.ingress.api_keys_env
        if env and os.environ.get(env):
            keys += [k.strip() for k in os.environ[env].split(",") if k.strip()]
        self.api_keys = keys if self.cfg.ingress.auth_enabled else []
        self.videos: OrderedDict[str, VideoTask] = OrderedDict()
        self.http = self._http_app()

    def _http_app(self) -> FastAPI:
        app = FastAPI(title="Mammoth Serve", version="1")
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_api_route("/v1/images/generations", self.images_generations, methods=["POST"])
        app.add_api_route("/v1/images/edits", self.images_edits, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/videos", self.create_video, methods=["POST"])
        app.add_api_route("/v1/videos/{video_id}", self.get_video, methods=["GET"])
        app.add_api_route("/v1/videos/{video_id}/content", self.get_video_content, methods=["GET"])
        app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        return app

    async def __call__(self, request: Request) -> StarletteResponse:
        """HTTP entry point (the Serve HTTP proxy calls ``__call__``)."""
        return _ForwardToASGI(self.http)

    # -- shared ------------------------------------------------------------------------------
    def _check_key(self, key: str | None) -> None:
        if not self.api_keys:
            return
        if not key or not any(secrets.compare_digest(key, k) for k in self.api_keys):
            raise Unauthenticated("missing or invalid API key")

    def _grpc_key(self, grpc_context: Any) -> str | None:
        if grpc_context is None:
            return None
        for key, value in grpc_context.invocation_metadata():
            if key == "authorization" and value.lower().startswith("bearer "):
                return value[7:].strip()
            if key == "x-api-key":
                return value.strip()
        return None

    def _http_key(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")

    def _family_stages(self, family: str, field_name: str = "model") -> RayStages:
        if family not in self.stages:
            task = "image" if family == "mammoth2" else "video"
            raise InvalidArgument(field_name, f"this server has no {task} model")
        return self.stages[family]

    def _image_flow(self, msg: Any, *, edit: bool) -> AsyncIterator[flows.Event]:
        stages = self._family_stages("mammoth2")
        job = image_job(msg, self.defaults["mammoth2"], self.limits, edit=edit)
        flow = flows.edit_image if edit else flows.text_to_image
        return self._with_deadline(flow(stages, job))

    def _video_flow(self, msg: Any, *, edit: bool) -> AsyncIterator[flows.Event]:
        stages = self._family_stages("mammoth25")
        job = video_job(msg, self.defaults["mammoth25"], self.limits, edit=edit)
        flow = flows.edit_video if edit else flows.text_to_video
        return self._with_deadline(flow(stages, job))

    def _understand(self, msg: Any) -> tuple[UnderstandJob, AsyncIterator[str]]:
        job = understand_job(msg, self.limits)
        family = "mammoth2" if "mammoth2" in self.stages else next(iter(self.stages))
        return job, self._with_deadline(flows.understand(self.stages[family], job))

    async def _with_deadline(self, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async with asyncio.timeout(self.limits.request_timeout_s):
            async for event in events:
                yield event

    # -- gRPC: mammoth.v1.Generation -----------------------------------------------------------
    async def _grpc_generation(self, make_flow, request: Any, grpc_context: Any):
        try:
            self._check_key(self._grpc_key(grpc_context))
            async for event in make_flow(request):
                yield _event_proto(event)
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc)

    async def GenerateImage(self, request, grpc_context=None):  # noqa: N802
        async for out in self._grpc_generation(lambda r: self._image_flow(r, edit=False), request, grpc_context):
            yield out

    async def EditImage(self, request, grpc_context=None):  # noqa: N802
        async for out in self._grpc_generation(lambda r: self._image_flow(r, edit=True), request, grpc_context):
            yield out

    async def GenerateVideo(self, request, grpc_context=None):  # noqa: N802
        async for out in self._grpc_generation(lambda r: self._video_flow(r, edit=False), request, grpc_context):
            yield out

    async def EditVideo(self, request, grpc_context=None):  # noqa: N802
        async for out in self._grpc_generation(lambda r: self._video_flow(r, edit=True), request, grpc_context):
            yield out

    async def Understand(self, request, grpc_context=None):  # noqa: N802
        try:
            self._check_key(self._grpc_key(grpc_context))
            job, deltas = self._understand(request)
            count = 0
            async for delta in deltas:
                count += 1
                yield generation_pb2.UnderstandEvent(request_id=job.request_id, text=delta)
            yield generation_pb2.UnderstandEvent(request_id=job.request_id, finish_reason="stop",
                                                 usage=generation_pb2.Usage(completion_tokens=count))
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc)

    # grpc.health.v1.Health, routed here by the proxy (see services.render).
    async def Check(self, request, grpc_context=None):  # noqa: N802
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request, grpc_context=None):  # noqa: N802
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # -- HTTP -----------------------------------------------------------------------------------
    async def _http_errors(self, request: Request, work):
        try:
            self._check_key(self._http_key(request))
            return await work()
        except Exception as exc:  # noqa: BLE001
            error = classify(exc)
            field_name = getattr(getattr(exc, "cause", None) or exc, "field", None)
            return _error_json(error.http_status, http_message(error.message), error.kind,
                               http_field(field_name) if field_name else None)

    async def _image_http(self, request: Request, *, edit: bool):
        files: list[bytes] = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            data: dict[str, Any] = {}
            for key, value in form.multi_items():
                if key in ("image", "image[]"):
                    files.append(await value.read())
                else:
                    data[key] = value
            body = parse_body(ImageGenerationBody, data)
        else:
            body = parse_body(ImageGenerationBody, await _json(request))
        flow = self._image_flow(image_request(body, edit=edit, files=files), edit=edit)
        if body.stream:
            first = await anext(flow)  # surface bad requests as a status, not mid-stream
            return StreamingResponse(_sse_events(first, flow), media_type="text/event-stream")
        result = None
        async for event in flow:
            result = event
        return JSONResponse(result_json(result))

    async def images_generations(self, request: Request):
        return await self._http_errors(request, lambda: self._image_http(request, edit=False))

    async def images_edits(self, request: Request):
        return await self._http_errors(request, lambda: self._image_http(request, edit=True))

    async def chat_completions(self, request: Request):
        async def work():
            body = parse_body(ChatBody, await _json(request))
            job, deltas = self._understand(chat_request(body))
            created, name = int(time.time()), body.model or "mammoth"
            if body.stream:
                first = await anext(deltas, "")
                return StreamingResponse(_chat_sse(job.request_id, created, name, first, deltas),
                                         media_type="text/event-stream")
            text = "".join([d async for d in deltas])
            return JSONResponse({"id": job.request_id, "object": "chat.completion", "created": created, "model": name,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}]})
        return await self._http_errors(request, work)

    async def create_video(self, request: Request):
        async def work():
            source = None
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form()
                data = {}
                for key, value in form.multi_items():
                    if key in ("input_video", "video_file"):
                        source = await value.read()
                    else:
                        data[key] = value
                body = parse_body(VideoBody, data)
            else:
                body = parse_body(VideoBody, await _json(request))
            msg = video_request(body, source)
            flow = self._video_flow(msg, edit=isinstance(msg, generation_pb2.EditVideoRequest))
            first = await anext(flow)
            video = VideoTask(first.request_id, int(time.time()))
            video.task = asyncio.ensure_future(self._run_video(video, flow))
            self.videos[video.id] = video
            while len(self.videos) > MAX_VIDEO_JOBS:
                _, old = self.videos.popitem(last=False)
                if old.task is not None:
                    old.task.cancel()
            return JSONResponse(video.as_json(), status_code=200)
        return await self._http_errors(request, work)

    async def _run_video(self, video: VideoTask, flow: AsyncIterator[flows.Event]) -> None:
        try:
            async for event in flow:
                if isinstance(event, flows.Step):
                    video.status = "in_progress"
                    video.progress = int(100 * event.step / max(event.total, 1) * 0.95)
                elif isinstance(event, flows.Result):
                    video.result, video.status, video.progress = event, "completed", 100
        except Exception as exc:  # noqa: BLE001
            error = classify(exc)
            video.status, video.error = "failed", {"message": error.message, "type": error.kind}

    async def get_video(self, video_id: str, request: Request):
        async def work():
            video = self.videos.get(video_id)
            if video is None:
                return _error_json(404, f"video {video_id!r} not found", "not_found_error", "video_id")
            return JSONResponse(video.as_json())
        return await self._http_errors(request, work)

    async def get_video_content(self, video_id: str, request: Request):
        async def work():
            video = self.videos.get(video_id)
            if video is None:
                return _error_json(404, f"video {video_id!r} not found", "not_found_error", "video_id")
            if video.result is None:
                return _error_json(409, f"video {video_id!r} is {video.status}", "invalid_request_error", "video_id")
            return Response(video.result.media.data, media_type=video.result.media.mime_type)
        return await self._http_errors(request, work)

    async def list_models(self, request: Request):
        async def work():
            return JSONResponse({"object": "list", "data": [
                {"id": stages.model_name, "object": "model", "family": family}
                for family, stages in self.stages.items()]})
        return await self._http_errors(request, work)


async def _sse_events(first: flows.Event, rest: AsyncIterator[flows.Event]) -> AsyncIterator[str]:
    yield sse(event_json(first), "progress")
    try:
        async for event in rest:
            kind = "completed" if isinstance(event, flows.Result) else "progress"
            yield sse(event_json(event), kind)
    except Exception as exc:  # noqa: BLE001 - a stream that already started reports errors in-band
        error = classify(exc)
        yield sse({"type": "error", "error": {"message": error.message, "type": error.kind}}, "error")


async def _chat_sse(request_id: str, created: int, model: str, first: str,
                    rest: AsyncIterator[str]) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": first})
    try:
        async for delta in rest:
            yield chunk({"content": delta})
        yield chunk({}, "stop")
    except Exception as exc:  # noqa: BLE001
        error = classify(exc)
        yield sse({"error": {"message": error.message, "type": error.kind}})
    yield sse("[DONE]")


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise InvalidArgument("body", "not valid JSON") from None


def _event_proto(event: flows.Event) -> generation_pb2.GenerationEvent:
    out = generation_pb2.GenerationEvent(request_id=event.request_id)
    if isinstance(event, flows.Queued):
        out.queued.SetInParent()
    elif isinstance(event, flows.Planning):
        out.planning.planned_tokens = event.planned_tokens
    elif isinstance(event, flows.Step):
        out.denoise_step.step, out.denoise_step.total = event.step, event.total
        if event.preview_png is not None:
            out.denoise_step.preview.CopyFrom(common_pb2.Media(data=event.preview_png, mime_type="image/png"))
    elif isinstance(event, flows.Decoding):
        out.decoding.SetInParent()
    else:
        media = event.media
        result = out.result
        result.media.CopyFrom(common_pb2.Media(data=media.data, mime_type=media.mime_type))
        result.width, result.height, result.frames, result.fps = media.width, media.height, media.frames, media.fps
        result.seed, result.model, result.steps = event.seed, event.model, event.steps
        result.planned_tokens = event.planned_tokens
        result.timings.CopyFrom(timings_proto(event.timings))
    return out


def app(args: dict[str, Any]) -> serve.Application:
    return IngressDeployment.options(**deployment_options(config_from_args(args), "mammoth")).bind(args)

