"""MoE layer cost against a dense FFN with the same active FLOPs, on identical tokens.

``python -m bench.moe_layer --json`` -- the last stdout line is a JSON object with medians
(seconds) of: the grouped MoE layer as served (``grouped``, automatic path), with ``--paths``
its two expert paths forced (``padded_bmm``, ``ragged_grouped_mm``), a dense GELU-tanh FFN of hidden width
``top_k * expert_ffn (+ shared)`` (``dense``), and the reference per-expert Python loop
(``reference_loop``, what the official code does, with its per-expert ``.any()``), plus
``ratio_moe_over_dense`` and ``ratio_reference_over_grouped`` (of the first dtype; every
dtype's figures are under ``results``). Timings are interleaved within a dtype so machine load
hits them alike; ratios use process-CPU-time medians (wall medians are reported too) because
the box is shared.

Dtypes this CPU does not multiply natively are skipped (``skipped`` names why, e.g. bf16 on AVX2,
where it is ~100x slower than float32; ``--allow-slow`` runs them anyway), and each timed group
(grouped vs dense; the forced paths and the loop reference) gets at most ``--budget-s`` of
repetitions per dtype, so the defaults finish in minutes on any CPU. ``cpu_capability`` records the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dit_worker.models.moe import MoELayer, choose_capacity
from mammoth_common.cpu import report_fields, split_native


def reference_loop(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The official algorithm: one masked pass per expert, skipping empty ones via ``.any()``."""
    weights, indices = layer.router(x)
    out = torch.zeros_like(x)
    w1, w2 = layer.experts.w1, layer.experts.w2
    for e in range(layer.num_experts):
        hit = indices == e
        rows = hit.any(dim=-1)
        if not rows.any():
            continue
        y = F.gelu(x[rows] @ w1[e], approximate="tanh") @ w2[e]
        out[rows] += y * (weights[rows] * hit[rows]).sum(-1, keepdim=True)
    if layer.shared_experts is not None:
        out += layer.shared_experts(x)
    return out


@torch.no_grad()
def balance_router(layer: MoELayer, calibration: torch.Tensor, steps: int, rate: float = 1e-3) -> None:
    """Emulate a trained router: the expert bias is what the official training tunes for load
    balance (aux-loss-free: ``bias += rate * sign(mean_load - load)``). Random router weights
    alone give a ~1.2x busiest/mean skew that a trained model does not have; tuning on separate
    calibration tokens and measuring on fresh ones keeps the benchmark honest."""
    router = layer.router
    for _ in range(steps):
        _, chosen = router(calibration)
        load = torch.bincount(chosen.reshape(-1), minlength=layer.num_experts).float()
        router.expert_bias += rate * torch.sign(load.mean() - load)


def _time(fns: dict[str, Callable[[], object]], reps: int,
          budget_s: float | None = None) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Interleaved wall and process-CPU times per function (after one warm-up call each), and
    the repetitions run: with ``budget_s``, as many as the warm-up round says fit (at least 1).

    CPU time is the headline: on a shared box, time spent descheduled inflates wall time of
    whichever function it hits, while CPU time only counts the work done (threads spinning at
    a barrier still count, so it is not perfectly immune either)."""
    start = time.perf_counter()
    for fn in fns.values():  # warm-up (allocator, oneDNN primitive caches)
        fn()
    if budget_s is not None:
        reps = max(1, min(reps, int(budget_s / max(time.perf_counter() - start, 1e-9))))
    times = {"wall": {name: [] for name in fns}, "cpu": {name: [] for name in fns}}
    for _ in range(reps):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times["cpu"][name].append(time.process_time() - cpu)
            times["wall"][name].append(time.perf_counter() - wall)
    return times, reps


def run(width: int, experts: int, top_k: int, ffn: int, shared: int, shared_ffn: int, tokens: int,
        dtype: torch.dtype, reps: int, extra_reps: int, paths: bool = False, balance_steps: int = 0,
        seed: int = 0, budget_s: float | None = None) -> dict:
    torch.manual_seed(seed)
    layer = MoELayer(width, experts, top_k, ffn, num_shared_experts=shared,
                     shared_ffn_hidden_size=shared_ffn).to(dtype).eval()
    if balance_steps:
        balance_router(layer, torch.randn(tokens, width).to(dtype), balance_steps)
    hidden = top_k * ffn + shared * shared_ffn
    dense_w1 = (torch.randn(hidden, width) * width ** -0.5).to(dtype)
    dense_w2 = (torch.randn(width, hidden) * hidden ** -0.5).to(dtype)
    x = torch.randn(tokens, width).to(dtype)

    def with_costs(row_cost: float, group_cost: float) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            saved = layer.ragged_row_cost, layer.ragged_group_cost
            layer.ragged_row_cost, layer.ragged_group_cost = row_cost, group_cost
            try:
                return layer(x)
            finally:
                layer.ragged_row_cost, layer.ragged_group_cost = saved
        return call

    def dense() -> torch.Tensor:  # the same in-place GELU as the experts
        return F.linear(torch.ops.aten.gelu_(F.linear(x, dense_w1), approximate="tanh"), dense_w2)

    core = {"grouped": lambda: layer(x), "dense": dense}
    extra: dict[str, Callable[[], object]] = {"reference_loop": lambda: reference_loop(layer, x)}
    if paths:
        extra.update(padded_bmm=with_costs(float("inf"), 0.0), ragged_grouped_mm=with_costs(0.0, 0.0))
    with torch.inference_mode():
        ref = reference_loop(layer, x).float()
        got = layer(x).float()
        max_diff = float((ref - got).abs().max())
        counts = layer.last_expert_counts.float()
        capacity = choose_capacity(layer.last_expert_counts.tolist(), *layer.ragged_costs(dtype))
        times, reps = _time(core, reps, budget_s)
        extra_times, extra_reps = _time(extra, extra_reps, budget_s)
    for timer in times:
        times[timer].update(extra_times[timer])
    med = {t: {name: statistics.median(v) for name, v in times[t].items()} for t in times}
    cpu, wall = med["cpu"], med["wall"]
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_medians_s": {k: round(v, 4) for k, v in cpu.items()},
        "wall_medians_s": {k: round(v, 4) for k, v in wall.items()},
        "reps": {"grouped_dense": reps, "others": extra_reps},
        "ratio_moe_over_dense": round(cpu["grouped"] / cpu["dense"], 3),
        "ratio_moe_over_dense_wall": round(wall["grouped"] / wall["dense"], 3),
        "ratio_reference_over_grouped": round(cpu["reference_loop"] / cpu["grouped"], 3),
        "ratio_reference_over_grouped_wall": round(wall["reference_loop"] / wall["grouped"], 3),
        "expert_load_max_over_mean": round(float(counts.max() / counts.mean()), 3),
        "capacity_chosen": capacity,
        "max_abs_diff_vs_reference": max_diff,
        **({"ratio_padded_over_dense": round(cpu["padded_bmm"] / cpu["dense"], 3),
            "ratio_ragged_over_dense": round(cpu["ragged_grouped_mm"] / cpu["dense"], 3)} if paths else {}),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--shared", type=int, default=0)
    parser.add_argument("--shared-ffn", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="in order, the first is the headline; dtypes without native matmuls here are skipped")
    parser.add_argument("--allow-slow", action="store_true", help="run the dtypes this CPU lacks anyway")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="seconds per dtype and timed group at most (fewer repetitions on a slow CPU)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run (JSON) and exit")
    parser.add_argument("--reps", type=int, default=4, help="grouped vs dense, interleaved")
    parser.add_argument("--extra-reps", type=int, default=2, help="forced paths and the loop reference")
    parser.add_argument("--balance-steps", type=int, default=100,
                        help="expert-bias balancing steps on calibration tokens (0: raw random router)")
    parser.add_argument("--paths", action="store_true", help="also time both expert paths forced")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {"width": args.width, "experts": args.experts, "top_k": args.top_k, "expert_ffn": args.ffn,
              "shared": args.shared, "shared_ffn": args.shared_ffn if args.shared else 0,
              "dense_hidden": args.top_k * args.ffn + args.shared * args.shared_ffn,
              "tokens": args.tokens, "balance_steps": args.balance_steps, "threads": torch.get_num_threads(),
              "budget_s": args.budget_s}
    dtypes, skipped = split_native([d.strip() for d in args.dtypes.split(",")], allow_slow=args.allow_slow)
    if not dtypes:
        parser.error(f"--dtypes: nothing left to run on this CPU ({skipped}); pass --allow-slow to run them anyway")
    if args.dry_run:
        plan = {"benchmark": "moe_layer", "config": config, "dtypes": dtypes,
                **report_fields(skipped, measure=False), "dry_run": True}
        print(json.dumps(plan))
        return plan
    results = []
    for name in dtypes:
        result = run(args.width, args.experts, args.top_k, args.ffn, args.shared, args.shared_ffn,
                     args.tokens, getattr(torch, name), args.reps, args.extra_reps, args.paths,
                     args.balance_steps, budget_s=args.budget_s)
        results.append(result)
        if not args.json:
            print(json.dumps(result, indent=2))
    first = results[0]
    summary = {"benchmark": "moe_layer", "config": config, "results": results,
               "ratio_moe_over_dense": first["ratio_moe_over_dense"],
               "ratio_reference_over_grouped": first["ratio_reference_over_grouped"],
               "dtype": first["dtype"], "timer": "process_cpu_median", **report_fields(skipped)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
