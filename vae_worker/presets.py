"""Named VAE configurations: tiny ones for CPU tests and the real ones the released checkpoints use.

Each preset is a plain diffusers config dict (with ``_class_name``), so a directory written from it
loads with ``AutoencoderKL.from_pretrained`` / ``AutoencoderKLWan.from_pretrained`` -- and real
MammothModa2 / 2.5 VAE folders load with the same code as they are.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderKLWan

# Wan2.1 VAE per-channel latent statistics (diffusers' AutoencoderKLWan defaults, which equal the
# config.json shipped with the Wan2.1 checkpoints); the 2.5 pipeline normalises with them.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]

_FOUR_DOWN = ["DownEncoderBlock2D"] * 4
_FOUR_UP = ["UpDecoderBlock2D"] * 4

# FLUX.1-style 16-channel image VAE (what MammothModa2 pairs with its Lumina2-style DiT).
_MAMMOTH2_DEV: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": _FOUR_DOWN,
    "up_block_types": _FOUR_UP,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

# Same topology and normalisation constants, a fraction of the width: 4 levels -> 8x, 16 channels.
_TINY_MAMMOTH2: dict[str, Any] = {
    **_MAMMOTH2_DEV,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 256,
}

# Wan2.1 causal 3D VAE: z_dim 16, 8x spatial, 4x temporal (frames = 4k+1).
_WAN21: dict[str, Any] = {
    "_class_name": "AutoencoderKLWan",
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": WAN21_LATENTS_MEAN,
    "latents_std": WAN21_LATENTS_STD,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 8,
}

_TINY_MAMMOTH25: dict[str, Any] = {**_WAN21, "base_dim": 16, "num_res_blocks": 1}

# Wan2.2 causal 3D VAE (what the released MammothModa2.5 checkpoints use: the reference
# pipeline draws 48-channel noise): z_dim 48, 2x2 pixel patching + 8x = 16x spatial, 4x
# temporal. Its per-channel latent statistics are checkpoint data that ship in the real
# ``vae/config.json``; the preset only fixes the architecture, so they are neutral here.
_WAN22: dict[str, Any] = {
    "_class_name": "AutoencoderKLWan",
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 16,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-mammoth2": _TINY_MAMMOTH2,
    "tiny-mammoth25": _TINY_MAMMOTH25,
    "mammoth2-dev": _MAMMOTH2_DEV,
    # MammothModa2-Preview pairs its DiT with the same 16-channel image VAE.
    "tiny-mammoth2-preview": _TINY_MAMMOTH2,
    "mammoth2-preview": _MAMMOTH2_DEV,
    "mammoth25-6b-a1b": _WAN22,
    "mammoth25-20b-a3b": _WAN22,
}

MODEL_CLASSES: dict[str, type] = {"AutoencoderKL": AutoencoderKL, "AutoencoderKLWan": AutoencoderKLWan}


def stage_config(preset: str) -> dict[str, Any]:
    """A fresh copy of the diffusers config dict of ``preset`` (safe to mutate)."""
    try:
        return copy.deepcopy(PRESETS[preset])
    except KeyError:
        raise ValueError(f"unknown VAE preset {preset!r}; known: {sorted(PRESETS)}") from None


def model_class(config: dict[str, Any]) -> type:
    name = config.get("_class_name")
    if name not in MODEL_CLASSES:
        raise ValueError(f"unsupported VAE class {name!r}; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name]


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """Instantiate the diffusers VAE for ``config`` (under whatever device context is active)."""
    return model_class(config).from_config(config)


def count_parameters(preset: str) -> dict[str, int]:
    """Parameter counts, computed on the meta device (no memory). A VAE is dense: active == total."""
    with torch.device("meta"):
        model = build_model(stage_config(preset))
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "active": total}


def write_random_checkpoint(preset: str, directory: str | Path, seed: int = 0) -> None:
    """Write a diffusers-format VAE folder with random weights, identical for identical seeds.

    Initialisation draws from a private generator and small weights keep decoded values in range,
    so tests get finite, non-degenerate (if meaningless) pixels.
    """
    config = stage_config(preset)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 or ".norm" in name or "norm" in name.rsplit(".", 2)[-2]:
                # norm scales (GroupNorm weight, Wan RMS gamma) stay at 1
                param.fill_(1.0)
            else:
                fan_in = param[0].numel()
                std = (1.0 / fan_in) ** 0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(str(directory), safe_serialization=True)
