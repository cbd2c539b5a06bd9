"""VAE application: one model's VAE plus every byte of media in and out."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import numpy as np
import torch
from ray import serve

from protos import common_pb2, vae_pb2
from protos.tensors import ndarray_from_proto, tensor_to_proto

from ..families import get_family
from ..handoff import EncodedMedia, MediaGeometry, MediaOutput
from ..jobs import InvalidArgument, check_int
from ..media_formats import DEFAULT_QUALITY, IMAGE_FORMATS, MIME
from ..stage_messages import encode_job, output_spec
from ..stage_setup import media_limits, stage_lanes
from ..stages.vae import VAEStage
from .common import (
    ApiKeys,
    StageMetrics,
    apply_threads,
    config_from_args,
    deployment_options,
    model_from_args,
)
from .grpc_util import stage_grpc_abort, timings_proto


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
        self.stage = VAEStage.from_model_dir(index.root, get_family(index.family).engine_class("vae"),
                                             device=self.cfg.resolved_device("vae"), dtype=self.cfg.resolved_dtype("vae"),
                                             memory_budget_mb=engine.memory_budget_mb,
                                             media_limits=media_limits(self.cfg), resolve=resolve,
                                             max_batch_decodes=engine.max_batch_decodes,
                                             batch_wait_timeout_s=engine.batch_wait_timeout_s,
                                             lanes=stage_lanes(self.cfg, "vae"))
        self.metrics = StageMetrics("vae", self.model)
        self.auth = ApiKeys.from_settings(self.cfg.ingress)  # its gRPC service, with expose_stages

    async def check_health(self) -> None:
        """Serve's probe: the VAE decodes a minimal latent on its device (a lost device, a broken
        engine or a hung worker thread fails it, and Serve replaces this replica)."""
        vae = self.stage.vae
        shape = (1, vae.latent_channels, 1, 2, 2) if self.stage.is_video else (1, vae.latent_channels, 2, 2)
        probe = torch.zeros(shape, dtype=vae.dtype, device=vae.device)
        await asyncio.wait_for(asyncio.to_thread(vae.decode_many, [probe]), self.cfg.ingress.health_timeout_s * 4)

    # -- pipeline (handle) methods: the gRPC request messages, tensors beside them ------------
    async def encode(self, request: vae_pb2.EncodeRequest) -> EncodedMedia:
        """One image or video in: fitted pixels (for the planner) and latents (for the DiT)."""
        video = self._is_video(request)
        with self.metrics.call("encode"):
            job = encode_job(request, self.defaults, self.cfg.ingress.limits, video=video)
            if video:
                return await self.stage.encode_source_video(job)
            return await self.stage.encode_references(job)

    async def decode(self, request: vae_pb2.DecodeRequest, latents: Any) -> MediaOutput:
        """``latents``: the DiT's ``[ObjectRef]`` (read here, never by the ingress) or an array."""
        with self.metrics.call("decode"):
            spec = output_spec(request, video=self.stage.is_video, limits=self.cfg.ingress.limits)
            return await self.stage.decode(latents, spec)

    async def preview(self, request: vae_pb2.PreviewRequest, latents: np.ndarray) -> common_pb2.Media:
        with self.metrics.call("preview"):
            fmt = IMAGE_FORMATS.get(request.format, "png")
            quality = check_int("quality", request.quality, 1, 100) if request.HasField("quality") else DEFAULT_QUALITY
            max_side = check_int("max_side", request.max_side, 0, max(self.cfg.ingress.limits.max_width,
                                                                       self.cfg.ingress.limits.max_height))
            data = await self.stage.preview(latents, fmt, quality, max_side)
        return common_pb2.Media(data=data, mime_type=MIME[fmt])

    def stats(self) -> dict[str, int]:
        """Decode batching of this replica (for tests and debugging)."""
        return {"decode_batches_run": self.stage.decoder.batches_run,
                "last_decode_batch_size": self.stage.decoder.last_batch_size}

    def geometry(self, encoded: EncodedMedia) -> MediaGeometry:
        """Size/frames/fps of an ``encode`` result that Ray resolved here, without shipping it."""
        return encoded.geometry

    def _is_video(self, request: vae_pb2.EncodeRequest) -> bool:
        kind = request.kind or (vae_pb2.MEDIA_KIND_VIDEO if request.media.mime_type.startswith("video/")
                                else vae_pb2.MEDIA_KIND_IMAGE if request.media.mime_type else 0)
        if kind and (kind == vae_pb2.MEDIA_KIND_VIDEO) != self.stage.is_video:
            model = "a video" if self.stage.is_video else "an image"
            raise InvalidArgument("kind", f"this VAE belongs to {model} model")
        return self.stage.is_video

    # -- gRPC: mammoth.v1.VAE (the same calls, tensors read from / put into the messages) ---
    async def Decode(self, request: vae_pb2.DecodeRequest, grpc_context=None):  # noqa: N802
        try:
            self.auth.check_grpc(grpc_context)
            result = await self.decode(request, ndarray_from_proto(request.latents, name="latents"))
        except Exception as exc:  # noqa: BLE001
            stage_grpc_abort(grpc_context, exc, request.request_id)
        return vae_pb2.DecodeResponse(request_id=request.request_id,
                                      media=common_pb2.Media(data=result.data, mime_type=result.mime_type),
                                      width=result.width, height=result.height, frames=result.frames,
                                      timings=timings_proto(result.timings))

    async def Encode(self, request: vae_pb2.EncodeRequest, grpc_context=None):  # noqa: N802
        try:
            self.auth.check_grpc(grpc_context)
            encoded = await self.encode(request)
        except Exception as exc:  # noqa: BLE001
            stage_grpc_abort(grpc_context, exc, request.request_id)
        response = vae_pb2.EncodeResponse(request_id=request.request_id, width=encoded.width, height=encoded.height,
                                          frames=encoded.frames, fps=round(encoded.fps),
                                          timings=timings_proto(encoded.timings))
        tensor_to_proto(encoded.latents[0], out=response.latents)
        if encoded.visual_codes:
            tensor_to_proto(encoded.visual_codes[0], out=response.visual_codes)
        return response

    async def Preview(self, request: vae_pb2.PreviewRequest, grpc_context=None):  # noqa: N802
        try:
            self.auth.check_grpc(grpc_context)
            return await self.preview(request, ndarray_from_proto(request.latents, name="latents"))
        except Exception as exc:  # noqa: BLE001
            stage_grpc_abort(grpc_context, exc, request.request_id)


def app(args: dict[str, Any]) -> serve.Application:
    return VAEDeployment.options(**deployment_options(config_from_args(args), "vae")).bind(args)
