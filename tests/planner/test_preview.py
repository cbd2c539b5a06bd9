"""The MammothModa2-Preview planner (Qwen2.5-VL + generation experts) on real vLLM (CPU), one
engine for the module, checked against the pure-PyTorch reference of the same weights: the
same grid planning, AR-CFG, routing and hidden-state export as the Qwen3-VL planner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from planner.tokens import TokenLayout

from .conftest import start_engine

pytestmark = pytest.mark.slow
LAY = TokenLayout()


@pytest.fixture(scope="module")
def engine(tiny_preview_dir):
    loop, eng = start_engine(tiny_preview_dir)
    eng.loop = loop
    yield eng
    loop.run(eng.shutdown(), timeout=120)
    loop.close()


def run(engine, coro, timeout=300):
    return engine.loop.run(coro, timeout)


def _assert_grid(ids: torch.Tensor, h: int, w: int):
    assert ids.shape == (h * (w + 1),)
    grid = ids.view(h, w + 1)
    assert (grid[:, w] == LAY.eol_id).all()
    body = grid[:, :w]
    assert ((body >= LAY.visual_start_id) & (body < LAY.visual_start_id + LAY.num_visual_codes)).all()


def test_the_checkpoint_selects_the_qwen25_architecture(engine, tiny_preview_dir):
    config = json.loads((tiny_preview_dir / "config.json").read_text())
    assert config["architectures"] == ["Mammothmoda2Qwen2_5_VLForConditionalGeneration"]
    assert engine.vllm_config.model_config.architectures == ["Mammothmoda2Qwen2_5_VLForConditionalGeneration"]
    # The official Preview conditions the DiT on the last (normed) hidden state.
    assert engine.config.condition_layers == (-1,)
    assert engine.hidden_size == 128 and engine.num_layers == 18


def test_plan_and_exported_conditions_match_reference(engine, preview_reference):
    res = run(engine, engine.plan_image("a red cube on a table", ar_height=3, ar_width=5, cfg_scale=1.0,
                                        seed=3, negative_prompt="blurry"))
    _assert_grid(res.visual_token_ids, 3, 5)
    seq = torch.tensor(res.prompt_token_ids + res.visual_token_ids.tolist() + [LAY.image_end_id])
    ref = preview_reference.condition(seq, (-1,))
    text_ref, image_ref = engine.split_condition(seq, ref, len(res.prompt_token_ids))
    assert res.image_condition.shape[0] == 2 + 3 * 6 + 1
    torch.testing.assert_close(res.text_condition, text_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(res.image_condition, image_ref, atol=2e-3, rtol=2e-3)
    neg_ids = torch.tensor(engine._encode(engine.negative_prompt_text("blurry")))
    torch.testing.assert_close(res.negative_condition, preview_reference.condition(neg_ids, (-1,)),
                               atol=2e-3, rtol=2e-3)
    assert engine.live_shared_blocks() == 0


def test_greedy_plan_with_and_without_ar_cfg_equals_reference(engine, preview_reference):
    prompt = "a lighthouse at night"
    ids = engine._encode(engine.t2i_prompt(prompt, 2, 4))
    kw = dict(ar_height=2, ar_width=4, eol_id=LAY.eol_id, visual_start=LAY.visual_start_id,
              num_visual=LAY.num_visual_codes)
    plans = {}
    for scale in (1.0, 5.0):
        res = run(engine, engine.plan_image(prompt, ar_height=2, ar_width=4, cfg_scale=scale, temperature=0.0,
                                            negative_prompt=None))
        plans[scale] = preview_reference.generate_plan(ids, cfg_scale=scale, **kw)
        assert res.visual_token_ids.tolist() == plans[scale], f"cfg_scale={scale}"
    assert plans[5.0] != plans[1.0]  # guidance changed the choice (so the test can fail)


def test_gen_tokens_take_the_gen_experts_and_biases_load(engine, preview_reference):
    """Gen-vocabulary ids in the prompt: vLLM equals the routed reference (whose q/k/v biases
    are non-zero), and differs from the unrouted one exactly from the first gen token on."""
    ids = engine._encode("hello there, general") + [LAY.visual_start_id + 5, LAY.eol_id, LAY.visual_start_id + 9]
    ids += engine._encode(" and more text")
    hidden, _ = run(engine, engine._capture({"prompt_token_ids": ids}, (-1,)))
    t = torch.tensor(ids)
    routed = preview_reference.forward(t[None]).hidden_states[-1][0]
    torch.testing.assert_close(hidden, routed, atol=2e-3, rtol=2e-3)
    layers = preview_reference.model.language_model.layers
    assert layers[0].self_attn.q_proj.bias.abs().max() > 0
    saved = [layer.gen_mlp for layer in layers]
    try:
        for layer in layers:
            layer.gen_mlp = None
        unrouted = preview_reference.forward(t[None]).hidden_states[-1][0]
    finally:
        for layer, g in zip(layers, saved):
            layer.gen_mlp = g
    first_gen = int((t >= LAY.gen_vocab_start_index).nonzero()[0])
    diff = (routed - unrouted).abs().amax(-1)
    assert (diff[:first_gen] < 1e-5).all() and (diff[first_gen:] > 1e-3).all()


def test_understanding_with_an_image_through_the_qwen25_vision_tower(engine):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    info: dict = {}

    async def collect(into=None):
        return [d async for d in engine.understand(messages, {"max_tokens": 6, "temperature": 0.0, "seed": 1},
                                                   info=into)]

    deltas = run(engine, collect(info))
    assert len(deltas) >= 2 and all(isinstance(d, str) for d in deltas)
    # 56x84 px -> 4x6 patches of 14 px -> 2x3 merged image tokens, on top of the text
    assert info["prompt_tokens"] > 6
    assert run(engine, collect()) == deltas  # greedy: same answer
