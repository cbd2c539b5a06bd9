"""DiT stage presets: which transformer config each named preset uses.

Random checkpoints for the tiny presets are written with the same code path real ones are
loaded with (``checkpoint.save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .checkpoint import DataclassConfig, save_pretrained
from .families import SCHEDULER_DIR
from .models import transformer_mammoth2, transformer_mammoth25
from .models.transformer_mammoth2 import Mammoth2DiTConfig
from .models.transformer_mammoth25 import Mammoth25DiTConfig


def _preview(base: Mammoth2DiTConfig, **changes) -> Mammoth2DiTConfig:
    """MammothModa2-Preview: the Mammoth2 image DiT conditioned by a Qwen2.5-VL planner, its
    QFormer at the planner width (official ``gen_image_condition_refiner``)."""
    return Mammoth2DiTConfig.from_dict({**base.to_dict(), **changes, "image_refiner_at_llm_width": True})


_CONFIGS = {
    "tiny-mammoth2": Mammoth2DiTConfig.tiny,
    "mammoth2-dev": Mammoth2DiTConfig.dev,
    # DiT narrower than the planner (64 vs 128), so the QFormer width and the caption
    # projection after it are exercised.
    "tiny-mammoth2-preview": lambda: _preview(Mammoth2DiTConfig.tiny(), hidden_size=64, num_attention_heads=2,
                                              num_kv_heads=1, llm_hidden_size=128),
    "mammoth2-preview": lambda: _preview(Mammoth2DiTConfig.dev(), llm_hidden_size=3584),  # Qwen2.5-VL-7B
    "tiny-mammoth25": Mammoth25DiTConfig.tiny,
    "mammoth25-6b-a1b": Mammoth25DiTConfig.a6b_a1b,
    "mammoth25-20b-a3b": Mammoth25DiTConfig.a20b_a3b,
}

# Flow shift of the video family's scheduler (Wan-style static shift for 480p).
VIDEO_FLOW_SHIFT = 3.0


def stage_config(preset: str) -> DataclassConfig:
    try:
        return _CONFIGS[preset]()
    except KeyError:
        raise ValueError(f"preset: no DiT config for {preset!r}") from None


def count_parameters(preset: str) -> dict[str, int]:
    """Total/active parameters of the DiT stage, plus ``condition_total``: the part that encodes
    the planner's states once per request (MammothModa2: caption projection + QFormer;
    MammothModa2.5: the VLM-token refiner). Preset names (6B-A1B...) count the rest."""
    config = stage_config(preset)
    if isinstance(config, Mammoth2DiTConfig):
        counts = transformer_mammoth2.count_parameters(config)
        with torch.device("meta"):
            embed = transformer_mammoth2.Mammoth2Transformer(config).time_caption_embed
        condition = sum(p.numel() for name, p in embed.named_parameters()
                        if name.startswith(("caption_embedder.", "image_embedder.")))
        return {**counts, "condition_total": condition}
    counts = transformer_mammoth25.count_parameters(config)
    return {"total": counts["total"], "active": counts["active"], "condition_total": counts["refiner"]}


def write_random_checkpoint(preset: str, directory: str | Path, seed: int) -> Path:
    """Random-weight DiT in the served layout; deterministic for ``seed``."""
    config = stage_config(preset)
    torch.manual_seed(seed)
    if isinstance(config, Mammoth2DiTConfig):
        model = transformer_mammoth2.Mammoth2Transformer(config)
    else:
        model = transformer_mammoth25.Mammoth25Transformer(config)
    _perturb(model, seed)
    directory = save_pretrained(model, config, directory)
    if isinstance(config, Mammoth25DiTConfig):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=VIDEO_FLOW_SHIFT)
        scheduler.save_config(str(directory / SCHEDULER_DIR))
    return directory


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Add noise to every parameter: zero-initialised gates/projections would otherwise make a
    random model an identity map, hiding bugs that real weights would expose."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
