"""Sequence parallel (Ulysses) forward of the MammothModa2.5 DiT over the ranks of a group.

Every rank builds the full row (``[video | source | context]``, padded to a multiple of N with
masked positions), keeps its contiguous ``1/N`` of the tokens and runs the blocks on them.
Attention is diffusers' own context parallelism: each attention processor gets a
``ParallelConfig(ContextParallelConfig(ulysses_degree=N))`` and ``dispatch_attention_fn``
all-to-alls queries/keys/values from sequence shards to head shards and back
(``TemplatedUlyssesAttention``); the key mask stays full-length. Modulation, RoPE (each
rank's slice of the positions) and the MoE FFN are per token, so they run on the shard (the
MoE through the expert-parallel all-to-all). The final norm and projection run per shard;
one all-gather returns the full velocity to every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def ulysses_config(world_size: int, rank: int, device: torch.device) -> Any:
    """A set-up diffusers ``ParallelConfig`` for Ulysses over the whole default group."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (1, world_size), mesh_dim_names=("ring", "ulysses"))
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=world_size))
    config.setup(rank, world_size, device, mesh=mesh)
    return config


def attention_processors(model: nn.Module) -> list[Any]:
    """Processors that hand ``_parallel_config`` to ``dispatch_attention_fn`` (diffusers' and
    the DiT's own seam both do)."""
    return [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_parallel_config")]


class _ContextParallel:
    """Sets the processors' ``_parallel_config`` for one forward, then clears it."""

    def __init__(self, model: nn.Module, config: Any):
        self.processors = attention_processors(model)
        if not self.processors:
            raise RuntimeError(f"{type(model).__name__}: no attention processor takes a parallel config")
        self.config = config

    def __enter__(self) -> None:
        for p in self.processors:
            p._parallel_config = self.config

    def __exit__(self, *exc) -> None:
        for p in self.processors:
            p._parallel_config = None


def _shard(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size)


@torch.inference_mode()
def sequence_parallel_forward(model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, prepared: Any,
                              parallel_config: Any, rank: int, world_size: int) -> torch.Tensor:
    """``model(latents, timestep, prepared)`` with the sequence split over ``world_size`` ranks;
    every rank passes the same inputs and gets the full output."""
    config = model.config
    if config.num_attention_heads % world_size:
        raise ValueError(f"parallel.size: {config.num_attention_heads} attention heads do not split over "
                         f"{world_size} ranks (Ulysses)")
    dtype, device = model.dtype, latents.device
    video, grid = model._patchify(latents.to(dtype))
    n_video = video.shape[1]
    x = torch.cat([video, prepared.extra.to(dtype)], dim=1) if prepared.extra.shape[1] else video
    seq = x.shape[1]
    total = -(-seq // world_size) * world_size
    x = nn.functional.pad(x, (0, 0, 0, total - seq))
    lens = torch.tensor([n_video + e for e in prepared.extra_lens], device=device)
    mask = torch.arange(total, device=device) < lens.unsqueeze(1)  # [B, P]
    padded = bool((~mask).any())
    cos, sin = model._row_rope(prepared, grid, device)  # [B or 1, seq, 1, hd]
    cos = nn.functional.pad(cos, (0, 0, 0, 0, 0, total - seq), value=1.0)
    sin = nn.functional.pad(sin, (0, 0, 0, 0, 0, total - seq), value=0.0)

    local = _shard(x, 1, rank, world_size)
    rope = (_shard(cos, 1, rank, world_size), _shard(sin, 1, rank, world_size))
    local_mask = _shard(mask, 1, rank, world_size)
    key_mask = mask[:, None, None, :] if padded else None
    valid = local_mask.reshape(-1).nonzero().squeeze(1) if not bool(local_mask.all()) else None
    temb, modulation = model.condition_embedder(timestep, dtype)
    with _ContextParallel(model, parallel_config):
        for block in model.blocks:
            local = block(local, modulation, rope, key_mask, valid)
    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    local = (model.norm_out(local.float()) * (1 + scale) + shift).type_as(local)
    out = model.proj_out(local).contiguous()
    parts = [torch.empty_like(out) for _ in range(world_size)]
    dist.all_gather(parts, out)
    return model._unpatchify(torch.cat(parts, dim=1)[:, :n_video], grid)
