"""MammothTok encoder: AIMv2 (native resolution, sin-cos positions) + VQ lookup.

Module and parameter names follow the official ``VQVitModel2DPlus_AIMv2`` (``encoder.preprocessor``,
``encoder.trunk``, ``quant_conv``, ``quantize.embedding``), so its ``gen_tokenizer.image_tokenizer.*``
tensors load by name (see ``official``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

CONFIG_NAME = "config.json"


class MammothTokLoadError(ValueError):
    """A MammothTok folder that cannot be loaded as it is; the message names the tensor or file."""


@dataclass
class MammothTokConfig:
    """Sizes of the official ``aimv2_large_native`` encoder and its codebook (defaults: official)."""

    image_size: int = 448  # the grid the planner was trained on: 32 x 32 codes
    patch_size: int = 14
    embed_dim: int = 1024
    mlp_hidden_dim: int = 2816
    num_blocks: int = 24
    num_heads: int = 8
    norm_eps: float = 1e-5
    codebook_size: int = 16384
    codebook_embed_dim: int = 8

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError("mammothtok: embed_dim must divide by num_heads and by 4 (2-D sin-cos positions)")
        if self.image_size % self.patch_size:
            raise ValueError("mammothtok: image_size must be a multiple of patch_size")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "MammothTokEncoder", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MammothTokConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if not k.startswith("_") and k not in known)
        if unknown:
            raise MammothTokLoadError(f"mammothtok config: unknown keys {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})


class RMSNorm(nn.Module):
    """AIMv2's RMSNorm: normalised in the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class PatchEmbed(nn.Module):
    def __init__(self, config: MammothTokConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pixels).flatten(2).transpose(1, 2))


def sincos_positions(rows: int, cols: int, dim: int) -> torch.Tensor:
    """``[rows * cols, dim]``, row-major: the first half encodes the column, the second the row
    (the official grid order), each half ``[sin, cos]`` of ``pos / 10000^(i / (dim/4))``."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    col = torch.arange(cols, dtype=torch.float32).repeat(rows)
    row = torch.arange(rows, dtype=torch.float32).repeat_interleave(cols)

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(col), embed(row)], dim=1)


class Preprocessor(nn.Module):
    def __init__(self, config: MammothTokConfig):
        super().__init__()
        self.patchifier = PatchEmbed(config)
        self.patch_size = config.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.patchifier(pixels)
        rows, cols = pixels.shape[2] // self.patch_size, pixels.shape[3] // self.patch_size
        return tokens + sincos_positions(rows, cols, tokens.shape[-1]).to(tokens.device, tokens.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    def __init__(self, config: MammothTokConfig):
        super().__init__()
        self.attn = Attention(config.embed_dim, config.num_heads)
        self.norm_1 = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = SwiGLU(config.embed_dim, config.mlp_hidden_dim)
        self.norm_2 = RMSNorm(config.embed_dim, config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, config: MammothTokConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.post_trunk_norm = RMSNorm(config.embed_dim, config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.post_trunk_norm(x)


class AIMv2Encoder(nn.Module):
    def __init__(self, config: MammothTokConfig):
        super().__init__()
        self.preprocessor = Preprocessor(config)
        self.trunk = Trunk(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocessor(pixels))


class Quantizer(nn.Module):
    def __init__(self, config: MammothTokConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [N, e]`` -> nearest code index ``[N]`` by l2 distance of l2-normalised vectors."""
        z = F.normalize(z, p=2, dim=-1)
        codes = F.normalize(self.embedding.weight, p=2, dim=-1)
        distance = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()
        return distance.argmin(dim=1)


class MammothTokEncoder(nn.Module):
    """Pixels in [-1, 1] ``[B, 3, H, W]`` (H, W multiples of the patch) -> codes ``[B, H/p, W/p]``."""

    def __init__(self, config: MammothTokConfig):
        super().__init__()
        self.config = config
        self.encoder = AIMv2Encoder(config)
        self.quant_conv = nn.Conv2d(config.embed_dim, config.codebook_embed_dim, 1)
        self.quantize = Quantizer(config)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % p or pixels.shape[3] % p:
            raise ValueError(f"reference_images: MammothTok needs [B, 3, H, W] with H, W multiples of {p}, "
                             f"got {tuple(pixels.shape)}")
        b, rows, cols = pixels.shape[0], pixels.shape[2] // p, pixels.shape[3] // p
        weight = self.quant_conv.weight
        h = self.encoder(pixels.to(weight.device, weight.dtype))
        h = self.quant_conv(h.view(b, rows, cols, -1).permute(0, 3, 1, 2))
        z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        return self.quantize(z).view(b, rows, cols)


def load_mammothtok(directory: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> MammothTokEncoder:
    """Strict load of ``config.json`` + ``model*.safetensors``: every tensor present, no extra,
    shapes equal; errors name the tensor."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise MammothTokLoadError(f"missing {CONFIG_NAME} in {directory}")
    config = MammothTokConfig.from_dict(json.loads(path.read_text()))
    with torch.device("meta"):
        model = MammothTokEncoder(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MammothTokLoadError(f"no safetensors files in {directory}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is no dict
                    if name not in expected:
                        raise MammothTokLoadError(f"unexpected tensor '{name}' in {file}")
                    tensor = handle.get_tensor(name)
                    if tuple(tensor.shape) != tuple(expected[name].shape):
                        raise MammothTokLoadError(f"tensor '{name}' has shape {tuple(tensor.shape)} in {file}, "
                                                  f"the config expects {tuple(expected[name].shape)}")
                    state[name] = tensor.to(device=device, dtype=dtype, copy=True)
        except (SafetensorError, OSError) as exc:
            raise MammothTokLoadError(f"{file}: unreadable safetensors file ({exc})") from exc
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MammothTokLoadError(f"missing tensor '{missing[0]}' in {directory}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
