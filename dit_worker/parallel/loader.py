"""Load one rank's share of a DiT checkpoint: every dense tensor, only its experts' slices.

The model is built on the meta device, each ``moe.MoELayer`` is swapped for an
``ExpertParallelMoE`` holding the rank's slots, and tensors are read from the same
safetensors files the single-rank engine reads. Stacked expert weights are read with
``safe_open(...).get_slice`` block by block (``weight1 [D, E*F]`` by columns, ``weight2
[E*F, D]`` by rows), so no rank ever materialises the full expert tensors. Checks are the
single-rank loader's: a missing, unexpected, mis-shaped or non-finite tensor is an error
naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn

from dit_worker.checkpoint import CONFIG_NAME, CheckpointError, _weight_files
from dit_worker.families import Family, config_class_for, family_for
from dit_worker.models.moe import MoELayer

from .expert import ExpertParallelMoE
from .placement import ExpertPlacement, PlacementError

_EXPERT_WEIGHTS = ("experts.weight1", "experts.weight2")  # stacked [D, E*F] / [E*F, D]


def read_family(directory: str | Path) -> tuple[object, Family]:
    """(model config, family) of ``<model>/dit`` without building the model."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"missing {CONFIG_NAME} in {directory}")
    data = json.loads(path.read_text())
    config = config_class_for(data.get("_class_name", "")).from_dict(data)
    return config, family_for(config, directory)


def moe_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (MoELayer, ExpertParallelMoE))]


def shard_experts(model: nn.Module, placement: ExpertPlacement, rank: int,
                  group: dist.ProcessGroup | None = None) -> list[str]:
    """Replace every ``MoELayer`` of a meta-device model by its expert-parallel twin."""
    names = []
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, MoELayer):
            continue
        if layer.num_experts != placement.num_experts:
            raise PlacementError(f"num_experts: the placement has {placement.num_experts}, "
                                 f"layer {name} has {layer.num_experts}")
        shared = layer.shared_experts
        with torch.device("meta"):
            twin = ExpertParallelMoE(
                layer.experts.hidden_size, layer.num_experts, layer.top_k, layer.experts.ffn_hidden_size,
                slots=placement.for_layer(name), rank=rank, group=group,
                num_shared_experts=1 if shared is not None else 0,
                shared_ffn_hidden_size=shared.weight1.shape[0] if shared is not None else 0,
                enable_expert_bias=layer.router.expert_bias is not None,
                router_dtype={torch.float32: "fp32", torch.float64: "fp64"}[layer.router.router_dtype])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, twin)
        names.append(name)
    unknown = sorted(set(placement.layers) - set(names))
    if unknown:
        raise PlacementError(f"layers.{unknown[0]}: no such MoE layer in the model")
    return names


def load_rank_model(directory: str | Path, placement: ExpertPlacement | None, rank: int, world_size: int, *,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    group: dist.ProcessGroup | None = None) -> tuple[nn.Module, Family]:
    """This rank's model (all dense weights, its experts) from ``<model>/dit``."""
    directory = Path(directory)
    config, family = read_family(directory)
    with torch.device("meta"):
        model = family.model_cls(config)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if placement is None:
        if not layers:
            raise PlacementError(f"parallel.size: {type(model).__name__} has no MoE layers to spread over ranks")
        placement = ExpertPlacement.contiguous(layers[0].num_experts, world_size)
    if placement.world_size != world_size:
        raise PlacementError(f"placement_file: written for {placement.world_size} ranks, the group has {world_size}")
    shard_experts(model, placement, rank, group)
    _load_sharded(model, directory, device=device, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), family


def _load_sharded(model: nn.Module, directory: Path, *, device, dtype: torch.dtype) -> None:
    expected = model.state_dict()
    available = _weight_files(directory)
    missing = sorted(set(expected) - set(available))
    if missing:
        raise CheckpointError(f"missing tensor '{missing[0]}' in {directory}")
    unexpected = sorted(set(available) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected tensor '{unexpected[0]}' in {directory}")
    sharded = {f"{name}.{suffix}": module for name, module in model.named_modules()
               if isinstance(module, ExpertParallelMoE) for suffix in _EXPERT_WEIGHTS}
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", ()) or ())
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(available[name], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    want = expected[name]
                    try:
                        if name in sharded:
                            tensor = _read_slots(handle.get_slice(name), sharded[name], name, want.shape)
                        else:
                            tensor = handle.get_tensor(name)
                    except (SafetensorError, OSError) as exc:
                        raise CheckpointError(f"tensor '{name}' in {path} is unreadable ({exc})") from exc
                    if tuple(tensor.shape) != tuple(want.shape):
                        raise CheckpointError(f"tensor '{name}' has shape {tuple(tensor.shape)} in {directory}, "
                                              f"the config expects {tuple(want.shape)}")
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise CheckpointError(f"tensor '{name}' in {directory} holds NaN or Inf values")
                    target = dtype if tensor.is_floating_point() else want.dtype
                    if keep_fp32 and tensor.dtype == torch.float32 and any(k in name for k in keep_fp32):
                        target = torch.float32
                    state[name] = tensor.to(device=device, dtype=target, copy=True)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    model.load_state_dict(state, strict=True, assign=True)


def _read_slots(view, layer: ExpertParallelMoE, name: str, local_shape: torch.Size) -> torch.Tensor:
    """The local experts' blocks of a stacked expert weight. Both layouts hold each expert as
    one contiguous chunk of the flat buffer (``weight1`` viewed ``[E, D, F]``, ``weight2``
    ``[E, F, D]``); a chunk is read as the rows covering it, then cut to size."""
    shape = tuple(view.get_shape())
    per_expert = layer.experts.hidden_size * layer.experts.ffn_hidden_size
    if len(shape) != 2 or shape[0] * shape[1] != layer.num_experts * per_expert:
        raise CheckpointError(f"tensor '{name}' has shape {shape}, the config expects {layer.num_experts} "
                              f"stacked experts of {layer.experts.hidden_size}x{layer.experts.ffn_hidden_size}")
    row = shape[1]
    chunks = []
    for e in layer.local_experts:
        start, end = e * per_expert, (e + 1) * per_expert
        first, last = start // row, -(-end // row)
        rows = view[first:last].reshape(-1)
        chunks.append(rows[start - first * row: end - first * row])
    return torch.cat(chunks).view(local_shape)


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of routed-expert weights and of everything else held by this rank."""
    expert = dense = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        size = tensor.numel() * tensor.element_size()
        if name.split(".")[-2:-1] == ["experts"]:
            expert += size
        else:
            dense += size
    return {"expert": expert, "dense": dense}
