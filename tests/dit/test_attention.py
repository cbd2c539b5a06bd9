"""The DiT attention seam: dispatch rules, kernel eligibility of real CFG batches, numerics,
and the backend / parallel-config switches of both DiTs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dit_worker.models import attention as attn_mod
from dit_worker.models.attention import (
    attention,
    plan_attention,
    sdpa_kernels,
    set_attention_backend,
    set_parallel_config,
)
from dit_worker.models.mammoth2_conditioning import QFormerLayer
from dit_worker.models.transformer_mammoth25 import (
    Mammoth25Condition,
    Mammoth25DiTConfig,
    Mammoth25Transformer,
)

V_CFG = Mammoth25DiTConfig.tiny()


@pytest.fixture(scope="module")
def video_model() -> Mammoth25Transformer:
    torch.manual_seed(0)
    model = Mammoth25Transformer(V_CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


class SdpaSpy:
    """Records the tensors every ``F.scaled_dot_product_attention`` call really gets, then runs it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        original = F.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            self.calls.append(dict(query=query, key=key, value=value, attn_mask=attn_mask, enable_gqa=enable_gqa))
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


def _as_gpu_dtype(call: dict) -> dict:
    """The same call in bf16, the production dtype (eligibility depends on dtype)."""
    return {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in call.items()}


def _assert_fused(calls: list[dict]) -> None:
    assert calls
    for call in calls:
        # bf16 is the production dtype; a padded call must also fuse in fp32 (memory-efficient)
        for c in (_as_gpu_dtype(call), call) if call["attn_mask"] is not None else (_as_gpu_dtype(call),):
            kernels = sdpa_kernels(**c)
            assert kernels != ["math"], f"only the math kernel qualifies: mask={c['attn_mask'] is not None}, " \
                                        f"gqa={c['enable_gqa']}, q={tuple(c['query'].shape)}, k={tuple(c['key'].shape)}"
        if call["attn_mask"] is None:  # unpadded: flash itself (bf16)
            assert "flash" in sdpa_kernels(**_as_gpu_dtype(call))


# --------------------------------------------------------------------------------- the rules


def test_sdpa_eligibility_rules():
    q = torch.randn(2, 6, 16, 32, dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 16, 32, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    # the combination the issue is about: boolean mask + enable_gqa -> math only
    assert sdpa_kernels(q, kv, kv, mask, True) == ["math"]
    assert sdpa_kernels(q, kv, kv, None, True) == ["flash", "math"]
    full = kv.repeat_interleave(3, dim=1)
    assert sdpa_kernels(q, full, full, mask, False) == ["efficient", "math"]
    assert sdpa_kernels(q.float(), full.float(), full.float(), None, False) == ["efficient", "math"]
    assert sdpa_kernels(q[..., :30], full[..., :30], full[..., :30], None, False) == ["math"]


@pytest.mark.parametrize("backend,masked,expect", [
    ("native", False, ("native", "none", False, True)),
    ("native", True, ("native", "key_mask_4d", True, False)),
    ("flash_varlen", True, ("flash_varlen", "key_mask_2d", False, False)),
    ("flash", True, ("native", "key_mask_4d", True, False)),
    ("flash", False, ("flash", "none", False, True)),
    ("_native_efficient", False, ("_native_efficient", "none", True, False)),
])
def test_plan(backend, masked, expect):
    mask = torch.ones(2, 8, dtype=torch.bool) if masked else None
    plan = plan_attention(6, 2, mask, backend)
    assert (plan.backend, plan.mask, plan.expand_kv, plan.enable_gqa) == expect
    if masked:
        assert not (plan.enable_gqa and plan.mask != "none")


def test_context_parallel_plans_never_pass_gqa():
    """diffusers' templated (Ulysses / ring) attention refuses enable_gqa: expand instead."""
    mask = torch.ones(2, 8, dtype=torch.bool)
    for key_mask in (None, mask):
        for backend in ("native", "native_varlen", "_native_cudnn"):
            plan = plan_attention(6, 2, key_mask, backend, parallel=True)
            assert not plan.enable_gqa and plan.expand_kv and plan.backend != "native_varlen"
    assert plan_attention(4, 4, None, "native", parallel=True).expand_kv is False


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'flashy'"):
        plan_attention(4, 4, None, "flashy")


def _reference(q, k, v, key_mask):
    """Plain softmax attention, [B, S, H, D], KV groups by head // (H / Hkv)."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", [None, "_native_math", "flash"])
def test_attention_matches_reference(masked, backend, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 10, 6, 16, generator=g)
    k, v = torch.randn(3, 10, 2, 16, generator=g), torch.randn(3, 10, 2, 16, generator=g)
    mask = (torch.arange(10) < torch.tensor([10, 4, 7])[:, None]) if masked else None
    if backend == "flash" and not masked:
        pytest.skip("the flash-attn package is not installed here")
    spy = SdpaSpy(monkeypatch)
    out = attention(q, k, v, mask, backend=backend)
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    (call,) = spy.calls
    assert not (call["enable_gqa"] and call["attn_mask"] is not None)


# ------------------------------------------------------------------- real CFG batches, both DiTs


def test_image_cfg_batch_reaches_fused_kernels(mammoth2_model, make_condition, monkeypatch):
    """Cond + uncond rows (different prompt lengths: padded), with and without a reference image."""
    cond = make_condition(9, image_len=6, seed=1)
    uncond = make_condition(3, seed=2)
    edit = make_condition(5, image_len=4, refs=((8, 8),), seed=3)
    prepared = mammoth2_model.prepare([cond, uncond, edit])
    latents = torch.randn(3, 16, 8, 8)
    spy = SdpaSpy(monkeypatch)
    with torch.no_grad():
        mammoth2_model(latents, torch.tensor([0.3, 0.3, 0.7]), prepared)
    heads = mammoth2_model.config.num_attention_heads
    masked = [c for c in spy.calls if c["attn_mask"] is not None]
    assert masked, "a CFG batch is padded: some calls must carry a key mask"
    assert all(c["key"].shape[1] == heads for c in masked)  # KV heads expanded, not enable_gqa
    _assert_fused(spy.calls)


def test_image_cfg_batch_on_varlen_backend_passes_packing_mask(mammoth2_model, make_condition, monkeypatch):
    """With a varlen backend the boolean [B, S] key mask itself reaches the backend (which packs
    rows); the grouped KV heads stay unexpanded."""
    seen = []

    def fake_dispatch(query, key, value, attn_mask=None, enable_gqa=False, backend=None, parallel_config=None):
        seen.append((backend.value, attn_mask, key.shape[2]))
        flat = attn_mask if attn_mask is None or attn_mask.ndim == 2 else attn_mask[:, 0, 0]
        return _reference(query, key, value, flat)

    monkeypatch.setattr(attn_mod, "dispatch_attention_fn", fake_dispatch)
    monkeypatch.setattr(attn_mod, "_check_attention_backend_requirements", lambda backend: None)  # no flash-attn here
    set_attention_backend(mammoth2_model, "flash_varlen")
    try:
        prepared = mammoth2_model.prepare([make_condition(9, seed=1), make_condition(3, seed=2)])
        with torch.no_grad():
            mammoth2_model(torch.randn(2, 16, 8, 8), torch.tensor([0.5, 0.5]), prepared)
    finally:
        set_attention_backend(mammoth2_model, None)
    masked = [s for s in seen if s[1] is not None]
    assert masked and all(b == "flash_varlen" and m.ndim == 2 and m.dtype == torch.bool for b, m, _ in masked)
    assert all(kv == mammoth2_model.config.num_kv_heads for *_, kv in masked)


def test_video_cfg_batch_reaches_fused_kernels(video_model, monkeypatch):
    f, h, w = 3, 4, 6
    conditions = [Mammoth25Condition(prompt=torch.randn(9, V_CFG.refiner.vlm_dim)),
                  Mammoth25Condition(prompt=torch.randn(2, V_CFG.refiner.vlm_dim))]
    with torch.no_grad():
        prepared = video_model.prepare(conditions)
    spy = SdpaSpy(monkeypatch)
    with torch.no_grad():
        video_model(torch.randn(2, V_CFG.in_channels, f, h, w), torch.tensor([500.0, 500.0]), prepared)
    assert any(c["attn_mask"] is not None for c in spy.calls)
    _assert_fused(spy.calls)


def test_backend_switch_reaches_every_attention(mammoth2_model, video_model, make_condition):
    image_attn = sum(1 for name, _ in mammoth2_model.named_modules() if name.endswith(".attn"))
    assert set_attention_backend(mammoth2_model, "_native_math") == image_attn
    try:
        assert all(m.processor._attention_backend == "_native_math"
                   for name, m in mammoth2_model.named_modules() if name.endswith(".attn"))
        prepared = mammoth2_model.prepare([make_condition(7, seed=4), make_condition(2, seed=5)])
        latents = torch.randn(2, 16, 8, 8)
        with torch.no_grad():
            math_out = mammoth2_model(latents, torch.tensor([0.2, 0.2]), prepared)
    finally:
        set_attention_backend(mammoth2_model, None)
    with torch.no_grad():
        default_out = mammoth2_model(latents, torch.tensor([0.2, 0.2]), prepared)
    torch.testing.assert_close(math_out, default_out, atol=1e-5, rtol=1e-5)
    assert set_attention_backend(video_model, "native") == V_CFG.num_layers
    assert set_parallel_config(video_model, None) == V_CFG.num_layers
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(video_model, "nope")


def test_parallel_config_reaches_the_dispatcher(video_model, monkeypatch):
    """The processor's ``_parallel_config`` is what ``dispatch_attention_fn`` receives (diffusers
    runs Ulysses / ring from it)."""
    marker = object()
    seen = []
    original = attn_mod.dispatch_attention_fn

    def recording(*args, parallel_config=None, **kwargs):
        seen.append(parallel_config)
        return original(*args, parallel_config=None, **kwargs)

    monkeypatch.setattr(attn_mod, "dispatch_attention_fn", recording)
    set_parallel_config(video_model, marker)
    try:
        prepared = video_model.prepare([Mammoth25Condition(prompt=torch.randn(4, V_CFG.refiner.vlm_dim))])
        with torch.no_grad():
            video_model(torch.randn(1, V_CFG.in_channels, 1, 4, 4), torch.tensor([100.0]), prepared)
    finally:
        set_parallel_config(video_model, None)
    assert seen.count(marker) == V_CFG.num_layers  # every block; the refiner stays local


def test_qformer_attention_equals_torch_multihead_attention():
    """The QFormer's nn.MultiheadAttention weights, run through the seam, give torch's own
    MultiheadAttention result (padding keys included)."""
    torch.manual_seed(0)
    layer = QFormerLayer(64, 4, 0.0, 1e-5).eval()
    q, kv = torch.randn(2, 8, 64), torch.randn(2, 10, 64)
    padding = torch.arange(10) >= torch.tensor([[10], [6]])
    with torch.no_grad():
        h = layer.ln_q1(q)
        expected = q + layer.self_attn(h, h, h, need_weights=False)[0]
        h = layer.ln_q2(expected)
        expected = expected + layer.cross_attn(h, kv, kv, need_weights=False, key_padding_mask=padding)[0]
        expected = expected + layer.ffn(layer.ln_ffn(expected))
        torch.testing.assert_close(layer(q, kv, padding), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(layer(q, kv, torch.zeros_like(padding)), expected, atol=1e-3)


# ------------------------------------------------------------------------------ native_varlen


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, enable_gqa=False, seqused_k=None, **_):
    """``torch.nn.attention.varlen.varlen_attn``'s documented semantics, one sequence at a time."""
    assert q.shape[1] == k.shape[1] or enable_gqa
    assert int((cu_q[1:] - cu_q[:-1]).max()) <= max_q and int((cu_k[1:] - cu_k[:-1]).max()) <= max_k
    outs = []
    for i in range(cu_q.numel() - 1):
        n = int(seqused_k[i]) if seqused_k is not None else int(cu_k[i + 1] - cu_k[i])
        ki, vi = k[cu_k[i]:cu_k[i] + n], v[cu_k[i]:cu_k[i] + n]
        outs.append(_reference(q[cu_q[i]:cu_q[i + 1]][None], ki[None], vi[None], None)[0])
    return torch.cat(outs)


def test_native_varlen_plan_and_arguments(monkeypatch):
    mask = torch.arange(10) < torch.tensor([[10], [4], [7]])
    plan = plan_attention(6, 2, mask, "native_varlen")
    assert (plan.backend, plan.mask, plan.expand_kv, plan.enable_gqa) == ("native_varlen", "seqused_k", False, True)
    assert plan_attention(6, 2, None, "native_varlen") == plan_attention(6, 2, None, "native")
    assert plan_attention(6, 2, mask, "native_varlen", parallel=True).backend == "native"  # diffusers runs CP
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 10, 6, 16, generator=g)
    k, v = torch.randn(3, 10, 2, 16, generator=g), torch.randn(3, 10, 2, 16, generator=g)
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", _varlen_reference)
    got = attn_mod._padded_varlen(q, k, v, mask, enable_gqa=True)
    torch.testing.assert_close(got, attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_native_varlen_refuses_cpu(video_model):
    with pytest.raises(ValueError, match="native_varlen.*not usable here"):
        set_attention_backend(video_model, "native_varlen", "cpu")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="native_varlen"):
        attention(q, q, q, torch.tensor([[True, True, False, False]]), backend="native_varlen")
