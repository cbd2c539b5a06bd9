"""The logits processors alone: CFG formula, pairing, grid forcing, desync handling, both vLLM
runner interfaces loaded through vLLM's own loaders (batches built by hand, no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

from planner.logits import MammothLogitsProcessor, filter_top_k_top_p, guided_logits
from planner.runtime import EXTRA_KEY, get_runtime

V, START, NVIS, EOL, EOI, STOP = 64, 40, 20, 32, 35, 33


def _proc():
    text = SimpleNamespace(gen_vocab_start_index=32)
    hf = SimpleNamespace(get_text_config=lambda: text)
    return MammothLogitsProcessor(SimpleNamespace(model_config=SimpleNamespace(hf_config=hf)), torch.device("cpu"), False)


def _spec(role, **kw):
    spec = dict(kind="plan", pair="p", role=role, ar_height=2, ar_width=3, cfg_scale=4.0, seed=0, temperature=0.0,
                top_k=0, top_p=1.0, eol_id=EOL, image_end_id=EOI, visual_start=START, num_visual=NVIS,
                stop_id=STOP)
    spec.update(kw)
    return SamplingParams(extra_args={EXTRA_KEY: spec})


def _add(proc, rows):
    added = [(i, params, [1, 2, 3], out) for i, (params, out) in enumerate(rows)]
    proc.update_state(BatchUpdate(batch_size=len(rows), removed=[], added=added, moved=[]))


def teardown_function():
    get_runtime().rows.clear()
    get_runtime().note_batch(None, None)


def test_guided_formula():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert torch.allclose(guided_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(guided_logits(cond, None, 3.0), cond)


def test_sample_index_draws_from_the_distribution_and_never_a_zero_category():
    from planner.guidance import sample_index

    probs = torch.tensor([0.1, 0.0, 0.6, 0.0, 0.3])
    generator = torch.Generator().manual_seed(7)
    counts = torch.bincount(torch.tensor([sample_index(probs, generator) for _ in range(6000)]), minlength=5)
    assert counts[1] == 0 and counts[3] == 0
    assert torch.allclose(counts.double() / 6000, probs.double(), atol=0.025), counts
    draws = [sample_index(probs, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert len(set(draws)) == 1  # one seed, one draw
    assert sample_index(torch.tensor([0.0, 0.0, 1.0]), generator) == 2


def test_top_k_keeps_at_least_three():
    x = torch.arange(10.0)
    assert torch.isfinite(filter_top_k_top_p(x, 1, 1.0)).sum() == 3
    assert torch.isfinite(filter_top_k_top_p(x, 5, 1.0)).sum() == 5


def test_pair_samples_guided_argmax_and_forces_both_rows():
    proc = _proc()
    out_c, out_u = [], []
    _add(proc, [(_spec("cond"), out_c), (_spec("uncond"), out_u)])
    logits = torch.randn(2, V)
    cond, uncond = logits[0, START:START + NVIS].clone(), logits[1, START:START + NVIS].clone()
    expected = START + int((uncond + 4.0 * (cond - uncond)).argmax())
    res = proc.apply(logits.clone())
    for r in range(2):
        assert int(res[r].argmax()) == expected
        assert torch.isfinite(res[r]).sum() == 1


def test_eol_at_row_end_and_image_end_after_grid():
    proc = _proc()
    out = [START] * 3  # t = 3 == ar_width -> EOL
    _add(proc, [(_spec("cond", cfg_scale=1.0), out)])
    assert int(proc.apply(torch.randn(1, V))[0].argmax()) == EOL
    out[:] = [START] * 8  # t = 8 == grid length -> <|image end|>
    assert int(proc.apply(torch.randn(1, V))[0].argmax()) == EOI


def test_lagging_partner_gets_the_same_tokens():
    proc = _proc()
    out_c, out_u = [], []
    _add(proc, [(_spec("cond"), out_c), (_spec("uncond"), out_u)])
    first = int(proc.apply(torch.randn(2, V))[0].argmax())
    out_c.append(first)  # the conditional row moved on, the unconditional did not
    res = proc.apply(torch.randn(2, V))
    assert int(res[1].argmax()) == first


def test_understanding_rows_cannot_sample_generation_vocab():
    proc = _proc()
    _add(proc, [(SamplingParams(extra_args={EXTRA_KEY: {"kind": "understand"}}), [])])
    res = proc.apply(torch.zeros(1, V))
    assert torch.isinf(res[0, 32:]).all() and torch.isfinite(res[0, :32]).all()


def test_partial_prefill_row_is_left_alone_and_its_partner_desyncs():
    """cond still prefilling (its sample is discarded by vLLM), uncond done: no unguided sample
    is taken; the sampling row is stopped and nothing is recorded for the pair."""
    proc = _proc()
    out_c, out_u = [], []
    _add(proc, [(_spec("cond"), out_c), (_spec("uncond"), out_u)])
    rt = get_runtime()
    rt.note_batch([0, 2, 5], [2, 3])  # cond computed 2 of its 3 prompt tokens; uncond all 3
    logits = torch.randn(2, V)
    res = proc.apply(logits.clone())
    torch.testing.assert_close(res[0], logits[0])  # partial row untouched
    assert int(res[1].argmax()) == STOP and torch.isfinite(res[1]).sum() == 1
    state = proc.guidance.pairs["p"]
    assert state.tokens == [] and state.desync_at == 0 and proc.guidance.stats.desyncs == 1
    rt.note_batch([0, 1, 2], [3, 3])  # later both sample at t=0: the cond is stopped as well
    assert int(proc.apply(torch.randn(2, V))[0].argmax()) == STOP


def test_sampling_seed_is_per_grid_position():
    """A repaired pair (guided prefix moved into its prompt: ``offset``) samples the same token
    at a grid index as an unrepaired one; the generator lives on the logits' device."""
    from planner.guidance import GridGuidance, PairState, PlanRow

    base = dict(_spec("cond", temperature=1.0, seed=5, cfg_scale=1.0).extra_args[EXTRA_KEY])
    logits = torch.randn(1, V)
    g = GridGuidance()
    g.pairs["a"] = PairState(tokens=[START])  # grid index 0 already chosen
    g.step(a := logits.clone(), {**base, "pair": "a"}, [PlanRow(0, "cond", 1, True)])
    g.step(b := logits.clone(), {**base, "pair": "b", "offset": 1}, [PlanRow(0, "cond", 0, True)])
    assert int(a[0].argmax()) == int(b[0].argmax())
    assert g.pairs["b"].generator.device == logits.device
    draws = set()
    for seed in range(8):
        g.step(c := logits.clone(), {**base, "pair": f"s{seed}", "seed": seed}, [PlanRow(0, "cond", 0, True)])
        draws.add(int(c[0].argmax()))
    assert len(draws) > 1


def _v1_config():
    text = SimpleNamespace(gen_vocab_start_index=32)
    hf = SimpleNamespace(get_text_config=lambda: text)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), speculative_config=None,
                           scheduler_config=SimpleNamespace(max_num_seqs=4))


def test_v1_loader_builds_the_processor_and_it_guides():
    from vllm.v1.sample.logits_processor import build_logitsprocs

    procs = build_logitsprocs(_v1_config(), torch.device("cpu"), False, False, ["planner.logits:MammothLogitsProcessor"])
    proc = next(p for p in procs.all if isinstance(p, MammothLogitsProcessor))
    _add(proc, [(_spec("cond"), []), (_spec("uncond"), [])])
    logits = torch.randn(2, V)
    cond, uncond = logits[0, START:START + NVIS], logits[1, START:START + NVIS]
    res = proc.apply(logits.clone())
    assert int(res[0].argmax()) == int(res[1].argmax()) == START + int((uncond + 4.0 * (cond - uncond)).argmax())


def test_v2_loader_builds_the_processor_and_apply_guides_with_its_context():
    """Through Model Runner V2's own loader (which rejects V1-interface classes), then ``apply``
    with a V2 ``LogitsContext``: batch order differs from slot order, a foreign request sits in
    between, one pair row is a partial prefill chunk in a second step."""
    import numpy as np
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, build_custom_logits_processors

    from planner.logits_v2 import MammothLogitsProcessorV2

    n = 4
    req_states = SimpleNamespace(
        device=torch.device("cpu"), max_num_reqs=n, vocab_size=V, all_token_ids=None, total_len=None,
        prompt_len=SimpleNamespace(np=np.zeros(n, np.int32)), prefill_len=SimpleNamespace(np=np.zeros(n, np.int32)))
    with pytest.raises(ValueError, match="not a subclass"):
        build_custom_logits_processors(_v1_config(), req_states, False, ["planner.logits:MammothLogitsProcessor"])
    (proc,) = build_custom_logits_processors(_v1_config(), req_states, False,
                                             ["planner.logits_v2:MammothLogitsProcessorV2"])
    assert isinstance(proc, MammothLogitsProcessorV2)
    assert proc.add_request(2, _spec("cond")) and proc.add_request(0, _spec("uncond"))
    assert not proc.add_request(1, SamplingParams())
    assert proc.add_request(3, SamplingParams(extra_args={EXTRA_KEY: {"kind": "understand"}}))
    req_states.prompt_len.np[:] = [10, 7, 30, 5]
    req_states.prefill_len.np[:] = [10, 7, 30, 5]

    def ctx(slots, seq_lens):
        idx = np.asarray(slots, dtype=np.int32)
        return LogitsContext(expanded_idx_mapping=torch.from_numpy(idx), idx_mapping=torch.from_numpy(idx),
                             idx_mapping_np=idx, expanded_local_pos=torch.zeros(len(idx), dtype=torch.int32),
                             input_ids=torch.zeros(len(idx), dtype=torch.int32),
                             pos=torch.tensor(seq_lens) - 1, seq_lens_upper_bound_np=np.asarray(seq_lens))

    logits = torch.randn(4, V)
    res = proc.apply(logits.clone(), ctx([2, 1, 0, 3], [30, 9, 10, 5]))
    cond, uncond = logits[0, START:START + NVIS], logits[2, START:START + NVIS]
    expected = START + int((uncond + 4.0 * (cond - uncond)).argmax())
    assert int(res[0].argmax()) == int(res[2].argmax()) == expected
    torch.testing.assert_close(res[1], logits[1])  # not ours
    assert torch.isinf(res[3, 32:]).all() and torch.isfinite(res[3, :32]).all()
    # Next step: the uncond was preempted and re-prefills (prefill_len 11, chunk reaches 8):
    # its row is ignored and the cond, alone at t=1, is stopped instead of sampled unguided.
    req_states.prefill_len.np[0] = 11
    res = proc.apply(torch.randn(2, V), ctx([2, 0], [31, 8]))
    assert int(res[0].argmax()) == STOP
    assert proc.guidance.pairs["p"].tokens == [expected] and proc.guidance.stats.desyncs == 1
