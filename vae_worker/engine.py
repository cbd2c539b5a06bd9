"""The VAE stage engines: normalised latents <-> uint8 pixels, for images and for video.

Normalisation mirrors the official MammothModa2 code so the DiT sees what it was trained on:
  image (AutoencoderKL):   z = (mode - shift_factor) * scaling_factor;  decode inverts it.
  video (AutoencoderKLWan): z = (mode - latents_mean) / latents_std (per channel); decode inverts.
Pixels go in as uint8 and are mapped to [-1, 1]; decoded values are clamped to [-1, 1] and
rounded to uint8 (``round((x + 1) / 2 * 255)``), as diffusers' image processor does.

Encoding uses the posterior *mode* (its mean). The official 2.5 pipeline does so for source videos
(``sample_mode="argmax"``); the official MammothModa2 code *samples* reference-image latents
(``latent_dist.sample()``), which makes a served edit depend on hidden RNG state. We use the mode
for both so identical requests give identical latents; the difference is one posterior std (small
for the trained VAE).

Every call picks slicing/tiling from ``memory_budget_mb`` (see ``vae_worker.memory``). diffusers
keeps the tiling switches on the module, so calls from several threads share the model only
while they need the same switches and their estimated activations fit the budget together
(``_using``); the video VAE keeps its causal feature cache on the module too, so its calls run
one at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammoth_common.cpu import warn_if_slow
from vae_worker import memory
from vae_worker.loading import load_vae
from vae_worker.preview import apply_linear_map, fit_linear_map

DEFAULT_MEMORY_BUDGET_MB = 4096


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def _to_uint8_(x: torch.Tensor) -> torch.Tensor:
    """In place on a float tensor the caller owns (a decoded video is the largest tensor here)."""
    return x.clamp_(-1, 1).add_(1.0).mul_(127.5).round_().to(torch.uint8)


def _as_uint8_tensor(data: Any, ndim: int, what: str) -> torch.Tensor:
    """uint8 Tensor / ndarray / list of PIL images or arrays -> uint8 Tensor with ``ndim`` dims."""
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{what}: empty batch")
        arrays = [np.asarray(item.convert("RGB") if hasattr(item, "convert") else item) for item in data]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"{what}: all items of a batch must have one shape, got {sorted(shapes)}")
        data = np.stack(arrays)
    tensor = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    if tensor.dtype != torch.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got {tensor.dtype}")
    if tensor.ndim != ndim or tensor.shape[-1] != 3:
        raise ValueError(f"{what}: expected shape with {ndim} dims ending in 3 channels, got {tuple(tensor.shape)}")
    return tensor


class _VAEEngine:
    """Shared plumbing: device/dtype, budget, the model's sharing between threads, lazily fitted
    preview map."""

    expected_class: str = ""
    _preview_fit_size: int = 64
    concurrent_calls: bool = False  # whether calls from several threads may run the model at once

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> None:
        warn_if_slow(dtype, device, f"{type(self).__name__} dtype")
        model = model.to(device=device)
        if any(p.dtype != dtype for p in model.parameters()):
            model = model.to(dtype=dtype)
        self.model = model.eval()
        self.config = dict(config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.memory_budget_mb = float(memory_budget_mb)
        self._lock = threading.RLock()  # the preview map, fitted once
        self._model_free = threading.Condition()
        self._calls = 0  # calls running the model now ...
        self._call_bytes = 0  # ... their estimated activation bytes
        self._plan_key: tuple[bool, int | None] | None = None  # the switches they run under
        self._preview: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_plan: memory.MemoryPlan | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB):
        """Load a diffusers VAE folder strictly (a missing/mis-shaped tensor is a ``VAELoadError``)."""
        model, config = load_vae(path, cls.expected_class, device=device, dtype=dtype)
        return cls(model, config, device=device, dtype=dtype, memory_budget_mb=memory_budget_mb)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 2**20)

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def temporal_compression(self) -> int:
        return 1

    @property
    def _itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _check_pixels_grid(self, height: int, width: int) -> None:
        f = self.spatial_compression
        if height % f or width % f or height == 0 or width == 0:
            raise ValueError(f"pixel size {height}x{width} is not a positive multiple of {f}")

    def prepare_preview(self) -> None:
        """Fit the preview map now (one small encode), e.g. at replica start, not on the first step."""
        self._preview_map()

    def _preview_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._preview is None:
                self._preview = fit_linear_map(self._encode_images_for_preview, self.spatial_compression,
                                               size=self._preview_fit_size)
            return self._preview

    def _encode_images_for_preview(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_many(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decode several requests' latents ([n_i, ...] each), batching those whose per-sample shape
        matches (slicing still applies if the batch outgrows the budget); results keep input order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(latents):
            groups.setdefault(tuple(item.shape[1:]), []).append(index)
        results: list[torch.Tensor | None] = [None] * len(latents)
        for indices in groups.values():
            decoded = self.decode(torch.cat([latents[i] for i in indices]))
            offset = 0
            for i in indices:
                n = latents[i].shape[0]
                results[i] = decoded[offset:offset + n]
                offset += n
        return results  # type: ignore[return-value]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def _using(self, plan: memory.MemoryPlan) -> Iterator[None]:
        """Run the model under ``plan``; waits while other calls need other switches or would
        overrun ``memory_budget_mb`` together (a lone call always runs)."""
        key = (plan.slice_batch, plan.tile)
        with self._model_free:
            while self._calls and not (self.concurrent_calls and key == self._plan_key
                                       and self._call_bytes + plan.estimate_bytes <= self.memory_budget_bytes):
                self._model_free.wait()
            if not self._calls:
                self._apply_plan(plan)
                self._plan_key = key
            self.last_plan = plan
            self._calls += 1
            self._call_bytes += plan.estimate_bytes
        try:
            yield
        finally:
            with self._model_free:
                self._calls -= 1
                self._call_bytes -= plan.estimate_bytes
                self._model_free.notify_all()

    def _apply_plan(self, plan: memory.MemoryPlan) -> None:
        raise NotImplementedError


class ImageVAE(_VAEEngine):
    """MammothModa2 image VAE (diffusers ``AutoencoderKL``, 16 channels, 8x)."""

    expected_class = "AutoencoderKL"
    concurrent_calls = True  # AutoencoderKL keeps nothing on the module between calls

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    @property
    def shift_factor(self) -> float:
        return float(self.config.get("shift_factor") or 0.0)

    @property
    def scaling_factor(self) -> float:
        value = self.config.get("scaling_factor")
        return 1.0 if value is None else float(value)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor

    def plan_for(self, batch: int, height: int, width: int, *, decode: bool) -> memory.MemoryPlan:
        """Slicing/tiling for a batch of ``height`` x ``width`` pixel images."""
        def per_sample(h: int, w: int) -> int:
            return memory.kl_bytes(self.config, h, w, self._itemsize, decode=decode)
        return memory.plan(per_sample, batch, height, width, self.memory_budget_bytes,
                           output_bytes=3 * height * width * self._itemsize)

    def _apply_plan(self, plan: memory.MemoryPlan) -> None:
        self.model.use_slicing = plan.slice_batch
        self.model.use_tiling = plan.tile is not None
        if plan.tile is not None:
            self.model.tile_sample_min_size = plan.tile
            self.model.tile_latent_min_size = plan.tile // self.spatial_compression
            self.model.tile_overlap_factor = 0.25

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor | np.ndarray | Sequence[Any]) -> torch.Tensor:
        """uint8 [B,H,W,3] (or a list of same-size PIL images) -> normalised latents [B,C,H/8,W/8]."""
        pixels = _as_uint8_tensor(pixels, 4, "image")
        batch, height, width, _ = pixels.shape
        self._check_pixels_grid(height, width)
        x = _to_unit_range(pixels).permute(0, 3, 1, 2).to(self.device, self.dtype)
        with self._using(self.plan_for(batch, height, width, decode=False)):
            z = self.model.encode(x).latent_dist.mode()
        return self.normalize(z.float())

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,C,h,w] -> float pixels in [-1,1], [B,3,H,W] (before rounding)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B,{self.latent_channels},h,w], got {tuple(latents.shape)}")
        batch, _, h, w = latents.shape
        f = self.spatial_compression
        z = self.denormalize(latents.float()).to(self.device, self.dtype)
        with self._using(self.plan_for(batch, h * f, w * f, decode=True)):
            x = self.model.decode(z).sample
        return x.float().clamp(-1, 1)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,C,h,w] -> uint8 [B,8h,8w,3]."""
        return _to_uint8_(self.decode_float(latents)).permute(0, 2, 3, 1).cpu().contiguous()

    def _encode_images_for_preview(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)

    def preview(self, latents: torch.Tensor, upsample: int = 1) -> torch.Tensor:
        """Normalised latents [B,C,h,w] -> uint8 [B,h*u,w*u,3] through the fixed linear map."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B,{self.latent_channels},h,w], got {tuple(latents.shape)}")
        weight, bias = self._preview_map()
        return apply_linear_map(latents, weight, bias, upsample)


class VideoVAE(_VAEEngine):
    """MammothModa2.5 video VAE (diffusers ``AutoencoderKLWan``: causal 3D, 4x time, 8x space)."""

    expected_class = "AutoencoderKLWan"
    concurrent_calls = False  # its causal feature cache lives on the module during a call
    _preview_fit_size = 32  # the 3D encoder is costlier; 24 x 4x4 latent pixels still over-determine 17 unknowns

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(model, config, **kwargs)
        channels = self.latent_channels
        self._mean = torch.tensor(self.config["latents_mean"], dtype=torch.float32).view(1, channels, 1, 1, 1)
        self._std = torch.tensor(self.config["latents_std"], dtype=torch.float32).view(1, channels, 1, 1, 1)

    @property
    def latent_channels(self) -> int:
        return int(self.config["z_dim"])

    @property
    def spatial_compression(self) -> int:
        return int(self.config.get("scale_factor_spatial") or 8)

    @property
    def temporal_compression(self) -> int:
        return int(self.config.get("scale_factor_temporal") or 4)

    def num_latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_compression + 1

    def num_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.temporal_compression + 1

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._mean.to(z.device)) / self._std.to(z.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._std.to(z.device) + self._mean.to(z.device)

    def plan_for(self, batch: int, frames: int, height: int, width: int) -> memory.MemoryPlan:
        def per_sample(h: int, w: int) -> int:
            return memory.wan_bytes(self.config, frames, h, w, self._itemsize)
        return memory.plan(per_sample, batch, height, width, self.memory_budget_bytes,
                           output_bytes=3 * frames * height * width * self._itemsize)

    def _apply_plan(self, plan: memory.MemoryPlan) -> None:
        self.model.use_slicing = plan.slice_batch
        self.model.use_tiling = plan.tile is not None
        if plan.tile is not None:
            self.model.tile_sample_min_height = self.model.tile_sample_min_width = plan.tile
            self.model.tile_sample_stride_height = self.model.tile_sample_stride_width = plan.stride

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B,F,H,W,3] with F = 4k+1 -> normalised latents [B,C,k+1,H/8,W/8]."""
        frames = _as_uint8_tensor(frames, 5, "video")
        batch, count, height, width, _ = frames.shape
        if count % self.temporal_compression != 1:
            raise ValueError(f"video has {count} frames; the causal VAE needs 4k+1 frames")
        self._check_pixels_grid(height, width)
        x = _to_unit_range(frames).permute(0, 4, 1, 2, 3).to(self.device, self.dtype)
        with self._using(self.plan_for(batch, count, height, width)):
            z = self.model.encode(x).latent_dist.mode()
        return self.normalize(z.float())

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,C,T,h,w] -> float video in [-1,1], [B,3,4(T-1)+1,8h,8w]."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B,{self.latent_channels},T,h,w], got {tuple(latents.shape)}")
        batch, _, t, h, w = latents.shape
        f = self.spatial_compression
        z = self.denormalize(latents.float()).to(self.device, self.dtype)
        with self._using(self.plan_for(batch, self.num_frames(t), h * f, w * f)):
            x = self.model.decode(z).sample
        return x.float().clamp(-1, 1)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,C,T,h,w] -> uint8 [B,4(T-1)+1,8h,8w,3]."""
        return _to_uint8_(self.decode_float(latents)).permute(0, 2, 3, 4, 1).cpu().contiguous()

    def _encode_images_for_preview(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images[:, None])[:, :, 0]

    def preview(self, latents: torch.Tensor, upsample: int = 1) -> torch.Tensor:
        """Normalised latents [B,C,T,h,w] -> uint8 [B,T,h*u,w*u,3] through the fixed linear map."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B,{self.latent_channels},T,h,w], got {tuple(latents.shape)}")
        weight, bias = self._preview_map()
        return apply_linear_map(latents.transpose(1, 2), weight, bias, upsample)
