"""Fixtures for the DiT tests: tiny random-weight MammothModa2 transformer and conditions."""

from __future__ import annotations

import math

import pytest
import torch

from dit_worker.models.transformer_mammoth2 import Mammoth2Condition, Mammoth2DiTConfig, Mammoth2Transformer


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit-ish scale everywhere (incl. gates and norms), so no path is a no-op."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 1 and ("norm" in name or name.endswith((".ln_q1.weight", ".ln_q2.weight",
                                                                  ".ln_ffn.weight", ".0.weight"))):
            param.copy_(1 + 0.2 * noise)
        elif param.ndim >= 2 and name != "image_index_embedding" and not name.endswith("query"):
            param.copy_(noise / math.sqrt(param.shape[-1]))
        else:
            param.copy_(0.3 * noise)


@pytest.fixture(scope="module")
def mammoth2_config() -> Mammoth2DiTConfig:
    return Mammoth2DiTConfig.tiny()


@pytest.fixture(scope="module")
def mammoth2_model(mammoth2_config: Mammoth2DiTConfig) -> Mammoth2Transformer:
    model = Mammoth2Transformer(mammoth2_config).eval()
    _randomize(model, seed=0)
    return model


@pytest.fixture
def make_condition(mammoth2_config: Mammoth2DiTConfig):
    """``make_condition(text_len, image_len=None, refs=((h, w), ...), seed=0)``."""

    def make(text_len: int, image_len: int | None = None, refs=(), seed: int = 0) -> Mammoth2Condition:
        g = torch.Generator().manual_seed(seed)
        d = mammoth2_config.llm_hidden_size
        c = mammoth2_config.in_channels
        return Mammoth2Condition(
            text=torch.randn(text_len, d, generator=g),
            image=None if image_len is None else torch.randn(image_len, d, generator=g),
            ref_latents=[torch.randn(c, h, w, generator=g) for h, w in refs],
        )

    return make
