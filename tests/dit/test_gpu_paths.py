"""What the GPU hot path relies on, checked on CPU: the host-sync-free MoE path equals the
reference, neither DiT forward reads a value back from the device once a batch is laid out,
the blocks trace as single graphs, and the engine's compile / attention-backend options work."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dit_worker.engine import DiTEngine, DiTEngineConfig
from dit_worker.families import family_for
from dit_worker.models.compilation import compile_repeated_blocks
from dit_worker.models.moe import MoELayer
from dit_worker.models.transformer_mammoth25 import (
    Mammoth25Condition,
    Mammoth25DiTConfig,
    Mammoth25Transformer,
)
from tests.dit.test_moe import make_layer, reference_moe

V_CFG = Mammoth25DiTConfig.tiny()
aten = torch.ops.aten

# Ops that make the host wait for the device: a scalar read back (item / bool / tolist), or an
# output whose size depends on values (nonzero, boolean indexing, bincount's max on CUDA).
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default,
            aten.is_nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor,
            aten.unique_dim.default, aten._unique2.default}


# ...and the tensor methods that read device memory from the host (on CPU tensors tolist()
# reads memory directly, without dispatching an op, so these are caught one level up).
SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
                torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}


class _SyncOps(TorchDispatchMode):
    def __init__(self, syncs: list[str]) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        elif func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.syncs.append("boolean index")
        return func(*args, **kwargs)


class _SyncMethods(TorchFunctionMode):
    def __init__(self, syncs: list[str]) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_METHODS:
            self.syncs.append(func.__name__)
        return func(*args, **(kwargs or {}))


class HostSyncProbe:
    """Records every op or method that would synchronise the host with a CUDA device."""

    def __init__(self) -> None:
        self.syncs: list[str] = []
        self._modes = (_SyncMethods(self.syncs), _SyncOps(self.syncs))

    def __enter__(self) -> HostSyncProbe:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _set_moe_path(model: torch.nn.Module, path: str) -> None:
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.path = path


@pytest.fixture(scope="module")
def video_model() -> Mammoth25Transformer:
    torch.manual_seed(0)
    model = Mammoth25Transformer(V_CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for block in model.blocks:
            block.ffn.router.expert_bias.normal_(std=0.1)
    return model


# ------------------------------------------------------------------------------------ the MoE


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("tokens", [0, 1, 17, 256])
def test_grouped_path_matches_loop_reference(shared, tokens):
    layer = make_layer(shared)
    layer.path = "grouped"
    x = torch.randn(tokens, 32)
    torch.testing.assert_close(layer(x), reference_moe(layer, x), atol=1e-5, rtol=1e-5)
    assert int(layer.last_expert_counts.sum()) == tokens * 2


def test_grouped_path_with_idle_experts_and_no_host_sync():
    layer = make_layer(0, experts=16, top_k=3)
    layer.path = "grouped"
    with torch.no_grad():  # every token onto experts 0..5: ten empty groups
        layer.router.expert_bias.zero_()
        layer.router.expert_bias[:6] = 10.0
    x = torch.randn(40, 32)
    with torch.no_grad(), HostSyncProbe() as probe:
        got = layer(x)
    assert probe.syncs == []
    torch.testing.assert_close(got, reference_moe(layer, x), atol=1e-5, rtol=1e-5)
    assert layer.last_expert_counts[6:].sum() == 0


def test_auto_path_is_grouped_off_cpu_and_capacity_on_cpu():
    layer = make_layer(0)
    assert layer.resolved_path(torch.empty(1)) == "capacity"
    assert layer.resolved_path(torch.empty(1, device="meta", dtype=torch.bfloat16)) == "grouped"
    assert layer.resolved_path(torch.empty(1, device="meta")) == "capacity"  # CUDA grouped GEMM: bf16 only
    with torch.no_grad(), HostSyncProbe() as probe:  # the CPU cost model reads its counts back
        layer(torch.randn(64, 32))
    assert "tolist" in probe.syncs
    layer.path = "fastest"
    with pytest.raises(ValueError, match="path"):
        layer(torch.randn(4, 32))


# ------------------------------------------------------------------------ whole-model forwards


def test_video_forward_is_host_sync_free(video_model):
    """A padded CFG batch (two prompt lengths) with an editing row, as a GPU runs it."""
    f, h, w = 2, 4, 4
    source = torch.randn(V_CFG.in_channels, f, h, w)
    conditions = [Mammoth25Condition(prompt=torch.randn(7, V_CFG.refiner.vlm_dim), source_latents=source),
                  Mammoth25Condition(prompt=torch.randn(2, V_CFG.refiner.vlm_dim), source_latents=source)]
    latents = torch.randn(2, V_CFG.in_channels, f, h, w)
    t = torch.tensor([700.0, 700.0])
    _set_moe_path(video_model, "grouped")
    try:
        with torch.no_grad():
            prepared = video_model.prepare(conditions)
            first = video_model(latents, t, prepared)  # lays the batch out (cached)
            with HostSyncProbe() as probe:
                again = video_model(latents, t, prepared)
            _set_moe_path(video_model, "capacity")
            capacity = video_model(latents, t, prepared)
    finally:
        _set_moe_path(video_model, "auto")
    assert probe.syncs == []
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(again, capacity, atol=2e-5, rtol=1e-5)


def test_image_forward_is_host_sync_free_after_the_first_step(mammoth2_model, make_condition):
    conditions = [make_condition(9, image_len=5, seed=1), make_condition(3, seed=2),
                  make_condition(4, image_len=3, refs=((8, 8),), seed=3)]
    latents = torch.randn(3, 16, 8, 8)
    t = torch.tensor([0.4, 0.4, 0.4])
    with torch.no_grad():
        prepared = mammoth2_model.prepare(conditions)
        first = mammoth2_model(latents, t, prepared)
        with HostSyncProbe() as probe:
            again = mammoth2_model(latents, t + 0.1, prepared)
    assert probe.syncs == []
    assert not torch.equal(first, again)


def test_probe_sees_the_old_per_forward_syncs():
    """The probe itself: the calls the issue names are caught."""
    mask = torch.tensor([[True, False]])
    with HostSyncProbe() as probe:
        bool(mask.all())
        mask.reshape(-1).nonzero()
        torch.bincount(torch.tensor([0, 1]), minlength=4)
        torch.randn(3)[torch.tensor([True, False, True])]
    assert len(probe.syncs) >= 4 and {"__bool__", "aten.nonzero.default", "aten.bincount.default",
                                      "boolean index"} <= set(probe.syncs)


# -------------------------------------------------------------------------------- compilation


def test_video_block_traces_as_one_graph(video_model):
    """fullgraph=True fails on any graph break (a host sync is one): the GPU path has none."""
    torch._dynamo.reset()
    block = copy.deepcopy(video_model.blocks[0]).to(torch.bfloat16)  # the grouped GEMM's dtype on CUDA
    block.ffn.path = "grouped"
    try:
        x = torch.randn(2, 12, V_CFG.inner_dim, dtype=torch.bfloat16)
        modulation = torch.randn(2, 6, V_CFG.inner_dim)
        rope = video_model._video_rope((1, 3, 4), x.device)
        rope = (rope[0][None, :, None], rope[1][None, :, None])
        mask = torch.arange(12) < torch.tensor([[12], [9]])
        valid = mask.reshape(-1).nonzero().squeeze(1)
        with torch.no_grad():
            eager = block(x, modulation, rope, mask, valid)
            traced = torch.compile(block, fullgraph=True, backend="eager")(x, modulation, rope, mask, valid)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(traced, eager, atol=0, rtol=0)


@pytest.mark.slow
def test_engine_compile_and_backend_options(mammoth2_model, make_condition, tmp_path):
    """``compile=True`` (inductor) gives the eager result; the backend option reaches every block."""
    torch._dynamo.reset()
    family = family_for(mammoth2_model.config, tmp_path)
    eager = DiTEngine(mammoth2_model, family, DiTEngineConfig())
    prepared = mammoth2_model.prepare([make_condition(6, seed=7), make_condition(2, seed=8)])
    latents, t = torch.randn(2, 16, 8, 8), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        expected = eager.model(latents, t, prepared)
    model = copy.deepcopy(mammoth2_model)
    engine = DiTEngine(model, family, DiTEngineConfig(compile=True, attention_backend="_native_math"))
    try:
        assert all(m.processor._attention_backend == "_native_math"
                   for name, m in model.named_modules() if name.endswith(".attn"))
        with torch.no_grad():
            got = engine.model(latents, t, prepared)
        compiled = [m for m in model.modules() if type(m).__name__ == "Mammoth2Block"]
        assert compiled and all(m._compiled_call_impl is not None for m in compiled)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not usable"):
        DiTEngine(copy.deepcopy(mammoth2_model), family, DiTEngineConfig(attention_backend="flash_varlen"))


def test_compile_needs_repeated_blocks():
    with pytest.raises(ValueError, match="_repeated_blocks"):
        compile_repeated_blocks(torch.nn.Linear(2, 2))
