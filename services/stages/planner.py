"""Planner stage: visual-token planning, prompt encoding and understanding on vLLM."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from planner.engine import PlannerEngine, planner_config_from_dir
from vae_worker.media import MediaLimits, decode_image, decode_video, fit_to_grid, grid_size

from ..config import PlannerEngine as PlannerEngineSettings
from ..handoff import EncodedMedia, ImageConditions, PromptConditions
from ..jobs import ImageJob, UnderstandJob
from ..understanding import UnderstandDone


def planner_config(model_dir: Path, settings: PlannerEngineSettings, device: str, dtype: str):
    """Serving config -> vLLM engine config for ``<model>/planner``."""
    return planner_config_from_dir(
        model_dir / "planner",
        device=device,
        dtype=dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=settings.enforce_eager,
        kv_cache_gib=float(settings.kv_cache_gib or 0.25),
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        disable_multiprocessing=not settings.multiprocessing,
        model_runner=settings.model_runner,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_cfg_repairs=settings.max_cfg_repairs,
        admission_timeout_s=settings.admission_timeout_s,
        negative_cache_size=settings.negative_cache_size,
        health_timeout_s=settings.health_timeout_s,
    )


class PlannerStage:
    def __init__(self, engine: PlannerEngine, media_limits: MediaLimits | None = None):
        self.engine = engine
        self.media_limits = media_limits or MediaLimits()
        self._prompt_cache: OrderedDict[str, asyncio.Future] = OrderedDict()

    @classmethod
    async def start(cls, model_dir: Path, settings: PlannerEngineSettings, *, device: str = "cpu",
                    dtype: str = "float32", media_limits: MediaLimits | None = None,
                    engine_cls: type[PlannerEngine] = PlannerEngine) -> PlannerStage:
        """``engine_cls``: the model family's planner engine (``ModelFamily.engine_class("planner")``)."""
        engine = engine_cls(planner_config(model_dir, settings, device, dtype))
        await engine.start()
        return cls(engine, media_limits)

    async def shutdown(self) -> None:
        await self.engine.shutdown()

    async def check_health(self) -> None:
        """Raises unless the vLLM engine is alive and answering."""
        await self.engine.check_health()

    # -- image tasks --------------------------------------------------------------------------
    async def plan_image(self, job: ImageJob, references: EncodedMedia | None = None) -> ImageConditions:
        """References with MammothTok codes (a model with ``vae/mammothtok/``) go into the prompt
        as visual tokens, as the official processor writes them; without codes the planner's
        ViT sees the fitted pixels."""
        codes = list(references.visual_codes) if references is not None else []
        images = ([Image.fromarray(p) for p in references.pixels] if references is not None and not codes else [])
        start = time.perf_counter()
        result = await self.engine.plan_image(
            job.prompt, ar_height=job.ar_height, ar_width=job.ar_width, cfg_scale=job.ar_cfg_scale,
            seed=job.seed, temperature=job.ar_temperature, top_k=job.ar_top_k, top_p=job.ar_top_p,
            reference_images=images, reference_codes=codes, negative_prompt=job.negative_prompt,
        )
        timings = {f"planner_{k}": float(v) for k, v in result.timings.items()}
        timings["planner"] = time.perf_counter() - start
        return ImageConditions(
            text=_numpy(result.text_condition),
            image=_numpy(result.image_condition) if result.image_condition.numel() else None,
            negative=_numpy(result.negative_condition) if result.negative_condition is not None else None,
            planned_tokens=int(result.visual_token_ids.numel()),
            timings=timings,
            prompt_tokens=len(result.prompt_token_ids),
        )

    async def edit_inputs(self, job: ImageJob, encoded: EncodedMedia | None,
                          codes: list[np.ndarray]) -> EncodedMedia | None:
        """What ``plan_image`` reads of an edit's references: a direct caller's MammothTok codes
        (``PlanImageRequest.reference_codes``: no pixels needed), else the VAE's encoded
        references, else the job's images decoded and fitted here (for the ViT)."""
        if codes:
            return (dataclasses.replace(encoded, visual_codes=codes) if encoded is not None
                    else EncodedMedia([], [], job.width, job.height, visual_codes=codes))
        if encoded is None and job.reference_images:
            return await self.fit_references(job)
        return encoded

    async def fit_references(self, job: ImageJob) -> EncodedMedia:
        """Reference images decoded and fitted for the planner alone (no latents): what a
        ``Planner.PlanImage`` gRPC caller gets without going through the VAE stage."""
        pixels = []
        for i, data in enumerate(job.reference_images):
            image = await asyncio.to_thread(decode_image, data, self.media_limits, f"reference_images[{i}]")
            if job.size_from_reference and i == 0:
                job.width, job.height = grid_size(image.width, image.height, max_pixels=job.width * job.height,
                                                  multiple=job.multiple)
            pixels.append(np.asarray(fit_to_grid(image, job.width, job.height, job.resize_policy, job.multiple)))
        return EncodedMedia([], pixels, job.width, job.height)

    # -- video tasks --------------------------------------------------------------------------
    async def encode_prompts(self, prompt: str, negative_prompt: str | None) -> PromptConditions:
        """The prompt's and (``None``: no) negative prompt's last hidden states."""
        start = time.perf_counter()
        if negative_prompt is None:
            hidden = await self.engine.encode_prompt(prompt)
            return PromptConditions(_numpy(hidden), None, {"planner": time.perf_counter() - start})
        encoded = asyncio.ensure_future(self.engine.encode_prompt(prompt))
        negative = self._cached_prompt(negative_prompt)
        hidden, negative_hidden = await asyncio.gather(encoded, asyncio.shield(negative))
        return PromptConditions(_numpy(hidden), _numpy(negative_hidden),
                                {"planner": time.perf_counter() - start})

    def _cached_prompt(self, text: str) -> asyncio.Future:
        """Negative prompts repeat across requests: encode each distinct one once (LRU).

        An empty negative prompt has no tokens: like the reference pipeline (which pads it to
        an all-masked sequence) its condition is zero-length, not an error."""
        if not text.strip():
            future = asyncio.get_running_loop().create_future()
            future.set_result(torch.zeros(0, self.engine.hidden_size))
            return future
        future = self._prompt_cache.get(text)
        if future is not None and not (future.done() and (future.cancelled() or future.exception())):
            self._prompt_cache.move_to_end(text)
            return future
        future = asyncio.ensure_future(self.engine.encode_prompt(text))
        self._prompt_cache[text] = future
        while len(self._prompt_cache) > self.engine.config.negative_cache_size:
            self._prompt_cache.popitem(last=False)
        return future

    # -- understanding ------------------------------------------------------------------------
    async def understand(self, job: UnderstandJob) -> AsyncIterator[str | UnderstandDone]:
        messages = [await self._decode_media(i, m) for i, m in enumerate(job.messages)]
        sampling: dict[str, Any] = {"max_tokens": job.max_tokens, "temperature": job.temperature,
                                    "top_p": job.top_p, "seed": job.seed, "stop": job.stop or None}
        info: dict[str, Any] = {}
        async for delta in self.engine.understand(messages, sampling, info):
            yield delta
        yield UnderstandDone(info.get("prompt_tokens", 0), info.get("completion_tokens", 0),
                             "length" if info.get("finish_reason") == "length" else "stop")

    async def _decode_media(self, index: int, message: dict[str, Any]) -> dict[str, Any]:
        content = []
        for j, part in enumerate(message["content"]):
            field = f"messages[{index}].content[{j}]"
            if part["type"] == "image":
                array = await asyncio.to_thread(decode_image, part["data"], self.media_limits, f"{field}.image")
                content.append({"type": "image", "image": _pil(array)})
            elif part["type"] == "video":
                frames, fps = await asyncio.to_thread(decode_video, part["data"], self.media_limits, f"{field}.video")
                content.append({"type": "video", "video": frames, "fps": fps})
            else:
                content.append(part)
        return {"role": message["role"], "content": content}


def _numpy(tensor: Any) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


def _pil(image: Any) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
