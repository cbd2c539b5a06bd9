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

Expert compute never loops over experts in Python: token->expert assignments are sorted once
and run either as one ``bmm`` over capacity-padded expert groups (fastest on CPU when the load
is balanced enough) or as one ``torch._grouped_mm`` over the ragged groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# bmm over groups padded to the largest group beats the ragged grouped GEMM on CPU while the
# padding stays below this fraction of the real rows (measured in bench/moe_layer.py).
PAD_BUDGET = 0.25


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

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x [E, C, D]`` (each expert's rows, zero-padded to capacity C) -> ``[E, C, D]``."""
        h = F.gelu(torch.bmm(x, self.w1), approximate="tanh")
        return torch.bmm(h, self.w2)

    def ragged(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` sorted by expert, ``offsets`` int32 group ends -> ``[N, D]``."""
        h = F.gelu(torch._grouped_mm(x, self.w1, offs=offsets), approximate="tanh")
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
        self.pad_budget = PAD_BUDGET  # <0: always ragged grouped GEMM; inf: always padded bmm
        self.last_expert_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self._routed(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        tokens, k, num_experts = x.shape[0], self.top_k, self.num_experts
        weights, indices = self.router(x)
        flat = indices.reshape(-1)  # assignment j = token j // k, its (j % k)-th choice
        counts = torch.bincount(flat, minlength=num_experts)
        self.last_expert_counts = counts.detach()
        if tokens == 0:
            return torch.zeros_like(x)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        ends = torch.cumsum(counts, 0)
        capacity = int(counts.max())  # the one host sync of the layer
        n = flat.numel()
        if num_experts * capacity <= n * (1.0 + self.pad_budget):
            # Slot of each assignment in the [E, capacity] grid: expert * C + rank in expert.
            sorted_experts = flat[order]
            rank = torch.arange(n, device=x.device) - (ends - counts)[sorted_experts]
            slot_of_sorted = sorted_experts * capacity + rank
            slot = torch.empty_like(slot_of_sorted).scatter_(0, order, slot_of_sorted)
            source = torch.full((num_experts * capacity,), tokens, dtype=torch.long, device=x.device)
            source.scatter_(0, slot, torch.arange(n, device=x.device) // k)
            x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row `tokens` feeds empty slots
            grid = x_ext.index_select(0, source).view(num_experts, capacity, -1)
            y = self.experts.padded(grid).view(num_experts * capacity, -1).index_select(0, slot)
        else:
            y_sorted = self.experts.ragged(x.index_select(0, order // k), ends.to(torch.int32))
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=x.device))
            y = y_sorted.index_select(0, inverse)
        # Weighted sum over the k choices in fp32 (the reference weighs in fp32 too).
        combined = torch.bmm(weights.unsqueeze(1), y.view(tokens, k, -1).float()).squeeze(1)
        return combined.to(x.dtype)


def expert_counts(model: nn.Module) -> dict[str, list[int]]:
    """Per-layer expert token counts of the last forward, keyed by module name."""
    return {name: module.last_expert_counts.tolist() for name, module in model.named_modules()
            if isinstance(module, MoELayer) and module.last_expert_counts is not None}
