"""Expert/sequence/data-parallel DiT step at N=1 vs N=2 ranks (gloo on CPU, NCCL on GPU).

``python -m bench.parallel_dit --json`` -- the last stdout line is a JSON object with, for a
mid-size MoE video config (width 1024, 16 experts top-2 + 1 shared, 4,096 video tokens):

* ``n1`` / ``n2``: median seconds of one DiT step for one long request (1 row: sequence
  parallel at N=2) and a CFG pair (2 rows: data parallel at N=2). A CPU "device" is
  ``--threads`` cores: N=1 is today's single-process model on one device, N=2 two rank
  processes on one device each (as N GPUs vs one GPU);
* ``n2.*_all_to_all_share``: share of rank 0's step time spent in all-to-all (expert dispatch
  and combine, plus Ulysses' q/k/v/output exchange in SP);
* ``expert_imbalance`` (max/mean tokens per expert: routing, the same under any placement),
  ``rank_imbalance_before/after`` (max/mean expert rows per rank, measured on the ranks) and
  ``slot_imbalance_before/after`` (per expert copy) for the contiguous placement and a balanced
  one with 2 replicated experts computed from the measured counts (``mammoth dit placement``);
* ``expert_bytes_per_rank_over_total``: each rank's expert weights / all expert weights
  (target 1/N).

The router gets a fixed selection bias so the load is skewed like a trained router's (a
random router is near-uniform, which would leave nothing to rebalance). float32 unless
``--dtype`` says otherwise; dtypes this CPU does not multiply natively are refused.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dit_worker.checkpoint import save_pretrained
from dit_worker.models.mammoth25_refiner import Mammoth25RefinerConfig, Mammoth25RefinerLayerConfig
from dit_worker.models.transformer_mammoth25 import (
    Mammoth25Condition,
    Mammoth25DiTConfig,
    Mammoth25MoEConfig,
    Mammoth25Transformer,
)
from dit_worker.parallel.placement import ExpertPlacement, imbalance, rank_loads
from mammoth_common.cpu import is_refused, report_fields

WORLD = 2
FRAMES, HEIGHT, WIDTH = 4, 64, 64  # latent grid: 4 x 32 x 32 = 4,096 video tokens
REPLICAS = 2


def bench_config() -> Mammoth25DiTConfig:
    return Mammoth25DiTConfig(
        num_attention_heads=8, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=256,
        ffn_dim=4096, num_layers=2, rope_max_seq_len=256,
        moe=Mammoth25MoEConfig(num_layers=2, hidden_size=1024, num_attention_heads=8, ffn_hidden_size=1024,
                               num_moe_experts=16, moe_router_topk=2, num_shared_experts=1,
                               shared_expert_intermediate_size=1024),
        refiner=Mammoth25RefinerConfig(vlm_dim=256, transformer_config=Mammoth25RefinerLayerConfig(
            hidden_size=256, num_heads=2, ffn_dim=256)))


def write_checkpoint(directory: Path) -> Path:
    config = bench_config()
    torch.manual_seed(0)
    model = Mammoth25Transformer(config)
    with torch.no_grad():
        skew = torch.linspace(0.25, -0.25, config.moe.num_moe_experts)  # early experts hot
        for block in model.blocks:
            block.ffn.router.expert_bias.copy_(skew)
    return save_pretrained(model, config, directory)


def inputs(rows: int, dtype: torch.dtype) -> tuple[list[Mammoth25Condition], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    conditions = [Mammoth25Condition(prompt=torch.randn(32, 256, generator=g, dtype=dtype)) for _ in range(rows)]
    latents = torch.randn(rows, 16, FRAMES, HEIGHT, WIDTH, generator=g, dtype=dtype)
    return conditions, latents, torch.full((rows,), 700.0)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def single_rank(ckpt: Path, dtype: str, repeats: int, threads: int) -> dict[str, float]:
    from dit_worker.engine import DiTEngine, DiTEngineConfig

    torch.set_num_threads(threads)  # one device
    engine = DiTEngine.from_pretrained(ckpt, DiTEngineConfig(dtype=dtype))
    out = {}
    for name, rows in (("sp_step_s", 1), ("dp_step_s", 2)):
        conditions, latents, t = inputs(rows, engine.dtype)
        prepared = engine.model.prepare(conditions)
        with torch.inference_mode():
            out[name] = _median_time(lambda a=(latents, t, prepared): engine.model(*a), repeats)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, ckpt: str, out: str, ports: list[int], dtype: str, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    from diffusers.models import attention_dispatch

    from dit_worker.parallel.group import GroupSpec
    from dit_worker.parallel.plan import StepPlan
    from dit_worker.parallel.worker import RankWorker

    ulysses = {"s": 0.0}
    original = attention_dispatch._all_to_all_single

    def timed(x, group):  # Ulysses' exchange, timed where it happens
        start = time.perf_counter()
        try:
            return original(x, group)
        finally:
            ulysses["s"] += time.perf_counter() - start

    attention_dispatch._all_to_all_single = timed
    result: dict = {}
    placement_file = str(Path(out) / "balanced.json")
    for phase, placement in enumerate((None, placement_file)):
        spec = GroupSpec(rank, WORLD, f"tcp://127.0.0.1:{ports[phase]}", timeout_s=600)
        worker = RankWorker(ckpt, spec, dtype=dtype, placement=placement)
        if rank:
            worker.follow()
            worker.close()
            continue
        stats = worker.stats()
        result[f"phase{phase}_bytes"] = stats["parameter_bytes"]
        cases = (("sp", 1), ("dp", 2)) if phase == 0 else (("dp", 2),)
        for mode, rows in cases:
            conditions, latents, t = inputs(rows, worker.dtype)
            worker.submit(StepPlan("prepare", prepared_id=rows, conditions=conditions))
            plan = StepPlan("forward", prepared_id=rows, rows=list(range(rows)), latents=latents, timesteps=t,
                            mode=mode)
            comm0 = sum(m.comm_seconds for _, m in worker.layers) + ulysses["s"]
            step0 = worker.step_seconds
            seconds = _median_time(lambda plan=plan, w=worker: w.submit(plan), repeats)
            comm = sum(m.comm_seconds for _, m in worker.layers) + ulysses["s"] - comm0
            steps = worker.step_seconds - step0
            result[f"phase{phase}_{mode}"] = {"step_s": seconds, "all_to_all_share": comm / steps,
                                              "rank_tokens": worker.last_rank_tokens,
                                              "counts": worker.last_counts}
        if phase == 0:  # what `mammoth dit placement --from-metrics` does with these counts
            counts = result["phase0_dp"]["counts"]
            ExpertPlacement.balanced(counts, WORLD, replicas=REPLICAS).save(placement_file)
        worker.submit(StepPlan("stop"))
        worker.close()
    if rank == 0:
        (Path(out) / "rank0.json").write_text(json.dumps(result))


def _slot_imbalance(loads: list[float], slots: list[list[int]]) -> float:
    copies = [sum(e in s for s in slots) for e in range(len(loads))]
    return imbalance([loads[e] / copies[e] for s in slots for e in s])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per device (rank)")
    args = parser.parse_args()
    if is_refused(args.dtype, "cpu"):
        raise SystemExit(f"--dtype {args.dtype}: this CPU has no native kernels for it (use float32)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "dit")
        n1 = single_rank(ckpt, args.dtype, args.repeats, args.threads)
        mp.start_processes(_rank_main, args=(str(ckpt), tmp, [_free_port(), _free_port()], args.dtype, args.repeats,
                                             args.threads), nprocs=WORLD, start_method="spawn", join=True)
        ranks = json.loads((Path(tmp) / "rank0.json").read_text())
        balanced = ExpertPlacement.load(Path(tmp) / "balanced.json")
    counts = ranks["phase0_dp"]["counts"]
    contiguous = ExpertPlacement.contiguous(16, WORLD)
    layer_loads = list(counts.values())
    expert_bytes_total = ranks["phase0_bytes"]["expert"] * WORLD  # contiguous: every expert once
    report = {
        "config": {"width": 1024, "experts": 16, "top_k": 2, "shared_experts": 1, "layers": 2,
                   "video_tokens": FRAMES * HEIGHT * WIDTH // 4, "world_size": WORLD, "dtype": args.dtype,
                   "threads_per_device": args.threads},
        "n1": n1,
        "n2": {"sp_step_s": ranks["phase0_sp"]["step_s"], "dp_step_s": ranks["phase0_dp"]["step_s"],
               "sp_all_to_all_share": ranks["phase0_sp"]["all_to_all_share"],
               "dp_all_to_all_share": ranks["phase0_dp"]["all_to_all_share"]},
        "speedup_sp": n1["sp_step_s"] / ranks["phase0_sp"]["step_s"],
        "speedup_dp": n1["dp_step_s"] / ranks["phase0_dp"]["step_s"],
        "expert_imbalance": max(imbalance(v) for v in layer_loads),
        "rank_imbalance_before": imbalance(ranks["phase0_dp"]["rank_tokens"]),
        "rank_imbalance_after": imbalance(ranks["phase1_dp"]["rank_tokens"]),
        "rank_imbalance_after_predicted": max(imbalance(rank_loads(v, balanced.for_layer(n)))
                                              for n, v in counts.items()),
        "slot_imbalance_before": max(_slot_imbalance(v, contiguous.default) for v in layer_loads),
        "slot_imbalance_after": max(_slot_imbalance(v, balanced.for_layer(n)) for n, v in counts.items()),
        "replicated_experts": REPLICAS,
        "expert_bytes_per_rank_over_total": ranks["phase0_bytes"]["expert"] / expert_bytes_total,
        "expert_bytes_per_rank_over_total_balanced": ranks["phase1_bytes"]["expert"] / expert_bytes_total,
        "seconds": time.perf_counter() - started,
        **report_fields(measure=False),
    }
    if not args.json:
        for key, value in report.items():
            print(f"{key}: {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
