"""Building blocks of the MammothModa2 DiT (Lumina2 / OmniGen2 lineage).

Attribute names mirror the official modules so that ``state_dict`` keys match an official
checkpoint one to one (``attn.to_q``, ``feed_forward.linear_1``, ``norm1.linear``...). The math
follows the official code operation by operation (fp32 RMSNorm, fp32 SiLU in SwiGLU, fp32 RoPE),
so bf16 runs round the same way; attention honours padding masks, which the official CPU path
does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from torch import nn

from dit_worker.models.attention import attention

ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    """Qwen-style RMSNorm: normalise in fp32, cast back, then scale (keeps bf16 rounding identical)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel: the same x * rsqrt(mean(x^2) + eps) in one pass, not four
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def ffn_inner_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Hidden width of the SwiGLU FFN: 4*dim, optionally scaled, rounded up to ``multiple_of``."""
    inner = 4 * dim
    if ffn_dim_multiplier is not None:
        inner = int(ffn_dim_multiplier * inner)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


class SwiGLUFeedForward(nn.Module):
    """``linear_2(silu(linear_1 x) * linear_3 x)``, SiLU in fp32 like the official kernel-free path."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, inner_dim, bias=False)
        self.linear_2 = nn.Linear(inner_dim, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.linear_1(x)
        return self.linear_2(F.silu(gate.float()).to(gate.dtype) * self.linear_3(x))


# --------------------------------------------------------------------------------------------- RoPE


def rope_inv_freqs(axes_dim: tuple[int, ...], device: torch.device | None = None) -> list[torch.Tensor]:
    """Per-axis inverse frequencies in float64 (the official tables are built in float64)."""
    return [
        1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)) for d in axes_dim
    ]


def rope_cos_sin(positions: torch.Tensor, axes_dim: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for integer ``positions[..., n_axes]`` -> two fp32 tensors ``[..., head_dim // 2]``.

    Computed directly from the positions instead of gathered from a table (the same float64
    products, so the same values), so the model holds no RoPE buffers and any position works.
    Column ``i`` drives the channel pair ``(2i, 2i + 1)``; axes are laid out one after another.
    """
    angles = [
        positions[..., a : a + 1].to(torch.float64) * inv
        for a, inv in enumerate(rope_inv_freqs(axes_dim, positions.device))
    ]
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x[B, S, H, D]`` by ``cos/sin[B, S, D // 2]``; math in fp32.

    One complex product per pair (as the official ``apply_rotary_emb``), the same arithmetic as
    ``(x1 c - x2 s, x1 s + x2 c)`` in one kernel instead of six elementwise passes and a stack."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotated = pairs * torch.complex(cos, sin).unsqueeze(2)
    return torch.view_as_real(rotated).flatten(-2)


# ---------------------------------------------------------------------------------------- Attention


class Mammoth2AttnProcessor:
    """Projections, qk-norm, RoPE, then the DiT attention seam (``models.attention``).

    Like diffusers' processors it carries ``_attention_backend`` (a backend name, None =
    default) and ``_parallel_config`` (a diffusers ``ParallelConfig`` for Ulysses / ring, None =
    off); ``models.attention.set_attention_backend`` / ``set_parallel_config`` set them.
    """

    _attention_backend: str | None = None
    _parallel_config = None

    def __call__(self, attn: Mammoth2Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 key_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        dtype = x.dtype
        q = attn.norm_q(attn.to_q(x).view(b, s, attn.num_heads, attn.head_dim))
        k = attn.norm_k(attn.to_k(x).view(b, s, attn.num_kv_heads, attn.head_dim))
        v = attn.to_v(x).view(b, s, attn.num_kv_heads, attn.head_dim)
        q = apply_rope(q, *rope).to(dtype)
        k = apply_rope(k, *rope).to(dtype)
        out = attention(q, k, v, key_mask, backend=self._attention_backend, parallel_config=self._parallel_config)
        return attn.to_out[0](out.reshape(b, s, attn.num_heads * attn.head_dim).to(dtype))


class Mammoth2Attention(nn.Module, AttentionModuleMixin):
    """Self-attention with per-head RMS qk-norm, 3-axis RoPE and grouped KV heads.

    Mirrors the parameter layout of diffusers' ``Attention(qk_norm="rms_norm", kv_heads=...)``
    used by the official blocks (``to_out`` is a list whose first entry is the projection).
    """

    _default_processor_cls = Mammoth2AttnProcessor
    _available_processors = [Mammoth2AttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.norm_q = RMSNorm(self.head_dim, eps=eps)
        self.norm_k = RMSNorm(self.head_dim, eps=eps)
        self.to_q = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(num_heads * self.head_dim, dim, bias=False)])
        self.processor = Mammoth2AttnProcessor()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``key_mask[B, S]`` (True = real token) hides padding; ``None`` means no padding."""
        return self.processor(self, x, rope, key_mask)


# ------------------------------------------------------------------------------------------- Blocks


class RMSNormZero(nn.Module):
    """adaLN-zero on RMSNorm: one projection of the time embedding gives 4 modulation vectors."""

    def __init__(self, dim: int, temb_dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(temb_dim, 4 * dim, bias=True)
        self.norm = RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(4, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class Mammoth2Block(nn.Module):
    """Pre/post-norm single-stream block; ``modulation`` adds tanh-gated time conditioning."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        ffn_dim: int,
        norm_eps: float,
        modulation: bool,
    ) -> None:
        super().__init__()
        self.modulation = modulation
        self.attn = Mammoth2Attention(dim, num_heads, num_kv_heads)
        self.feed_forward = SwiGLUFeedForward(dim, ffn_dim)
        self.norm1 = RMSNormZero(dim, min(dim, 1024), norm_eps) if modulation else RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=norm_eps)
        self.norm2 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.modulation:
            x = x + self.norm2(self.attn(self.norm1(x), rope, key_mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        if temb is None:
            raise ValueError("a modulated block needs the time embedding")
        h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
        x = x + gate_msa.unsqueeze(1).tanh() * self.norm2(self.attn(h, rope, key_mask))
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
        return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(h)


class OutputNorm(nn.Module):
    """Final affine-free LayerNorm scaled by the time embedding, then projection to patches."""

    def __init__(self, dim: int, temb_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(temb_dim, dim, bias=True)
        self.linear_2 = nn.Linear(dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb).to(x.dtype))
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale)[:, None, :]
        return self.linear_2(x)
