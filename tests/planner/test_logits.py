"""The logits processor alone: CFG formula, pairing, grid forcing (fake batches, no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

from planner.logits import MammothLogitsProcessor, filter_top_k_top_p, guided_logits
from planner.runtime import EXTRA_KEY, get_runtime

V, START, NVIS, EOL, EOI = 64, 40, 20, 32, 35


def _proc():
    text = SimpleNamespace(gen_vocab_start_index=32)
    hf = SimpleNamespace(get_text_config=lambda: text)
    return MammothLogitsProcessor(SimpleNamespace(model_config=SimpleNamespace(hf_config=hf)), torch.device("cpu"), False)


def _spec(role, **kw):
    spec = dict(kind="plan", pair="p", role=role, ar_height=2, ar_width=3, cfg_scale=4.0, seed=0, temperature=0.0,
                top_k=0, top_p=1.0, eol_id=EOL, image_end_id=EOI, visual_start=START, num_visual=NVIS)
    spec.update(kw)
    return SamplingParams(extra_args={EXTRA_KEY: spec})


def _add(proc, rows):
    added = [(i, params, [1, 2, 3], out) for i, (params, out) in enumerate(rows)]
    proc.update_state(BatchUpdate(batch_size=len(rows), removed=[], added=added, moved=[]))


def teardown_function():
    get_runtime().rows.clear()


def test_guided_formula():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert torch.allclose(guided_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(guided_logits(cond, None, 3.0), cond)


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
