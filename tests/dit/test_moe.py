"""The grouped MoE layer against a plain per-expert loop, and the router's selection semantics."""

import pytest
import torch
import torch.nn.functional as F

from dit_worker.models.moe import MoELayer, choose_capacity, expert_counts


def reference_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Written from the semantics, one expert at a time (what the official code does)."""
    router = layer.router
    scores = torch.sigmoid(x.double() @ router.weight.double().t())
    bias = router.expert_bias.double() if router.expert_bias is not None else 0.0
    chosen = torch.topk(scores + bias, layer.top_k, dim=-1).indices
    picked = scores.gather(1, chosen)
    if layer.top_k > 1:
        picked = picked / picked.sum(-1, keepdim=True)
    out = torch.zeros_like(x, dtype=torch.float64)
    w1, w2 = layer.experts.w1.double(), layer.experts.w2.double()
    for e in range(layer.num_experts):
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        if rows.numel():
            y = F.gelu(x[rows].double() @ w1[e], approximate="tanh") @ w2[e]
            out.index_add_(0, rows, y * picked[rows, slot].unsqueeze(1))
    if layer.shared_experts is not None:
        s = layer.shared_experts
        out += F.gelu(x.double() @ s.weight1.double().t(), approximate="tanh") @ s.weight2.double().t()
    return out.to(x.dtype)


def make_layer(shared: int, experts: int = 8, top_k: int = 2, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(32, experts, top_k, 48, num_shared_experts=shared, shared_ffn_hidden_size=40)
    with torch.no_grad():
        layer.router.expert_bias.normal_(std=0.05)
    return layer


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("tokens", [0, 1, 17, 256])
@pytest.mark.parametrize("costs", [(float("inf"), 0.0), (0.0, 0.0), (1.2, 0.0), (None, None)])  # padded/ragged/mixed/default
def test_grouped_matches_loop_reference(shared, tokens, costs):
    layer = make_layer(shared)
    layer.ragged_row_cost, layer.ragged_group_cost = costs
    x = torch.randn(tokens, 32)
    got = layer(x)
    torch.testing.assert_close(got, reference_moe(layer, x), atol=1e-5, rtol=1e-5)
    counts = layer.last_expert_counts
    assert counts.shape == (8,) and int(counts.sum()) == tokens * 2


def test_experts_receiving_no_tokens_and_3d_input():
    layer = make_layer(0, experts=16, top_k=3)
    with torch.no_grad():  # push every token onto experts 0..5: 10 experts stay empty
        layer.router.expert_bias.zero_()
        layer.router.expert_bias[:6] = 10.0
    x = torch.randn(2, 5, 32)
    for costs in ((float("inf"), 0.0), (0.0, 0.0), (1.2, 0.0)):
        layer.ragged_row_cost, layer.ragged_group_cost = costs
        got = layer(x)
        assert got.shape == x.shape
        torch.testing.assert_close(got.reshape(-1, 32), reference_moe(layer, x.reshape(-1, 32)),
                                   atol=1e-5, rtol=1e-5)
        counts = layer.last_expert_counts
        assert (counts[6:] == 0).all() and int(counts.sum()) == 10 * 3


def test_bias_selects_but_does_not_weigh():
    layer = make_layer(0, experts=8, top_k=2)
    x = torch.randn(64, 32)
    with torch.no_grad():
        layer.router.expert_bias.zero_()
    _, free_choice = layer.router(x)
    with torch.no_grad():
        layer.router.expert_bias[7] = 5.0  # expert 7 always wins a slot
    weights, chosen = layer.router(x)
    assert (chosen == 7).any(dim=1).all()
    assert not (free_choice == 7).any(dim=1).all()
    scores = torch.sigmoid(x @ layer.router.weight.t())
    picked = scores.gather(1, chosen)
    torch.testing.assert_close(weights, picked / picked.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))


def test_top1_weights_are_raw_sigmoid_scores():
    torch.manual_seed(1)
    layer = MoELayer(16, 4, 1, 8)
    x = torch.randn(10, 16)
    weights, chosen = layer.router(x)
    scores = torch.sigmoid(x @ layer.router.weight.t())
    torch.testing.assert_close(weights, scores.gather(1, chosen))
    assert (weights < 1).all()


def test_bf16_close_to_fp32_and_bias_stays_fp32():
    layer = make_layer(1)
    bias = layer.router.expert_bias.clone()
    x = torch.randn(40, 32)
    ref = layer(x)
    layer.to(torch.bfloat16)
    assert layer.router.expert_bias.dtype == torch.float32
    torch.testing.assert_close(layer.router.expert_bias, bias)
    got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_expert_counts_collects_per_layer():
    model = torch.nn.ModuleDict({"a": make_layer(0), "b": make_layer(0, seed=1)})
    x = torch.randn(9, 32)
    model["a"](x)
    model["b"](x)
    counts = expert_counts(model)
    assert set(counts) == {"a", "b"}
    assert all(sum(c) == 18 for c in counts.values())


def test_choose_capacity_trades_padding_against_overflow():
    counts = [10, 10, 10, 40]
    assert choose_capacity(counts, float("inf"), 0.0) == 40
    assert choose_capacity(counts, 0.0, 0.0) == 0
    assert choose_capacity(counts, 2.0, 0.0) == 10  # 40 rows + 2 x 30 overflow < 160 padded
    assert choose_capacity(counts, 2.0, 192.0) == 40  # a ragged group costs more than padding
    assert choose_capacity([5, 5, 5, 5], 2.0, 0.0) == 5
    assert choose_capacity([0, 0, 0, 3000], 2.0, 192.0) == 0  # one busy expert: ragged only
    assert choose_capacity([9, 9, 1, 1], 1.5, 1.0) == 1  # 4 + 1.5 x 16 + 2 groups < 36
    assert choose_capacity([9, 9, 1, 1], 1.5, 10.0) == 9  # 4 + 24 + 20 > 36
