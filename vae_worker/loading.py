"""Strict loading of diffusers VAE folders (``config.json`` + safetensors).

diffusers' ``from_pretrained`` only *warns* about missing or unexpected tensors (a missing one is
silently left at its random initial value) and reports shape mismatches as a generic
``RuntimeError``. A serving process must refuse such a folder instead, so the safetensors headers
are checked against the model's expected state (built on the meta device, no memory) before
diffusers reads a byte of weights, and every failure is a ``VAELoadError`` naming the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vae_worker.presets import build_model, model_class

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class VAELoadError(ValueError):
    """A VAE folder that cannot be served as it is; the message names the file or tensor."""


def read_vae_config(directory: str | Path, expected_class: str | None = None) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise VAELoadError(f"missing {CONFIG_NAME} in {directory}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VAELoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise VAELoadError(f"{path}: expected a JSON object")
    name = config.get("_class_name")
    if expected_class is not None and name != expected_class:
        raise VAELoadError(f"{path}: _class_name is {name!r}, this stage needs {expected_class!r}")
    try:
        model_class(config)
    except ValueError as exc:
        raise VAELoadError(f"{path}: {exc}") from exc
    return config


def _header_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (no tensor data is read)."""
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise VAELoadError(f"{index}: malformed index ({exc})") from exc
        files = sorted({directory / name for name in weight_map.values()})
    elif (directory / WEIGHTS_NAME).is_file():
        files = [directory / WEIGHTS_NAME]
    else:
        raise VAELoadError(f"missing {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {directory}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is no dict
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise VAELoadError(f"{file}: unreadable safetensors file ({exc})") from exc
    return shapes


def check_checkpoint(directory: str | Path, config: dict[str, Any]) -> None:
    """Raise ``VAELoadError`` unless the folder holds exactly the tensors ``config`` needs."""
    directory = Path(directory)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    found = _header_shapes(directory)
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise VAELoadError(f"missing tensor '{missing[0]}'{more} in {directory}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise VAELoadError(f"unexpected tensor '{unexpected[0]}'{more} in {directory}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise VAELoadError(
                f"tensor '{name}' has shape {found[name]} in {directory}, the config expects {shape}"
            )


def load_vae(directory: str | Path, expected_class: str, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Check, then load through diffusers' ``from_pretrained``; returns (eval model, config)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise VAELoadError(f"VAE directory {directory} does not exist")
    config = read_vae_config(directory, expected_class)
    check_checkpoint(directory, config)
    cls = model_class(config)
    try:
        model = cls.from_pretrained(str(directory), torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise VAELoadError(f"{directory}: diffusers could not load the VAE ({exc})") from exc
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise VAELoadError(f"tensor '{name}' in {directory} holds NaN or Inf values")
    return model.to(device).eval(), config
