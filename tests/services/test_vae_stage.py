"""The VAE stage batches concurrent decodes without letting one request spoil another."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from services.jobs import InvalidArgument, OutputSpec
from services.stages.vae import VAEStage
from vae_worker.engine import ImageVAE
from vae_worker.presets import write_random_checkpoint


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> VAEStage:
    path = tmp_path_factory.mktemp("vae")
    write_random_checkpoint("tiny-mammoth2", path, seed=0)
    return VAEStage(ImageVAE.from_pretrained(path), max_batch_decodes=4, batch_wait_timeout_s=0.05)


def _latents(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return torch.randn(16, h, w, generator=torch.Generator().manual_seed(seed)).numpy()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_concurrent_decodes_share_one_batch_and_match_single_decodes(stage):
    inputs = [_latents(i) for i in range(3)] + [_latents(3, 8, 6)]

    async def together():
        return await asyncio.gather(*(stage.decode(x, OutputSpec("png")) for x in inputs))

    batches = stage.decoder.batches_run
    outputs = asyncio.run(together())
    assert stage.decoder.batches_run == batches + 1 and stage.decoder.last_batch_size == 4
    assert [(o.width, o.height) for o in outputs] == [(64, 64)] * 3 + [(48, 64)]
    for x, batched in zip(inputs, outputs):
        alone = asyncio.run(stage.decode(x, OutputSpec("png")))
        assert np.abs(_pixels(batched.data) - _pixels(alone.data)).max() <= 1


@pytest.mark.parametrize("bad,message", [
    (np.zeros((4, 8, 8), np.float32), "C=16"),
    (np.zeros((16, 8), np.float32), "[C, h, w]"),
    (np.full((16, 8, 8), np.nan, np.float32), "NaN"),
])
def test_bad_latents_fail_alone(stage, bad, message):
    async def together():
        return await asyncio.gather(stage.decode(bad, OutputSpec("png")), stage.decode(_latents(5), OutputSpec("png")),
                                    return_exceptions=True)

    error, good = asyncio.run(together())
    assert isinstance(error, InvalidArgument) and error.field == "latents" and message in str(error)
    assert good.width == 64


def test_a_cancelled_decode_does_not_disturb_the_batch(stage):
    async def main():
        doomed = asyncio.ensure_future(stage.decode(_latents(6), OutputSpec("png")))
        kept = asyncio.ensure_future(stage.decode(_latents(7), OutputSpec("jpeg")))
        await asyncio.sleep(0)
        doomed.cancel()
        return await kept

    assert asyncio.run(main()).mime_type == "image/jpeg"


def test_two_lanes_decode_side_by_side_within_the_memory_budget(tmp_path):
    """Two lanes split a burst of decodes; both run the image VAE at once while their estimates
    fit the budget together, and one at a time once they would not."""
    import threading

    from services.stages.lanes import Lanes

    write_random_checkpoint("tiny-mammoth2", tmp_path, seed=0)
    vae = ImageVAE.from_pretrained(tmp_path)
    running = {"now": 0, "most": 0}
    lock = threading.Lock()
    decode = vae.model.decode

    def watched(*args, **kwargs):
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        try:
            time.sleep(0.05)  # long enough for the other lane to arrive
            return decode(*args, **kwargs)
        finally:
            with lock:
                running["now"] -= 1

    vae.model.decode = watched
    stage = VAEStage(vae, max_batch_decodes=4, lanes=Lanes(2, threads=1))
    inputs = [_latents(i) for i in range(4)]

    async def burst():
        return await asyncio.gather(*(stage.decode(x, OutputSpec("png")) for x in inputs))

    outputs = asyncio.run(burst())
    assert running["most"] == 2 and stage.decoder.batches_run >= 2 and stage.decoder.last_batch_size <= 2
    single = VAEStage(ImageVAE.from_pretrained(tmp_path))
    for x, out in zip(inputs, outputs):
        assert np.abs(_pixels(out.data) - _pixels(asyncio.run(single.decode(x, OutputSpec("png"))).data)).max() <= 1
    plan = vae.plan_for(1, 64, 64, decode=True)
    vae.memory_budget_mb = plan.estimate_bytes * 1.5 / 2**20  # room for one call, not two
    running["most"] = 0
    asyncio.run(burst())
    assert running["most"] == 1
