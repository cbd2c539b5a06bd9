"""The in-process pipeline: the same stage services and flows as the served one, minus Ray.

Used by benchmarks (the baseline of ``bench.serve_overhead``) and by tests that exercise the
flows without a cluster. Stage calls become asyncio tasks handed from stage to stage. What the
served applications share with it (model directories, engine configs) is ``services.stage_setup``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .config import ServeConfig
from .families import get_family
from .handoff import MediaGeometry, MediaOutput
from .jobs import ImageJob, UnderstandJob, VideoJob
from .stage_setup import dit_engine_config, ensure_model, media_limits, stage_lanes  # noqa: F401 - callers move to stage_setup
from .stages.dit import DiTStage
from .stages.planner import PlannerStage
from .stages.vae import VAEStage


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
        return asyncio.ensure_future(self.planner.encode_prompts(*job.planner_prompts()))

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
    family = get_family(index.family)
    limits = media_limits(cfg)
    planner = await PlannerStage.start(index.root, cfg.planner.engine, device=cfg.resolved_device("planner"),
                                       dtype=cfg.resolved_dtype("planner"), media_limits=limits,
                                       engine_cls=family.engine_class("planner"))
    dit = DiTStage.from_model_dir(index.root, dit_engine_config(cfg),
                                  batch_wait_timeout_s=cfg.dit.engine.batch_wait_timeout_s,
                                  engine_cls=family.engine_class("dit"), lanes=stage_lanes(cfg, "dit"))
    vae = VAEStage.from_model_dir(index.root, family.engine_class("vae"), device=cfg.resolved_device("vae"),
                                  dtype=cfg.resolved_dtype("vae"), memory_budget_mb=cfg.vae.engine.memory_budget_mb,
                                  media_limits=limits, max_batch_decodes=cfg.vae.engine.max_batch_decodes,
                                  batch_wait_timeout_s=cfg.vae.engine.batch_wait_timeout_s,
                                  lanes=stage_lanes(cfg, "vae"))
    return LocalStages(name, index.family, planner, dit, vae)
