"""VAE stage: untrusted media in (decode, validate, fit, encode to latents), media out."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vae_worker.engine import ImageVAE, VideoVAE
from vae_worker.mammothtok import MammothTokEncoder, encode_reference, load_mammothtok
from vae_worker.mammothtok.official import SUBFOLDER as MAMMOTHTOK_SUBFOLDER
from vae_worker.media import (
    MediaLimits,
    decode_image,
    decode_video,
    encode_image,
    encode_video,
    fit_to_grid,
    grid_size,
    trim_to_4k1,
)

from ..handoff import EncodedMedia, MediaOutput
from ..jobs import ImageJob, InvalidArgument, OutputSpec, VideoJob
from ..media_formats import MIME
from .lanes import Lanes

Resolve = Callable[[Any], Any]


async def _resolve_local(handle: Any) -> Any:
    return await handle if inspect.isawaitable(handle) else handle


class DecodeBatcher:
    """Gathers concurrent decode calls and runs them through ``decode_many``, up to one batch
    per lane at once (``services.stages.lanes``): latents of the same shape share one VAE
    forward (the engine groups by shape), and with idle lanes the waiting decodes are shared
    out between them.

    A caller waits at most ``wait_s`` for company; a cancelled caller's result is dropped.
    """

    def __init__(self, vae: ImageVAE | VideoVAE, max_batch: int = 4, wait_s: float = 0.0,
                 lanes: Lanes | None = None):
        self.vae = vae
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.lanes = lanes or Lanes(1, name="vae-lane")
        self._pending: list[tuple[torch.Tensor, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._busy = 0  # lanes decoding now
        self._tasks: set[asyncio.Task] = set()
        self.batches_run = 0
        self.last_batch_size = 0

    async def decode(self, latents: torch.Tensor) -> np.ndarray:
        """One request's latents ``[C, ...]`` -> uint8 pixels."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((latents[None], future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._start())
        return await future

    async def _start(self) -> None:
        if len(self._pending) < self.max_batch and self.wait_s > 0:
            await asyncio.sleep(self.wait_s)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand waiting decodes to the free lanes, an equal share each (at most ``max_batch``)."""
        while self._pending and self._busy < self.lanes.count:
            size = min(self.max_batch, -(-len(self._pending) // (self.lanes.count - self._busy)))
            batch, self._pending = self._pending[:size], self._pending[size:]
            batch = [(x, f) for x, f in batch if not f.done()]
            if not batch:
                continue
            self._busy += 1
            self.batches_run += 1
            self.last_batch_size = len(batch)
            task = asyncio.get_running_loop().create_task(self._decode(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _decode(self, batch: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        try:
            outputs = await self.lanes.run(self.vae.decode_many, [x for x, _ in batch])
        except asyncio.CancelledError:
            self._busy -= 1
            raise
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), pixels in zip(batch, outputs):
                if not future.done():
                    future.set_result(pixels[0].numpy())
        self._busy -= 1
        self._dispatch()


class VAEStage:
    """One model's VAE (an image or a video engine) plus the media codecs around it, and the
    model's MammothTok (``<model>/vae/mammothtok/``) when it has one: edit references are then
    also tokenized for the planner's prompt."""

    def __init__(self, vae: ImageVAE | VideoVAE, media_limits: MediaLimits | None = None,
                 resolve: Callable[[Any], Any] = _resolve_local, *, max_batch_decodes: int = 4,
                 batch_wait_timeout_s: float = 0.0, tokenizer: MammothTokEncoder | None = None,
                 lanes: Lanes | None = None):
        self.vae = vae
        self.tokenizer = tokenizer
        self.is_video = isinstance(vae, VideoVAE)
        self.media_limits = media_limits or MediaLimits()
        self.resolve = resolve
        self.lanes = lanes or Lanes(1, name="vae-lane")  # decodes and encodes run here
        self.decoder = DecodeBatcher(vae, max_batch_decodes, batch_wait_timeout_s, self.lanes)

    @classmethod
    def from_model_dir(cls, model_dir: Path, engine_cls: type[ImageVAE | VideoVAE], *, device: str = "cpu",
                       dtype: str = "float32", memory_budget_mb: float = 2048, media_limits: MediaLimits | None = None,
                       resolve: Callable[[Any], Any] = _resolve_local, max_batch_decodes: int = 4,
                       batch_wait_timeout_s: float = 0.0, lanes: Lanes | None = None) -> VAEStage:
        """``engine_cls``: the model family's VAE engine (``ModelFamily.engine_class("vae")``)."""
        vae = engine_cls.from_pretrained(model_dir / "vae", device=device, dtype=getattr(torch, dtype),
                                         memory_budget_mb=memory_budget_mb)
        tok_dir = model_dir / "vae" / MAMMOTHTOK_SUBFOLDER
        # fp32: a VQ lookup picks the nearest code, and reduced precision flips near-ties
        tokenizer = load_mammothtok(tok_dir, device=device) if tok_dir.is_dir() else None
        return cls(vae, media_limits, resolve, max_batch_decodes=max_batch_decodes,
                   batch_wait_timeout_s=batch_wait_timeout_s, tokenizer=tokenizer, lanes=lanes)

    # -- media in ----------------------------------------------------------------------------
    async def encode_references(self, job: ImageJob) -> EncodedMedia:
        """Reference images -> fitted pixels (for the planner), latents (for the DiT) and, with a
        MammothTok, each fitted image's code grid (for the planner's prompt).

        With no size in the request, the first image's aspect ratio picks the output size
        (within the model's default area); every reference is fitted to that grid.
        """
        start = time.perf_counter()
        images = [await asyncio.to_thread(decode_image, data, self.media_limits, f"reference_images[{i}]")
                  for i, data in enumerate(job.reference_images)]
        if job.size_from_reference:
            width, height = grid_size(images[0].width, images[0].height, max_pixels=job.width * job.height,
                                      multiple=job.multiple)
            job.width, job.height = width, height
        pixels = [np.asarray(fit_to_grid(img, job.width, job.height, job.resize_policy, job.multiple), dtype=np.uint8)
                  for img in images]
        latents = await self.lanes.run(self._encode_images, pixels)
        timings = {"vae_encode": time.perf_counter() - start}
        codes: list[np.ndarray] = []
        if self.tokenizer is not None:
            start = time.perf_counter()
            codes = await asyncio.to_thread(lambda: [encode_reference(self.tokenizer, p) for p in pixels])
            timings["mammothtok_encode"] = time.perf_counter() - start
        return EncodedMedia(latents, pixels, job.width, job.height, timings=timings, visual_codes=codes)

    def _encode_images(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(self.vae.encode(torch.from_numpy(p)[None])[0].numpy()) for p in pixels]

    async def encode_source_video(self, job: VideoJob) -> EncodedMedia:
        start = time.perf_counter()
        frames, fps = await asyncio.to_thread(decode_video, job.source_video, self.media_limits, "source_video")
        if job.frames_from_source:
            frames = trim_to_4k1(frames, self.vae.temporal_compression)
            job.frames = int(frames.shape[0])
        elif frames.shape[0] < job.frames:
            raise InvalidArgument("frames", f"the source video has {frames.shape[0]} frames, {job.frames} asked")
        else:
            frames = frames[: job.frames]
        if job.size_from_source:
            job.width, job.height = grid_size(frames.shape[2], frames.shape[1], max_pixels=job.width * job.height,
                                              multiple=job.multiple)
        fitted = np.asarray(fit_to_grid(frames, job.width, job.height, job.resize_policy, job.multiple),
                            dtype=np.uint8)
        latents = await self.lanes.run(lambda: self.vae.encode(torch.from_numpy(fitted)[None])[0].numpy())
        return EncodedMedia([np.ascontiguousarray(latents)], [fitted], job.width, job.height, int(fitted.shape[0]),
                            float(fps), timings={"vae_encode": time.perf_counter() - start})

    # -- media out ---------------------------------------------------------------------------
    async def decode(self, latents_handle: Any, output: OutputSpec) -> MediaOutput:
        start = time.perf_counter()
        latents = torch.from_numpy(np.asarray(await self.resolve(latents_handle)))
        self._check_latents(latents)  # before batching: one bad request must not fail the others
        pixels = await self.decoder.decode(latents)
        if self.is_video:
            data = await asyncio.to_thread(encode_video, pixels, output.fps or 16, output.format)
            frames, height, width = pixels.shape[0], pixels.shape[1], pixels.shape[2]
        else:
            data = await asyncio.to_thread(encode_image, pixels, output.format, output.quality)
            frames, height, width = 1, pixels.shape[0], pixels.shape[1]
        return MediaOutput(data, MIME[output.format], width, height, frames, output.fps if self.is_video else 0,
                           {"vae_decode": time.perf_counter() - start})

    def _check_latents(self, latents: torch.Tensor) -> None:
        layout = "[C, f, h, w]" if self.is_video else "[C, h, w]"
        if latents.ndim != (4 if self.is_video else 3) or latents.shape[0] != self.vae.latent_channels:
            raise InvalidArgument("latents", f"expected {layout} with C={self.vae.latent_channels}, "
                                             f"got {tuple(latents.shape)}")
        if min(latents.shape) == 0:
            raise InvalidArgument("latents", f"empty shape {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise InvalidArgument("latents", "contains NaN or Inf")

    async def preview(self, latents: np.ndarray, fmt: str = "png", quality: int = 90, max_side: int = 0) -> bytes:
        """Cheap preview of intermediate latents (fixed linear map, no VAE pass); a video
        shows its middle frame. ``max_side`` > 0 downscales so the longer side fits."""
        tensor = torch.from_numpy(np.asarray(latents))[None]
        # a fixed linear map: not queued behind a lane's decode
        image = await asyncio.to_thread(lambda: self.vae.preview(tensor)[0].numpy())
        if image.ndim == 4:
            image = image[image.shape[0] // 2]
        if max_side > 0 and max(image.shape[:2]) > max_side:
            pil = Image.fromarray(image)
            pil.thumbnail((max_side, max_side))
            image = np.asarray(pil)
        return await asyncio.to_thread(encode_image, image, fmt, quality)
