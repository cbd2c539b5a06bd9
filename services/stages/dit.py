"""DiT stage: a batching loop in front of the DiT engine.

Requests arrive as async calls; a worker task per lane (``services.stages.lanes``: on CPU
several batches run side by side, one per free core) groups the queued ones that share a
latent shape -- or any shapes when the engine takes mixed sizes (``mixed_shapes``) -- (waiting at
most ``batch_wait_timeout_s`` for company), runs the engine on them in its lane's thread, and
streams each request's progress back to its caller. The replica's ``max_batch_requests`` is
shared out between the lanes, and a lane that finds others idle leaves them their share.
Requests that fit the running batch and queue up meanwhile join it at the next step boundary
(continuous batching), and each result goes back the moment its request is done, not when the batch ends. Cancelling
a caller aborts its request inside the running batch at the next step; the rest carries on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_worker.checkpoint import CheckpointError
from dit_worker.engine import DenoiseOutput, DiTEngine, DiTEngineConfig, RequestAborted
from dit_worker.models.glyph_encoder import SUBFOLDER as GLYPH_SUBFOLDER
from dit_worker.models.glyph_encoder import GlyphEncoder
from dit_worker.requests import ImageDenoiseRequest, SamplingParams, VideoDenoiseRequest
from dit_worker.step_cache import StepCacheParams

from ..handoff import DenoiseDone, DenoiseStepEvent, EncodedMedia, ImageConditions, PromptConditions
from ..jobs import ImageJob, InvalidArgument, VideoJob
from .lanes import Lanes

Publish = Callable[[np.ndarray], Any]
log = logging.getLogger(__name__)
NEGATIVE_GLYPH_CACHE = 32  # distinct negative glyph texts whose ByT5 states are kept


def _identity(array: np.ndarray) -> Any:
    return array


@dataclass
class _Pending:
    request: ImageDenoiseRequest | VideoDenoiseRequest
    shape: tuple[int, ...] | None  # batch key (DiTStage._batch_key)
    events: asyncio.Queue
    preview: bool
    loop: asyncio.AbstractEventLoop
    upstream_timings: dict[str, float] = field(default_factory=dict)  # planner / VAE encode, passed on
    cancelled: bool = False
    delivered: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


class DiTStage:
    def __init__(self, engine: DiTEngine, *, max_batch_requests: int = 8, batch_wait_timeout_s: float = 0.01,
                 publish: Publish = _identity, glyph_encoder: GlyphEncoder | None = None,
                 lanes: Lanes | None = None):
        self.engine = engine
        self.lanes = lanes or Lanes(1, name="dit-lane")
        self.glyph_encoder = glyph_encoder  # glyph checkpoints: their ByT5 condition encoder
        self._negative_glyphs: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.max_batch_requests = max_batch_requests
        self.lane_capacity = max(1, -(-max_batch_requests // self.lanes.count))  # requests per lane
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.publish = publish
        self._queue: asyncio.Queue[_Pending] | None = None
        self._workers: list[asyncio.Task] = []
        self._waiting = 0  # lanes waiting for a first request
        self._running: dict[int, dict[str, _Pending]] = {}  # lane -> its batch's requests
        self._deferred: list[_Pending] = []
        self._serial = 0
        self.batches_run = 0
        self.batches_joined = 0  # step boundaries at which queued requests joined a running batch
        self.last_batch_size = 0

    @classmethod
    def from_model_dir(cls, model_dir: Path, config: DiTEngineConfig, *, batch_wait_timeout_s: float = 0.01,
                       publish: Publish = _identity, engine_cls: type[DiTEngine] = DiTEngine,
                       lanes: Lanes | None = None) -> DiTStage:
        """``engine_cls``: the model family's DiT engine (``ModelFamily.engine_class("dit")``)."""
        engine = engine_cls.from_pretrained(model_dir / "dit", config)
        return cls(engine, max_batch_requests=max(1, config.max_batch_rows // 2),
                   batch_wait_timeout_s=batch_wait_timeout_s, publish=publish,
                   glyph_encoder=load_glyph_encoder(model_dir / "dit", engine), lanes=lanes)

    @property
    def active_requests(self) -> int:
        """Requests denoising now, in every lane."""
        return sum(not p.delivered for batch in self._running.values() for p in batch.values())

    # -- requests ----------------------------------------------------------------------------
    def image_request(self, job: ImageJob, conditions: ImageConditions,
                      references: EncodedMedia | None) -> ImageDenoiseRequest:
        refs = [torch.from_numpy(np.asarray(r)) for r in references.latents] if references is not None else []
        return ImageDenoiseRequest(
            request_id=job.request_id,
            text=torch.from_numpy(np.asarray(conditions.text)),
            image=torch.from_numpy(np.asarray(conditions.image)) if conditions.image is not None else None,
            negative=torch.from_numpy(np.asarray(conditions.negative)) if conditions.negative is not None else None,
            latent_height=job.latent_height, latent_width=job.latent_width, ref_latents=refs,
            text_guidance=job.text_guidance, image_guidance=job.image_guidance,
            sampling=_sampling(job),
        )

    def video_request(self, job: VideoJob, conditions: PromptConditions, source: EncodedMedia | None,
                      glyphs: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> VideoDenoiseRequest:
        latents = torch.from_numpy(np.asarray(source.latents[0])) if source is not None else None
        negative = conditions.negative
        return VideoDenoiseRequest(
            request_id=job.request_id,
            prompt=torch.from_numpy(np.asarray(conditions.prompt)),
            negative=torch.from_numpy(np.asarray(negative)) if negative is not None else None,
            latent_frames=job.latent_frames, latent_height=job.latent_height, latent_width=job.latent_width,
            source_latents=latents, guidance=job.guidance, context_guidance=job.context_guidance,
            sampling=_sampling(job), glyph=glyphs[0], negative_glyph=glyphs[1],
        )

    async def glyph_states(self, job: VideoJob) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ByT5 states of the job's glyph text and (when CFG uses it) negative glyph text; none
        without a glyph encoder (checkpoints without ``enable_byt5`` ignore glyph text)."""
        text = getattr(job, "glyph_text", None)
        negative_text = getattr(job, "negative_glyph_text", None) if job.guidance > 1.0 else None
        if self.glyph_encoder is None or not (text or negative_text):
            return None, None
        # Negative prompts repeat across requests: their states are kept (LRU), like the planner's.
        negative = self._negative_glyphs.get(negative_text) if negative_text else None
        if negative is not None:
            self._negative_glyphs.move_to_end(negative_text)
        todo = [text, negative_text if negative is None else None]
        if not any(todo):
            return None, negative
        glyph, encoded = await asyncio.to_thread(self.glyph_encoder.encode, todo)
        if encoded is not None:
            negative = self._negative_glyphs[negative_text] = encoded
            while len(self._negative_glyphs) > NEGATIVE_GLYPH_CACHE:
                self._negative_glyphs.popitem(last=False)
        return glyph, negative

    async def denoise(self, job: ImageJob | VideoJob, conditions: Any,
                      media: Any = None) -> AsyncIterator[DenoiseStepEvent | DenoiseDone]:
        """Stream step events, then one ``DenoiseDone``. ``conditions``/``media`` may be
        awaitables (in-process pipeline) or already resolved (Ray resolves them)."""
        if inspect.isawaitable(conditions):
            conditions = await conditions
        if inspect.isawaitable(media):
            media = await media
        if isinstance(job, ImageJob):
            request = self.image_request(job, conditions, media)
        else:
            request = self.video_request(job, conditions, media, await self.glyph_states(job))
        # The engine keys requests by id: two callers reusing one id must not share a slot.
        self._serial += 1
        request.request_id = f"{job.request_id}#{self._serial}"
        try:
            self.engine.validate(request)
        except ValueError as exc:  # the engine's messages start with the field name
            field, _, message = str(exc).partition(": ")
            raise InvalidArgument(field, message or field) from None
        shape = self._batch_key(request)
        upstream = {**getattr(conditions, "timings", {}), **(getattr(media, "timings", None) or {})}
        pending = _Pending(request, shape, asyncio.Queue(), job.preview, asyncio.get_running_loop(), upstream)
        self._ensure_worker()
        await self._queue.put(pending)
        finished = False
        try:
            while True:
                event = await pending.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, DenoiseDone):
                    finished = True
                    return
        finally:
            if not finished:
                pending.cancelled = True
                self.engine.abort(request.request_id)

    # -- batching loop -----------------------------------------------------------------------
    def _batch_key(self, request: ImageDenoiseRequest | VideoDenoiseRequest) -> tuple[int, ...] | None:
        """What requests must share to batch: the latent shape, or nothing with mixed sizes."""
        if getattr(self.engine.config, "mixed_shapes", False):
            return None
        return self.engine.family.latent_shape(request, self.engine.latent_channels)

    def _ensure_worker(self) -> None:
        """Start the lanes' loops (a fresh queue when none runs, e.g. on a new event loop), or
        restart the one that died."""
        loop = asyncio.get_running_loop()
        if all(w.done() for w in self._workers):
            self._queue = asyncio.Queue()
            self._waiting = 0
            self._running.clear()
            self._workers = [loop.create_task(self._run(lane)) for lane in range(self.lanes.count)]
            return
        for lane, worker in enumerate(self._workers):
            if worker.done():
                self._running.pop(lane, None)
                self._workers[lane] = loop.create_task(self._run(lane))

    async def _first(self) -> _Pending:
        if self._deferred:
            return self._deferred.pop(0)
        self._waiting += 1
        try:
            return await self._queue.get()
        finally:
            self._waiting -= 1

    async def _next_batch(self) -> list[_Pending]:
        first = await self._first()
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_timeout_s
        keep: list[_Pending] = []
        for item in self._deferred:  # earlier arrivals of the same shape join first
            (batch if item.shape == first.shape and len(batch) < self.lane_capacity else keep).append(item)
        self._deferred = keep
        while len(batch) < self.lane_capacity:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            (batch if item.shape == first.shape else self._deferred).append(item)
        if self._waiting and len(batch) > 1 and self._queue.empty():
            # idle lanes take an equal share (back in the queue, in order: it is empty)
            share = -(-len(batch) // (self._waiting + 1))
            for item in batch[share:]:
                self._queue.put_nowait(item)
            batch = batch[:share]
        return [p for p in batch if not p.cancelled]

    async def _run(self, lane: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batches_run += 1
            self.last_batch_size = len(batch)
            by_id = self._running[lane] = {p.request.request_id: p for p in batch}
            generate = functools.partial(
                self.engine.generate, [p.request for p in batch], functools.partial(self._progress, by_id),
                on_done=functools.partial(loop.call_soon_threadsafe, self._deliver, by_id),
                admit=functools.partial(self._admit_from_thread, loop, batch[0].shape, by_id),
                max_requests=self.lane_capacity)
            try:
                await self.lanes.run(generate)
            except Exception as exc:  # noqa: BLE001 - delivered to every caller still waiting
                for pending in by_id.values():
                    if not pending.delivered:
                        pending.delivered = True
                        pending.events.put_nowait(exc)
            finally:
                self._running.pop(lane, None)

    def _deliver(self, by_id: dict[str, _Pending], result: DenoiseOutput | RequestAborted) -> None:
        """On the loop, as soon as the engine finishes (or aborts) one request of the batch."""
        pending = by_id[result.request_id]
        pending.delivered = True
        if isinstance(result, RequestAborted):
            pending.events.put_nowait(asyncio.CancelledError())
        else:
            pending.events.put_nowait(self._done(result, pending))

    def _admit_from_thread(self, loop: asyncio.AbstractEventLoop, shape: tuple[int, ...] | None,
                           by_id: dict[str, _Pending], free: int) -> list[Any]:
        """Runs in the engine thread at each step boundary: queued requests of the running
        batch's shape join it now rather than after it ends."""
        future = asyncio.run_coroutine_threadsafe(self._take_joining(shape, free), loop)
        try:
            joining = future.result(timeout=5.0)
        except (TimeoutError, RuntimeError):  # the loop is gone or stuck: carry on without joiners
            future.cancel()
            return []
        for pending in joining:
            by_id[pending.request.request_id] = pending
        return [p.request for p in joining]

    async def _take_joining(self, shape: tuple[int, ...] | None, free: int) -> list[_Pending]:
        joining: list[_Pending] = []
        keep: list[_Pending] = []
        for item in self._deferred:
            (joining if item.shape == shape and len(joining) < free else keep).append(item)
        self._deferred = keep
        while len(joining) < free and self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            (joining if item.shape == shape else self._deferred).append(item)
        joining = [p for p in joining if not p.cancelled]
        if joining:
            self.batches_joined += 1
        return joining

    @staticmethod
    def _progress(by_id: dict[str, _Pending], request_id: str, step: int, total: int, latents: torch.Tensor) -> None:
        """Runs in the engine thread: hand the event to the caller's loop."""
        pending = by_id[request_id]
        preview = latents.float().cpu().numpy().copy() if pending.preview else None
        pending.loop.call_soon_threadsafe(pending.events.put_nowait, DenoiseStepEvent(step, total, preview))

    def _done(self, output: DenoiseOutput, pending: _Pending) -> DenoiseDone:
        array = np.ascontiguousarray(output.latents.float().cpu().numpy())
        timings = {**pending.upstream_timings, "dit": output.seconds,
                   "dit_queue": max(0.0, time.perf_counter() - pending.enqueued - output.seconds),
                   # counts, not seconds: the step cache's computed vs cached steps
                   "dit_steps_computed": float(output.computed_steps),
                   "dit_steps_cached": float(output.cached_steps)}
        return DenoiseDone(self.publish(array), tuple(array.shape), output.steps, timings)

    def check_health(self) -> None:
        """Raise if the batching loop died (not cancelled) or the engine's model does not answer
        (a rank group pings every rank; a single in-process model has nothing to ask)."""
        for worker in self._workers:
            if worker.done() and not worker.cancelled() and worker.exception() is not None:
                raise RuntimeError(f"DiT batching loop died: {worker.exception()!r}")
        check = getattr(self.engine.model, "check_health", None)
        if callable(check):
            check()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        self.lanes.close()


def load_glyph_encoder(dit_dir: Path, engine: DiTEngine) -> GlyphEncoder | None:
    """``<model>/dit/glyph_encoder`` on the engine's device and dtype, when the DiT takes glyph
    states (``enable_byt5``); None otherwise. A glyph DiT converted without its encoder serves
    without glyph text (as its ingress, without ``glyph_text`` in the defaults, sends none)."""
    glyph_dim = getattr(engine.family, "glyph_dim", None)
    glyph_dim = glyph_dim(engine.model.config) if glyph_dim is not None else None
    if glyph_dim is None:
        return None
    directory = Path(dit_dir) / GLYPH_SUBFOLDER
    if not directory.is_dir():
        log.warning("%s: the DiT has a ByT5 glyph mapper but no glyph encoder; quoted text is not rendered "
                    "(re-run mammoth convert)", dit_dir)
        return None
    encoder = GlyphEncoder.from_pretrained(directory, device=engine.config.device, dtype=engine.dtype)
    if encoder.dim != glyph_dim:
        raise CheckpointError(f"{directory}: glyph encoder width {encoder.dim}, the DiT's byt5_in takes {glyph_dim}")
    return encoder


def _sampling(job: ImageJob | VideoJob) -> SamplingParams:
    """The job's schedule and seed, and its step-cache knobs (absent on older jobs: off)."""
    cache = StepCacheParams(threshold=float(getattr(job, "step_cache_threshold", 0.0) or 0.0),
                            warmup=float(getattr(job, "step_cache_warmup", 0.1)),
                            max_cached_steps=int(getattr(job, "step_cache_max_cached_steps", 3)))
    return SamplingParams(steps=job.steps, seed=job.seed, cfg_range=job.cfg_range, sigmas=job.sigmas,
                          step_cache=cache)
