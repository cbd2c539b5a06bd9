"""The DiT rank group on a local Ray cluster: 2 rank actors (gloo), the engine in this process.

Same outputs as one process, a killed rank fails the running step within the collective
timeout (``GroupUnavailable``, UNAVAILABLE/503 in the services), the group is rebuilt and
the next request succeeds.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from dit_worker.engine import DiTEngine, DiTEngineConfig
from dit_worker.parallel.group import GroupUnavailable
from dit_worker.parallel.proxy import parallel_engine
from dit_worker.presets import write_random_checkpoint
from dit_worker.requests import SamplingParams, VideoDenoiseRequest
from services.config import DiTParallel
from services.errors import classify

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray cluster and two rank processes
TIMEOUT_S = 8.0


def _request(rid: str, dim: int, steps: int = 2, seed: int = 3) -> VideoDenoiseRequest:
    g = torch.Generator().manual_seed(seed)
    return VideoDenoiseRequest(request_id=rid, prompt=torch.randn(7, dim, generator=g),
                               negative=torch.randn(4, dim, generator=g), latent_frames=3, latent_height=8,
                               latent_width=8, guidance=3.0, sampling=SamplingParams(steps=steps, seed=seed))


@pytest.fixture(scope="module")
def group_engine(tmp_path_factory):
    from services.dit_group import RankGroup

    ckpt = write_random_checkpoint("tiny-mammoth25", tmp_path_factory.mktemp("group") / "dit", seed=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-dit-group")
    group = RankGroup(ckpt, DiTParallel(size=2, collective_timeout_s=TIMEOUT_S, start_timeout_s=120),
                      device="cpu", dtype="float32", cpu_threads=1)
    try:
        group.start()
        yield ckpt, group, parallel_engine(ckpt, DiTEngineConfig(), group, world_size=2)
    finally:
        group.shutdown()
        ray.shutdown()


def test_group_output_equals_single_process_and_health_passes(group_engine):
    ckpt, group, engine = group_engine
    single = DiTEngine.from_pretrained(ckpt, DiTEngineConfig())
    dim = single.model.config.refiner.vlm_dim
    got = engine.generate([_request("a", dim)])[0].latents
    want = single.generate([_request("a", dim)])[0].latents
    assert float((got - want).abs().max()) <= 1e-4
    group.check_health()
    stats = engine.model.stats()
    assert stats["world_size"] == 2 and sum(stats["rank_tokens"]) > 0
    assert stats["parameter_bytes"]["expert"] * 2 == sum(
        p.numel() * p.element_size() for n, p in single.model.named_parameters() if n.endswith(
            ("ffn.experts.weight1", "ffn.experts.weight2")))


def test_an_idle_group_outlives_the_collective_timeout(group_engine):
    # Followers wait for the next plan inside a collective bounded by the timeout: the leader's
    # keepalive must keep an idle group up (before it, every idle spell rebuilt the group).
    ckpt, group, engine = group_engine
    generation, pids = group.generation, list(group.pids)
    time.sleep(TIMEOUT_S * 2.5)
    group.check_health()
    assert group.generation == generation and group.pids == pids
    dim = engine.model.config.refiner.vlm_dim
    assert engine.generate([_request("after-idle", dim)])[0].latents.shape == (16, 3, 8, 8)
    assert group.generation == generation


def test_killed_rank_fails_the_step_promptly_then_the_group_is_rebuilt(group_engine):
    ckpt, group, engine = group_engine
    dim = engine.model.config.refiner.vlm_dim
    generation, follower = group.generation, group.pids[1]
    outcome: dict = {}

    def run() -> None:
        try:
            engine.generate([_request("long", dim, steps=200)])
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(2.0)  # well inside the 200 steps
    killed = time.monotonic()
    os.kill(follower, signal.SIGKILL)
    thread.join(timeout=TIMEOUT_S + 30)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), GroupUnavailable)
    assert outcome["at"] - killed < TIMEOUT_S + 10  # bounded by the collective timeout, never a hang
    assert classify(outcome["error"]).http_status == 503
    result = engine.generate([_request("after", dim)])[0]  # waits for the rebuilt group
    assert result.latents.shape == (16, 3, 8, 8) and group.generation == generation + 1
    assert group.pids[1] != follower
    group.check_health()
