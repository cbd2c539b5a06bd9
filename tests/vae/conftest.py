"""Tiny random-weight VAE folders, written once per session from the presets."""

from __future__ import annotations

import pytest
import torch

from vae_worker.engine import ImageVAE, VideoVAE
from vae_worker.presets import write_random_checkpoint


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def image_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mammoth2")
    write_random_checkpoint("tiny-mammoth2", path, seed=0)
    return path


@pytest.fixture(scope="session")
def video_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mammoth25")
    write_random_checkpoint("tiny-mammoth25", path, seed=0)
    return path


@pytest.fixture()
def image_vae(image_ckpt):
    return ImageVAE.from_pretrained(image_ckpt)


@pytest.fixture()
def video_vae(video_ckpt):
    return VideoVAE.from_pretrained(video_ckpt)


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields, uint8 [B,H,W,3] (VAE-friendly content)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(batch, 3, 4, 4, generator=gen)
    up = torch.nn.functional.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)
    return (up.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
