"""Condition encoders of the MammothModa2 DiT: time embedding, caption projection, QFormer.

They sit under ``time_caption_embed`` in the official checkpoint (after its
``reinit_caption_embedder`` / ``reinit_image_embedder``), hence the container below and its
attribute names. Only the time embedding depends on the diffusion step; the caption projection
and the QFormer are run once per request by ``Mammoth2Transformer.prepare``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from dit_worker.models.attention import attention
from dit_worker.models.mammoth2_layers import RMSNorm, SwiGLUFeedForward, ffn_inner_dim

TIME_FREQ_DIM = 256


def qformer_num_heads(hidden_size: int, proposed: int, preferred_head_dim: int = 128) -> int:
    """Head count of the QFormer: ``proposed`` if it divides the width, else the nearest divisor
    to ``hidden_size / preferred_head_dim`` (same rule as the official module)."""
    if proposed > 0 and hidden_size % proposed == 0:
        return proposed
    target = max(1, round(hidden_size / preferred_head_dim))
    divisors = [d for d in range(1, min(128, hidden_size) + 1) if hidden_size % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def multihead_attention(module: nn.MultiheadAttention, query: torch.Tensor, kv: torch.Tensor,
                        key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``module``'s batch-first forward (its packed ``in_proj`` / ``out_proj`` weights, the
    official layout) with the attention itself through the DiT seam. ``key_mask`` True = real."""
    if module.training and module.dropout:
        raise ValueError("attention dropout is a training feature; serve the model in eval mode")
    heads = module.num_heads
    w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).unflatten(-1, (heads, -1))
    k = F.linear(kv, w_k, b_k).unflatten(-1, (heads, -1))
    v = F.linear(kv, w_v, b_v).unflatten(-1, (heads, -1))
    return module.out_proj(attention(q, k, v, key_mask).flatten(-2))


class QFormerLayer(nn.Module):
    """Learned queries: self-attention, cross-attention to the planner states, SwiGLU FFN."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.ln_q1 = RMSNorm(hidden_size, eps=norm_eps)
        self.self_attn = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.ln_q2 = RMSNorm(hidden_size, eps=norm_eps)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.ln_ffn = RMSNorm(hidden_size, eps=norm_eps)
        self.ffn = SwiGLUFeedForward(hidden_size, ffn_inner_dim(hidden_size, 256, None))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_padding: torch.Tensor) -> torch.Tensor:
        h = self.ln_q1(q)
        q = q + multihead_attention(self.self_attn, h, h)
        h = self.ln_q2(q)
        q = q + multihead_attention(self.cross_attn, h, kv, None if kv_padding is None else ~kv_padding)
        return q + self.ffn(self.ln_ffn(q))


class QFormerImageEmbedder(nn.Module):
    """Maps a variable number of planner hidden states (the generated visual tokens) to a fixed
    number of DiT-width tokens, so the DiT sequence length does not grow with the AR grid."""

    def __init__(
        self,
        input_dim: int,
        hidden_size: int,
        num_queries: int,
        num_layers: int,
        num_heads: int,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        heads = qformer_num_heads(hidden_size, num_heads)
        self.input_proj = nn.Sequential(RMSNorm(input_dim, eps=norm_eps), nn.Linear(input_dim, hidden_size))
        self.query = nn.Parameter(torch.randn(1, num_queries, hidden_size) * hidden_size**-0.5)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden_size, heads, dropout, norm_eps) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x[B, L, input_dim]`` with ``mask[B, L]`` (True = real) -> ``[B, num_queries, hidden]``."""
        kv = self.input_proj(x)
        q = self.query.expand(x.shape[0], -1, -1).to(kv.dtype)
        padding = ~mask.bool()
        for layer in self.layers:
            q = layer(q, kv, padding)
        return q


class TimeCaptionEmbed(nn.Module):
    """Container matching the official ``time_caption_embed`` sub-module."""

    def __init__(
        self,
        hidden_size: int,
        llm_hidden_size: int,
        timestep_scale: float,
        image_embedder: QFormerImageEmbedder,
    ) -> None:
        super().__init__()
        self.time_proj = Timesteps(
            num_channels=TIME_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=timestep_scale
        )
        self.timestep_embedder = TimestepEmbedding(TIME_FREQ_DIM, min(hidden_size, 1024))
        self.caption_embedder = nn.Sequential(
            RMSNorm(llm_hidden_size, eps=1e-5), nn.Linear(llm_hidden_size, hidden_size, bias=True)
        )
        self.image_embedder = image_embedder

    def time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(timestep).to(dtype))
