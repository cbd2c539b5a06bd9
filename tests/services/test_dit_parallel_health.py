"""DiT ``check_health``: a live single-process stage passes; a dead batching loop fails it."""

from __future__ import annotations

import asyncio

import pytest

from dit_worker.engine import DiTEngineConfig
from dit_worker.presets import write_random_checkpoint
from services.stages.dit import DiTStage


def test_check_health_passes_when_alive_and_fails_when_the_batching_loop_died(tmp_path):
    write_random_checkpoint("tiny-mammoth25", tmp_path / "dit", seed=0)
    stage = DiTStage.from_model_dir(tmp_path, DiTEngineConfig())
    stage.check_health()  # no loop yet, in-process model: healthy

    async def crash() -> None:
        raise RuntimeError("boom")

    async def run() -> None:
        stage._workers = [asyncio.get_running_loop().create_task(crash())]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="batching loop died"):
            stage.check_health()
        stage._ensure_worker()  # the next request restarts the loop
        stage.check_health()
        await stage.close()

    asyncio.run(run())
