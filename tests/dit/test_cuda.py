"""What only a GPU can confirm (skipped without CUDA): the DiTs' padded CFG batches run fused
attention kernels, native_varlen equals native, the grouped MoE path equals the capacity path in
bf16, and a steady-state forward of either DiT makes no synchronising CUDA call."""

from __future__ import annotations

import pytest
import torch

from dit_worker.models.attention import attention, native_varlen_problem, set_attention_backend
from dit_worker.models.moe import MoELayer
from dit_worker.models.transformer_mammoth2 import Mammoth2DiTConfig, Mammoth2Transformer
from dit_worker.models.transformer_mammoth25 import (
    Mammoth25Condition,
    Mammoth25DiTConfig,
    Mammoth25Transformer,
)
from tests.dit.test_moe import make_layer, reference_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _attention_kernels(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()
            if any(w in e.key.lower() for w in ("flash", "fmha", "efficient", "attention"))}


def _padded_gqa_inputs(rows=4, seq=256, heads=8, kv_heads=2, dim=128):
    g = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(rows, seq, heads, dim, device=CUDA, dtype=torch.bfloat16, generator=g)
    k = torch.randn(rows, seq, kv_heads, dim, device=CUDA, dtype=torch.bfloat16, generator=g)
    v = torch.randn(rows, seq, kv_heads, dim, device=CUDA, dtype=torch.bfloat16, generator=g)
    lens = torch.tensor([seq, seq - 40, seq - 7, seq - 100], device=CUDA)[:rows]
    return q, k, v, torch.arange(seq, device=CUDA) < lens[:, None]


def test_padded_gqa_attention_runs_a_fused_kernel():
    q, k, v, mask = _padded_gqa_inputs()
    kernels = _attention_kernels(lambda: attention(q, k, v, mask))
    assert kernels and not any("math" in name.lower() for name in kernels), kernels


def test_native_varlen_equals_native():
    problem = native_varlen_problem(CUDA)
    if problem:
        pytest.skip(problem)
    q, k, v, mask = _padded_gqa_inputs()
    got = attention(q, k, v, mask, backend="native_varlen")
    expected = attention(q, k, v, mask)
    real = mask[:, :, None, None].expand_as(got)  # padded query rows are never read back
    torch.testing.assert_close(got[real].float(), expected[real].float(), atol=2e-2, rtol=2e-2)
    assert any("flash" in name.lower() for name in _attention_kernels(
        lambda: attention(q, k, v, mask, backend="native_varlen")))


def test_grouped_moe_on_cuda_matches_reference():
    layer = make_layer(2).to(CUDA)
    x = torch.randn(300, 32, device=CUDA)
    with torch.no_grad():
        expected = reference_moe(layer, x)  # fp32, before the bf16 cast
        layer = layer.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        assert layer.resolved_path(xb) == "grouped"
        got = layer(xb)
        layer.path = "capacity"
        capacity = layer(xb)
    torch.testing.assert_close(got, capacity, atol=2e-2, rtol=2e-2)
    close = (got.float() - expected).abs().amax(-1) < 0.1  # bf16 routing may flip a near-tie token
    assert close.float().mean() > 0.95


def _no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_video_forward_has_no_cuda_sync():
    torch.manual_seed(0)
    cfg = Mammoth25DiTConfig.tiny()
    model = Mammoth25Transformer(cfg).to(CUDA, torch.bfloat16).eval()
    conditions = [Mammoth25Condition(prompt=torch.randn(9, cfg.refiner.vlm_dim, device=CUDA)),
                  Mammoth25Condition(prompt=torch.randn(3, cfg.refiner.vlm_dim, device=CUDA))]
    latents = torch.randn(2, cfg.in_channels, 3, 8, 8, device=CUDA, dtype=torch.bfloat16)
    t = torch.full((2,), 500.0, device=CUDA)
    assert all(m.resolved_path(latents) == "grouped" for m in model.modules() if isinstance(m, MoELayer))
    with torch.no_grad():
        prepared = model.prepare(conditions)
        model(latents, t, prepared)
        _no_sync(lambda: model(latents, t, prepared))


def test_image_forward_has_no_cuda_sync_after_the_first_step(make_condition):
    torch.manual_seed(0)
    model = Mammoth2Transformer(Mammoth2DiTConfig.tiny()).to(CUDA, torch.bfloat16).eval()
    set_attention_backend(model, "native", CUDA)
    conditions = [make_condition(9, image_len=5, seed=1), make_condition(3, seed=2)]
    for c in conditions:
        c.text = c.text.to(CUDA)
        c.image = None if c.image is None else c.image.to(CUDA)
    latents = torch.randn(2, 16, 16, 16, device=CUDA, dtype=torch.bfloat16)
    t = torch.full((2,), 0.5, device=CUDA)
    with torch.no_grad():
        prepared = model.prepare(conditions)
        model(latents, t, prepared)
        _no_sync(lambda: model(latents, t, prepared))
