"""MammothModa2.5 condition encoder: the VLM-token refiner (official ``VLMTokenRefiner``).

The official model feeds the refiner the planner's prompt states zero-padded to 512 tokens and
runs its bidirectional layers *without* a mask, so real tokens attend to ``512 - L`` padding
tokens. Those padding tokens all start as the same vector and the layers have no positions, so
they stay identical in every layer: attending to ``n`` identical keys equals attending to one
key whose logit is raised by ``log n``. ``RefinerInputs`` uses exactly that -- one
representative padding slot with a ``log(n)`` key bias -- which reproduces the official output
at the cost of ``L + 1`` tokens instead of 512. Batch padding (other rows' lengths) is masked
with ``-inf`` and never changes a row's result.

Module and parameter names follow the official ``connector`` ``nn.Sequential`` indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm
from torch import nn

from dit_worker.checkpoint import DataclassConfig
from dit_worker.models.attention import attention


@dataclass
class Mammoth25RefinerLayerConfig(DataclassConfig):
    """Official ``TransformerConnectorConfig`` keys."""

    hidden_size: int = 4096
    num_heads: int = 8
    ffn_dim: int = 4096
    dropout: float = 0.0
    attention_dropout: float = 0.0
    norm_type: str = "rmsnorm"
    eps: float = 1e-6


@dataclass
class Mammoth25RefinerConfig(DataclassConfig):
    """Official ``VLMTokenRefinerConfig`` keys (``enable`` is always on in the transformer)."""

    mode: str = "ffn_with_bidirectional_transformer"
    fusion_mode: str = "in_context"
    num_transformer_layers: int = 2
    use_ffn: bool = True
    use_transformer: bool = True
    vlm_dim: int = 4096
    transformer_config: Mammoth25RefinerLayerConfig = field(default_factory=Mammoth25RefinerLayerConfig)
    enable: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("ffn_only", "ffn_with_bidirectional_transformer"):
            raise ValueError(f"refiner.mode: unknown {self.mode!r}")
        if self.fusion_mode != "in_context":
            raise ValueError("refiner.fusion_mode: only 'in_context' exists in MammothModa2.5")


class RefinerSelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_*``, ``out_proj``) with an additive
    key bias, so padding can be collapsed or masked."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"refiner hidden size {hidden_size} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, s, 3, self.num_heads, -1).unbind(2)
        # fp32 core: the log(n) padding bias must not be rounded to bf16 (prompts are short).
        out = attention(q.float(), k.float(), v.float(), key_bias.float())
        return self.out_proj(out.reshape(b, s, d).to(x.dtype))


class RefinerLayer(nn.Module):
    """Pre-norm bidirectional transformer layer (exact-GELU FFN with biases)."""

    def __init__(self, cfg: Mammoth25RefinerLayerConfig):
        super().__init__()
        d = cfg.hidden_size
        if cfg.norm_type == "rmsnorm":
            self.norm1, self.norm2 = RMSNorm(d, eps=cfg.eps), RMSNorm(d, eps=cfg.eps)
        else:
            self.norm1, self.norm2 = nn.LayerNorm(d, eps=cfg.eps), nn.LayerNorm(d, eps=cfg.eps)
        self.self_attn = RefinerSelfAttention(d, cfg.num_heads)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_dim, d), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), key_bias)
        return x + self.ffn(self.norm2(x))


class VLMTokenRefiner(nn.Module):
    """MLP ``vlm_dim -> hidden`` then bidirectional layers (then ``hidden -> out_dim`` if needed)."""

    def __init__(self, cfg: Mammoth25RefinerConfig, out_dim: int):
        super().__init__()
        tc = cfg.transformer_config
        layers: list[nn.Module] = []
        if cfg.mode == "ffn_only":
            layers += [nn.Linear(cfg.vlm_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)]
        else:
            if cfg.use_ffn:
                layers += [nn.Linear(cfg.vlm_dim, tc.hidden_size), nn.GELU(), nn.Linear(tc.hidden_size, tc.hidden_size)]
            elif cfg.vlm_dim != tc.hidden_size:
                layers.append(nn.Linear(cfg.vlm_dim, tc.hidden_size))
            if cfg.use_transformer:
                layers += [RefinerLayer(tc) for _ in range(cfg.num_transformer_layers)]
            if tc.hidden_size != out_dim:
                layers.append(nn.Linear(tc.hidden_size, out_dim))
        self.connector = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        for module in self.connector:
            x = module(x, key_bias) if isinstance(module, RefinerLayer) else module(x)
        return x


@dataclass
class RefinerInputs:
    """A batch of prompts laid out as ``[real tokens | batch padding | one padding slot]``."""

    states: torch.Tensor  # [B, Lmax + 1, vlm_dim]
    key_bias: torch.Tensor  # [B, 1, 1, Lmax + 1] additive, fp32
    lengths: list[int]

    @classmethod
    def build(cls, prompts: list[torch.Tensor], pad_to: int, *, device: torch.device,
              dtype: torch.dtype) -> RefinerInputs:
        """``prompts``: unpadded ``[L_i, vlm_dim]`` (``L_i <= pad_to``); the official model pads
        each to ``pad_to`` zero vectors."""
        lengths = [int(p.shape[0]) for p in prompts]
        width = max(lengths) + 1
        dim = prompts[0].shape[1]
        states = torch.zeros(len(prompts), width, dim, device=device, dtype=dtype)
        key_bias = torch.full((len(prompts), 1, 1, width), -math.inf, device=device)
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            states[i, :n] = p.to(device=device, dtype=dtype)
            key_bias[i, ..., :n] = 0.0
            if pad_to > n:  # the pad_to - n zero vectors, collapsed into the last slot
                key_bias[i, ..., -1] = math.log(pad_to - n)
        return cls(states, key_bias, lengths)
