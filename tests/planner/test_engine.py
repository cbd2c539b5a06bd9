"""Real vLLM (CPU) on the tiny checkpoint, one engine for the module; checked against the
pure-PyTorch reference forward of the same weights."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from PIL import Image

from planner.tokens import TokenLayout

from .conftest import start_engine

pytestmark = pytest.mark.slow
LAY = TokenLayout()
LAYERS = [-2, -5, -8, -11, -14, -17]


@pytest.fixture(scope="module")
def engine(tiny_planner_dir):
    loop, eng = start_engine(tiny_planner_dir)
    eng.loop = loop
    yield eng
    loop.run(eng.shutdown(), timeout=120)
    loop.close()


def run(engine, coro, timeout=300):
    return engine.loop.run(coro, timeout)


def _assert_grid(ids: torch.Tensor, h: int, w: int):
    assert ids.shape == (h * (w + 1),)
    grid = ids.view(h, w + 1)
    assert (grid[:, w] == LAY.eol_id).all()  # EOL exactly at each row end
    body = grid[:, :w]
    assert ((body >= LAY.visual_start_id) & (body < LAY.visual_start_id + LAY.num_visual_codes)).all()


def test_plan_structure_and_conditions_match_reference(engine, reference):
    res = run(engine, engine.plan_image("a red cube on a table", ar_height=3, ar_width=5, cfg_scale=1.0,
                                        seed=3, negative_prompt="blurry"))
    _assert_grid(res.visual_token_ids, 3, 5)
    # Exported hidden states == reference layer average over prompt + generated + <|image end|>.
    seq = torch.tensor(res.prompt_token_ids + res.visual_token_ids.tolist() + [LAY.image_end_id])
    ref = reference.condition(seq, LAYERS)
    text_ref, image_ref = engine.split_condition(seq, ref, len(res.prompt_token_ids))
    assert res.text_condition.shape == text_ref.shape and res.image_condition.shape == image_ref.shape
    # image condition: 2 prompt markers + the grid (EOLs included) + <|image end|>
    assert res.image_condition.shape[0] == 2 + 3 * 6 + 1
    torch.testing.assert_close(res.text_condition, text_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(res.image_condition, image_ref, atol=2e-3, rtol=2e-3)
    neg_ids = torch.tensor(engine._encode(engine.negative_prompt_text("blurry")))
    torch.testing.assert_close(res.negative_condition, reference.condition(neg_ids, LAYERS), atol=2e-3, rtol=2e-3)
    assert engine.live_shared_blocks() == 0


def test_greedy_plan_equals_reference_generate(engine, reference):
    """With and without AR-CFG (pairs in one vLLM batch) the tokens equal the reference loop."""
    prompt = "a lighthouse at night"
    ids = engine._encode(engine.t2i_prompt(prompt, 2, 4))
    kw = dict(ar_height=2, ar_width=4, eol_id=LAY.eol_id, visual_start=LAY.visual_start_id,
              num_visual=LAY.num_visual_codes)
    for scale in (1.0, 5.0):
        res = run(engine, engine.plan_image(prompt, ar_height=2, ar_width=4, cfg_scale=scale, temperature=0.0,
                                            negative_prompt=None))
        expected = reference.generate_plan(ids, cfg_scale=scale, **kw)
        assert res.visual_token_ids.tolist() == expected, f"cfg_scale={scale}"
    no_cfg = reference.generate_plan(ids, cfg_scale=1.0, **kw)
    assert expected != no_cfg  # guidance changed the choice (so the test can fail)


def test_gen_tokens_take_the_gen_experts(engine, reference):
    """Prompt with generation-vocabulary ids (vLLM's multimodal model runs the embeddings path):
    vLLM equals the routed reference, and differs from the unrouted one exactly from the first
    gen token on."""
    ids = engine._encode("hello there, general") + [LAY.visual_start_id + 5, LAY.eol_id, LAY.visual_start_id + 9]
    ids += engine._encode(" and more text")
    hidden, _ = run(engine, engine._capture({"prompt_token_ids": ids}, (-1,)))
    t = torch.tensor(ids)
    routed = reference.forward(t[None]).hidden_states[-1][0]
    torch.testing.assert_close(hidden, routed, atol=2e-3, rtol=2e-3)
    unrouted = _unrouted_last_hidden(reference, t)
    first_gen = int((t >= LAY.gen_vocab_start_index).nonzero()[0])
    diff = (routed - unrouted).abs().amax(-1)
    assert (diff[:first_gen] < 1e-5).all() and (diff[first_gen:] > 1e-3).all()


def test_encode_prompt_is_last_hidden_state(engine, reference):
    """2.5 prompt encoder: final normed hidden state of the raw prompt tokens, unpadded."""
    hidden = run(engine, engine.encode_prompt("  a  slow pan over a misty   forest "))
    ids = torch.tensor(engine._encode("a slow pan over a misty forest"))
    torch.testing.assert_close(hidden, reference.forward(ids[None]).hidden_states[-1][0], atol=2e-3, rtol=2e-3)
    assert hidden.shape == (ids.numel(), 128) and engine.config.prompt_max_length == 512


def _unrouted_last_hidden(reference, t):
    saved = [layer.gen_mlp for layer in reference.model.language_model.layers]
    try:
        for layer in reference.model.language_model.layers:
            layer.gen_mlp = None
        return reference.forward(t[None]).hidden_states[-1][0]
    finally:
        for layer, g in zip(reference.model.language_model.layers, saved):
            layer.gen_mlp = g


def test_seeded_sampling_is_deterministic(engine):
    kw = dict(ar_height=2, ar_width=6, cfg_scale=3.0, temperature=1.0, top_k=50, top_p=0.9, negative_prompt=None)
    a = run(engine, engine.plan_image("a cat", seed=11, **kw))
    b = run(engine, engine.plan_image("a cat", seed=11, **kw))
    c = run(engine, engine.plan_image("a cat", seed=12, **kw))
    assert torch.equal(a.visual_token_ids, b.visual_token_ids)
    torch.testing.assert_close(a.image_condition, b.image_condition)
    assert not torch.equal(a.visual_token_ids, c.visual_token_ids)
    _assert_grid(c.visual_token_ids, 2, 6)


def test_concurrent_plans_and_negative_cache(engine):
    async def both():
        return await asyncio.gather(*(engine.plan_image(f"dog {i}", ar_height=2, ar_width=3, cfg_scale=2.0, seed=i,
                                                        negative_prompt="ugly") for i in range(3)))

    results = run(engine, both())
    for r in results:
        _assert_grid(r.visual_token_ids, 2, 3)
    assert results[0].negative_condition is results[1].negative_condition  # computed once, cached


def test_understanding_streams_with_image(engine):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in the picture?"}]}]

    async def collect():
        return [d async for d in engine.understand(messages, {"max_tokens": 6, "temperature": 0.0, "seed": 1})]

    deltas = run(engine, collect())
    assert len(deltas) >= 2 and all(isinstance(d, str) for d in deltas)
    assert run(engine, collect()) == deltas  # greedy: same answer


def test_cancellation_aborts_and_frees(engine):
    async def cancel_midway():
        task = asyncio.ensure_future(engine.plan_image("a big plan", ar_height=30, ar_width=30, cfg_scale=2.0,
                                                       negative_prompt=None))
        await asyncio.sleep(1.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if engine.llm.output_processor.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.1)
        return engine.llm.output_processor.get_num_unfinished_requests()

    t0 = time.perf_counter()
    assert run(engine, cancel_midway()) == 0
    assert engine.live_shared_blocks() == 0
    assert time.perf_counter() - t0 < 60
    res = run(engine, engine.plan_image("after cancel", ar_height=1, ar_width=2, cfg_scale=2.0, negative_prompt=None))
    _assert_grid(res.visual_token_ids, 1, 2)


def test_gen_routing_on_the_multimodal_path(engine, reference, tiny_planner_dir):
    """Image + gen tokens: vLLM (embeddings path with the carried mask) equals transformers'
    Qwen3-VL run on the same weights with the gen experts patched in; without them it differs
    exactly from the first gen token on."""
    from transformers import AutoProcessor

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>draw it<|im_end|>\n"
            "<|image start|><|endofline|><|image token|> then text")
    hidden, ids = run(engine, engine._capture({"prompt": text, "multi_modal_data": {"image": [image]}}, (-1,)))
    proc = AutoProcessor.from_pretrained(str(tiny_planner_dir))
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    routed = _hf_last_hidden(reference, inputs, routed=True)
    unrouted = _hf_last_hidden(reference, inputs, routed=False)
    torch.testing.assert_close(hidden, routed, atol=3e-3, rtol=3e-3)
    t = torch.tensor(ids)
    first_gen = int((t >= LAY.gen_vocab_start_index).nonzero()[0])
    diff = (routed - unrouted).abs().amax(-1)
    assert (diff[:first_gen] < 1e-5).all() and (diff[first_gen:] > 1e-3).all()
    assert (hidden - unrouted)[first_gen:].abs().amax() > 1e-2


def _hf_last_hidden(reference, inputs, routed: bool) -> torch.Tensor:
    """transformers' Qwen3-VL (vision, deepstack, M-RoPE) + our gen embeddings / experts."""
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**_stock_config())).eval()
    state = {k: v for k, v in reference.state_dict().items() if "gen_" not in k}
    model.load_state_dict(state, strict=False)
    ids = inputs["input_ids"]
    gen = ids >= LAY.gen_vocab_start_index
    lm = model.model.language_model
    ref_lm = reference.model.language_model
    plain_embed = lm.embed_tokens

    class Embed(torch.nn.Module):
        def forward(self, x):
            out = plain_embed(x.masked_fill(x >= LAY.gen_vocab_start_index, 0))
            if x.shape == ids.shape and (x == ids.masked_fill(gen, 0)).all():
                out[gen] = ref_lm.gen_embed_tokens(ids[gen] - LAY.gen_vocab_start_index)
            return out

    class Routed(torch.nn.Module):
        def __init__(self, und, gen_mlp):
            super().__init__()
            self.und, self.gen_mlp = und, gen_mlp

        def forward(self, x):
            return torch.where(gen[..., None], self.gen_mlp(x), self.und(x))

    lm.embed_tokens = Embed()
    if routed:
        for layer, ref_layer in zip(lm.layers, ref_lm.layers):
            if ref_layer.gen_mlp is not None:
                layer.mlp = Routed(layer.mlp, ref_layer.gen_mlp)
    with torch.inference_mode():
        out = model(input_ids=ids.masked_fill(gen, 0), attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=(ids == 151655).long(), output_hidden_states=True)
    return out.hidden_states[-1][0].float()


def _stock_config() -> dict:
    """The tiny config in transformers' own Qwen3-VL terms (its vision tower, no gen keys)."""
    from planner.presets import stage_config

    cfg = stage_config("tiny-mammoth2")
    text = {k: v for k, v in cfg["text_config"].items()
            if k not in ("gen_vocab_size", "gen_vocab_start_index", "moe_type", "extra_gen_vocab", "model_type")}
    rope = dict(text.pop("rope_scaling"))
    rope["rope_theta"] = text.pop("rope_theta")
    text["rope_parameters"] = rope
    vision = {k: v for k, v in cfg["vision_config"].items() if k != "model_type"}
    return {"text_config": text, "vision_config": vision, "dtype": "float32"}
