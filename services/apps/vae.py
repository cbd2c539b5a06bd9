"""VAE application: one model's VAE plus every byte of media in and out."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from ray import serve

from protos import common_pb2, vae_pb2
from protos.tensors import ndarray_from_proto, tensor_to_proto

from ..handoff import EncodedMedia, MediaOutput
from ..jobs import (
    IMAGE_FORMATS,
    MIME,
    RESIZE_POLICIES,
    VIDEO_FORMATS,
    ImageJob,
    OutputSpec,
    VideoJob,
    geometry,
    new_request_id,
)
from ..local import media_limits
from ..stages.vae import VAEStage
from .common import StageMetrics, apply_threads, config_from_args, deployment_options, model_from_args
from .grpc_util import grpc_abort, timings_proto


async def resolve(handle: Any) -> Any:
    """Latents arrive as ``[ObjectRef]`` from the DiT (or as an array from gRPC callers)."""
    if isinstance(handle, list) and len(handle) == 1 and not isinstance(handle[0], np.ndarray):
        handle = handle[0]
    return await handle if inspect.isawaitable(handle) else handle


@serve.deployment(name="VAE")
class VAEDeployment:
    def __init__(self, args: dict[str, Any]):
        self.cfg = config_from_args(args)
        self.model, index = model_from_args(self.cfg, args)
        self.defaults = index.defaults
        engine = self.cfg.vae.engine
        apply_threads(engine.cpu_threads)
        self.stage = VAEStage.from_model_dir(index.root, index.family, device=self.cfg.resolved_device("vae"),
                                             dtype=self.cfg.resolved_dtype("vae"),
                                             memory_budget_mb=engine.memory_budget_mb,
                                             media_limits=media_limits(self.cfg), resolve=resolve)
        self.metrics = StageMetrics("vae", self.model)

    # -- pipeline (handle) methods ----------------------------------------------------------
    async def encode_references(self, job: ImageJob) -> EncodedMedia:
        with self.metrics.call("encode_references"):
            return await self.stage.encode_references(job)

    async def encode_source_video(self, job: VideoJob) -> EncodedMedia:
        with self.metrics.call("encode_source_video"):
            return await self.stage.encode_source_video(job)

    async def decode(self, latents: Any, output: OutputSpec) -> MediaOutput:
        with self.metrics.call("decode"):
            return await self.stage.decode(latents, output)

    async def preview(self, latents: np.ndarray) -> bytes:
        with self.metrics.call("preview"):
            return await self.stage.preview(latents)

    # -- gRPC: mammoth.v1.VAE ---------------------------------------------------------------
    async def Decode(self, request: vae_pb2.DecodeRequest, grpc_context=None):  # noqa: N802
        try:
            latents = ndarray_from_proto(request.latents, name="latents")
            if self.stage.is_video:
                output = OutputSpec(VIDEO_FORMATS.get(request.video_format, "mp4"), fps=request.fps or 16)
            else:
                output = OutputSpec(IMAGE_FORMATS.get(request.image_format, "png"),
                                    request.quality if request.HasField("quality") else 90)
            result = await self.decode(latents, output)
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc)
        return vae_pb2.DecodeResponse(request_id=request.request_id,
                                      media=common_pb2.Media(data=result.data, mime_type=result.mime_type),
                                      width=result.width, height=result.height, frames=result.frames,
                                      timings=timings_proto(result.timings))

    async def Encode(self, request: vae_pb2.EncodeRequest, grpc_context=None):  # noqa: N802
        try:
            limits = self.cfg.ingress.limits
            has_size = request.HasField("width") and request.HasField("height")
            policy = RESIZE_POLICIES.get(request.resize_policy, "resize")
            spatial, multiple = geometry(self.defaults)
            if self.stage.is_video:
                frames = request.max_frames or limits.max_frames
                job = VideoJob(
                    request_id=new_request_id("encode"), prompt="", negative_prompt="",
                    width=request.width if has_size else self.defaults.get("width", limits.max_width),
                    height=request.height if has_size else self.defaults.get("height", limits.max_height),
                    frames=frames, fps=0, steps=1, seed=0, guidance=1.0, context_guidance=1.0, cfg_range=(0.0, 1.0),
                    output=OutputSpec("mp4"), source_video=request.media.data, resize_policy=policy,
                    size_from_source=not has_size, frames_from_source=True, spatial=spatial, multiple=multiple)
                encoded = await self.encode_source_video(job)
            else:
                job = ImageJob(
                    request_id=new_request_id("encode"), prompt="", negative_prompt=None,
                    width=request.width if has_size else self.defaults.get("width", 1024),
                    height=request.height if has_size else self.defaults.get("height", 1024),
                    steps=1, seed=0, text_guidance=1.0, image_guidance=1.0, cfg_range=(0.0, 1.0), ar_height=1,
                    ar_width=1, ar_cfg_scale=1.0, ar_temperature=1.0, ar_top_k=0, ar_top_p=1.0,
                    output=OutputSpec("png"), reference_images=[request.media.data], resize_policy=policy,
                    size_from_reference=not has_size, spatial=spatial, multiple=multiple)
                encoded = await self.encode_references(job)
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc)
        response = vae_pb2.EncodeResponse(request_id=request.request_id, width=encoded.width, height=encoded.height,
                                          frames=encoded.frames, fps=round(encoded.fps),
                                          timings=timings_proto(encoded.timings))
        tensor_to_proto(encoded.latents[0], out=response.latents)
        return response

    async def Preview(self, request: vae_pb2.PreviewRequest, grpc_context=None):  # noqa: N802
        try:
            data = await self.preview(ndarray_from_proto(request.latents, name="latents"))
        except Exception as exc:  # noqa: BLE001
            grpc_abort(grpc_context, exc)
        return common_pb2.Media(data=data, mime_type=MIME["png"])


def app(args: dict[str, Any]) -> serve.Application:
    return VAEDeployment.options(**deployment_options(config_from_args(args), "vae")).bind(args)
