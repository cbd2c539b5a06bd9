"""The video DiT app asks Serve for a placement group sized to its rank group; image DiTs never."""

from __future__ import annotations

import pytest

from services.apps import dit
from services.config import ConfigError, ServeConfig
from services.render import render_serve_config


def _dit_deployment(cfg: ServeConfig, model: str):
    app = next(a for a in render_serve_config(cfg)["applications"] if a["name"] == f"{model}-dit")
    return dit.app(app["args"])._bound_deployment


def _config(device: str, size: int) -> ServeConfig:
    data = (ServeConfig.default_gpu() if device == "gpu" else ServeConfig.default_cpu()).to_dict()
    data["dit"]["engine"]["parallel"]["size"] = size
    data["models"] = {"image": {"preset": "tiny-mammoth2"}, "video": {"preset": "tiny-mammoth25"}}
    return ServeConfig.from_dict(data)


def test_gpu_video_dit_reserves_one_gpu_per_rank_in_a_strict_pack_group():
    cfg = _config("gpu", 2)
    video = _dit_deployment(cfg, "video")
    assert video.ray_actor_options["num_gpus"] == 0  # the replica's engine runs on CPU tensors
    assert video._replica_config.placement_group_bundles == [{"CPU": 2.0}] + [{"CPU": 0.25, "GPU": 1.0}] * 2
    assert video._replica_config.placement_group_strategy == "STRICT_PACK"
    image = _dit_deployment(cfg, "image")  # no MoE: one process, its own GPU
    assert image._replica_config.placement_group_bundles is None and image.ray_actor_options["num_gpus"] == 1


def test_cpu_group_bundles_and_single_process_default():
    bundles = _dit_deployment(_config("cpu", 2), "video")._replica_config.placement_group_bundles
    assert bundles == [{"CPU": 0.25}] + [{"CPU": 0.25}] * 2
    assert _dit_deployment(_config("cpu", 1), "video")._replica_config.placement_group_bundles is None


def test_parallel_settings_are_validated_by_name():
    with pytest.raises(ConfigError, match="dit.engine.parallel.mode"):
        ServeConfig.from_dict({"dit": {"engine": {"parallel": {"mode": "tp"}}}})
    with pytest.raises(ConfigError, match="dit.engine.parallel.size"):
        ServeConfig.from_dict({"dit": {"engine": {"parallel": {"size": 0}}}})
    with pytest.raises(ConfigError, match="dit.engine.parallel.ranks"):
        ServeConfig.from_dict({"dit": {"engine": {"parallel": {"ranks": 2}}}})
