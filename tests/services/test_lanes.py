"""Lanes: how many, with how many intra-op threads, and that a lane thread really uses its count."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.config import ServeConfig
from services.stage_setup import stage_lanes
from services.stages import lanes as lanes_mod
from services.stages.lanes import Lanes, lane_threads, resolve_lanes


def test_auto_is_one_lane_per_core_on_cpu_capped_and_one_on_gpu(monkeypatch):
    monkeypatch.setattr(lanes_mod, "available_cpus", lambda: 2)
    assert resolve_lanes(0, "cpu") == 2 and resolve_lanes(0, "cuda") == 1
    assert resolve_lanes(0, "cpu", cpu_threads=2) == 1 and resolve_lanes(3, "cuda") == 3
    monkeypatch.setattr(lanes_mod, "available_cpus", lambda: 64)
    assert resolve_lanes(0, "cpu") == lanes_mod.MAX_AUTO_LANES
    assert lane_threads(4, None) == 16 and lane_threads(1, None) is None and lane_threads(4, 3) == 3


def test_stage_lanes_follow_the_config(monkeypatch):
    monkeypatch.setattr(lanes_mod, "available_cpus", lambda: 2)
    cfg = ServeConfig.loads("dit: {engine: {lanes: 3, cpu_threads: 1}}\nvae: {engine: {device: cpu}}")
    dit, vae = stage_lanes(cfg, "dit"), stage_lanes(cfg, "vae")
    assert (dit.count, dit.threads) == (3, 1) and (vae.count, vae.threads) == (2, 1)
    with pytest.raises(Exception, match="lanes"):
        ServeConfig.loads("vae: {engine: {lanes: -1}}")


def test_a_lane_thread_runs_with_its_own_thread_count():
    """OpenMP's count is per thread: the lane sets it in the thread, whatever the main thread has."""
    lanes = Lanes(1, threads=1, name="t-lane")
    before = torch.get_num_threads()

    async def main():
        return await lanes.run(torch.get_num_threads)

    try:
        assert asyncio.run(main()) == 1
        assert torch.get_num_threads() == before
    finally:
        lanes.close()
    assert asyncio.run(main()) == 1  # a closed Lanes starts new threads on the next run
    lanes.close()
    with pytest.raises(ValueError, match="at least one"):
        Lanes(0)


def test_a_cgroup_cpu_quota_caps_the_available_cpus(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a pod limited to 1.5 CPUs
    assert lanes_mod._cgroup_cpu_limit(quota) == 2
    quota.write_text("max 100000\n")
    assert lanes_mod._cgroup_cpu_limit(quota) is None
    assert lanes_mod._cgroup_cpu_limit(tmp_path / "absent") is None
    monkeypatch.setattr(lanes_mod, "_cgroup_cpu_limit", lambda: 1)
    assert lanes_mod.available_cpus() == 1 and resolve_lanes(0, "cpu") == 1
