"""What crosses stage boundaries inside the pipeline.

Tensors travel as numpy arrays: Ray puts them in the object store once and readers map them
zero-copy (a pickled torch tensor would be copied at every hop, FACTS §3). The same objects
are what the stage gRPC services convert to and from ``protos`` messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ImageConditions:
    """Planner -> DiT for MammothModa2: averaged hidden states split by token kind."""

    text: np.ndarray  # [Lt, D] float32
    image: np.ndarray | None  # [Li, D]
    negative: np.ndarray | None  # [Ln, D]
    planned_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0  # the conditional prompt's tokens (reference visual tokens included)


@dataclass
class PromptConditions:
    """Planner -> DiT for MammothModa2.5: last hidden states of prompt and negative prompt."""

    prompt: np.ndarray  # [L, D]
    negative: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class MediaGeometry:
    """What an orchestrator needs of encoded media to shape the output: a few numbers."""

    width: int
    height: int
    frames: int = 1
    fps: float = 0.0


@dataclass
class EncodedMedia:
    """VAE -> DiT (latents) and -> planner (fitted pixels, or MammothTok codes) for editing."""

    latents: list[np.ndarray]  # images: one [C, h, w] each; video: one [C, f, h, w]
    pixels: list[np.ndarray]  # the fitted uint8 inputs: [H, W, 3] each, or one [F, H, W, 3]
    width: int
    height: int
    frames: int = 1
    fps: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    # images of a model with a MammothTok: one int32 [rows, cols] code grid per image (the
    # planner writes them into its prompt instead of showing the pixels); empty otherwise
    visual_codes: list[np.ndarray] = field(default_factory=list)

    @property
    def geometry(self) -> MediaGeometry:
        return MediaGeometry(self.width, self.height, self.frames, self.fps)

    @classmethod
    def merge(cls, parts: Sequence[EncodedMedia]) -> EncodedMedia | None:
        """One edit's references, encoded one per call, as one input (encode times add up)."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        timings = {k: sum(p.timings.get(k, 0.0) for p in parts) for k in first.timings}
        return cls([a for p in parts for a in p.latents], [a for p in parts for a in p.pixels], first.width,
                   first.height, first.frames, first.fps, timings, [c for p in parts for c in p.visual_codes])


@dataclass
class DenoiseStepEvent:
    step: int
    total: int
    preview_latents: np.ndarray | None = None


@dataclass
class DenoiseDone:
    """The final latents, as a handle: an ObjectRef under Ray (wrapped in a list so Ray does
    not resolve it on the way through the ingress), the array itself in-process."""

    latents: Any
    shape: tuple[int, ...]
    steps: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class MediaOutput:
    data: bytes
    mime_type: str
    width: int
    height: int
    frames: int = 1
    fps: int = 0
    timings: dict[str, float] = field(default_factory=dict)
