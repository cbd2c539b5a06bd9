"""The pipeline ingress: gRPC ``mammoth.v1.Generation`` and the OpenAI-style HTTP API.

It orchestrates the stage applications by handle (``services.flows``) and never holds a
tensor: each stage's DeploymentResponse goes straight into the next stage's call.
"""


import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from starlette.responses import Response as StarletteResponse

from protos import common_pb2, generation_pb2, vae_pb2
from protos.server_extras import SERVICE_NAMES

from .. import flows
from .. import stage_messages as messages
from ..errors import RequestTooLarge, classify, root_cause
from ..handoff import MediaGeometry, MediaOutput
from ..http_api import (
    ChatBody,
    ImageGenerationBody,
    LimitedBody,
    RequireKey,
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
from ..video_jobs import store_actor
from .common import ApiKeys, config_from_args, deployment_options
from .grpc_util import grpc_abort, timings_proto


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

    def __init__(self, model_name: str, model: str, ready: Callable[[], Awaitable[bool]] | None = None):
        self.model_name = model_name
        self._ready = ready
        self.planner = serve.get_deployment_handle("Planner", app_name=stage_app_name(model, "planner"))
        self.dit = serve.get_deployment_handle("DiT", app_name=stage_app_name(model, "dit"))
        self.vae = serve.get_deployment_handle("VAE", app_name=stage_app_name(model, "vae"))

    async def ready(self) -> bool:
        """Whether every stage of this model has a running replica (the retry gate of ``flows``)."""
        return True if self._ready is None else await self._ready()

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


# Stage services by the health-service names a gRPC client may ask about.
_STAGE_SERVICES = {SERVICE_NAMES["planner"]: "planner", SERVICE_NAMES["dit"]: "dit", SERVICE_NAMES["vae"]: "vae"}
_STAGE_DEPLOYMENTS = {"planner": "Planner", "dit": "DiT", "vae": "VAE"}
_OPEN_PATHS = frozenset({"/health", "/ready"})  # probes: no key, no body
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@serve.deployment(name="Ingress")
class IngressDeployment:
    def __init__(self, args: dict[str, Any]):
        self.cfg = config_from_args(args)
        self.limits = self.cfg.ingress.limits
        self.auth = ApiKeys.from_settings(self.cfg.ingress)  # refuses to start with auth on and no keys
        self.stages: dict[str, RayStages] = {}
        self.defaults: dict[str, dict[str, Any]] = {}
        self.stage_apps: dict[str, str] = {}  # stage app name -> stage kind
        for name in self.cfg.models:
            index = ensure_model(self.cfg, name)
            apps = [stage_app_name(name, stage) for stage in _STAGE_DEPLOYMENTS]
            self.stages[index.family] = RayStages(index.preset, name, functools.partial(self._apps_serving, apps))
            self.defaults[index.family] = index.defaults
            self.stage_apps.update({stage_app_name(name, stage): stage for stage in _STAGE_DEPLOYMENTS})
        self.retries = self.cfg.ingress.stage_retries
        jobs = self.cfg.ingress.video_jobs
        self._job_deadline_s = self.limits.request_timeout_s + self.cfg.ingress.health_timeout_s
        self.jobs = store_actor(jobs, self._job_deadline_s)
        self._video_tasks: set[asyncio.Task] = set()
        self._status_cache: tuple[float, dict[str, int]] | None = None
        self.http = RequireKey(LimitedBody(self._http_app(), self.limits.max_request_bytes),
                               self.auth.check_headers, _OPEN_PATHS)

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
        app.add_api_route("/health", self.live, methods=["GET"])
        app.add_api_route("/ready", self.ready, methods=["GET"])
        return app

    async def __call__(self, request: Request) -> StarletteResponse:
        """HTTP entry point (the Serve HTTP proxy calls ``__call__``)."""
        return _ForwardToASGI(self.http)

    async def check_health(self) -> None:
        """Serve's probe of this replica (it answers, so its event loop runs). The shared job
        store is pinged too: a dead one is re-created (losing its jobs, not the ingress); a slow
        one (still starting on a busy node) is no reason to replace the ingress."""
        try:
            await asyncio.wait_for(self.jobs.counts.remote(), self.cfg.ingress.health_timeout_s)
        except TimeoutError:
            return
        except Exception:  # noqa: BLE001 - the actor died: the next job goes to a new store
            self.jobs = store_actor(self.cfg.ingress.video_jobs, self._job_deadline_s)

    # -- shared ------------------------------------------------------------------------------
    def _family_stages(self, family: str, field_name: str = "model") -> RayStages:
        if family not in self.stages:
            task = "image" if family == "mammoth2" else "video"
            raise InvalidArgument(field_name, f"this server has no {task} model")
        return self.stages[family]

    def _check_latent_tokens(self, job: ImageJob | VideoJob) -> None:
        """The DiT's own bound, checked here so a too-large size is the client's 422, not a stage error."""
        frames = job.latent_frames if isinstance(job, VideoJob) else 1
        positions = job.latent_height * job.latent_width * frames  # counted like the engine does
        limit = self.cfg.dit.engine.max_latent_tokens
        if positions > limit:
            raise InvalidArgument("width", f"{job.width}x{job.height} needs {positions} latent positions, over the "
                                  f"limit {limit}")

    def _image_flow(self, msg: Any, *, edit: bool) -> AsyncIterator[flows.Event]:
        stages = self._family_stages("mammoth2")
        job = image_job(msg, self.defaults["mammoth2"], self.limits, edit=edit)
        self._check_latent_tokens(job)
        flow = flows.edit_image if edit else flows.text_to_image
        return self._with_deadline(flow(stages, job, retries=self.retries))

    def _video_flow(self, msg: Any, *, edit: bool) -> AsyncIterator[flows.Event]:
        stages = self._family_stages("mammoth25")
        job = video_job(msg, self.defaults["mammoth25"], self.limits, edit=edit)
        self._check_latent_tokens(job)
        flow = flows.edit_video if edit else flows.text_to_video
        return self._with_deadline(flow(stages, job, retries=self.retries))

    def _understand(self, msg: Any) -> tuple[UnderstandJob, AsyncIterator[str]]:
        job = understand_job(msg, self.limits)
        family = "mammoth2" if "mammoth2" in self.stages else next(iter(self.stages))
        return job, self._with_deadline(flows.understand(self.stages[family], job, retries=self.retries))

    async def _with_deadline(self, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async with asyncio.timeout(self.limits.request_timeout_s):
            async for event in events:
                yield event

    def _check_grpc(self, request: Any, grpc_context: Any) -> None:
        """Key first (an unauthenticated caller learns nothing), then the message size."""
        self.auth.check_grpc(grpc_context)
        if request.ByteSize() > self.limits.max_request_bytes:
            raise RequestTooLarge("request", self.limits.max_request_bytes)

    # -- gRPC: mammoth.v1.Generation -----------------------------------------------------------
    async def _grpc_generation(self, make_flow, request: Any, grpc_context: Any):
        request_id = ""
        try:
            self._check_grpc(request, grpc_context)
            async for event in make_flow(request):
                request_id = event.request_id
                yield _event_proto(event)
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc, request_id)

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
        request_id = ""
        try:
            self._check_grpc(request, grpc_context)
            job, deltas = self._understand(request)
            request_id = job.request_id
            count = 0
            async for delta in deltas:
                count += 1
                yield generation_pb2.UnderstandEvent(request_id=job.request_id, text=delta)
            yield generation_pb2.UnderstandEvent(request_id=job.request_id, finish_reason="stop",
                                                 usage=generation_pb2.Usage(completion_tokens=count))
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc, request_id)

    # -- health: grpc.health.v1.Health (routed here by the proxy, see services.render) and HTTP --
    async def stage_states(self) -> dict[str, int]:
        """Each stage application's state: SERVING while Serve has a RUNNING replica of it
        (Serve replaces replicas whose ``check_health`` fails, so a dead engine shows here)."""
        now = time.monotonic()
        if self._status_cache is not None and now - self._status_cache[0] < 1.0:
            return self._status_cache[1]
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), self.cfg.ingress.health_timeout_s)
        except Exception:  # noqa: BLE001 - the controller not answering: nothing is known to serve
            return dict.fromkeys(self.stage_apps, NOT_SERVING)
        states = {}
        for app_name, kind in self.stage_apps.items():
            app = status.applications.get(app_name)
            deployment = app.deployments.get(_STAGE_DEPLOYMENTS[kind]) if app is not None else None
            running = deployment.replica_states.get("RUNNING", 0) if deployment is not None else 0
            states[app_name] = SERVING if running > 0 else NOT_SERVING
        self._status_cache = (now, states)
        return states

    async def _apps_serving(self, apps: list[str]) -> bool:
        """True once every app in ``apps`` has a running replica, waiting up to ``retry_wait_s``
        (a DiT or VAE replica is replaced in seconds; a planner restart takes longer)."""
        deadline = time.monotonic() + self.cfg.ingress.retry_wait_s
        while True:
            states = await self.stage_states()
            if all(states.get(app) == SERVING for app in apps):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.5)

    async def _health_of(self, service: str) -> int:
        states = await self.stage_states()
        if service in ("", SERVICE_NAMES["generation"]):
            chosen = list(states.values())
        elif service in states:
            chosen = [states[service]]
        elif service in _STAGE_SERVICES:
            chosen = [v for app, v in states.items() if self.stage_apps[app] == _STAGE_SERVICES[service]]
        else:
            raise UnknownService(service)
        return SERVING if all(v == SERVING for v in chosen) else NOT_SERVING

    async def Check(self, request, grpc_context=None):  # noqa: N802
        """Overall ("" or ``mammoth.v1.Generation``), one stage app (``image-dit``) or one
        stage service (``mammoth.v1.DiT``, all models); health needs no key."""
        try:
            return health_pb2.HealthCheckResponse(status=await self._health_of(request.service))
        except UnknownService:
            _set_grpc_status(grpc_context, grpc.StatusCode.NOT_FOUND, f"service: unknown {request.service!r}")
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def Watch(self, request, grpc_context=None):  # noqa: N802
        """The current status, then every change (polled; ends with the proxy's request timeout)."""
        last = None
        while True:
            try:
                current = await self._health_of(request.service)
            except UnknownService:
                current = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if current != last:
                last = current
                yield health_pb2.HealthCheckResponse(status=current)
            await asyncio.sleep(self.cfg.ingress.health_timeout_s)

    async def live(self, request: Request):
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request):
        """200 when every stage application has a running replica, else 503; states per stage."""
        states = await self.stage_states()
        ready = all(v == SERVING for v in states.values())
        body = {"status": "ready" if ready else "not_ready",
                "stages": {app: health_pb2.HealthCheckResponse.ServingStatus.Name(v) for app, v in states.items()}}
        return JSONResponse(body, status_code=200 if ready else 503)

    # -- HTTP -----------------------------------------------------------------------------------
    async def _http_errors(self, request: Request, work):
        try:
            return await work()
        except Exception as exc:  # noqa: BLE001
            error = classify(exc, _serve_request_id())
            field_name = getattr(root_cause(exc), "field", None)
            return _error_json(error.http_status, http_message(error.message), error.kind,
                               http_field(field_name) if field_name else None)

    async def _image_http(self, request: Request, *, edit: bool):
        files: list[bytes] = []
        if _is_multipart(request):
            form = await request.form(max_files=self.limits.max_reference_images + 1)
            data: dict[str, Any] = {}
            for key, value in form.multi_items():
                if key in ("image", "image[]"):
                    files.append(await _read_upload(f"image[{len(files)}]", value, self.limits.max_image_bytes))
                else:
                    data[key] = value
            body = parse_body(ImageGenerationBody, data)
        else:
            body = parse_body(ImageGenerationBody, await _json(request))
        msg = image_request(body, edit=edit, files=files, max_image_bytes=self.limits.max_image_bytes)
        flow = self._image_flow(msg, edit=edit)
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
            msg = chat_request(body, self.limits.max_image_bytes, self.limits.max_video_bytes)
            job, deltas = self._understand(msg)
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
            if _is_multipart(request):
                form = await request.form(max_files=1)
                data = {}
                for key, value in form.multi_items():
                    if key in ("input_video", "video_file"):
                        source = await _read_upload(key, value, self.limits.max_video_bytes)
                    else:
                        data[key] = value
                body = parse_body(VideoBody, data)
            else:
                body = parse_body(VideoBody, await _json(request))
            msg = video_request(body, source, self.limits.max_video_bytes)
            flow = self._video_flow(msg, edit=isinstance(msg, generation_pb2.EditVideoRequest))
            first = await anext(flow)  # bad requests fail here, before a job exists
            try:
                created = await self.jobs.create.remote(first.request_id)
            except BaseException:
                await flow.aclose()
                raise
            task = asyncio.ensure_future(self._run_video(first.request_id, flow))
            self._video_tasks.add(task)
            task.add_done_callback(self._video_tasks.discard)
            return JSONResponse(created, status_code=200)
        return await self._http_errors(request, work)

    async def _run_video(self, video_id: str, flow: AsyncIterator[flows.Event]) -> None:
        """Runs in the replica that took the job; every state change goes to the shared store."""
        progress = -1
        try:
            async for event in flow:
                if isinstance(event, flows.Step):
                    value = int(100 * event.step / max(event.total, 1) * 0.95)
                    if value != progress:
                        progress = value
                        self.jobs.progress.remote(video_id, value)
                elif isinstance(event, flows.Result):
                    media = event.media
                    meta = {"model": event.model, "seed": event.seed, "width": media.width, "height": media.height,
                            "frames": media.frames, "fps": media.fps, "mime_type": media.mime_type,
                            "timings": event.timings, "retries": event.retries}
                    await self.jobs.finish.remote(video_id, meta, media.data, media.mime_type)
        except Exception as exc:  # noqa: BLE001
            error = classify(exc, video_id)
            await self.jobs.fail.remote(video_id, {"message": error.message, "type": error.kind})

    async def get_video(self, video_id: str, request: Request):
        async def work():
            video = await self.jobs.get.remote(video_id)
            if video is None:
                return _error_json(404, "video not found", "not_found_error", "video_id")
            return JSONResponse(video)
        return await self._http_errors(request, work)

    async def get_video_content(self, video_id: str, request: Request):
        async def work():
            found = await self.jobs.content.remote(video_id)
            if found is None:
                return _error_json(404, "video not found", "not_found_error", "video_id")
            status, data, mime_type = found
            if data is None:
                return _error_json(409, f"video is {status}", "invalid_request_error", "video_id")
            return Response(data, media_type=mime_type)
        return await self._http_errors(request, work)

    async def list_models(self, request: Request):
        async def work():
            return JSONResponse({"object": "list", "data": [
                {"id": stages.model_name, "object": "model", "family": family}
                for family, stages in self.stages.items()]})
        return await self._http_errors(request, work)


class UnknownService(Exception):
    """A health check for a service this server does not have."""


def _set_grpc_status(grpc_context: Any, code: grpc.StatusCode, details: str) -> None:
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)


def _serve_request_id() -> str:
    """Serve's id of the current request (also in its ``x-request-id`` response header)."""
    try:
        return serve.context._get_serve_request_context().request_id or ""
    except Exception:  # noqa: BLE001 - outside a replica
        return ""


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def _read_upload(field_name: str, upload: Any, limit: int) -> bytes:
    """An uploaded file, refused once it passes ``limit`` (the body is already bounded)."""
    if isinstance(upload, str):
        raise InvalidArgument(field_name, "expected a file upload")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidArgument(field_name, f"over the limit of {limit} bytes")
    return data


async def _sse_events(first: flows.Event, rest: AsyncIterator[flows.Event]) -> AsyncIterator[str]:
    yield sse(event_json(first), "progress")
    try:
        async for event in rest:
            kind = "completed" if isinstance(event, flows.Result) else "progress"
            yield sse(event_json(event), kind)
    except Exception as exc:  # noqa: BLE001 - a stream that already started reports errors in-band
        error = classify(exc, first.request_id)
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
        error = classify(exc, request_id)
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

