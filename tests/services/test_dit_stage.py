"""The DiT stage's batching loop: late requests join the running batch and leave it when done."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from dit_worker import presets
from dit_worker.engine import DiTEngine
from protos import dit_pb2
from services.handoff import DenoiseDone, ImageConditions
from services.stage_messages import denoise_job
from services.stages.dit import DiTStage


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> DiTEngine:
    path = tmp_path_factory.mktemp("dit")
    presets.write_random_checkpoint("tiny-mammoth2", path, seed=1)
    return DiTEngine.from_pretrained(path)


def _job(rid: str, steps: int, seed: int):
    request = dit_pb2.DenoiseRequest(request_id=rid, latent_height=8, latent_width=8, steps=steps, seed=seed,
                                     text_guidance=4.0)
    return denoise_job(request, "mammoth2", {})


def _conditions(seed: int) -> ImageConditions:
    rng = np.random.default_rng(seed)
    return ImageConditions(rng.standard_normal((5, 128), dtype=np.float32), None,
                           rng.standard_normal((3, 128), dtype=np.float32), 0)


async def _collect(stage: DiTStage, job, conditions, finished: list[str]) -> DenoiseDone:
    done = None
    async for event in stage.denoise(job, conditions):
        done = event
    finished.append(job.request_id)
    return done


def test_a_late_short_request_joins_and_finishes_first(engine):
    async def main():
        stage = DiTStage(engine, max_batch_requests=4, batch_wait_timeout_s=0.0)
        finished: list[str] = []
        long = asyncio.ensure_future(_collect(stage, _job("long", 200, 1), _conditions(1), finished))
        while stage.active_requests == 0:  # the long request is denoising
            await asyncio.sleep(0.001)
        short = await _collect(stage, _job("short", 2, 2), _conditions(2), finished)
        await long
        solo = DiTStage(engine)
        alone = await _collect(solo, _job("short", 2, 2), _conditions(2), [])
        await stage.close()
        await solo.close()
        return stage, finished, short, alone

    stage, finished, short, alone = asyncio.run(main())
    assert finished == ["short", "long"]
    assert stage.batches_run == 1 and stage.batches_joined == 1  # it joined; no second batch ran
    np.testing.assert_allclose(short.latents, alone.latents, atol=2e-5, rtol=1e-4)


def test_two_callers_reusing_one_request_id_get_their_own_results(engine):
    async def main():
        stage = DiTStage(engine, max_batch_requests=4)
        results = await asyncio.gather(_collect(stage, _job("dup", 3, 1), _conditions(1), []),
                                       _collect(stage, _job("dup", 3, 2), _conditions(2), []))
        await stage.close()
        return results

    first, second = asyncio.run(main())
    assert first.steps == second.steps == 3 and not np.allclose(first.latents, second.latents)


def test_two_lanes_share_a_burst_run_side_by_side_and_match_one_lane(engine):
    """A burst of four on a two-lane stage runs as two batches of two in two threads at once;
    each request's result is what a one-lane stage gives it."""
    import threading

    from services.stages.lanes import Lanes

    threads: set[str] = set()
    overlap = {"now": 0, "most": 0}
    lock = threading.Lock()
    generate = engine.generate

    def watched(*args, **kwargs):
        with lock:
            threads.add(threading.current_thread().name)
            overlap["now"] += 1
            overlap["most"] = max(overlap["most"], overlap["now"])
        try:
            return generate(*args, **kwargs)
        finally:
            with lock:
                overlap["now"] -= 1

    async def run(stage):
        jobs = [(_job(f"r{i}", 30, i), _conditions(i)) for i in range(4)]
        results = await asyncio.gather(*(_collect(stage, job, cond, []) for job, cond in jobs))
        await stage.close()
        return results

    engine.generate = watched
    try:
        two = DiTStage(engine, max_batch_requests=4, batch_wait_timeout_s=0.05, lanes=Lanes(2, threads=1, name="dit-lane"))
        laned = asyncio.run(run(two))
    finally:
        del engine.generate
    one = asyncio.run(run(DiTStage(engine, max_batch_requests=4, batch_wait_timeout_s=0.05)))
    assert two.lane_capacity == 2 and two.batches_run == 2 and two.last_batch_size == 2
    assert overlap["most"] == 2 and len(threads) == 2 and all(t.startswith("dit-lane") for t in threads)
    for a, b in zip(laned, one):
        np.testing.assert_allclose(a.latents, b.latents, atol=2e-5, rtol=1e-4)
    assert two.active_requests == 0
