"""Per-family glue between requests and models: guidance chains, schedules, latent shapes.

The guidance chains mirror the reference pipelines exactly (which branches exist for which
scales), so a served request denoises like the research code does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import DataclassConfig
from .guidance import GuidanceChain
from .models.transformer_mammoth2 import Mammoth2Condition, Mammoth2DiTConfig, Mammoth2Transformer
from .models.transformer_mammoth25 import (
    BYT5_DIM,
    Mammoth25Condition,
    Mammoth25DiTConfig,
    Mammoth25Transformer,
)
from .requests import ImageDenoiseRequest, VideoDenoiseRequest
from .sampling import FlowMatchSampler, image_sampler, video_sampler

SCHEDULER_DIR = "scheduler"



def condition_to(condition: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A condition dataclass with its tensors (and lists of tensors) on ``device``; floating
    tensors in ``dtype``, index tensors keep theirs."""
    moved = {}
    for name, value in vars(condition).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype if value.is_floating_point() else value.dtype)
        elif isinstance(value, list):
            value = [v.to(device, dtype) if isinstance(v, torch.Tensor) else v for v in value]
        moved[name] = value
    return type(condition)(**moved)

@dataclass(frozen=True)
class ImageFamily:
    """MammothModa2: 2-way CFG for T2I, 3-way (uncond, ref-only, full) for editing."""

    name = "mammoth2"
    latent_dtype = None  # the official draws the noise in the model's dtype
    config_cls = Mammoth2DiTConfig
    model_cls = Mammoth2Transformer
    request_cls = ImageDenoiseRequest

    def chain(self, req: ImageDenoiseRequest) -> GuidanceChain:
        refs = list(req.ref_latents)
        full = Mammoth2Condition(text=req.text, image=req.image, ref_latents=refs)
        image_guidance = req.image_guidance if refs else 1.0
        if req.text_guidance > 1.0 and image_guidance > 1.0:
            uncond = Mammoth2Condition(text=req.negative, image=None, ref_latents=[])
            ref_only = Mammoth2Condition(text=req.negative, image=None, ref_latents=refs)
            return GuidanceChain([uncond, ref_only, full], [image_guidance, req.text_guidance],
                                 req.sampling.cfg_range)
        if req.text_guidance > 1.0:
            uncond = Mammoth2Condition(text=req.negative, image=None, ref_latents=[])
            return GuidanceChain([uncond, full], [req.text_guidance], req.sampling.cfg_range)
        return GuidanceChain([full], [], req.sampling.cfg_range)

    def sampler(self, req: ImageDenoiseRequest) -> FlowMatchSampler:
        return image_sampler(req.latent_height, req.latent_width, req.sampling.steps, req.sampling.sigmas)

    def latent_shape(self, req: ImageDenoiseRequest, channels: int) -> tuple[int, ...]:
        return (channels, req.latent_height, req.latent_width)


@dataclass(frozen=True)
class VideoFamily:
    """MammothModa2.5, as the official pipeline guides it:

    - ``guidance <= 1``: no CFG at all, the conditioned prediction alone (editing included);
    - text-to-video: ``[uncond, cond]`` on every step (``cfg_range`` does not apply);
    - editing with ``context_guidance > 1``: inside ``cfg_range`` the 3-way chain
      ``[uncond, source-only, cond]``; outside it, text guidance against the source-only branch.

    Glyph (ByT5) states ride on the conditioned branch and on the 2-way negative, never on the
    3-way context / uncond branches (the official calls pass none there).
    """

    scheduler_config: dict | None = None
    name = "mammoth25"
    latent_dtype = torch.float32  # official: fp32 noise, only the model input is cast
    config_cls = Mammoth25DiTConfig
    model_cls = Mammoth25Transformer
    request_cls = VideoDenoiseRequest

    @staticmethod
    def glyph_dim(config: Mammoth25DiTConfig) -> int | None:
        """Width of the glyph states a checkpoint takes, None without its ByT5 mapper."""
        return BYT5_DIM if config.enable_byt5 else None

    def chain(self, req: VideoDenoiseRequest) -> GuidanceChain:
        source = req.source_latents
        full = Mammoth25Condition(prompt=req.prompt, source_latents=source, glyph=req.glyph)
        if req.guidance <= 1.0:
            return GuidanceChain([full])
        text_uncond = Mammoth25Condition(prompt=req.negative, source_latents=source, glyph=req.negative_glyph)
        if source is None or req.context_guidance <= 1.0:
            return GuidanceChain([text_uncond, full], [req.guidance])
        uncond = Mammoth25Condition(prompt=req.negative, source_latents=None)
        context = Mammoth25Condition(prompt=req.negative, source_latents=source)
        branches = [uncond, context, full]
        if req.negative_glyph is None:
            outside = [1, 2]  # the 2-way negative is the context branch itself
        else:
            branches.append(text_uncond)
            outside = [3, 2]
        return GuidanceChain(branches, [req.context_guidance, req.guidance], req.sampling.cfg_range,
                             outside=outside, outside_scales=[req.guidance], inside=[0, 1, 2])

    def sampler(self, req: VideoDenoiseRequest) -> FlowMatchSampler:
        return video_sampler(req.sampling.steps, self.scheduler_config, req.sampling.sigmas)

    def latent_shape(self, req: VideoDenoiseRequest, channels: int) -> tuple[int, ...]:
        return (channels, req.latent_frames, req.latent_height, req.latent_width)


Family = ImageFamily | VideoFamily

_BY_CONFIG_CLASS: dict[str, type[DataclassConfig]] = {
    Mammoth2DiTConfig.__name__: Mammoth2DiTConfig,
    Mammoth25DiTConfig.__name__: Mammoth25DiTConfig,
}


def family_for(config: DataclassConfig, directory: str | Path | None = None) -> Family:
    if isinstance(config, Mammoth2DiTConfig):
        return ImageFamily()
    if isinstance(config, Mammoth25DiTConfig):
        scheduler_config = None
        if directory is not None:
            path = Path(directory) / SCHEDULER_DIR / "scheduler_config.json"
            if path.is_file():
                scheduler_config = json.loads(path.read_text())
        return VideoFamily(scheduler_config=scheduler_config)
    raise ValueError(f"unsupported DiT config {type(config).__name__}")


def config_class_for(class_name: str) -> type[DataclassConfig]:
    try:
        return _BY_CONFIG_CLASS[class_name]
    except KeyError:
        raise ValueError(f"dit config.json: unknown _class_name {class_name!r}; "
                         f"expected one of {sorted(_BY_CONFIG_CLASS)}") from None

