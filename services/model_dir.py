"""The served model directory: ``model_index.json`` plus one HF-style subfolder per stage.

    <model>/model_index.json   family, preset, tasks, defaults, stage -> subfolder
    <model>/planner/           config.json + *.safetensors + tokenizer files (vLLM loads it)
    <model>/dit/               config.json + diffusion_pytorch_model.safetensors
    <model>/vae/               config.json + diffusion_pytorch_model.safetensors (diffusers)

Reading the index never touches weights; each stage loads its own subfolder lazily.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .presets import STAGES, available_stages, get_preset, stage_module

INDEX_NAME = "model_index.json"
FORMAT_VERSION = 1


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or malformed; the message names what."""


@dataclass(frozen=True)
class ModelIndex:
    root: Path
    family: str
    preset: str
    tasks: tuple[str, ...]
    defaults: dict[str, Any]
    stages: dict[str, str]

    def stage_path(self, stage: str) -> Path:
        if stage not in self.stages:
            raise ModelDirError(f"{self.root / INDEX_NAME}: no '{stage}' stage (has {sorted(self.stages)})")
        return self.root / self.stages[stage]


def read_index(root: str | Path) -> ModelIndex:
    root = Path(root)
    path = root / INDEX_NAME
    if not path.is_file():
        raise ModelDirError(f"{root}: not a model directory (no {INDEX_NAME})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path}: invalid JSON ({exc})") from exc
    for key in ("family", "preset", "tasks", "stages"):
        if key not in data:
            raise ModelDirError(f"{path}: missing key '{key}'")
    index = ModelIndex(root, data["family"], data["preset"], tuple(data["tasks"]), dict(data.get("defaults", {})),
                       dict(data["stages"]))
    for stage, sub in index.stages.items():
        if not (root / sub / "config.json").is_file():
            raise ModelDirError(f"{root}: stage '{stage}' has no {sub}/config.json")
    return index


def init_random(root: str | Path, preset_name: str, seed: int = 0, *, overwrite: bool = False) -> ModelIndex:
    """Write a complete random-weight model directory for every stage that exists.

    Deterministic for a given (preset, seed): each stage draws from its own seed offset, so
    adding a stage never changes another stage's weights.
    """
    preset = get_preset(preset_name)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ModelDirError(f"{root}: exists and is not empty (pass overwrite=True / --force)")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    stages: dict[str, str] = {}
    for offset, stage in enumerate(STAGES):
        if stage not in available_stages():
            continue
        stage_module(stage).write_random_checkpoint(preset_name, root / stage, seed + 1000 * offset)
        stages[stage] = stage
    index = {
        "_class_name": "MammothServeModel",
        "format_version": FORMAT_VERSION,
        "family": preset.family,
        "preset": preset.name,
        "tasks": list(preset.tasks),
        "defaults": preset.defaults,
        "stages": stages,
        "seed": seed,
    }
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return read_index(root)
