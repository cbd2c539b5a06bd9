"""Expert-parallel MoE layer: each rank holds its slots' experts; tokens travel, not weights.

Routing is the single-rank layer's (``moe.TopKRouter``: same weights on every rank, fp32),
so each token picks the same experts as it would alone. Per layer:

1. each (token, choice) assignment gets a global slot (rank * slots_per_rank + local slot);
   an expert with several copies sends assignment ``j`` to copy ``j % copies``;
2. per-slot counts are exchanged (one fixed-size all-to-all), then the token rows with
   variable split sizes (``all_to_all_single``);
3. the receiving rank groups its rows by local expert and runs ``moe.GroupedExperts`` (padded
   bmm + ragged grouped GEMM for the overflow, the single-rank cost model);
4. results go back with the reverse split sizes and are combined with the router weights.

Shared experts and everything outside the MoE stay local: tokens stay in place for attention.
Parameter names equal ``moe.MoELayer``'s, with ``experts.weight1/2`` holding only the local
slots' blocks, so checkpoints load by slicing (``loader``).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from dit_worker.models.moe import (
    RAGGED_COSTS,
    RAGGED_COSTS_DEFAULT,
    GroupedExperts,
    SharedExperts,
    TopKRouter,
    choose_capacity,
)


class ExpertParallelMoE(nn.Module):
    """``moe.MoELayer`` with its routed experts spread over the ranks of ``group``.

    After each forward: ``last_expert_counts`` (int64 ``[E]``, assignments of *this rank's*
    tokens per expert), ``last_received`` (int64 ``[slots]``, rows this rank's experts ran) and
    ``comm_seconds`` (wall time spent in all-to-all, accumulated) for metrics and benchmarks.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, *,
                 slots: list[list[int]], rank: int, group: dist.ProcessGroup | None = None,
                 num_shared_experts: int = 0, shared_ffn_hidden_size: int = 0,
                 enable_expert_bias: bool = True, router_dtype: str = "fp32"):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.rank = rank
        self.world_size = len(slots)
        self.group = group
        self.slots = [list(s) for s in slots]
        self.local_experts = self.slots[rank]
        self.slots_per_rank = len(self.local_experts)
        self.router = TopKRouter(hidden_size, num_experts, top_k,
                                 enable_expert_bias=enable_expert_bias, router_dtype=router_dtype)
        self.experts = GroupedExperts(hidden_size, self.slots_per_rank, ffn_hidden_size)
        self.shared_experts = (SharedExperts(hidden_size, num_shared_experts, shared_ffn_hidden_size)
                               if num_shared_experts > 0 else None)
        copies: list[list[int]] = [[] for _ in range(num_experts)]
        for r, experts in enumerate(self.slots):
            for local, e in enumerate(experts):
                copies[e].append(r * self.slots_per_rank + local)
        width = max(len(c) for c in copies)
        # expert -> its global slots (padded by repeating the first), and its copy count; on the
        # CPU even when built under a meta-device context, moved on first use
        self._slot_table = torch.tensor([c + [c[0]] * (width - len(c)) for c in copies], dtype=torch.long,
                                        device="cpu")
        self._copies = torch.tensor([len(c) for c in copies], dtype=torch.long,
                                        device="cpu")
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_expert_counts: torch.Tensor | None = None
        self.last_received: torch.Tensor | None = None
        self.comm_seconds = 0.0

    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = (self._slot_table.to(device), self._copies.to(device))
        return self._tables[device]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self._routed(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)

    def _all_to_all(self, output: torch.Tensor, send: torch.Tensor, out_splits=None, in_splits=None) -> None:
        start = time.perf_counter()
        dist.all_to_all_single(output, send, out_splits, in_splits, group=self.group)
        self.comm_seconds += time.perf_counter() - start

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        tokens, k, device = x.shape[0], self.top_k, x.device
        n_ranks, per_rank = self.world_size, self.slots_per_rank
        weights, indices = self.router(x)
        flat = indices.reshape(-1)
        self.last_expert_counts = torch.bincount(flat, minlength=self.num_experts).detach()
        slot_table, copies = self._tables_on(device)
        assignment = torch.arange(flat.numel(), device=device)
        slot = slot_table[flat, assignment % copies[flat]]
        order = torch.argsort(slot, stable=True)  # by destination rank, then local slot
        send_counts = torch.bincount(slot, minlength=n_ranks * per_rank)
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all(recv_counts, send_counts)  # [source rank, my slot] counts
        send_splits = send_counts.view(n_ranks, per_rank).sum(1).tolist()  # host sync: split sizes
        recv_grid = recv_counts.view(n_ranks, per_rank)
        recv_splits = recv_grid.sum(1).tolist()
        send = x.index_select(0, order // k)
        received = x.new_empty(sum(recv_splits), x.shape[1])
        self._all_to_all(received, send, recv_splits, send_splits)

        per_slot = recv_grid.sum(0)
        self.last_received = per_slot.detach()
        result = torch.empty_like(received)
        if received.shape[0]:
            # rows arrive source-major, slot-minor: regroup by local slot for the grouped GEMM
            local_slot = torch.repeat_interleave(torch.arange(per_rank, device=device).repeat(n_ranks),
                                                 recv_counts)
            grouping = torch.argsort(local_slot, stable=True)
            result.index_copy_(0, grouping, self._experts(received.index_select(0, grouping), per_slot))
        back = torch.empty_like(send)
        self._all_to_all(back, result, send_splits, recv_splits)
        y = torch.empty_like(back).index_copy_(0, order, back).view(tokens, k, x.shape[1])
        return torch.bmm(weights.to(x.dtype).unsqueeze(1), y).squeeze(1)

    def _experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows ``x`` sorted by local slot (``counts`` per slot) through their experts: the first
        ``cap`` rows of each slot as one padded bmm, the rest as one ragged grouped GEMM."""
        host = counts.tolist()
        cap = choose_capacity(host, *RAGGED_COSTS.get(x.dtype, RAGGED_COSTS_DEFAULT))
        n, slots, device = x.shape[0], len(host), x.device
        sorted_slot = torch.repeat_interleave(torch.arange(slots, device=device), counts)
        rank_in_slot = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_slot]
        in_bulk = rank_in_slot < cap
        out = torch.empty_like(x)
        if cap:
            grid = x.new_zeros(slots * cap, x.shape[1])
            cells = sorted_slot[in_bulk] * cap + rank_in_slot[in_bulk]
            grid.index_copy_(0, cells, x[in_bulk])
            y = self.experts.padded(grid.view(slots, cap, -1)).view(slots * cap, -1)
            out[in_bulk] = y.index_select(0, cells)
        if not bool(in_bulk.all()):
            ends = torch.cumsum((counts - cap).clamp(min=0), 0).to(torch.int32)
            out[~in_bulk] = self.experts.ragged(x[~in_bulk], ends)
        return out
