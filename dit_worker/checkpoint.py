"""Model-directory I/O for the DiT stage: ``config.json`` + safetensors, read lazily and strictly.

The config is read first and the module is built on the meta device (no memory); tensors are
then read one by one from memory-mapped safetensors files, so peak memory is one copy of the
weights. Any missing, unexpected, mis-shaped or unreadable tensor is a ``CheckpointError`` that
names the tensor (and the file), never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mammoth_common.dataclass_config import DataclassConfig as _BaseConfig

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
WEIGHTS_NAME = f"{WEIGHTS_STEM}.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A model directory that cannot be loaded as it is; the message names the culprit."""


@dataclasses.dataclass
class DataclassConfig(_BaseConfig):
    """The DiT's configs: ``mammoth_common.dataclass_config.DataclassConfig`` whose unknown keys
    are a ``CheckpointError`` like every other problem of a model directory."""

    error: ClassVar[type[Exception]] = CheckpointError


C = TypeVar("C", bound=_BaseConfig)


def save_pretrained(model: nn.Module, config: DataclassConfig, directory: str | Path) -> Path:
    """Write ``config.json`` and one safetensors file (contiguous, de-aliased tensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    state = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def read_config_json(directory: str | Path) -> dict:
    """``<directory>/config.json`` as a dict; a missing or broken file is a ``CheckpointError``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"missing {CONFIG_NAME} in {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def read_config(config_cls: type[C], directory: str | Path) -> C:
    return config_cls.from_dict(read_config_json(directory))


def _weight_files(directory: Path, stem: str = WEIGHTS_STEM) -> dict[str, Path]:
    """Map tensor name -> file, from a sharded index or a single weights file (``<stem>.safetensors``)."""
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / fname for name, fname in weight_map.items()}
    single = directory / f"{stem}.safetensors"
    if not single.is_file():
        raise CheckpointError(f"missing {single.name} (or {index.name}) in {directory}")
    try:
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}  # noqa: SIM118 - safe_open is no dict
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{single}: unreadable safetensors file ({exc})") from exc


def iter_checkpoint_tensors(directory: str | Path, names: list[str],
                            stem: str = WEIGHTS_STEM) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the named tensors lazily (one mmap'd read at a time), each file opened once."""
    directory = Path(directory)
    files = _weight_files(directory, stem)
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, file_names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    try:
                        yield name, handle.get_tensor(name)
                    except (SafetensorError, OSError) as exc:
                        raise CheckpointError(f"tensor '{name}' in {path} is unreadable ({exc})") from exc
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc


def keeps_fp32(name: str, modules: tuple[str, ...]) -> bool:
    """Whether tensor ``name`` belongs to one of the ``_keep_in_fp32_modules`` (matched by a
    whole dotted component, as diffusers matches them: ``norm1`` is not ``norm10``)."""
    parts = name.split(".")
    return any(module in parts for module in modules)


def load_state_into(model: nn.Module, directory: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, stem: str = WEIGHTS_STEM,
                    tied: tuple[str, ...] = ()) -> nn.Module:
    """Fill a (meta-device) module from a model directory, strictly and lazily.

    ``tied``: state-dict names that alias another parameter (tied embeddings); they are not in
    the files, and the caller re-ties them after loading."""
    directory = Path(directory)
    expected = {n: t for n, t in model.state_dict().items() if n not in tied}
    available = _weight_files(directory, stem)
    missing = sorted(set(expected) - set(available))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor '{missing[0]}'{more} in {directory}")
    unexpected = sorted(set(available) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor '{unexpected[0]}'{more} in {directory}")
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", ()) or ())
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_checkpoint_tensors(directory, list(expected), stem):
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"tensor '{name}' has shape {tuple(tensor.shape)} in {directory}, "
                f"the config expects {tuple(want.shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor '{name}' in {directory} holds NaN or Inf values")
        target = dtype if (dtype is not None and tensor.is_floating_point()) else want.dtype
        if tensor.is_floating_point() and keeps_fp32(name, keep_fp32):
            # Modules the reference keeps in fp32 (time embedding, modulation) run in fp32
            # whatever the file stores: a bf16 checkpoint is upcast, as diffusers' loader does.
            target = torch.float32
        # copy=True: own, aligned memory instead of views into the mmap'd file (kernels pick
        # different paths on unaligned buffers, and the file may change after load).
        state[name] = tensor.to(device=device, dtype=target, copy=True)
    result = model.load_state_dict(state, strict=not tied, assign=True)
    if tied and (set(result.missing_keys) - set(tied) or result.unexpected_keys):
        raise CheckpointError(f"{directory}: state does not fit the model ({result})")
    return model


def from_pretrained(model_cls: type[M], config_cls: type[DataclassConfig], directory: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> M:
    """Build ``model_cls(config)`` on the meta device and load its weights from ``directory``."""
    config = read_config(config_cls, directory)
    with torch.device("meta"):
        model = model_cls(config)
    load_state_into(model, directory, device=device, dtype=dtype)
    return model.eval()
