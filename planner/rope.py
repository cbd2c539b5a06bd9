"""M-RoPE on CPU: the rotation table of a forward built once, applied by vLLM's fused kernel.

vLLM's ``MRotaryEmbedding`` runs ``forward_native`` on CPU in every decoder layer: gather the
cos/sin rows of the 3-axis positions, interleave them per ``mrope_section``, rotate q and k --
about thirty small ops a layer, ~250 us at 16 tokens, 4.5 ms of every decode step over the tiny
planner's 18 layers. The positions are the same in every layer of one forward, so
``OncePerForwardMRope`` builds the merged per-token ``[cos | sin]`` table in the first layer
and every layer rotates with vLLM's ``_C.rotary_embedding`` kernel over that table (token
``t`` -> row ``t``): the same products, bit-identical, 0.19 ms a step. On CUDA (vLLM's Triton
M-RoPE kernel) and for 1-D positions the wrapped module runs unchanged.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_shared: weakref.WeakKeyDictionary[nn.Module, OncePerForwardMRope] = weakref.WeakKeyDictionary()
_forward_serial = 0  # bumped once per model forward (``new_forward``): a table is valid within one


def new_forward() -> None:
    """Called at the start of every model forward: tables from the previous one are stale (vLLM
    reuses its positions buffer in place)."""
    global _forward_serial
    _forward_serial += 1


class OncePerForwardMRope(nn.Module):
    """Wraps the ``MRotaryEmbedding`` all layers share (vLLM's ``get_rope`` caches instances)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._key: tuple | None = None
        self._table: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    @classmethod
    def wrap(cls, rope: nn.Module) -> nn.Module:
        """``rope`` wrapped, once per shared instance; anything but an M-RoPE is returned as is."""
        if isinstance(rope, cls) or not getattr(rope, "mrope_section", None):
            return rope
        if rope not in _shared:
            _shared[rope] = cls(rope)
        return _shared[rope]

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, rotary_dim]`` rows ``[cos | sin]`` per token of this forward, and ``arange(T)``."""
        key = (_forward_serial, positions.data_ptr(), tuple(positions.shape), dtype)
        if key != self._key:
            from vllm.model_executor.layers.rotary_embedding.mrope import apply_interleaved_rope

            rope = self.inner
            # the rows of this forward, then the cast (not a cast of the whole cache every forward)
            cos, sin = rope.cos_sin_cache[positions].to(dtype).chunk(2, dim=-1)
            if rope.mrope_interleaved:
                cos = apply_interleaved_rope(cos, rope.mrope_section)
                sin = apply_interleaved_rope(sin, rope.mrope_section)
            else:
                cos = torch.cat([m[i] for i, m in enumerate(cos.split(rope.mrope_section, dim=-1))], dim=-1)
                sin = torch.cat([m[i] for i, m in enumerate(sin.split(rope.mrope_section, dim=-1))], dim=-1)
            self._table = torch.cat([cos, sin], dim=-1).contiguous()
            self._rows = torch.arange(positions.shape[-1], device=positions.device)
            self._key = key
        return self._table, self._rows

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None,
                offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.device.type != "cpu" or positions.ndim != 2 or key is None or offsets is not None:
            return self.inner(positions, query, key, offsets)
        from vllm import _custom_ops as ops

        table, rows = self.table(positions, query.dtype)
        ops.rotary_embedding(rows, query, key, self.inner.head_size, table, self.inner.is_neox_style)
        return query, key
