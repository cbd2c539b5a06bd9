"""Presets (configs, counts, deterministic random folders) and strict loading errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from safetensors.torch import load_file, save_file

from vae_worker.engine import ImageVAE, VideoVAE
from vae_worker.loading import VAELoadError
from vae_worker.presets import PRESETS, count_parameters, stage_config, write_random_checkpoint

WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_real_presets_match_published_configs():
    flux = stage_config("mammoth2-dev")
    assert flux["_class_name"] == "AutoencoderKL" and flux["latent_channels"] == 16
    assert (flux["shift_factor"], flux["scaling_factor"]) == (0.1159, 0.3611)
    assert flux["block_out_channels"] == [128, 256, 512, 512] and not flux["use_quant_conv"]
    assert count_parameters("mammoth2-dev")["total"] == 83_819_683  # FLUX.1 VAE
    for name in ("mammoth25-6b-a1b", "mammoth25-20b-a3b"):  # Wan2.2 VAE: 48 channels, 16x spatial
        wan = stage_config(name)
        assert wan["_class_name"] == "AutoencoderKLWan" and wan["z_dim"] == 48 and wan["is_residual"]
        assert len(wan["latents_mean"]) == len(wan["latents_std"]) == 48
        assert (wan["scale_factor_spatial"], wan["scale_factor_temporal"]) == (16, 4)
    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(stage_config("mammoth25-6b-a1b"))
    assert model.config.z_dim == 48 and model.encoder.conv_in.in_channels == 12  # 2x2 patched RGB
    # the tiny video preset keeps the Wan2.1 layout (diffusers' defaults) at a small width
    default = AutoencoderKLWan.from_config({}).config
    tiny = stage_config("tiny-mammoth25")
    for key in ("z_dim", "dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
        assert list(default[key]) == list(tiny[key]) if isinstance(tiny[key], list) else default[key] == tiny[key]


def test_stage_config_is_a_copy_and_unknown_preset_errors():
    stage_config("tiny-mammoth2")["latent_channels"] = 4
    assert stage_config("tiny-mammoth2")["latent_channels"] == 16
    with pytest.raises(ValueError, match="unknown VAE preset"):
        stage_config("nope")


def test_tiny_presets_are_small():
    for name in ("tiny-mammoth2", "tiny-mammoth25"):
        assert count_parameters(name)["total"] < 5_000_000
    assert set(PRESETS) >= {"tiny-mammoth2", "tiny-mammoth25", "mammoth2-dev", "mammoth25-6b-a1b",
                            "mammoth25-20b-a3b"}


def test_random_checkpoint_is_deterministic_and_loads_with_plain_diffusers(tmp_path):
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        write_random_checkpoint("tiny-mammoth2", tmp_path / name, seed=seed)
    a, b, c = (load_file(str(tmp_path / n / WEIGHTS)) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["shift_factor"] == 0.1159
    model = AutoencoderKL.from_pretrained(str(tmp_path / "a"))
    assert model.config.latent_channels == 16


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, edit):
    state = load_file(str(folder / WEIGHTS))
    edit(state)
    save_file(state, str(folder / WEIGHTS))


def test_missing_tensor_is_named(image_ckpt, tmp_path):
    folder = _copy(image_ckpt, tmp_path / "m")
    _rewrite(folder, lambda s: s.pop("decoder.conv_out.weight"))
    with pytest.raises(VAELoadError, match="missing tensor 'decoder.conv_out.weight'"):
        ImageVAE.from_pretrained(folder)


def test_unexpected_tensor_is_named(image_ckpt, tmp_path):
    folder = _copy(image_ckpt, tmp_path / "u")
    _rewrite(folder, lambda s: s.__setitem__("decoder.extra.weight", torch.zeros(2)))
    with pytest.raises(VAELoadError, match="unexpected tensor 'decoder.extra.weight'"):
        ImageVAE.from_pretrained(folder)


def test_misshaped_tensor_is_named(image_ckpt, tmp_path):
    folder = _copy(image_ckpt, tmp_path / "s")
    _rewrite(folder, lambda s: s.__setitem__("decoder.conv_out.bias", torch.zeros(4)))
    with pytest.raises(VAELoadError, match=r"tensor 'decoder.conv_out.bias' has shape \(4,\)"):
        ImageVAE.from_pretrained(folder)


def test_nan_tensor_is_named(image_ckpt, tmp_path):
    folder = _copy(image_ckpt, tmp_path / "n")
    _rewrite(folder, lambda s: s["decoder.conv_out.bias"].fill_(float("nan")))
    with pytest.raises(VAELoadError, match="decoder.conv_out.bias"):
        ImageVAE.from_pretrained(folder)


def test_wrong_class_and_bad_folders(image_ckpt, video_ckpt, tmp_path):
    with pytest.raises(VAELoadError, match="AutoencoderKLWan"):
        VideoVAE.from_pretrained(image_ckpt)
    with pytest.raises(VAELoadError, match="does not exist"):
        ImageVAE.from_pretrained(tmp_path / "absent")
    folder = _copy(image_ckpt, tmp_path / "j")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(VAELoadError, match="not valid JSON"):
        ImageVAE.from_pretrained(folder)
    folder = _copy(image_ckpt, tmp_path / "w")
    (folder / WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(VAELoadError, match="unreadable safetensors"):
        ImageVAE.from_pretrained(folder)
    folder = _copy(image_ckpt, tmp_path / "x")
    (folder / WEIGHTS).unlink()
    with pytest.raises(VAELoadError, match="missing diffusion_pytorch_model.safetensors"):
        ImageVAE.from_pretrained(folder)
