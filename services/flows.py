"""Task orchestration: the order of stage calls for each task, as event streams.

A flow never holds a tensor: it passes each stage's (future) result straight to the next
stage (DeploymentResponses under Ray, tasks in-process), so intermediates go from stage to
stage without passing through the ingress. The ``Stages`` object hides which transport is
used; ``services.local`` and ``services.apps.pipeline`` provide the two implementations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import is_unavailable
from .handoff import DenoiseDone, DenoiseStepEvent, MediaGeometry, MediaOutput
from .jobs import ImageJob, UnderstandJob, VideoJob
from .understanding import UnderstandDone


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

    def understand(self, job: UnderstandJob) -> AsyncIterator[str | UnderstandDone]:
        """Text deltas, then (from stages that count them) one ``UnderstandDone``."""


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
    index: int = 0  # which image of a several-image request


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
    retries: int = 0  # stage calls issued again because a replica died
    index: int = 0  # which image of a several-image request (one Result per image)


Event = Queued | Planning | Step | Decoding | Result


Start = Callable[[], Awaitable[tuple[Any, Any]]]


async def _retryable(stages: Stages, exc: BaseException) -> bool:
    """Only a dead stage is retried, and only while every stage has a live replica to take the
    call (``stages.ready()`` where the transport knows): waiting for a restart that takes longer
    than the deadline would turn a prompt 503 into a late 504."""
    if not is_unavailable(exc):
        return False
    ready = getattr(stages, "ready", None)
    return True if ready is None else bool(await ready())


def preview_steps(total: int, count: int) -> frozenset[int]:
    """The steps (1-based) at which ``count`` partial images are taken, spread evenly over ``total``."""
    return frozenset(max(1, min(total, round((i + 1) * total / (count + 1)))) for i in range(max(0, count)))


async def _denoise_and_decode(stages: Stages, job: ImageJob | VideoJob, start: Start, planned_tokens: int,
                              started: float, retries: int,
                              previews: Collection[int] | None = None) -> AsyncIterator[Event]:
    """``start()`` issues the planner/VAE-encode calls and returns (conditions, media).

    A stage that dies (``errors.is_unavailable``) is retried up to ``retries`` times in all: a
    DiT that dies before its first step may have been fed by a dead planner or encoder, so
    everything is issued again (nothing has reached the client but ``Queued``/``Planning``);
    after that only the DiT runs again, on the inputs still in the object store; a dead VAE
    decode is issued again on the same latents. ``previews`` limits preview images to those
    steps (default: every step of a job that asked for previews).
    """
    attempts = 0
    conditions = media = None
    done: DenoiseDone | None = None
    stepped = planning = False
    while done is None:
        try:
            if conditions is None:
                conditions, media = await start()
                if not planning:
                    planning = True
                    yield Planning(job.request_id, planned_tokens)
            async for event in stages.denoise(job, conditions, media):
                if isinstance(event, DenoiseStepEvent):
                    stepped = True
                    preview = None
                    wanted = previews is None or event.step in previews
                    if job.preview and wanted and event.preview_latents is not None:
                        preview = await stages.preview(event.preview_latents)
                    yield Step(job.request_id, event.step, event.total, preview)
                else:
                    done = event
            if done is None:
                raise RuntimeError("the DiT stage ended without a result")
        except Exception as exc:
            if attempts >= retries or not await _retryable(stages, exc):
                raise
            attempts += 1
            if not stepped:
                conditions = media = None
    yield Decoding(job.request_id)
    while True:
        try:
            output = await stages.decode(done.latents, job)
            break
        except Exception as exc:
            if attempts >= retries or not await _retryable(stages, exc):
                raise
            attempts += 1
    timings = {**done.timings, **output.timings, "total": time.perf_counter() - started}
    yield Result(job.request_id, output, job.seed, stages.model_name, done.steps, planned_tokens, timings,
                 retries=attempts)


async def text_to_image(stages: Stages, job: ImageJob, *, retries: int = 0,
                        previews: Collection[int] | None = None) -> AsyncIterator[Event]:
    started = time.perf_counter()
    yield Queued(job.request_id)

    async def start() -> tuple[Any, Any]:
        return stages.plan_image(job, None), None

    async for event in _denoise_and_decode(stages, job, start, job.planned_tokens, started, retries, previews):
        yield event


async def edit_image(stages: Stages, job: ImageJob, *, retries: int = 0,
                     previews: Collection[int] | None = None) -> AsyncIterator[Event]:
    started = time.perf_counter()
    yield Queued(job.request_id)

    async def start() -> tuple[Any, Any]:
        references = await stages.encode_references(job)
        return stages.plan_image(job, references), references

    async for event in _denoise_and_decode(stages, job, start, job.planned_tokens, started, retries, previews):
        yield event


def image_jobs(job: ImageJob, count: int) -> list[ImageJob]:
    """``count`` copies of one request, seeds ``seed, seed + 1, ...``; each copy has its own stage
    request id (``id``, ``id.1``, ...) while every event carries the request's id."""
    return [job] + [dataclasses.replace(job, seed=(job.seed + i) % 2**63, request_id=f"{job.request_id}.{i}",
                                        reference_images=list(job.reference_images)) for i in range(1, count)]


async def images(stages: Stages, job: ImageJob, count: int, *, edit: bool, retries: int = 0,
                 previews: Collection[int] | None = None) -> AsyncIterator[Event]:
    """Several images of one prompt: ``count`` flows at once (the planner batches their identical
    prompts, the DiT batches their steps), merged into one stream: one ``Queued``, one
    ``Planning``, every image's ``Step`` (with its ``index``), one ``Decoding``, then one
    ``Result`` per image as it is ready. A failing image fails the request (the others are
    cancelled)."""
    flow = edit_image if edit else text_to_image
    if count <= 1:
        async for event in flow(stages, job, retries=retries, previews=previews):
            yield event
        return
    seen: set[type] = set()
    streams = [flow(stages, sub, retries=retries, previews=previews) for sub in image_jobs(job, count)]
    async for index, event in merge_streams(streams):
        event = dataclasses.replace(event, request_id=job.request_id)
        if isinstance(event, Step | Result):
            yield dataclasses.replace(event, index=index)
        elif type(event) not in seen:
            seen.add(type(event))
            yield event


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Events of several streams as they come, tagged with the stream's position; the first error
    cancels the rest (and closing the merged stream cancels all of them)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for event in stream:
                await queue.put((index, event, None))
            await queue.put((index, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            index, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                live -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def text_to_video(stages: Stages, job: VideoJob, *, retries: int = 0) -> AsyncIterator[Event]:
    started = time.perf_counter()
    yield Queued(job.request_id)

    async def start() -> tuple[Any, Any]:
        return stages.encode_prompts(job), None

    async for event in _denoise_and_decode(stages, job, start, 0, started, retries):
        yield event


async def edit_video(stages: Stages, job: VideoJob, *, retries: int = 0) -> AsyncIterator[Event]:
    started = time.perf_counter()
    yield Queued(job.request_id)

    async def start() -> tuple[Any, Any]:
        source = stages.encode_source_video(job)
        if job.size_from_source or job.frames_from_source:
            encoded = await stages.geometry(source)
            job.width, job.height, job.frames = encoded.width, encoded.height, encoded.frames
            if job.fps <= 0:
                job.fps = round(encoded.fps) or 16
        return stages.encode_prompts(job), source

    async for event in _denoise_and_decode(stages, job, start, 0, started, retries):
        yield event


async def understand(stages: Stages, job: UnderstandJob, *, retries: int = 0,
                     done: list[UnderstandDone] | None = None) -> AsyncIterator[str]:
    """Text deltas. The planner is issued again only while nothing has been streamed to the
    client. The planner's closing ``UnderstandDone`` (token counts, finish reason) is appended to
    ``done`` when given, never yielded."""
    attempts = 0
    while True:
        sent = False
        try:
            async for delta in stages.understand(job):
                if isinstance(delta, UnderstandDone):
                    if done is not None:
                        done.append(delta)
                    continue
                sent = True
                yield delta
            return
        except Exception as exc:
            if sent or attempts >= retries or not await _retryable(stages, exc):
                raise
            attempts += 1
