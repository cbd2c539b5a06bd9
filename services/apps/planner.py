"""Planner application: the vLLM planner of one model behind a Serve deployment.

The pipeline calls the handle methods with ``mammoth.v1.Planner`` request messages and gets
numpy conditions back; the gRPC methods are the same calls with the tensors put into the
response message, for any gRPC client that names this application.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from protos import generation_pb2, planner_pb2
from protos.tensors import tensor_to_proto

from ..families import get_family
from ..handoff import EncodedMedia, ImageConditions, PromptConditions
from ..jobs import check_text, new_request_id, understand_job
from ..stage_messages import plan_image_job, reference_codes
from ..stage_setup import media_limits
from ..stages.planner import PlannerStage
from ..understanding import UnderstandDone
from .common import (
    ApiKeys,
    StageMetrics,
    apply_threads,
    config_from_args,
    deployment_options,
    model_from_args,
)
from .grpc_util import stage_grpc_abort, timings_proto


@serve.deployment(name="Planner")
class PlannerDeployment:
    async def __init__(self, args: dict[str, Any]):
        self.cfg = config_from_args(args)
        self.model, index = model_from_args(self.cfg, args)
        apply_threads(self.cfg.planner.engine.cpu_threads)
        self.auth = ApiKeys.from_settings(self.cfg.ingress)  # before the engine: no keys, no start
        self.defaults = index.defaults
        self.stage = await PlannerStage.start(
            index.root, self.cfg.planner.engine, device=self.cfg.resolved_device("planner"),
            dtype=self.cfg.resolved_dtype("planner"), media_limits=media_limits(self.cfg),
            engine_cls=get_family(index.family).engine_class("planner"))
        self.metrics = StageMetrics("planner", self.model)
        self.tokens = serve.metrics.Counter("mammoth_planned_tokens_total", description="visual tokens planned",
                                            tag_keys=("model",))
        # AR-CFG pairs out of step / resubmitted / failed, incomplete exports (engine.stats keys).
        self.guidance = serve.metrics.Counter(
            "mammoth_planner_guidance_events_total", description="AR-CFG desyncs, repairs, failures; export errors",
            tag_keys=("model", "event"))
        self._exported: dict[str, int] = {}

    async def check_health(self) -> None:
        """Serve's probe: the vLLM engine must be alive and its core answer (a dead engine
        raises, and Serve replaces this replica)."""
        self._export_stats()
        await self.stage.check_health()

    def stats(self) -> dict[str, int]:
        """Requests still inside the vLLM engine (tests and debugging: a cancelled caller's must leave)."""
        return {"unfinished_requests": self.stage.engine.llm.get_num_unfinished_requests()}

    def _export_stats(self) -> None:
        for event, count in self.stage.engine.stats.items():
            delta = count - self._exported.get(event, 0)
            if delta > 0:
                self.guidance.inc(delta, tags={"model": self.model, "event": event})
                self._exported[event] = count

    async def __del__(self):
        await self.stage.shutdown()

    # -- pipeline (handle) methods: the gRPC request messages, tensors beside them ------------
    async def plan_image(self, request: planner_pb2.PlanImageRequest,
                         *references: EncodedMedia) -> ImageConditions:
        """``references``: the VAE's encoded edit inputs (their MammothTok codes go into the
        prompt, else their fitted pixels are shown to the planner); ``request.reference_codes``
        (a direct caller's) take precedence; else images in ``request.reference_images`` are
        decoded here and shown to the ViT."""
        with self.metrics.call("plan_image"):
            job = plan_image_job(request, self.defaults, self.cfg.ingress.limits)
            fitted = await self.stage.edit_inputs(job, EncodedMedia.merge(references), reference_codes(request))
            try:
                result = await self.stage.plan_image(job, fitted)
            finally:
                self._export_stats()
        self.tokens.inc(result.planned_tokens, tags={"model": self.model})
        return result

    async def encode_prompts(self, request: planner_pb2.EncodePromptRequest) -> PromptConditions:
        with self.metrics.call("encode_prompts"):
            prompt = check_text("prompt", request.prompt, self.cfg.ingress.limits)
            negative = (check_text("negative_prompt", request.negative_prompt, self.cfg.ingress.limits,
                                   required=False) if request.HasField("negative_prompt") else None)
            return await self.stage.encode_prompts(prompt, negative)

    async def understand(self, request: generation_pb2.UnderstandRequest) -> AsyncIterator[str | UnderstandDone]:
        with self.metrics.call("understand"):
            async for delta in self.stage.understand(understand_job(request, self.cfg.ingress.limits)):
                yield delta

    # -- gRPC: mammoth.v1.Planner (the same methods, tensors put in the response) -----------
    async def PlanImage(self, request: planner_pb2.PlanImageRequest, grpc_context=None):  # noqa: N802
        try:
            self.auth.check_grpc(grpc_context)
            result = await self.plan_image(request)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            stage_grpc_abort(grpc_context, exc)
        response = planner_pb2.PlanImageResponse(request_id=request.request_id, planned_tokens=result.planned_tokens,
                                                 prompt_tokens=result.prompt_tokens,
                                                 timings=timings_proto(result.timings))
        tensor_to_proto(result.text, out=response.text_condition)
        if result.image is not None:
            tensor_to_proto(result.image, out=response.image_condition)
        if result.negative is not None:
            tensor_to_proto(result.negative, out=response.negative_condition)
        return response

    async def EncodePrompt(self, request: planner_pb2.EncodePromptRequest, grpc_context=None):  # noqa: N802
        try:
            self.auth.check_grpc(grpc_context)
            result = await self.encode_prompts(request)
        except Exception as exc:  # noqa: BLE001
            stage_grpc_abort(grpc_context, exc)
        response = planner_pb2.EncodePromptResponse(request_id=request.request_id,
                                                    num_tokens=int(result.prompt.shape[0]),
                                                    timings=timings_proto(result.timings))
        tensor_to_proto(result.prompt, out=response.hidden_states)
        if result.negative is not None:
            tensor_to_proto(result.negative, out=response.negative_hidden_states)
        return response

    async def Understand(self, request: generation_pb2.UnderstandRequest, grpc_context=None):  # noqa: N802
        try:
            self.auth.check_grpc(grpc_context)
            request_id = new_request_id("chat")
            done = UnderstandDone(0, 0, "stop")
            async for delta in self.understand(request):
                if isinstance(delta, UnderstandDone):
                    done = delta
                else:
                    yield generation_pb2.UnderstandEvent(request_id=request_id, text=delta)
            yield generation_pb2.UnderstandEvent(request_id=request_id, finish_reason=done.finish_reason, usage=(
                generation_pb2.Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)))
        except Exception as exc:  # noqa: BLE001
            stage_grpc_abort(grpc_context, exc)


def app(args: dict[str, Any]) -> serve.Application:
    return PlannerDeployment.options(**deployment_options(config_from_args(args), "planner")).bind(args)
