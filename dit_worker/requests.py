"""What a caller hands the DiT engine: conditions from the planner plus sampling parameters.

Everything is in latent space: the orchestrator converts pixels to latent sizes with the VAE's
compression factors, so this stage never needs to know the VAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .guidance import validate_cfg_range, validate_scale
from .sampling import validate_schedule
from .step_cache import StepCacheParams


def _check_condition(name: str, tensor: torch.Tensor | None, *, required: bool) -> None:
    if tensor is None:
        if required:
            raise ValueError(f"{name}: required")
        return
    if tensor.ndim != 2:
        raise ValueError(f"{name}: expected [tokens, hidden], got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: contains NaN or Inf")


@dataclass
class SamplingParams:
    steps: int = 50
    seed: int = 0
    cfg_range: tuple[float, float] = (0.0, 1.0)
    sigmas: Sequence[float] | None = None  # explicit schedule (few-step / distilled checkpoints)
    step_cache: StepCacheParams = field(default_factory=StepCacheParams)  # off unless threshold > 0

    def validate(self) -> None:
        validate_schedule(self.steps, self.sigmas)
        self.step_cache.validate()
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be an integer in [0, 2**63), got {self.seed!r}")
        self.cfg_range = validate_cfg_range(self.cfg_range)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) if self.sigmas is not None else self.steps


@dataclass
class ImageDenoiseRequest:
    """MammothModa2 text-to-image / editing request for the DiT stage."""

    request_id: str
    text: torch.Tensor  # [Lt, D] averaged planner hidden states of the prompt's text tokens
    image: torch.Tensor | None  # [Li, D] ... of the planned visual tokens
    negative: torch.Tensor | None  # [Ln, D] ... of the negative prompt (all tokens)
    latent_height: int
    latent_width: int
    ref_latents: list[torch.Tensor] = field(default_factory=list)  # editing: [C, h, w] each
    text_guidance: float = 5.0
    image_guidance: float = 2.0
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def validate(self, *, max_ref_images: int = 5) -> None:
        _check_condition("text_condition", self.text, required=True)
        _check_condition("image_condition", self.image, required=False)
        self.text_guidance = validate_scale("text_guidance", self.text_guidance)
        self.image_guidance = validate_scale("image_guidance", self.image_guidance)
        _check_condition("negative_condition", self.negative, required=self.text_guidance > 1.0)
        if len(self.ref_latents) > max_ref_images:
            raise ValueError(f"reference_images: at most {max_ref_images}, got {len(self.ref_latents)}")
        for i, ref in enumerate(self.ref_latents):
            if ref.ndim != 3 or not torch.isfinite(ref).all():
                raise ValueError(f"reference_images[{i}]: expected finite [C, h, w] latents")
        _check_latent_dims(self.latent_height, self.latent_width)
        self.sampling.validate()


@dataclass
class VideoDenoiseRequest:
    """MammothModa2.5 text-to-video / video-editing request for the DiT stage."""

    request_id: str
    prompt: torch.Tensor  # [L, D] planner last hidden states of the prompt
    negative: torch.Tensor | None  # [Ln, D] ... of the negative prompt
    latent_frames: int
    latent_height: int
    latent_width: int
    source_latents: torch.Tensor | None = None  # video editing: [C, F, h, w]
    guidance: float = 5.0
    context_guidance: float = 1.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # ByT5 states [Lg, 1472] of the quoted text in the prompt / negative prompt (glyph
    # checkpoints, ``enable_byt5``); None when there is none, as the official pads it to nothing.
    glyph: torch.Tensor | None = None
    negative_glyph: torch.Tensor | None = None

    def validate(self, *, glyph_dim: int | None = None) -> None:
        """``glyph_dim``: the checkpoint's glyph width, None when it has no glyph mapper."""
        _check_condition("prompt_condition", self.prompt, required=True)
        self.guidance = validate_scale("guidance", self.guidance)
        self.context_guidance = validate_scale("context_guidance", self.context_guidance)
        # Official: CFG (and with it every negative branch) is on only when guidance > 1.
        _check_condition("negative_condition", self.negative, required=self.guidance > 1.0)
        for name, glyph in (("glyph_condition", self.glyph), ("negative_glyph_condition", self.negative_glyph)):
            _check_condition(name, glyph, required=False)
            if glyph is None:
                continue
            if glyph_dim is None:
                raise ValueError(f"{name}: this checkpoint has no ByT5 glyph mapper (enable_byt5 is off)")
            if glyph.shape[1] != glyph_dim:
                raise ValueError(f"{name}: expected [tokens, {glyph_dim}], got {tuple(glyph.shape)}")
        if self.source_latents is not None and (
            self.source_latents.ndim != 4 or not torch.isfinite(self.source_latents).all()
        ):
            raise ValueError("source_video: expected finite [C, F, h, w] latents")
        if not isinstance(self.latent_frames, int) or self.latent_frames < 1:
            raise ValueError(f"frames: need at least one latent frame, got {self.latent_frames!r}")
        _check_latent_dims(self.latent_height, self.latent_width)
        self.sampling.validate()


def _check_latent_dims(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 2 or value % 2:
            raise ValueError(f"{name}: latent size must be an even integer >= 2, got {value!r}")
