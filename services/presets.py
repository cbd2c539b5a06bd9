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

from .families import get_family

STAGES = ("planner", "dit", "vae")
_STAGE_MODULES = {"planner": "planner.presets", "dit": "dit_worker.presets", "vae": "vae_worker.presets"}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # a registered family (``services.families``)
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)  # over the family's defaults
    tiny: bool = False

    @property
    def tasks(self) -> tuple[str, ...]:
        return get_family(self.family).tasks


_IMAGE = get_family("mammoth2")
_VIDEO = get_family("mammoth25")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-mammoth2", _IMAGE.name, "CPU-sized MammothModa2 (image), random weights",
               {**_IMAGE.defaults, "width": 256, "height": 256, "steps": 8, "text_guidance": 5.0,
                "ar_height": 8, "ar_width": 8, "ar_cfg_scale": 3.0}, tiny=True),
        Preset("tiny-mammoth25", _VIDEO.name, "CPU-sized MammothModa2.5 (video, MoE DiT), random weights",
               {**_VIDEO.defaults, "width": 128, "height": 128, "frames": 9, "fps": 8, "steps": 6,
                "vae_spatial_compression": 8}, tiny=True),
        Preset("mammoth2-dev", _IMAGE.name, "MammothModa2-Dev: Qwen3-VL-8B planner with generation experts, "
               "2B single-stream DiT, 16-ch VAE", dict(_IMAGE.defaults)),
        Preset("mammoth25-6b-a1b", _VIDEO.name, "MammothModa2.5 with the 6B-A1B MoE DiT", dict(_VIDEO.defaults)),
        Preset("mammoth25-20b-a3b", _VIDEO.name, "MammothModa2.5 with the 20B-A3B MoE DiT", dict(_VIDEO.defaults)),
        Preset("tiny-mammoth2-preview", "mammoth2-preview", "CPU-sized MammothModa2-Preview (Qwen2.5-VL planner), "
               "random weights", {**_IMAGE.defaults, "width": 256, "height": 256, "steps": 8, "text_guidance": 5.0,
                                  "ar_height": 8, "ar_width": 8, "ar_cfg_scale": 3.0}, tiny=True),
        Preset("mammoth2-preview", "mammoth2-preview", "MammothModa2-Preview: Qwen2.5-VL-7B planner with generation "
               "experts, single-stream DiT, 16-ch VAE", dict(_IMAGE.defaults)),
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
