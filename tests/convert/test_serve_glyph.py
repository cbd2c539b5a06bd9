"""Serve a converted MammothModa2.5 glyph checkpoint through the in-process stages
(``services.local``: vLLM planner, DiT stage with its glyph encoder, VAE): quoted text leaves the
planner's prompt and reaches the DiT as ByT5 states."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from services.convert import convert

from .official_layout import MOE, REFINER, write_official_mammothmoda25

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from services.config import ServeConfig
    from services.local import start_local_stages

    src = tmp_path_factory.mktemp("official25-byt5")
    write_official_mammothmoda25(src, byt5=True)
    model = convert(src, tmp_path_factory.mktemp("served-glyph") / "model", "mammothmoda25",
                    dit_overrides={"moe": MOE, "refiner": REFINER})
    cfg = ServeConfig.loads(f"models:\n  video: {{path: {model.root}}}\n")
    loop = asyncio.new_event_loop()
    stages = loop.run_until_complete(start_local_stages(cfg, "video"))
    try:
        yield loop, stages, model, cfg
    finally:
        loop.run_until_complete(stages.close())
        loop.close()


def _job(model, cfg, prompt: str):
    from protos import generation_pb2
    from services.jobs import video_job

    msg = generation_pb2.GenerateVideoRequest(prompt=prompt, negative_prompt='"blurry"', width=64, height=64,
                                              frames=5, steps=2, seed=1, guidance=3.0)
    return video_job(msg, model.defaults, cfg.ingress.limits, edit=False)


def test_text_to_video_with_quoted_text(served, monkeypatch):
    from services import flows

    loop, stages, model, cfg = served
    planner_saw, dit_saw = [], []
    encode, glyph_states = stages.planner.encode_prompts, stages.dit.glyph_states

    async def spy_encode(prompt, negative):
        planner_saw.append((prompt, negative))
        return await encode(prompt, negative)

    async def spy_glyph(job):
        states = await glyph_states(job)
        dit_saw.append(states)
        return states

    monkeypatch.setattr(stages.planner, "encode_prompts", spy_encode)
    monkeypatch.setattr(stages.dit, "glyph_states", spy_glyph)
    job = _job(model, cfg, 'a shop window with a sign "OPEN"')

    async def collect():
        return [event async for event in flows.text_to_video(stages, job)]

    result = loop.run_until_complete(collect())[-1]
    assert isinstance(result, flows.Result) and result.steps == 2 and result.media.data
    assert planner_saw == [('a shop window with a sign ""', '""')]
    glyph, negative = dit_saw[0]
    assert glyph.shape == (len(b'Text "OPEN". ') + 1, 1472) and negative.shape == (len(b'Text "blurry". ') + 1, 1472)


def test_glyph_states_change_the_video_latents(served):
    """The same request (same planner conditions) with and without its glyph text."""
    loop, stages, model, cfg = served
    job = _job(model, cfg, 'a poster that says "SALE"')

    async def latents(job, conditions):
        events = [event async for event in stages.dit.denoise(job, conditions)]
        return np.asarray(events[-1].latents)

    async def encode():
        return await stages.encode_prompts(job)

    conditions = loop.run_until_complete(encode())
    with_glyph = loop.run_until_complete(latents(job, conditions))
    job.glyph_text = job.negative_glyph_text = None
    without = loop.run_until_complete(latents(job, conditions))
    assert with_glyph.shape == without.shape == (16, 2, 8, 8)
    assert not np.allclose(with_glyph, without)
