"""Task orchestration: the order of stage calls for each task, as event streams.

A flow never holds a tensor: it passes each stage's (future) result straight to the next
stage (DeploymentResponses under Ray, tasks in-process), so intermediates go from stage to
stage without passing through the ingress. The ``Stages`` object hides which transport is
used; ``services.local`` and ``services.apps.pipeline`` provide the two implementations.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .handoff import DenoiseDone, DenoiseStepEvent, MediaGeometry, MediaOutput
from .jobs import ImageJob, UnderstandJob, VideoJob


class Stages(Protocol):
    """Stage calls of one model family; each returns a handle the next call can take."""

    model_name: str

    def plan_image(self, job: ImageJob, references: Any) -> Any: ...

    def encode_prompts(self, job: VideoJob) -> Any: ...

    async def encode_references(self, job: ImageJob) -> Any:
        """Start encoding an edit's inputs; when the first image picks the output size, wait for
        it (small) and set ``job.width``/``height`` before the DiT shapes its latents."""

    def encode_source_video(self, job: VideoJob) -> Any: ...

    def denoise(self, job: ImageJob | VideoJob, conditions: Any, media: Any) -> AsyncIterator[Any]: ...

    async def decode(self, latents: Any, job: ImageJob | VideoJob) -> MediaOutput: ...

    async def preview(self, latents: Any) -> bytes: ...

    async def geometry(self, encoded: Any) -> MediaGeometry:
        """Size, frames and fps of encoded media, read where it lies (not its tensors)."""

    def understand(self, job: UnderstandJob) -> AsyncIterator[str]: ...


# ------------------------------------------------------------------------------- events


@dataclass
class Queued:
    request_id: str


@dataclass
class Planning:
    request_id: str
    planned_tokens: int


@dataclass
class Step:
    request_id: str
    step: int
    total: int
    preview_png: bytes | None = None


@dataclass
class Decoding:
    request_id: str


@dataclass
class Result:
    request_id: str
    media: MediaOutput
    seed: int
    model: str
    steps: int
    planned_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


Event = Queued | Planning | Step | Decoding | Result


async def _denoise_and_decode(stages: Stages, job: ImageJob | VideoJob, conditions: Any, media: Any,
                              planned_tokens: int, started: float) -> AsyncIterator[Event]:
    done: DenoiseDone | None = None
    async for event in stages.denoise(job, conditions, media):
        if isinstance(event, DenoiseStepEvent):
            preview = None
            if job.preview and event.preview_latents is not None:
                preview = await stages.preview(event.preview_latents)
            yield Step(job.request_id, event.step, event.total, preview)
        else:
            done = event
    if done is None:
        raise RuntimeError("the DiT stage ended without a result")
    yield Decoding(job.request_id)
    output = await stages.decode(done.latents, job)
    timings = {**done.timings, **output.timings, "total": time.perf_counter() - started}
    yield Result(job.request_id, output, job.seed, stages.model_name, done.steps, planned_tokens, timings)


async def text_to_image(stages: Stages, job: ImageJob) -> AsyncIterator[Event]:
    started = time.perf_counter()
    yield Queued(job.request_id)
    conditions = stages.plan_image(job, None)
    yield Planning(job.request_id, job.planned_tokens)
    async for event in _denoise_and_decode(stages, job, conditions, None, job.planned_tokens, started):
        yield event


async def edit_image(stages: Stages, job: ImageJob) -> AsyncIterator[Event]:
    started = time.perf_counter()
    yield Queued(job.request_id)
    references = await stages.encode_references(job)
    conditions = stages.plan_image(job, references)
    yield Planning(job.request_id, job.planned_tokens)
    async for event in _denoise_and_decode(stages, job, conditions, references, job.planned_tokens, started):
        yield event


async def text_to_video(stages: Stages, job: VideoJob) -> AsyncIterator[Event]:
    started = time.perf_counter()
    yield Queued(job.request_id)
    conditions = stages.encode_prompts(job)
    yield Planning(job.request_id, 0)
    async for event in _denoise_and_decode(stages, job, conditions, None, 0, started):
        yield event


async def edit_video(stages: Stages, job: VideoJob) -> AsyncIterator[Event]:
    started = time.perf_counter()
    yield Queued(job.request_id)
    source = stages.encode_source_video(job)
    if job.size_from_source or job.frames_from_source:
        encoded = await stages.geometry(source)
        job.width, job.height, job.frames = encoded.width, encoded.height, encoded.frames
        if job.fps <= 0:
            job.fps = round(encoded.fps) or 16
    conditions = stages.encode_prompts(job)
    yield Planning(job.request_id, 0)
    async for event in _denoise_and_decode(stages, job, conditions, source, 0, started):
        yield event


async def understand(stages: Stages, job: UnderstandJob) -> AsyncIterator[str]:
    async for delta in stages.understand(job):
        yield delta
