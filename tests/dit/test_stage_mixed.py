"""The DiT stage with mixed sizes and the step cache: a small request joins a running big batch
(and leaves it first), and the result's timings carry computed vs cached steps."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from dit_worker import presets
from dit_worker.engine import DiTEngine, DiTEngineConfig
from protos import dit_pb2
from services.handoff import DenoiseDone, ImageConditions
from services.stage_messages import denoise_job
from services.stages.dit import DiTStage


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> DiTEngine:
    path = tmp_path_factory.mktemp("dit")
    presets.write_random_checkpoint("tiny-mammoth2", path, seed=1)
    return DiTEngine.from_pretrained(path)


def _job(rid: str, steps: int, seed: int, latent: int, **knobs):
    request = dit_pb2.DenoiseRequest(request_id=rid, latent_height=latent, latent_width=latent, steps=steps,
                                     seed=seed, text_guidance=4.0, **knobs)
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


def _late_small_request(engine: DiTEngine) -> tuple[DiTStage, list[str], DenoiseDone]:
    async def main():
        stage = DiTStage(engine, max_batch_requests=4, batch_wait_timeout_s=0.0)
        finished: list[str] = []
        big = asyncio.ensure_future(_collect(stage, _job("big", 60, 1, 16), _conditions(1), finished))
        while stage.active_requests == 0:  # the big request is denoising
            await asyncio.sleep(0.001)
        small = await _collect(stage, _job("small", 2, 2, 8), _conditions(2), finished)
        await big
        await stage.close()
        return stage, finished, small

    return asyncio.run(main())


def test_a_small_request_joins_a_running_big_batch_and_finishes_first(engine):
    stage, finished, small = _late_small_request(engine)
    assert finished == ["small", "big"]
    assert stage.batches_run == 1 and stage.batches_joined == 1
    alone = engine.generate([DiTStage(engine).image_request(_job("solo", 2, 2, 8), _conditions(2), None)])[0]
    np.testing.assert_allclose(small.latents, alone.latents.numpy(), atol=2e-5, rtol=1e-4)


def test_without_mixed_shapes_the_small_request_waits_for_the_big_batch(engine):
    one_shape = DiTEngine(engine.model, engine.family, dataclasses.replace(engine.config, mixed_shapes=False))
    stage, finished, _ = _late_small_request(one_shape)
    assert finished == ["big", "small"] and stage.batches_run == 2


def test_step_cache_knobs_reach_the_engine_and_counts_come_back_in_timings(engine):
    async def main():
        stage = DiTStage(engine)
        on = await _collect(stage, _job("on", 8, 3, 8, step_cache_threshold=10.0, step_cache_warmup=0.25,
                                        step_cache_max_cached_steps=2), _conditions(3), [])
        off = await _collect(stage, _job("off", 8, 3, 8), _conditions(3), [])
        await stage.close()
        return on, off

    on, off = asyncio.run(main())
    # 8 steps: 0 1 computed (warm-up), then 2 cached / 1 computed: cached 2 3, 5 6; computed 4 7
    assert (on.timings["dit_steps_computed"], on.timings["dit_steps_cached"]) == (4.0, 4.0)
    assert (off.timings["dit_steps_computed"], off.timings["dit_steps_cached"]) == (8.0, 0.0)
    assert not np.allclose(on.latents, off.latents)
    assert DiTEngineConfig().mixed_shapes  # on by default
