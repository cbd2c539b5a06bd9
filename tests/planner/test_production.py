"""The planner under production pressure, on the real vLLM engine (CPU, tiny checkpoint).

One engine for the module, configured so every hard case happens: a token budget smaller than a
prompt (chunked prefill), a KV cache of 12 blocks of 32 tokens (two growing pairs already preempt
each other), an odd ``max_num_seqs``. Each test checks the guided plan against the pure-PyTorch
reference (greedy AR-CFG), the export against the reference hidden states, and that the engine
still serves afterwards.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from planner.engine import GuidanceError, PlannerConfig
from planner.guidance import EXTRA_KEY
from planner.tokens import TokenLayout

from .conftest import start_engine

pytestmark = pytest.mark.slow
LAY = TokenLayout()
LAYERS = [-2, -5, -8, -11, -14, -17]
SCALE = 5.0
BUDGET = 64  # tokens per step: the prompts below are 2-3 chunks long
LONG = "a very detailed watercolor painting of a lighthouse on a rocky cliff at dusk, gulls, waves, warm light"


@pytest.fixture(scope="module")
def engine(tiny_planner_dir):
    loop, eng = start_engine(tiny_planner_dir, max_model_len=256, max_num_seqs=7, max_num_batched_tokens=BUDGET,
                             block_size=32, num_kv_blocks=12, limit_images=0, negative_cache_size=2)
    eng.loop = loop
    yield eng
    loop.run(eng.shutdown(), timeout=120)
    loop.close()


def run(engine, coro, timeout=600):
    return engine.loop.run(coro, timeout)


def _expected(engine, reference, prompt, h, w, scale=SCALE):
    ids = engine._encode(engine.t2i_prompt(prompt, h, w))
    return reference.generate_plan(ids, ar_height=h, ar_width=w, cfg_scale=scale, eol_id=LAY.eol_id,
                                   visual_start=LAY.visual_start_id, num_visual=LAY.num_visual_codes)


def _assert_export(engine, reference, res):
    seq = torch.tensor(res.prompt_token_ids + res.visual_token_ids.tolist() + [LAY.image_end_id])
    text_ref, image_ref = engine.split_condition(seq, reference.condition(seq, LAYERS), len(res.prompt_token_ids))
    torch.testing.assert_close(res.text_condition, text_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(res.image_condition, image_ref, atol=2e-3, rtol=2e-3)


def _assert_live(engine):
    res = run(engine, engine.plan_image("still alive", ar_height=1, ar_width=2, cfg_scale=SCALE, temperature=0.0))
    assert res.visual_token_ids.numel() == 3
    run(engine, engine.check_health())
    assert engine.live_shared_blocks() == 0
    assert engine.llm.output_processor.get_num_unfinished_requests() == 0


def _prompt_ending_chunk(engine, h, w, lo, hi, budget=BUDGET):
    """A prompt whose last prefill chunk under ``budget`` has ``lo..hi`` tokens."""
    for n in range(80):
        prompt = LONG + " and more" * n
        length = len(engine._encode(engine.t2i_prompt(prompt, h, w)))
        if length > budget and lo <= length % budget <= hi:
            return prompt
    raise AssertionError("no such prompt")


@pytest.mark.parametrize("tail", [(1, 48), (56, 63)], ids=["pair-fits-last-chunk", "uncond-chunked-too"])
def test_chunked_prefill_plan_is_guided_and_fully_exported(engine, reference, tail):
    """The prompt (> the budget) is prefilled in 64-token chunks whose samples vLLM discards.
    With a long last chunk the unconditional prompt (10 tokens) cannot finish in the same step:
    the pair loses step at its first token and is repaired. Either way the plan equals the
    reference and every prompt and generated row was exported once."""
    prompt = _prompt_ending_chunk(engine, 3, 5, *tail)
    assert len(engine._encode(engine.t2i_prompt(prompt, 3, 5))) > BUDGET
    before = dict(engine.stats)
    res = run(engine, engine.plan_image(prompt, ar_height=3, ar_width=5, cfg_scale=SCALE, temperature=0.0))
    assert res.visual_token_ids.tolist() == _expected(engine, reference, prompt, 3, 5)
    assert res.visual_token_ids.tolist() != _expected(engine, reference, prompt, 3, 5, scale=1.0)
    _assert_export(engine, reference, res)
    assert engine.stats["cfg_failures"] == before.get("cfg_failures", 0)
    print("guidance stats", tail, dict(engine.stats))
    _assert_live(engine)


def test_eight_concurrent_cfg_plans_under_preemption_equal_the_reference(engine, reference):
    """16 sequences for 7 seats and a KV cache that cannot hold three growing pairs: pairs are
    preempted and out of step; every plan is still the guided reference, every export complete."""
    prompts = [f"{LONG}, variant {i}" for i in range(8)]

    seats = {"most": 0}

    async def all_plans():
        plans = asyncio.gather(*(engine.plan_image(p, ar_height=4, ar_width=6, cfg_scale=SCALE, temperature=0.0)
                                 for p in prompts))
        while not plans.done():
            seats["most"] = max(seats["most"], engine._slots.capacity - engine._slots.free)
            await asyncio.sleep(0.02)
        return await plans

    before = dict(engine.stats)
    results = run(engine, all_plans())
    # Three pairs were in flight at once (or a repair alone held all seats), and three grown pairs
    # need more KV blocks than exist: vLLM had to preempt.
    pair_tokens = [len(engine._encode(engine.t2i_prompt(p, 4, 6))) + 4 * 7 + 2 for p in prompts]
    pair_blocks = min(-(-n // 32) + -(-(10 + 4 * 7 + 2) // 32) for n in pair_tokens)
    assert seats["most"] >= 6 and 3 * pair_blocks > engine.config.num_kv_blocks
    print("guidance stats (8 concurrent)", dict(engine.stats))
    for prompt, res in zip(prompts, results):
        assert res.visual_token_ids.tolist() == _expected(engine, reference, prompt, 4, 6), prompt
    for res in results[:2]:
        _assert_export(engine, reference, res)
    assert engine.stats["cfg_failures"] == before.get("cfg_failures", 0)
    assert engine.stats["export_errors"] == 0
    _assert_live(engine)


def test_out_of_step_pair_is_repaired_or_fails_loudly(engine, reference):
    """The unconditional request is admitted only after the conditional one has sampled alone:
    the pair stops where it lost step and is resubmitted (equal to the reference); with no
    repairs allowed it fails with GuidanceError and is counted, never returning unguided tokens."""
    original = engine._admit
    staggered = {"left": 1}

    async def admit_staggered(requests):
        if staggered["left"] and len(requests) == 2:
            staggered["left"] -= 1
            # Marked as a lone row, the engine's PairScheduler does not hold it for its partner.
            requests[0][2].extra_args[EXTRA_KEY]["rows"] = 1
            first = await original(requests[:1])
            await asyncio.sleep(1.0)  # the conditional request runs (and samples) alone meanwhile
            return first + await original(requests[1:])
        return await original(requests)

    engine._admit = admit_staggered
    try:
        before = dict(engine.stats)
        res = run(engine, engine.plan_image("a red kite", ar_height=2, ar_width=4, cfg_scale=SCALE, temperature=0.0))
        assert res.visual_token_ids.tolist() == _expected(engine, reference, "a red kite", 2, 4)
        assert engine.stats["cfg_desyncs"] == before.get("cfg_desyncs", 0) + 1
        assert engine.stats["cfg_repairs"] == before.get("cfg_repairs", 0) + 1
        _assert_export(engine, reference, res)

        staggered["left"] = 1
        engine.config.max_cfg_repairs = 0
        with pytest.raises(GuidanceError, match="out of step"):
            run(engine, engine.plan_image("a red kite", ar_height=2, ar_width=4, cfg_scale=SCALE, temperature=0.0))
        assert engine.stats["cfg_failures"] == before.get("cfg_failures", 0) + 1
    finally:
        engine._admit = original
        engine.config.max_cfg_repairs = 4
    _assert_live(engine)


def test_cancel_during_admission_leaves_the_scheduler_running(engine):
    """A cancel that lands between the two rows of a pair reaching the engine: the row the
    scheduler holds for its partner is dropped with the abort, later requests run."""
    original = engine.llm.add_request
    entered = asyncio.Event()
    calls = []

    async def slow_second_row(request_id, *args, **kwargs):
        calls.append(request_id)
        if len(calls) == 2:  # the conditional row is in the engine, its partner not yet
            entered.set()
            await asyncio.sleep(30)
        return await original(request_id, *args, **kwargs)

    async def cancel_in_admission():
        engine.llm.add_request = slow_second_row
        try:
            task = asyncio.ensure_future(engine.plan_image("cancel me", ar_height=2, ar_width=2, cfg_scale=SCALE))
            await asyncio.wait_for(entered.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            engine.llm.add_request = original

    run(engine, cancel_in_admission())
    # A held row left behind would pair with nothing; the next pair must run at once.
    res = run(engine, engine.plan_image("after the cancel", ar_height=2, ar_width=3, cfg_scale=SCALE,
                                        temperature=0.0), timeout=120)
    assert res.visual_token_ids.numel() == 2 * 4
    _assert_live(engine)


def test_prefix_caching_serves_repeats_but_captures_compute_every_row(engine, reference):
    """Prefix caching is on; a capture of a prompt whose blocks are cached still exports every row
    (it opts out of cache reads), and equals the reference both times."""
    assert engine.vllm_config.cache_config.enable_prefix_caching
    text = f"{LONG} and a second sentence so the prompt spans several cache blocks"
    ids = torch.tensor(engine._encode(text))
    expected = reference.forward(ids[None]).hidden_states[-1][0]
    for _ in range(2):
        hidden = run(engine, engine.encode_prompt(text))
        torch.testing.assert_close(hidden, expected, atol=2e-3, rtol=2e-3)


def test_negative_condition_cache_is_lru_bounded(engine):
    first = run(engine, engine.negative_condition("blurry"))
    assert run(engine, engine.negative_condition("blurry")) is first
    for text in ("dark", "noisy", "flat"):
        run(engine, engine.negative_condition(text))
    assert engine.negative_cache_len() == 2  # negative_cache_size
    assert run(engine, engine.negative_condition("blurry")) is not first  # evicted, recomputed
    torch.testing.assert_close(run(engine, engine.negative_condition("blurry")), first)


def test_config_refuses_compiled_mode_and_unknown_runner():
    with pytest.raises(ValueError, match="enforce_eager"):
        PlannerConfig(enforce_eager=False)
    with pytest.raises(ValueError, match="model_runner"):
        PlannerConfig(model_runner="v3")


def test_health_check_raises_without_a_running_engine(tiny_planner_dir):
    from planner.engine import PlannerEngine

    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(PlannerEngine(PlannerConfig(model=str(tiny_planner_dir))).check_health())
