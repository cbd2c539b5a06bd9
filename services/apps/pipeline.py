"""The pipeline ingress: gRPC ``mammoth.v1.Generation`` and the OpenAI-style HTTP API.

It orchestrates the stage applications by handle (``services.flows``) and never holds a
tensor: each stage's DeploymentResponse goes straight into the next stage's call.
"""


import asyncio
import contextlib
import functools
import time
import uuid
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
    ERROR_CODES,
    ChatBody,
    ImageGenerationBody,
    LimitedBody,
    Refused,
    RequireKey,
    VideoBody,
    chat_chunk,
    chat_completion,
    chat_request,
    chat_usage,
    completed_event,
    error_body,
    event_json,
    http_field,
    http_message,
    image_item,
    image_request,
    images_response,
    is_image,
    parse_body,
    partial_image_event,
    sse,
    video_model_fields,
    video_request,
)
from ..jobs import (
    ImageJob,
    InvalidArgument,
    UnderstandJob,
    VideoJob,
    check_int,
    understand_job,
)
from ..model_routing import ModelRouter, ServedModel, requested_model
from ..playground import mount_playground, open_paths
from ..render import stage_app_name
from ..stage_setup import ensure_model
from ..understanding import UnderstandDone
from ..video_jobs import store_actor
from .admission import Admission
from .common import ApiKeys, config_from_args, deployment_options
from .grpc_util import grpc_abort, timings_proto
from .stage_health import StageHealth, health_service_names


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
    field_name = ".".join(str(p) for p in first["loc"] if p not in ("body", "query"))
    return _error_json(422, f"{field_name}: {first['msg']}", "invalid_request_error", field_name)


def _error_json(status: int, message: str, kind: str, param: str | None = None,
                code: str | None = None) -> JSONResponse:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse(status_code=status, content=error_body(message, kind, param, code or ERROR_CODES.get(status)))


class RayStages:
    """``flows.Stages`` over Serve handles of one model's stage applications.

    Each call carries the stage's own request message (``services.stage_messages``); what an
    earlier stage produced rides beside it as that stage's DeploymentResponse, which Ray
    resolves in the receiving replica, so no tensor passes through the ingress.
    """

    def __init__(self, model_name: str, model: str, ready: Callable[[], Awaitable[bool]] | None = None):
        self.model_name = model_name
        self._ready = ready
        # Not checked against the controller: ``mammoth serve`` deploys later models while the
        # ingress already serves the first (``services.deploy.start_waves``); a call to a model
        # still starting waits in Serve's router until its replicas run.
        self.planner = serve.get_deployment_handle("Planner", app_name=stage_app_name(model, "planner"),
                                                   _check_exists=False)
        self.dit = serve.get_deployment_handle("DiT", app_name=stage_app_name(model, "dit"), _check_exists=False)
        self.vae = serve.get_deployment_handle("VAE", app_name=stage_app_name(model, "vae"), _check_exists=False)

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
        self.stages: dict[str, RayStages] = {}  # served model name -> its stage apps
        self.stage_apps: dict[str, str] = {}  # stage app name -> stage kind
        indexes = {name: ensure_model(self.cfg, name) for name in self.cfg.models}
        for name in indexes:
            apps = [stage_app_name(name, stage) for stage in _STAGE_DEPLOYMENTS]
            self.stages[name] = RayStages(name, name, functools.partial(self._apps_serving, apps))
            self.stage_apps.update(dict(zip(apps, _STAGE_DEPLOYMENTS)))
        # a request's ``model`` (else the task's default model) -> that model (services.model_routing)
        self.router = ModelRouter.from_indexes(indexes, self.cfg.ingress.default_models, self.stages)
        self.retries = self.cfg.ingress.stage_retries
        self._started = time.time()
        jobs = self.cfg.ingress.video_jobs
        self._job_deadline_s = self.limits.request_timeout_s + self.cfg.ingress.health_timeout_s
        self.jobs = store_actor(jobs, self._job_deadline_s)
        self._video_tasks: dict[str, asyncio.Task] = {}  # video id -> its task in this replica
        self.admission = Admission(self.cfg.ingress.max_ongoing_requests, self.cfg.ingress.max_queued_requests)
        timeout_s = self.cfg.ingress.health_timeout_s
        self.health = StageHealth({app: _STAGE_DEPLOYMENTS[kind] for app, kind in self.stage_apps.items()},
                                  probe_timeout_s=4 * timeout_s, answer_s=timeout_s)
        self.health_names = {alias: app for name in indexes for stage in _STAGE_DEPLOYMENTS
                             for alias in health_service_names(name, stage)
                             for app in [stage_app_name(name, stage)]}
        self.http = RequireKey(LimitedBody(self._http_app(), self.limits.max_request_bytes),
                               self.auth.check_headers, _OPEN_PATHS | open_paths(self.cfg.ingress.playground))

    def _http_app(self) -> FastAPI:
        app = FastAPI(title="Mammoth Serve", version="1")
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_api_route("/v1/images/generations", self.images_generations, methods=["POST"])
        app.add_api_route("/v1/images/edits", self.images_edits, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/images/files/{file_id}", self.get_image_file, methods=["GET"])
        app.add_api_route("/v1/videos", self.create_video, methods=["POST"])
        app.add_api_route("/v1/videos", self.list_videos, methods=["GET"])
        app.add_api_route("/v1/videos/{video_id}", self.get_video, methods=["GET"])
        app.add_api_route("/v1/videos/{video_id}", self.delete_video, methods=["DELETE"])
        app.add_api_route("/v1/videos/{video_id}/content", self.get_video_content, methods=["GET"])
        app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        app.add_api_route("/health", self.live, methods=["GET"])
        app.add_api_route("/ready", self.ready, methods=["GET"])
        mount_playground(app, self.cfg.ingress.playground)
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
    def _route(self, task: str, msg: Any) -> ServedModel:
        """The served model of a request: its ``model`` field, else the task's default. Unknown
        names are ``ModelNotFound`` (HTTP 404 ``model_not_found``); a model that does not serve
        ``task`` is INVALID_ARGUMENT naming ``model``."""
        return self.router.route(task, requested_model(msg))

    def _check_latent_tokens(self, job: ImageJob | VideoJob) -> None:
        """The DiT's own bound, checked here so a too-large size is the client's 422, not a stage error."""
        frames = job.latent_frames if isinstance(job, VideoJob) else 1
        positions = job.latent_height * job.latent_width * frames  # counted like the engine does
        limit = self.cfg.dit.engine.max_latent_tokens
        if positions > limit:
            raise InvalidArgument("width", f"{job.width}x{job.height} needs {positions} latent positions, over the "
                                  f"limit {limit}")

    def _image_flow(self, msg: Any, *, edit: bool, partial_images: int = 0) -> AsyncIterator[flows.Event]:
        """``num_images`` images of one prompt (seeds seed, seed+1, ...), one Result each;
        ``partial_images`` previews per image, spread over the steps (OpenAI streaming)."""
        task = "image_edit" if edit else "text_to_image"
        served = self._route(task, msg)
        stages = served.stages
        job = served.family.build_job(msg, served.defaults, self.limits, task)
        count = check_int("num_images", msg.num_images if msg.HasField("num_images") else 1, 1, self.limits.max_images)
        self._check_latent_tokens(job)
        previews = flows.preview_steps(job.steps, partial_images) if partial_images else None
        return self._with_deadline(flows.images(stages, job, count, edit=edit, retries=self.retries,
                                                previews=previews))

    def _video_job_flow(self, msg: Any, *, edit: bool) -> tuple[VideoJob, AsyncIterator[flows.Event]]:
        task = "video_edit" if edit else "text_to_video"
        served = self._route(task, msg)
        stages = served.stages
        job = served.family.build_job(msg, served.defaults, self.limits, task)
        self._check_latent_tokens(job)
        flow = flows.edit_video if edit else flows.text_to_video
        return job, self._with_deadline(flow(stages, job, retries=self.retries))

    def _video_flow(self, msg: Any, *, edit: bool) -> AsyncIterator[flows.Event]:
        return self._video_job_flow(msg, edit=edit)[1]

    def _understand(self, msg: Any,
                    done: list[UnderstandDone] | None = None) -> tuple[UnderstandJob, AsyncIterator[str]]:
        """One answer; ``done`` collects the planner's token counts and finish reason."""
        stages = self._route("understand", msg).stages
        job = understand_job(msg, self.limits)
        return job, self._with_deadline(flows.understand(stages, job, retries=self.retries, done=done))

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
            async with self.admission.slot():
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
            done: list[UnderstandDone] = []
            job, deltas = self._understand(request, done=done)
            request_id = job.request_id
            count = 0
            async with self.admission.slot():
                async for delta in deltas:
                    count += 1
                    yield generation_pb2.UnderstandEvent(request_id=job.request_id, text=delta)
            end = done[-1] if done else UnderstandDone(0, count, "stop")
            yield generation_pb2.UnderstandEvent(request_id=job.request_id, finish_reason=end.finish_reason,
                                                 usage=generation_pb2.Usage(prompt_tokens=end.prompt_tokens,
                                                                            completion_tokens=end.completion_tokens))
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc, request_id)

    # -- health: grpc.health.v1.Health (routed here by the proxy, see services.render) and HTTP --
    async def stage_states(self) -> dict[str, int]:
        """Each stage application's state from its replicas' own ``check_health``
        (``services.apps.stage_health``): SERVING while one of them passes."""
        return await self.health.states()

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
        elif service in self.health_names:
            chosen = [states[self.health_names[service]]]
        elif service in _STAGE_SERVICES:
            chosen = [v for app, v in states.items() if self.stage_apps[app] == _STAGE_SERVICES[service]]
        else:
            raise UnknownService(service)
        return SERVING if all(v == SERVING for v in chosen) else NOT_SERVING

    async def Check(self, request, grpc_context=None):  # noqa: N802
        """Overall ("" or ``mammoth.v1.Generation``), one model's stage (``mammoth.dit.image`` or
        its app ``image-dit``) or one stage service (``mammoth.v1.DiT``, all models); no key needed."""
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
    async def _http_errors(self, request: Request, work, *, admit: bool = False):
        """``admit``: a generation, run within the ingress's own bounds (``self.admission``); a
        streamed answer holds its slot until the stream ends."""
        slot = contextlib.AsyncExitStack()
        try:
            if admit:
                await slot.enter_async_context(self.admission.slot())
            response = await work()
        except Exception as exc:  # noqa: BLE001
            await slot.aclose()
            return _http_error(exc)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _release_after(response.body_iterator, slot)
        else:
            await slot.aclose()
        return response

    async def _image_body(self, request: Request) -> tuple[ImageGenerationBody, list[bytes]]:
        """JSON, or multipart as the OpenAI SDK sends edits (``image`` / ``image[]`` files, every
        other field a string that the body model converts: ``n="2"``, ``stream="true"``)."""
        if not _is_multipart(request):
            return parse_body(ImageGenerationBody, await _json(request)), []
        files: list[bytes] = []
        form = await request.form(max_files=self.limits.max_reference_images + 2)
        data: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                files.append(await _read_upload(f"image[{len(files)}]", value, self.limits.max_image_bytes))
            elif key in ("mask", "markup"):
                data[key] = "file"  # refused by name below, unread
            else:
                data[key] = value
        return parse_body(ImageGenerationBody, data), files

    async def _image_http(self, request: Request, *, edit: bool):
        body, files = await self._image_body(request)
        msg = image_request(body, edit=edit, files=files, max_image_bytes=self.limits.max_image_bytes)
        flow = self._image_flow(msg, edit=edit, partial_images=body.partial_images or 0)
        first = await anext(flow)  # bad requests fail here, as a status
        if body.stream:
            return StreamingResponse(_image_sse(first, flow, body, edit=edit), media_type="text/event-stream")
        results = sorted([e async for e in flow if isinstance(e, flows.Result)], key=lambda r: r.index)
        if body.response_format == "url":
            items = [image_item(r, await self._image_url(request, r)) for r in results]
        else:
            items = [image_item(r) for r in results]
        return JSONResponse(images_response(results, body, items))

    async def _image_url(self, request: Request, result: flows.Result) -> str:
        """Keep the image in the shared store until ``ingress.image_url_ttl_s``; its URL on this server."""
        file_id = f"img-{uuid.uuid4().hex}"
        await self.jobs.put_file.remote(file_id, result.media.data, result.media.mime_type,
                                        self.cfg.ingress.image_url_ttl_s)
        return str(request.base_url).rstrip("/") + f"/v1/images/files/{file_id}"

    async def get_image_file(self, file_id: str, request: Request):
        async def work():
            found = await self.jobs.file.remote(file_id)
            if found is None:
                return _error_json(404, "image not found (or expired)", "invalid_request_error", "file_id")
            data, mime_type = found
            return Response(data, media_type=mime_type)
        return await self._http_errors(request, work)

    async def images_generations(self, request: Request):
        return await self._http_errors(request, lambda: self._image_http(request, edit=False), admit=True)

    async def images_edits(self, request: Request):
        return await self._http_errors(request, lambda: self._image_http(request, edit=True), admit=True)

    async def chat_completions(self, request: Request):
        async def work():
            body = parse_body(ChatBody, await _json(request))
            msg = chat_request(body, self.limits.max_image_bytes, self.limits.max_video_bytes)
            name = self._route("understand", msg).name
            count = check_int("n", 1 if body.n is None else body.n, 1, self.limits.max_images)
            dones: list[list[UnderstandDone]] = [[] for _ in range(count)]
            answers = []
            for i in range(count):  # n choices: n planner requests (seed, seed+1, ... when seeded)
                choice = generation_pb2.UnderstandRequest()
                choice.CopyFrom(msg)
                if msg.HasField("seed"):
                    choice.seed = (msg.seed + i) % 2**63
                answers.append(self._understand(choice, dones[i]))
            request_id, created = answers[0][0].request_id, int(time.time())
            merged = flows.merge_streams([deltas for _, deltas in answers])
            first = await anext(merged, None)  # bad requests fail here, as a status
            if body.stream:
                usage = bool((body.stream_options or {}).get("include_usage"))
                return StreamingResponse(_chat_sse(request_id, created, name, first, merged, dones, usage),
                                         media_type="text/event-stream")
            texts = [""] * count
            if first is not None:
                texts[first[0]] += first[1]
            async for index, delta in merged:
                texts[index] += delta
            return JSONResponse(chat_completion(request_id, created, name, texts, [d[-1] for d in dones if d]))
        return await self._http_errors(request, work, admit=True)

    async def _video_body(self, request: Request) -> tuple[VideoBody, bytes | None]:
        """JSON, or multipart (the OpenAI SDK always sends multipart) with ``input_reference``."""
        if not _is_multipart(request):
            return parse_body(VideoBody, await _json(request)), None
        source = None
        form = await request.form(max_files=1)
        data = {}
        for key, value in form.multi_items():
            if key in ("input_reference", "input_video", "video_file"):
                source = await _read_upload(key, value, self.limits.max_video_bytes)
                if is_image(source):
                    raise Refused(key, "image-to-video (a start frame) is not supported by the served model; "
                                  "upload a video to edit it")
            elif key.startswith("input_reference["):  # the SDK's {"image_url"|"file_id"} reference, flattened
                raise Refused("input_reference", "image-to-video (a start frame) is not supported by the served "
                              "model; upload a video as input_reference to edit it")
            else:
                data[key] = value
        return parse_body(VideoBody, data), source

    async def create_video(self, request: Request):
        async def work():
            body, source = await self._video_body(request)
            msg = video_request(body, source, self.limits.max_video_bytes)
            edit = isinstance(msg, generation_pb2.EditVideoRequest)
            job, flow = self._video_job_flow(msg, edit=edit)
            first = await anext(flow)  # bad requests fail here, before a job exists
            model = self._route("video_edit" if edit else "text_to_video", msg).name
            meta = video_model_fields(model=model, width=job.width, height=job.height, frames=job.frames,
                                      fps=job.fps, prompt=job.prompt)
            if job.size_from_source:  # known once the source is read
                meta = {k: v for k, v in meta.items() if k in ("model", "prompt")}
            try:
                created = await self.jobs.create.remote(first.request_id, meta)
            except BaseException:
                await flow.aclose()
                raise
            task = asyncio.ensure_future(self._run_video(first.request_id, flow))
            self._video_tasks[first.request_id] = task
            task.add_done_callback(lambda _: self._video_tasks.pop(first.request_id, None))
            return JSONResponse(created, status_code=200)
        return await self._http_errors(request, work, admit=True)

    async def _run_video(self, video_id: str, flow: AsyncIterator[flows.Event]) -> None:
        """Runs in the replica that took the job; every state change goes to the shared store. A
        job deleted meanwhile (``progress`` answers False) is cancelled."""
        progress = -1
        try:
            async for event in flow:
                if isinstance(event, flows.Step):
                    value = int(100 * event.step / max(event.total, 1) * 0.95)
                    if value != progress:
                        progress = value
                        if not await self.jobs.progress.remote(video_id, value):
                            await flow.aclose()
                            return
                elif isinstance(event, flows.Result):
                    media = event.media
                    meta = {**video_model_fields(model=event.model, width=media.width, height=media.height,
                                                 frames=media.frames, fps=media.fps or 16,
                                                 prompt=None),
                            "seed": event.seed, "mime_type": media.mime_type, "timings": event.timings,
                            "retries": event.retries}
                    meta.pop("prompt")
                    await self.jobs.finish.remote(video_id, meta, media.data, media.mime_type)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            error = classify(exc, video_id)
            await self.jobs.fail.remote(video_id, {"message": error.message, "type": error.kind,
                                                   "code": ERROR_CODES.get(error.http_status, error.kind)})

    async def get_video(self, video_id: str, request: Request):
        async def work():
            video = await self.jobs.get.remote(video_id)
            if video is None:
                return _error_json(404, "video not found", "invalid_request_error", "video_id")
            return JSONResponse(video)
        return await self._http_errors(request, work)

    async def list_videos(self, request: Request, after: str | None = None, limit: int = 20,
                          order: str = "desc"):
        async def work():
            if not 1 <= limit <= 100:
                raise InvalidArgument("limit", f"must be in [1, 100], got {limit}")
            if order not in ("asc", "desc"):
                raise InvalidArgument("order", f"must be asc or desc, got {order!r}")
            return JSONResponse(await self.jobs.list.remote(after, limit, order))
        return await self._http_errors(request, work)

    async def delete_video(self, video_id: str, request: Request):
        """Deletes a job in any state; a running one is cancelled (here, or by its own replica at
        its next progress report)."""
        async def work():
            if not await self.jobs.delete.remote(video_id):
                return _error_json(404, "video not found", "invalid_request_error", "video_id")
            task = self._video_tasks.get(video_id)
            if task is not None:
                task.cancel()
            return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})
        return await self._http_errors(request, work)

    async def get_video_content(self, video_id: str, request: Request, variant: str = "video"):
        async def work():
            if variant in ("thumbnail", "spritesheet"):
                raise Refused("variant", f"{variant} is not produced; variant=video is the only one")
            if variant != "video":
                raise Refused("variant", f"unknown variant {variant!r}; use video", "invalid_value")
            found = await self.jobs.content.remote(video_id)
            if found is None:
                return _error_json(404, "video not found", "invalid_request_error", "video_id")
            status, data, mime_type = found
            if data is None:
                return _error_json(409, f"video is {status}", "invalid_request_error", "video_id")
            return Response(data, media_type=mime_type)
        return await self._http_errors(request, work)

    async def list_models(self, request: Request):
        async def work():
            return JSONResponse({"object": "list", "data": [m.describe() for m in self.router.models.values()]})
        return await self._http_errors(request, work)


def _http_error(exc: BaseException) -> JSONResponse:
    """Any failure as OpenAI's error shape; OpenAI's own refusals keep their status (400, 404)."""
    error = classify(exc, _serve_request_id())
    cause = root_cause(exc)
    field_name = getattr(cause, "field", None)
    status = getattr(cause, "http_status", error.http_status) if isinstance(cause, InvalidArgument) else \
        error.http_status
    return _error_json(status, http_message(error.message), error.kind,
                       http_field(field_name) if field_name else None, getattr(cause, "code", None))


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


async def _image_sse(first: flows.Event, rest: AsyncIterator[flows.Event], body: ImageGenerationBody, *,
                     edit: bool) -> AsyncIterator[str]:
    """OpenAI's image stream: ``*.partial_image`` events (``partial_images`` per image), one
    ``*.completed`` per image; with ``progress_events`` also Mammoth's queued / planning /
    denoise_step / decoding events. A failure after the start is an ``error`` event."""
    partials: dict[int, int] = {}
    size = body.size if body.size and body.size != "auto" else "auto"

    def render(event: flows.Event) -> str | None:
        if isinstance(event, flows.Result):
            payload = completed_event(event, body, edit=edit)
            return sse(payload, payload["type"])
        if isinstance(event, flows.Step) and event.preview_png is not None and body.partial_images:
            index = partials[event.index] = partials.get(event.index, -1) + 1
            payload = partial_image_event(event, body, index, edit=edit, size=size)
            return sse(payload, payload["type"])
        return sse(event_json(event), "progress") if body.progress_events else None

    try:
        for event in (first,):
            if (line := render(event)) is not None:
                yield line
        async for event in rest:
            if (line := render(event)) is not None:
                yield line
    except Exception as exc:  # noqa: BLE001 - a stream that already started reports errors in-band
        error = classify(exc, first.request_id)
        yield sse({"type": "error", "error": {"message": error.message, "type": error.kind,
                                              "code": ERROR_CODES.get(error.http_status), "param": None}}, "error")
    finally:  # a client that went away cancels the generation now, not when the stream is collected
        await rest.aclose()


async def _chat_sse(request_id: str, created: int, model: str, first: tuple[int, str] | None,
                    rest: AsyncIterator[tuple[int, str]], dones: list[list[UnderstandDone]],
                    include_usage: bool) -> AsyncIterator[str]:
    """Chunks of ``n`` choices as they come (the first of each carries the role), a closing chunk
    per choice with its finish reason, then (``stream_options.include_usage``) the usage chunk."""
    started: set[int] = set()

    def chunk(index: int, delta: str) -> str:
        out: dict[str, Any] = {"content": delta}
        if index not in started:
            started.add(index)
            out["role"] = "assistant"
        return chat_chunk(request_id, created, model, [{"index": index, "delta": out, "finish_reason": None}])

    try:
        if first is not None:
            yield chunk(*first)
        async for index, delta in rest:
            yield chunk(index, delta)
        for index, done in enumerate(dones):
            reason = done[-1].finish_reason if done else "stop"
            delta = {} if index in started else {"role": "assistant", "content": ""}
            yield chat_chunk(request_id, created, model, [{"index": index, "delta": delta, "finish_reason": reason}])
        if include_usage:
            yield chat_chunk(request_id, created, model, [], chat_usage([d[-1] for d in dones if d]))
    except Exception as exc:  # noqa: BLE001
        error = classify(exc, request_id)
        yield sse({"error": {"message": error.message, "type": error.kind,
                             "code": ERROR_CODES.get(error.http_status), "param": None}})
    finally:  # a client that went away cancels the planner requests now
        await rest.aclose()
    yield sse("[DONE]")


async def _release_after(body: AsyncIterator[Any], slot: contextlib.AsyncExitStack) -> AsyncIterator[Any]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        await slot.aclose()


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
        out.denoise_step.index = event.index
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
        result.index = event.index
        result.timings.CopyFrom(timings_proto(event.timings))
    return out


def app(args: dict[str, Any]) -> serve.Application:
    return IngressDeployment.options(**deployment_options(config_from_args(args), "mammoth")).bind(args)

