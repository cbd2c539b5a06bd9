"""Mixture-of-experts FFN of the MammothModa2.5 DiT, with grouped expert compute.

Semantics follow the official layer (Megatron-style ``TopKRouter`` + stacked ``Expert``):

- router logits ``x @ W_r^T`` in fp32; scores ``sigmoid(logits)``;
- top-k chosen on ``scores + expert_bias`` (the bias balances load; it never weighs outputs);
- combine weights are the *unbiased* scores of the chosen experts, divided by their sum
  (for ``top_k > 1``);
- experts are non-gated ``fc2(gelu_tanh(fc1(x)))`` without biases; shared experts (if any)
  are one dense MLP of width ``num_shared * shared_ffn`` added unweighted.

Weight layout is the official one, so checkpoints load without renaming:
``experts.weight1`` is ``[D, E*F]`` holding ``E`` row-major ``[D, F]`` blocks back to back
(``view(E, D, F)``), ``experts.weight2`` is ``[E*F, D]`` (``view(E, F, D)``);
``shared_experts.weight1`` is ``[S*F_s, D]`` and ``weight2`` ``[D, S*F_s]`` (``nn.Linear``
layout). The stacked layout feeds grouped GEMMs directly.

Expert compute never loops over experts in Python: token->expert assignments are sorted once.
Two paths (``MoELayer.path``):

- ``"grouped"`` (what ``"auto"`` takes on accelerators in bf16, the dtype CUDA's
  ``torch._grouped_mm`` takes): every assignment in one
  ``torch._grouped_mm`` over ragged groups whose ends are computed on the device -- no host
  sync, static shapes, so CUDA graphs and full-graph ``torch.compile`` work;
- ``"capacity"`` (what ``"auto"`` takes on CPU, where a ragged group pays a large fixed cost):
  each expert's first ``cap`` rows run as one ``bmm`` over an ``[E, cap]`` grid and the rows past
  ``cap`` as one grouped GEMM; ``cap`` minimises padding + overflow cost from the actual counts
  (one host sync).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Cost of the ragged grouped GEMM in rows of the padded bmm, per row and per non-empty group,
# by activation dtype (torch 2.13 CPU, AVX-512, 1-2 threads; bench/moe_layer.py --paths):
# torch._grouped_mm is a C++ loop of per-group GEMMs -- in bf16 as fast per row as the bmm,
# in fp32 ~25% slower; tiny groups pay extra. Padding wins for small or skewed loads.
RAGGED_COSTS: dict[torch.dtype, tuple[float, float]] = {
    torch.bfloat16: (0.95, 48.0),
    torch.float16: (0.95, 48.0),
}
RAGGED_COSTS_DEFAULT = (1.25, 48.0)
MOE_PATHS = ("auto", "grouped", "capacity")


def _gelu_tanh_(h: torch.Tensor) -> torch.Tensor:
    """In-place GELU-tanh on a fresh activation (saves one [rows, F] buffer) unless autograd
    needs the input."""
    if torch.is_grad_enabled() and h.requires_grad:
        return F.gelu(h, approximate="tanh")
    return torch.ops.aten.gelu_(h, approximate="tanh")


def _router_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp64": torch.float64}[name]


class TopKRouter(nn.Module):
    """Sigmoid top-k router; ``expert_bias`` only shifts the selection."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 enable_expert_bias: bool = True, router_dtype: str = "fp32"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_dtype = _router_dtype(router_dtype)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def _apply(self, fn, recurse=True):
        # Keep the selection bias in fp32 through model.to(bf16): a rounded bias flips
        # near-tied expert choices.
        kept = self.expert_bias
        result = super()._apply(fn, recurse)
        if kept is not None and self.expert_bias.dtype != torch.float32:
            moved = self.expert_bias
            on_meta = kept.device.type == "meta" or moved.device.type == "meta"
            self.expert_bias = moved.float() if on_meta else kept.to(moved.device)
        return result

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, D]`` -> (combine weights ``[T, k]`` fp32, expert ids ``[T, k]`` int64)."""
        logits = F.linear(x.to(self.router_dtype), self.weight.to(self.router_dtype))
        scores = torch.sigmoid(logits.float()).to(logits.dtype)
        if self.expert_bias is not None:
            _, indices = torch.topk(scores + self.expert_bias.to(scores.dtype), self.top_k, dim=-1)
            weights = scores.gather(1, indices)
        else:
            weights, indices = torch.topk(scores, self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights.float(), indices


class GroupedExperts(nn.Module):
    """``E`` non-gated GELU-tanh MLPs held as two stacked weights (official layout)."""

    def __init__(self, hidden_size: int, num_experts: int, ffn_hidden_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.weight1 = nn.Parameter(torch.empty(hidden_size, num_experts * ffn_hidden_size))
        self.weight2 = nn.Parameter(torch.empty(num_experts * ffn_hidden_size, hidden_size))
        nn.init.normal_(self.weight1, std=hidden_size ** -0.5)
        nn.init.normal_(self.weight2, std=ffn_hidden_size ** -0.5)

    @property
    def w1(self) -> torch.Tensor:  # [E, D, F]
        return self.weight1.view(self.num_experts, self.hidden_size, self.ffn_hidden_size)

    @property
    def w2(self) -> torch.Tensor:  # [E, F, D]
        return self.weight2.view(self.num_experts, self.ffn_hidden_size, self.hidden_size)

    def padded(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [E, C, D]`` (each expert's rows, padded to capacity C) -> ``[E, C, D]``."""
        h = _gelu_tanh_(torch.bmm(x, self.w1))
        return torch.bmm(h, self.w2, out=out)

    def ragged(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` sorted by expert, ``offsets`` int32 group ends -> ``[N, D]``."""
        h = _gelu_tanh_(torch._grouped_mm(x, self.w1, offs=offsets))
        return torch._grouped_mm(h, self.w2, offs=offsets)


class SharedExperts(nn.Module):
    """Always-on experts: one dense GELU-tanh MLP of width ``num_shared * ffn``."""

    def __init__(self, hidden_size: int, num_shared: int, ffn_hidden_size: int):
        super().__init__()
        self.weight1 = nn.Parameter(torch.empty(num_shared * ffn_hidden_size, hidden_size))
        self.weight2 = nn.Parameter(torch.empty(hidden_size, num_shared * ffn_hidden_size))
        nn.init.normal_(self.weight1, std=hidden_size ** -0.5)
        nn.init.normal_(self.weight2, std=(num_shared * ffn_hidden_size) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, self.weight1), approximate="tanh"), self.weight2)


class MoELayer(nn.Module):
    """Routed + shared experts over ``[..., D]`` tokens; module names match the checkpoint.

    After each forward, ``last_expert_counts`` holds the tokens routed to each expert
    (int64 ``[E]``, summing to ``tokens * top_k``) for load metrics.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, *,
                 num_shared_experts: int = 0, shared_ffn_hidden_size: int = 0,
                 enable_expert_bias: bool = True, router_dtype: str = "fp32"):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = TopKRouter(hidden_size, num_experts, top_k,
                                 enable_expert_bias=enable_expert_bias, router_dtype=router_dtype)
        self.experts = GroupedExperts(hidden_size, num_experts, ffn_hidden_size)
        self.shared_experts = (SharedExperts(hidden_size, num_shared_experts, shared_ffn_hidden_size)
                               if num_shared_experts > 0 else None)
        # "auto": "grouped" on accelerators in bf16, else "capacity" (the measured CPU cost model).
        self.path: str = "auto"
        # Capacity path: override both to force a split: (0, 0) all ragged, (inf, 0) all padded bmm.
        self.ragged_row_cost: float | None = None  # None: RAGGED_COSTS for the input dtype
        self.ragged_group_cost: float | None = None
        self.last_expert_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self._routed(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)

    def ragged_costs(self, dtype: torch.dtype) -> tuple[float, float]:
        row, group = RAGGED_COSTS.get(dtype, RAGGED_COSTS_DEFAULT)
        return (row if self.ragged_row_cost is None else self.ragged_row_cost,
                group if self.ragged_group_cost is None else self.ragged_group_cost)

    def resolved_path(self, x: torch.Tensor) -> str:
        if self.path not in MOE_PATHS:
            raise ValueError(f"MoELayer.path must be one of {MOE_PATHS}, got {self.path!r}")
        if self.path != "auto":
            return self.path
        # torch._grouped_mm on CUDA (and its fake kernel under compile) takes bf16 only.
        return "grouped" if x.device.type != "cpu" and x.dtype == torch.bfloat16 else "capacity"

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        tokens, k, num_experts = x.shape[0], self.top_k, self.num_experts
        weights, indices = self.router(x)
        flat = indices.reshape(-1)  # assignment j = token j // k, its (j % k)-th choice
        # Not bincount: on CUDA it reads the input's max back to size its output (a host sync).
        counts = torch.zeros(num_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat, torch.ones_like(flat))
        self.last_expert_counts = counts.detach()
        if tokens == 0:
            return torch.zeros_like(x)
        if self.resolved_path(x) == "grouped":
            return self._routed_grouped(x, weights, flat, counts)
        host_counts = counts.tolist()  # the one host sync of the layer (E integers)
        cap = choose_capacity(host_counts, *self.ragged_costs(x.dtype))
        overflow = sum(max(0, c - cap) for c in host_counts)

        # Sort assignments by expert; rank = position inside its expert's group.
        n, device = flat.numel(), x.device
        order = torch.argsort(flat, stable=True)
        sorted_experts = flat[order]
        token_sorted = order // k
        rank = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
        # Rows [0, E*cap) of `y_all`: the [E, cap] grid; rows past it: overflow, in sorted order.
        bulk = num_experts * cap
        in_bulk = rank < cap
        row_sorted = torch.where(in_bulk, sorted_experts * cap + rank, bulk + torch.cumsum(~in_bulk, 0) - 1)
        y_all = x.new_empty(bulk + overflow, x.shape[1])
        if cap:
            # Grid slot -> source token; empty slots read token 0 and are never read back.
            source = torch.zeros(bulk + 1, dtype=torch.long, device=device)
            source.scatter_(0, torch.where(in_bulk, row_sorted, bulk), token_sorted)
            grid = x.index_select(0, source[:bulk]).view(num_experts, cap, -1)
            if torch.is_grad_enabled():  # out= has no autograd; serving runs without grad
                y_all[:bulk] = self.experts.padded(grid).view(bulk, -1)
            else:
                self.experts.padded(grid, out=y_all[:bulk].view(num_experts, cap, -1))
        if overflow:
            ends = torch.cumsum((counts - cap).clamp_(min=0), 0).to(torch.int32)
            y_all[bulk:] = self.experts.ragged(x.index_select(0, token_sorted[~in_bulk]), ends)
        row = torch.empty_like(row_sorted).scatter_(0, order, row_sorted)
        y = y_all.index_select(0, row).view(tokens, k, -1)
        # Weighted sum over the k choices: one tiny bmm per token, accumulated in fp32 inside
        # the GEMM (an explicit fp32 copy of y costs 5x more in bf16).
        return torch.bmm(weights.to(x.dtype).unsqueeze(1), y).squeeze(1)


    def _routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
        """All assignments through one ragged grouped GEMM; group ends stay on the device."""
        tokens, k = x.shape[0], self.top_k
        order = torch.argsort(flat, stable=True)
        ends = torch.cumsum(counts, 0).to(torch.int32)
        y_sorted = self.experts.ragged(x.index_select(0, order // k), ends)
        y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(tokens, k, -1)
        return torch.bmm(weights.to(x.dtype).unsqueeze(1), y).squeeze(1)


def choose_capacity(counts: list[int], row_cost: float, group_cost: float) -> int:
    """Rows per expert for the padded bmm; rows past it take the ragged grouped GEMM.

    Minimises ``E * cap + row_cost * overflow_rows(cap) + group_cost * overflow_groups(cap)``,
    costs in padded-bmm rows. On CPU a ragged group pays a large fixed cost (each group is its
    own GEMM that re-packs the expert's weights), so padding wins unless the load is very
    skewed. The optimum is a count value or 0. ``row_cost = inf`` -> pad to the largest group;
    ``row_cost <= 0`` -> all ragged.
    """
    if row_cost <= 0:
        return 0
    desc = sorted(counts, reverse=True)
    if math.isinf(row_cost):
        return desc[0]
    best_cap = 0
    best_cost = row_cost * sum(desc) + group_cost * sum(1 for c in desc if c)
    above, groups = 0, 0  # rows in / number of the groups larger than `cap`
    for j, cap in enumerate(desc):
        if j and desc[j - 1] > cap:
            groups = j
        cost = len(desc) * cap + row_cost * (above - groups * cap) + group_cost * groups
        if cost <= best_cost:
            best_cap, best_cost = cap, cost
        above += cap
    return best_cap


def expert_counts(model: nn.Module) -> dict[str, list[int]]:
    """Per-layer expert token counts of the last forward, keyed by module name."""
    return {name: module.last_expert_counts.tolist() for name, module in model.named_modules()
            if isinstance(module, MoELayer) and module.last_expert_counts is not None}
