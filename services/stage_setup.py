"""What a stage needs from the serving config before it starts, for every transport.

The Serve applications (``services.apps``), the deploy checks and the in-process pipeline
(``services.local``) all build their stages from these: the model directory of a configured
model (tiny presets written once into the cache), the media decode bounds and the DiT engine
config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vae_worker.media import MediaLimits

from .config import ServeConfig
from .model_dir import ModelIndex, init_random, read_index
from .presets import get_preset
from .stages.lanes import Lanes, lane_threads, resolve_lanes

if TYPE_CHECKING:  # the planner replica and the ingress import this module: no diffusers there
    from dit_worker.engine import DiTEngineConfig


def media_limits(cfg: ServeConfig) -> MediaLimits:
    """The media stage's decode bounds from the config (output sizes are checked in ``jobs``)."""
    limits = cfg.ingress.limits
    return MediaLimits(max_bytes=limits.max_image_bytes, max_video_bytes=limits.max_video_bytes,
                       max_pixels=limits.max_input_pixels, max_frames=limits.max_input_video_frames,
                       max_duration_s=limits.max_input_video_seconds,
                       decode_timeout_s=limits.media_decode_timeout_s)


def ensure_model(cfg: ServeConfig, name: str) -> ModelIndex:
    """The model directory of ``cfg.models[name]``; tiny presets are built once into the cache."""
    settings = cfg.models[name]
    directory = settings.directory()
    if settings.preset is not None and not (directory / "model_index.json").is_file():
        preset = get_preset(settings.preset)
        if not preset.tiny:
            raise FileNotFoundError(f"models.{name}: {directory} has no model; real presets need their weights")
        tmp = directory.with_name(directory.name + ".partial")
        init_random(tmp, settings.preset, seed=0, overwrite=True)
        tmp.replace(directory)
    return read_index(directory)


def stage_lanes(cfg: ServeConfig, stage: str) -> Lanes:
    """The worker threads of a DiT or VAE stage (``<stage>.engine.lanes`` / ``cpu_threads``)."""
    engine = getattr(cfg, stage).engine
    count = resolve_lanes(engine.lanes, cfg.resolved_device(stage), engine.cpu_threads)
    return Lanes(count, lane_threads(count, engine.cpu_threads), name=f"{stage}-lane")


def dit_engine_config(cfg: ServeConfig) -> DiTEngineConfig:
    from dit_worker.engine import DiTEngineConfig

    engine = cfg.dit.engine
    return DiTEngineConfig(device=cfg.resolved_device("dit"), dtype=cfg.resolved_dtype("dit"),
                           max_batch_rows=engine.max_batch_rows, max_latent_tokens=engine.max_latent_tokens,
                           max_batch_tokens=engine.max_batch_tokens, mixed_shapes=engine.mixed_shapes,
                           max_padding=engine.max_padding,
                           max_ref_images=cfg.ingress.limits.max_reference_images,
                           attention_backend=engine.attention_backend, compile=engine.compile)
