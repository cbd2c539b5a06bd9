"""Flow-matching Euler schedules for both model families, on diffusers' scheduler.

Two time conventions meet here:

- MammothModa2 (image) trains with ``t`` in [0, 1], 0 = noise, 1 = data, the velocity ``v``
  pointing towards data, ``x += (t_next - t) * v``; its schedule is ``t`` linear over
  ``[0, 1)`` warped by the dynamic shift ``t' = t / (m - m*t + t)`` with
  ``m = sqrt(latent_h * latent_w) / 40``.
- MammothModa2.5 (video) uses diffusers' ``FlowMatchEulerDiscreteScheduler`` as is:
  ``sigma`` from 1 (noise) to 0, the model sees ``sigma * 1000``, and its output is stepped
  with ``x += (sigma_next - sigma) * out``.

With ``sigma = 1 - t`` the image warp is exactly diffusers' static shift
``shift*s / (1 + (shift-1)*s)`` with ``shift = m``, and the image velocity is the negated
diffusers model output, so both families run on the same diffusers scheduler (the match is
proven in tests/dit/test_sampling.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

MIN_STEPS = 1
MAX_STEPS = 200


def image_time_shift(latent_height: int, latent_width: int) -> float:
    """MammothModa2's resolution-dependent shift ``m`` (1.0 at 320x320 px, 3.2 at 1024x1024 px)."""
    return math.sqrt(latent_height * latent_width) / 40.0


def validate_schedule(steps: int, sigmas: Sequence[float] | None) -> None:
    """Reject schedules a scheduler would silently mangle; messages name the field."""
    if sigmas is not None:
        values = list(sigmas)
        if not MIN_STEPS <= len(values) <= MAX_STEPS:
            raise ValueError(f"sigmas: need {MIN_STEPS}..{MAX_STEPS} values, got {len(values)}")
        if not all(math.isfinite(s) and 0.0 < s <= 1.0 for s in values):
            raise ValueError("sigmas: every value must be finite and in (0, 1]")
        if any(b >= a for a, b in zip(values, values[1:])):
            raise ValueError("sigmas: values must be strictly decreasing")
        return
    if not isinstance(steps, int) or not MIN_STEPS <= steps <= MAX_STEPS:
        raise ValueError(f"steps: must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {steps!r}")


@dataclass
class FlowMatchSampler:
    """One request's position on its schedule; steps its latents with diffusers' Euler step.

    ``velocity_sign`` is -1 for models that predict the data-ward velocity in ``t`` (image
    family) and +1 for models that predict in the diffusers sigma direction (video family).
    """

    scheduler: FlowMatchEulerDiscreteScheduler
    model_time_scale: str  # "t01" (model sees 1 - sigma) or "sigma1000" (model sees sigma * 1000)
    velocity_sign: float

    @property
    def num_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def step_index(self) -> int:
        index = self.scheduler.step_index
        return 0 if index is None else index

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    def model_timestep(self) -> float:
        """The current timestep in the units the model was trained with."""
        sigma = float(self.scheduler.sigmas[self.step_index])
        return 1.0 - sigma if self.model_time_scale == "t01" else sigma * self.scheduler.config.num_train_timesteps

    def step(self, model_output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        timestep = self.scheduler.timesteps[self.step_index]
        out = model_output if self.velocity_sign > 0 else -model_output
        return self.scheduler.step(out, timestep, latents, return_dict=False)[0]


def image_sampler(latent_height: int, latent_width: int, steps: int,
                  sigmas: Sequence[float] | None = None) -> FlowMatchSampler:
    """MammothModa2 schedule: linear ``t`` with the dynamic shift, or explicit (distilled) sigmas."""
    validate_schedule(steps, sigmas)
    if sigmas is not None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        scheduler.set_timesteps(sigmas=list(sigmas))
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=image_time_shift(latent_height, latent_width))
        linear_t = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)[:-1]
        scheduler.set_timesteps(sigmas=(1.0 - linear_t).tolist())
    return FlowMatchSampler(scheduler, model_time_scale="t01", velocity_sign=-1.0)


def video_sampler(steps: int, scheduler_config: dict | None = None,
                  sigmas: Sequence[float] | None = None) -> FlowMatchSampler:
    """MammothModa2.5 schedule: diffusers' flow-match Euler built from the checkpoint's
    ``scheduler_config.json`` (shift etc.), exactly as the reference pipeline builds it."""
    validate_schedule(steps, sigmas)
    if sigmas is not None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        scheduler.set_timesteps(sigmas=list(sigmas))
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config or {})
        scheduler.set_timesteps(steps)
    return FlowMatchSampler(scheduler, model_time_scale="sigma1000", velocity_sign=1.0)
