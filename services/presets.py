"""The preset registry: named model sizes, composed from each stage package's own presets.

Each stage package owns its architecture and exposes ``<stage>.presets`` with
``stage_config(preset)``, ``count_parameters(preset)`` and
``write_random_checkpoint(preset, directory, seed)``. This module only knows which stages
and task defaults make up a preset; it never builds a module itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

STAGES = ("planner", "dit", "vae")
_STAGE_MODULES = {"planner": "planner.presets", "dit": "dit_worker.presets", "vae": "vae_worker.presets"}

# The official MammothModa2 processor's default negative prompt (the DiT was tuned with it);
# a per-request field overrides it.
DEFAULT_IMAGE_NEGATIVE_PROMPT = (
    "deformed, blurry, over saturation, bad anatomy, disfigured, poorly drawn face, mutation, mutated, "
    "extra_limb, ugly, poorly drawn hands, fused fingers, messy drawing, broken legs censor, censored, "
    "censor_bar Create an image from the instruction."
)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "mammoth2" (image) or "mammoth25" (video)
    description: str
    tasks: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False


_IMAGE_TASKS = ("text_to_image", "image_edit", "understand")
_VIDEO_TASKS = ("text_to_video", "video_edit", "understand")

_MAMMOTH2_DEFAULTS = {
    "width": 1024, "height": 1024, "steps": 50, "text_guidance": 9.0, "image_guidance": 2.0,
    "cfg_range": [0.0, 1.0], "ar_height": 32, "ar_width": 32, "ar_cfg_scale": 7.0,
    "vae_spatial_compression": 8, "patch_size": 2,
    "negative_prompt": DEFAULT_IMAGE_NEGATIVE_PROMPT,
}
_MAMMOTH25_DEFAULTS = {
    "width": 832, "height": 480, "frames": 81, "fps": 16, "steps": 50, "guidance": 5.0,
    "context_guidance": 1.0, "cfg_range": [0.0, 1.0], "negative_prompt": "",
    # The released 2.5 checkpoints pair the DiT with Wan2.2's 48-channel, 16x VAE.
    "vae_spatial_compression": 16, "patch_size": 2,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-mammoth2", "mammoth2", "CPU-sized MammothModa2 (image), random weights", _IMAGE_TASKS,
               {**_MAMMOTH2_DEFAULTS, "width": 256, "height": 256, "steps": 8, "text_guidance": 5.0,
                "ar_height": 8, "ar_width": 8, "ar_cfg_scale": 3.0}, tiny=True),
        Preset("tiny-mammoth25", "mammoth25", "CPU-sized MammothModa2.5 (video, MoE DiT), random weights",
               _VIDEO_TASKS, {**_MAMMOTH25_DEFAULTS, "width": 128, "height": 128, "frames": 9, "fps": 8,
                              "steps": 6, "vae_spatial_compression": 8}, tiny=True),
        Preset("mammoth2-dev", "mammoth2", "MammothModa2-Dev: Qwen3-VL-8B planner with generation experts, "
               "2B single-stream DiT, 16-ch VAE", _IMAGE_TASKS, dict(_MAMMOTH2_DEFAULTS)),
        Preset("mammoth25-6b-a1b", "mammoth25", "MammothModa2.5 with the 6B-A1B MoE DiT", _VIDEO_TASKS,
               dict(_MAMMOTH25_DEFAULTS)),
        Preset("mammoth25-20b-a3b", "mammoth25", "MammothModa2.5 with the 20B-A3B MoE DiT", _VIDEO_TASKS,
               dict(_MAMMOTH25_DEFAULTS)),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown {name!r}; choose one of {sorted(PRESETS)}") from None


def stage_module(stage: str) -> ModuleType | None:
    """The stage's presets module, or None while that stage does not exist yet."""
    try:
        return importlib.import_module(_STAGE_MODULES[stage])
    except ModuleNotFoundError as exc:
        if exc.name and _STAGE_MODULES[stage].startswith(exc.name):
            return None
        raise


def available_stages() -> list[str]:
    return [s for s in STAGES if stage_module(s) is not None]


def parameter_report(names: list[str] | None = None) -> dict[str, Any]:
    """Total and active parameters per preset and stage, built on the meta device (no memory)."""
    report: dict[str, Any] = {}
    for name in names or list(PRESETS):
        preset = get_preset(name)
        stages = {}
        for stage in available_stages():
            counts = stage_module(stage).count_parameters(name)
            condition = int(counts.get("condition_total", 0))
            stages[stage] = {"total": int(counts["total"]) - condition, "active": int(counts["active"]) - condition}
            if condition:  # the DiT's once-per-request condition encoder, reported on its own line
                stages[f"{stage}_condition"] = {"total": condition, "active": condition}
        report[name] = {
            "family": preset.family,
            "description": preset.description,
            "stages": stages,
            "total": sum(s["total"] for s in stages.values()),
            "active": sum(s["active"] for s in stages.values()),
        }
    return report
