"""Serve text-to-image, editing and understanding from a directory ``mammoth convert`` wrote
from an official-layout checkpoint: the same stage services and flows as the served pipeline
(``services.local``: vLLM planner, DiT engine, VAE stage), minus Ray. The 2.5 checkpoint has the
ByT5 glyph encoder: quoted text leaves the planner's prompt and reaches the DiT as ByT5 states."""

from __future__ import annotations

import asyncio
import io
import os

import numpy as np
import pytest
from PIL import Image

from services.convert import convert

from .official_layout import write_official_mammothmoda2

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from services.config import ServeConfig
    from services.local import start_local_stages

    src = tmp_path_factory.mktemp("official")
    write_official_mammothmoda2(src)
    model = convert(src, tmp_path_factory.mktemp("served") / "model", "mammothmoda2")
    cfg = ServeConfig.loads(f"models:\n  image: {{path: {model.root}}}\n")
    loop = asyncio.new_event_loop()
    stages = loop.run_until_complete(start_local_stages(cfg, "image"))
    try:
        yield loop, stages, model, cfg
    finally:
        loop.run_until_complete(stages.close())
        loop.close()


def _run(loop, flow) -> list:
    async def collect():
        return [event async for event in flow]

    return loop.run_until_complete(collect())


SMALL = dict(width=64, height=64, steps=2, seed=3, ar_height=3, ar_width=3, text_guidance=3.0)


def test_text_to_image_from_a_converted_checkpoint(served):
    from protos import generation_pb2
    from services import flows
    from services.jobs import image_job

    loop, stages, model, cfg = served
    job = image_job(generation_pb2.GenerateImageRequest(prompt="a red bicycle", **SMALL), model.defaults,
                    cfg.ingress.limits, edit=False)
    assert job.ar_top_k == 2048  # the checkpoint's t2i_generation_config.json
    result = _run(loop, flows.text_to_image(stages, job))[-1]
    assert isinstance(result, flows.Result) and result.planned_tokens == 3 * (3 + 1)
    assert Image.open(io.BytesIO(result.media.data)).size == (64, 64)


def test_edit_from_a_converted_checkpoint(served):
    from protos import common_pb2, generation_pb2
    from services import flows
    from services.jobs import image_job

    loop, stages, model, cfg = served
    small = {k: v for k, v in SMALL.items() if k not in ("width", "height")}
    msg = generation_pb2.EditImageRequest(instruction="make it blue", width=64, height=64, image_guidance=2.0,
                                          reference_images=[common_pb2.Media(data=_png(), mime_type="image/png")],
                                          **small)
    job = image_job(msg, model.defaults, cfg.ingress.limits, edit=True)
    result = _run(loop, flows.edit_image(stages, job))[-1]
    assert isinstance(result, flows.Result) and Image.open(io.BytesIO(result.media.data)).size == (64, 64)


def test_edit_prompts_carry_the_references_mammothtok_codes(served):
    """The converted MammothTok tokenizes the fitted reference (64 px -> 70 px -> a 5 x 5 grid)
    and the planner's prompt grows by exactly that reference's official visual prompt."""
    from protos import common_pb2, generation_pb2
    from services.jobs import image_job
    from vae_worker.mammothtok import load_mammothtok, tokenizer_input, visual_prompt_length

    loop, stages, model, cfg = served
    small = {k: v for k, v in SMALL.items() if k not in ("width", "height", "text_guidance")}
    edit = image_job(generation_pb2.EditImageRequest(
        instruction="make it blue", width=64, height=64, reference_images=[common_pb2.Media(data=_png())], **small),
        model.defaults, cfg.ingress.limits, edit=True)
    t2i = image_job(generation_pb2.GenerateImageRequest(prompt="make it blue", width=64, height=64, **small),
                    model.defaults, cfg.ingress.limits, edit=False)
    assert stages.vae.tokenizer is not None
    encoded = loop.run_until_complete(stages.vae.encode_references(edit))
    (codes,) = encoded.visual_codes
    direct = load_mammothtok(model.stage_path("vae") / "mammothtok")(tokenizer_input(encoded.pixels[0], 14))[0]
    assert codes.shape == (5, 5) and np.array_equal(codes, direct.numpy())

    edited = loop.run_until_complete(stages.planner.plan_image(edit, encoded))
    plain = loop.run_until_complete(stages.planner.plan_image(t2i, None))
    assert edited.prompt_tokens == plain.prompt_tokens + visual_prompt_length(5, 5)
    assert edited.planned_tokens == plain.planned_tokens == 3 * (3 + 1)

    # a direct Planner.PlanImage caller: the codes ride in the message (as VAE.Encode returned them)
    from protos import planner_pb2
    from services import stage_messages as messages

    request = planner_pb2.PlanImageRequest.FromString(messages.plan_image_request(t2i, [codes]).SerializeToString())
    job = messages.plan_image_job(request, model.defaults, cfg.ingress.limits)
    inputs = loop.run_until_complete(stages.planner.edit_inputs(job, None, messages.reference_codes(request)))
    assert inputs.pixels == [] and np.array_equal(inputs.visual_codes[0], codes)
    assert loop.run_until_complete(stages.planner.plan_image(job, inputs)).prompt_tokens == edited.prompt_tokens

    engine = stages.planner.engine
    lay = engine.layout
    plan = loop.run_until_complete(engine.plan_image("make it blue", ar_height=3, ar_width=3, cfg_scale=1.0, seed=3,
                                                     reference_codes=[codes]))
    ids = plan.prompt_token_ids
    start = ids.index(lay.image_start_id)
    body = ids[ids.index(lay.image_token_id, start) + 1:][:5 * 6]
    assert body == [x for row in codes.tolist() for x in [*(lay.visual_start_id + c for c in row), lay.eol_id]]
    assert lay.gen_placeholder_id not in ids and lay.image_pad_id not in ids  # no ViT input for the reference
    # official text mask: the reference's generation-vocabulary tokens are not text condition,
    # its "5*5" size text is
    plain_plan = loop.run_until_complete(engine.plan_image("make it blue", ar_height=3, ar_width=3, cfg_scale=1.0,
                                                           seed=3))
    assert plan.text_condition.shape[0] == plain_plan.text_condition.shape[0] + len(engine._encode("5*5"))
    big = np.zeros((70, 70), dtype=np.int32)  # 4,970 visual tokens: over max_model_len, refused before planning
    with pytest.raises(ValueError, match="reference_images.*max_model_len"):
        loop.run_until_complete(engine.plan_image("make it blue", ar_height=3, ar_width=3, reference_codes=[big]))


def test_understanding_from_a_converted_checkpoint(served):
    from protos import common_pb2, generation_pb2
    from services import flows
    from services.jobs import understand_job

    loop, stages, _, cfg = served
    msg = generation_pb2.UnderstandRequest(max_tokens=6, seed=1, messages=[generation_pb2.ChatMessage(
        role="user", content=[generation_pb2.ContentPart(image=common_pb2.Media(data=_png(), mime_type="image/png")),
                              generation_pb2.ContentPart(text="What is in this picture?")])])
    deltas = _run(loop, flows.understand(stages, understand_job(msg, cfg.ingress.limits)))
    assert deltas and "".join(deltas)


@pytest.fixture(scope="module")
def served25(tmp_path_factory):
    from services.config import ServeConfig
    from services.local import start_local_stages

    from .official_layout import MOE, REFINER, write_official_mammothmoda25

    src = tmp_path_factory.mktemp("official25")
    write_official_mammothmoda25(src, byt5=True)  # with the ByT5 glyph encoder: the glyph tests below
    model = convert(src, tmp_path_factory.mktemp("served25") / "model", "mammothmoda25",
                    dit_overrides={"moe": MOE, "refiner": REFINER})
    cfg = ServeConfig.loads(f"models:\n  video: {{path: {model.root}}}\n")
    loop = asyncio.new_event_loop()
    stages = loop.run_until_complete(start_local_stages(cfg, "video"))
    try:
        yield loop, stages, model, cfg
    finally:
        loop.run_until_complete(stages.close())
        loop.close()


def test_text_to_video_from_a_converted_25_checkpoint(served25):
    from protos import generation_pb2
    from services import flows
    from services.jobs import video_job

    loop, stages, model, cfg = served25
    msg = generation_pb2.GenerateVideoRequest(prompt="waves on a beach", width=64, height=64, frames=5, steps=2, seed=1)
    result = _run(loop, flows.text_to_video(stages, video_job(msg, model.defaults, cfg.ingress.limits, edit=False)))[-1]
    assert isinstance(result, flows.Result) and result.steps == 2 and result.media.data


# ---------------------------------------------------------------------------- 2.5 glyph text (ByT5)


def _job(model, cfg, prompt: str):
    from protos import generation_pb2
    from services.jobs import video_job

    msg = generation_pb2.GenerateVideoRequest(prompt=prompt, negative_prompt='"blurry"', width=64, height=64,
                                              frames=5, steps=2, seed=1, guidance=3.0)
    return video_job(msg, model.defaults, cfg.ingress.limits, edit=False)


def test_quoted_text_leaves_the_planner_prompt_and_reaches_the_dit_as_byt5_states(served25, monkeypatch):
    from services import flows

    loop, stages, model, cfg = served25
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


def test_glyph_states_change_the_video_latents(served25):
    """The same request (same planner conditions) with and without its glyph text."""
    loop, stages, model, cfg = served25
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
