"""Planner application: the vLLM planner of one model behind a Serve deployment.

Handle methods take the pipeline's jobs; the gRPC methods (``mammoth.v1.Planner``) serve the
same work to any gRPC client that names this application.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from protos import generation_pb2, planner_pb2
from protos.tensors import tensor_to_proto

from ..handoff import EncodedMedia, ImageConditions, PromptConditions
from ..jobs import ImageJob, UnderstandJob, VideoJob, image_job, understand_job
from ..local import media_limits
from ..stages.planner import PlannerStage
from .common import StageMetrics, apply_threads, config_from_args, deployment_options, model_from_args
from .grpc_util import grpc_abort, timings_proto


@serve.deployment(name="Planner")
class PlannerDeployment:
    async def __init__(self, args: dict[str, Any]):
        self.cfg = config_from_args(args)
        self.model, index = model_from_args(self.cfg, args)
        apply_threads(self.cfg.planner.engine.cpu_threads)
        self.defaults = index.defaults
        self.stage = await PlannerStage.start(
            index.root, self.cfg.planner.engine, device=self.cfg.resolved_device("planner"),
            dtype=self.cfg.resolved_dtype("planner"), media_limits=media_limits(self.cfg))
        self.metrics = StageMetrics("planner", self.model)
        self.tokens = serve.metrics.Counter("mammoth_planned_tokens_total", description="visual tokens planned",
                                            tag_keys=("model",))

    async def __del__(self):
        await self.stage.shutdown()

    # -- pipeline (handle) methods ----------------------------------------------------------
    async def plan_image(self, job: ImageJob, references: EncodedMedia | None = None) -> ImageConditions:
        with self.metrics.call("plan_image"):
            result = await self.stage.plan_image(job, references)
        self.tokens.inc(result.planned_tokens, tags={"model": self.model})
        return result

    async def encode_prompts(self, job: VideoJob) -> PromptConditions:
        with self.metrics.call("encode_prompts"):
            return await self.stage.encode_prompts(job)

    async def understand(self, job: UnderstandJob) -> AsyncIterator[str]:
        with self.metrics.call("understand"):
            async for delta in self.stage.understand(job):
                yield delta

    # -- gRPC: mammoth.v1.Planner -----------------------------------------------------------
    async def PlanImage(self, request: planner_pb2.PlanImageRequest, grpc_context=None):  # noqa: N802
        try:
            edit = bool(request.reference_images)
            msg = (generation_pb2.EditImageRequest(instruction=request.prompt) if edit
                   else generation_pb2.GenerateImageRequest(prompt=request.prompt))
            for name in ("ar_height", "ar_width", "temperature", "top_k", "top_p", "negative_prompt", "cfg_scale"):
                if request.HasField(name):
                    target = {"temperature": "ar_temperature", "top_k": "ar_top_k", "top_p": "ar_top_p",
                              "cfg_scale": "ar_cfg_scale"}.get(name, name)
                    setattr(msg, target, getattr(request, name))
            msg.seed = request.seed
            if edit:
                msg.reference_images.extend(request.reference_images)
            job = image_job(msg, self.defaults, self.cfg.ingress.limits, edit=edit)
            references = await self.stage.fit_references(job) if job.reference_images else None
            result = await self.plan_image(job, references)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            grpc_abort(grpc_context, exc)
        response = planner_pb2.PlanImageResponse(request_id=request.request_id or job.request_id,
                                                 planned_tokens=result.planned_tokens,
                                                 timings=timings_proto(result.timings))
        tensor_to_proto(result.text, out=response.text_condition)
        if result.image is not None:
            tensor_to_proto(result.image, out=response.image_condition)
        if result.negative is not None:
            tensor_to_proto(result.negative, out=response.negative_condition)
        return response

    async def EncodePrompt(self, request: planner_pb2.EncodePromptRequest, grpc_context=None):  # noqa: N802
        try:
            if not request.prompt.strip():
                raise ValueError("prompt: must not be empty")
            hidden = await self.stage.engine.encode_prompt(request.prompt)
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc)
        response = planner_pb2.EncodePromptResponse(request_id=request.request_id, num_tokens=int(hidden.shape[0]))
        tensor_to_proto(hidden.float().numpy(), out=response.hidden_states)
        return response

    async def Understand(self, request: generation_pb2.UnderstandRequest, grpc_context=None):  # noqa: N802
        try:
            job = understand_job(request, self.cfg.ingress.limits)
            async for delta in self.understand(job):
                yield generation_pb2.UnderstandEvent(request_id=job.request_id, text=delta)
            yield generation_pb2.UnderstandEvent(request_id=job.request_id, finish_reason="stop")
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc)


def app(args: dict[str, Any]) -> serve.Application:
    return PlannerDeployment.options(**deployment_options(config_from_args(args), "planner")).bind(args)
