"""The in-process pipeline: the same stage services and flows as the served one, minus Ray.

Used by benchmarks (the baseline of ``bench.serve_overhead``) and by tests that exercise the
flows without a cluster. Stage calls become asyncio tasks handed from stage to stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dit_worker.engine import DiTEngineConfig
from vae_worker.media import MediaLimits

from .config import ServeConfig
from .handoff import MediaGeometry, MediaOutput
from .jobs import ImageJob, UnderstandJob, VideoJob
from .model_dir import ModelIndex, init_random, read_index
from .presets import get_preset
from .stages.dit import DiTStage
from .stages.planner import PlannerStage
from .stages.vae import VAEStage


def media_limits(cfg: ServeConfig) -> MediaLimits:
    """The media stage's decode bounds from the config (output sizes are checked in ``jobs``)."""
    limits = cfg.ingress.limits
    return MediaLimits(max_bytes=limits.max_image_bytes, max_video_bytes=limits.max_video_bytes,
                       max_pixels=limits.max_input_pixels, max_frames=limits.max_input_video_frames,
                       max_duration_s=limits.max_input_video_seconds,
                       decode_timeout_s=limits.media_decode_timeout_s)


def ensure_model(cfg: ServeConfig, name: str) -> ModelIndex:
    """The model directory of ``cfg.models[name]``; tiny presets are built once into the cache."""
    settings = cfg.models[name]
    directory = settings.directory()
    if settings.preset is not None and not (directory / "model_index.json").is_file():
        preset = get_preset(settings.preset)
        if not preset.tiny:
            raise FileNotFoundError(f"models.{name}: {directory} has no model; real presets need their weights")
        tmp = directory.with_name(directory.name + ".partial")
        init_random(tmp, settings.preset, seed=0, overwrite=True)
        tmp.replace(directory)
    return read_index(directory)


def dit_engine_config(cfg: ServeConfig) -> DiTEngineConfig:
    engine = cfg.dit.engine
    return DiTEngineConfig(device=cfg.resolved_device("dit"), dtype=cfg.resolved_dtype("dit"),
                           max_batch_rows=engine.max_batch_rows, max_latent_tokens=engine.max_latent_tokens,
                           max_ref_images=cfg.ingress.limits.max_reference_images,
                           attention_backend=engine.attention_backend, compile=engine.compile)


@dataclass
class LocalStages:
    """``flows.Stages`` over in-process stage services."""

    model_name: str
    family: str
    planner: PlannerStage
    dit: DiTStage
    vae: VAEStage

    def plan_image(self, job: ImageJob, references: Any) -> asyncio.Task:
        return asyncio.ensure_future(self._plan(job, references))

    async def _plan(self, job: ImageJob, references: Any):
        return await self.planner.plan_image(job, await references if references is not None else None)

    def encode_prompts(self, job: VideoJob) -> asyncio.Task:
        return asyncio.ensure_future(self.planner.encode_prompts(job.prompt, job.negative_prompt))

    async def encode_references(self, job: ImageJob) -> asyncio.Task:
        task = asyncio.ensure_future(self.vae.encode_references(job))
        if job.size_from_reference:
            encoded = await task
            job.width, job.height = encoded.width, encoded.height
        return task

    def encode_source_video(self, job: VideoJob) -> asyncio.Task:
        return asyncio.ensure_future(self.vae.encode_source_video(job))

    def denoise(self, job: ImageJob | VideoJob, conditions: Any, media: Any) -> AsyncIterator[Any]:
        return self.dit.denoise(job, conditions, media)

    async def decode(self, latents: Any, job: ImageJob | VideoJob) -> MediaOutput:
        output = job.output
        if isinstance(job, VideoJob):
            output.fps = job.fps
        return await self.vae.decode(latents, output)

    async def preview(self, latents: Any) -> bytes:
        return await self.vae.preview(latents)

    async def geometry(self, encoded: asyncio.Future) -> MediaGeometry:
        return (await encoded).geometry

    def understand(self, job: UnderstandJob) -> AsyncIterator[str]:
        return self.planner.understand(job)

    async def close(self) -> None:
        await self.dit.close()
        await self.planner.shutdown()


async def start_local_stages(cfg: ServeConfig, name: str) -> LocalStages:
    index = ensure_model(cfg, name)
    limits = media_limits(cfg)
    planner = await PlannerStage.start(index.root, cfg.planner.engine, device=cfg.resolved_device("planner"),
                                       dtype=cfg.resolved_dtype("planner"), media_limits=limits)
    dit = DiTStage.from_model_dir(index.root, dit_engine_config(cfg),
                                  batch_wait_timeout_s=cfg.dit.engine.batch_wait_timeout_s)
    vae = VAEStage.from_model_dir(index.root, index.family, device=cfg.resolved_device("vae"),
                                  dtype=cfg.resolved_dtype("vae"), memory_budget_mb=cfg.vae.engine.memory_budget_mb,
                                  media_limits=limits, max_batch_decodes=cfg.vae.engine.max_batch_decodes,
                                  batch_wait_timeout_s=cfg.vae.engine.batch_wait_timeout_s)
    return LocalStages(index.preset, index.family, planner, dit, vae)
