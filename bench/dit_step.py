"""One DiT denoising step of a mid-size MammothModa2 config vs this machine's dense GEMM rate.

The step is the engine's real per-step forward: a CFG pair (conditional + unconditional rows)
through ``Mammoth2Transformer.forward`` with everything timestep-independent prepared once.
FLOPs are counted by torch's ``FlopCounterMode`` on that very forward; the GEMM rate is measured
in the same run, same dtype, on a matmul of the model's own FFN shape. Dtypes this CPU does not
multiply natively (bf16 on AVX2: ~100x slower than float32) are skipped with a note under
``skipped`` unless ``--allow-slow``; ``cpu_capability`` records the CPU. Prints JSON last.

    python -m bench.dit_step --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_worker.models.transformer_mammoth2 import (
    Mammoth2Condition,
    Mammoth2DiTConfig,
    Mammoth2ImageEmbedderConfig,
    Mammoth2Transformer,
)
from mammoth_common.cpu import report_fields, split_native


def mid_config(width: int, layers: int) -> Mammoth2DiTConfig:
    heads = width // 128
    return Mammoth2DiTConfig(
        hidden_size=width, num_layers=layers, num_refiner_layers=1, num_attention_heads=heads,
        num_kv_heads=max(1, heads // 2), axes_dim_rope=(32, 48, 48), llm_hidden_size=1024,
        gen_image_condition_refiner_config=Mammoth2ImageEmbedderConfig(num_queries=32, num_layers=1),
    )


def _median_seconds(fn, repeats: int, budget_s: float | None = None) -> tuple[float, int]:
    """Median of ``repeats`` timed calls after a warm-up; with ``budget_s``, only as many as the
    warm-up says fit (at least one), so a slow CPU still finishes in bounded time."""
    start = time.perf_counter()
    fn()  # warm-up
    if budget_s is not None:
        repeats = max(1, min(repeats, int(budget_s / max(time.perf_counter() - start, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), repeats


def measure(dtype: torch.dtype, width: int, layers: int, image_px: int, repeats: int,
            budget_s: float | None = None) -> dict:
    torch.manual_seed(0)
    config = mid_config(width, layers)
    model = Mammoth2Transformer(config).to(dtype).eval()
    latent = image_px // 8
    text = torch.randn(64, config.llm_hidden_size, dtype=dtype)
    conditions = [Mammoth2Condition(text=text, image=torch.randn(256, config.llm_hidden_size, dtype=dtype)),
                  Mammoth2Condition(text=torch.randn(24, config.llm_hidden_size, dtype=dtype))]
    with torch.inference_mode():
        prepared = model.prepare(conditions)
        latents = torch.randn(2, config.in_channels, latent, latent, dtype=dtype)
        timestep = torch.full((2,), 0.5, dtype=dtype)

        def step() -> None:
            model(latents, timestep, prepared)

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        step_s, step_repeats = _median_seconds(step, repeats, budget_s)

        tokens = 2 * ((latent // 2) ** 2 + 64)
        inner = model.layers[0].feed_forward.linear_1.out_features
        a = torch.randn(tokens, width, dtype=dtype)
        b = torch.randn(width, inner, dtype=dtype)
        gemm_s, _ = _median_seconds(lambda: a @ b, repeats * 3)
    gemm_gflops = 2 * tokens * width * inner / gemm_s / 1e9
    step_gflops = flops / step_s / 1e9
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "step_ms": round(step_s * 1e3, 2),
        "step_repeats": step_repeats,
        "step_gflop": round(flops / 1e9, 2),
        "step_gflops_per_s": round(step_gflops, 1),
        "gemm_gflops_per_s": round(gemm_gflops, 1),
        "fraction_of_gemm": round(step_gflops / gemm_gflops, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-px", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="dtypes without native matmuls on this CPU are skipped")
    parser.add_argument("--allow-slow", action="store_true", help="run the dtypes this CPU lacks anyway")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="seconds of timed steps per dtype at most (fewer repeats on a slow CPU)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run (JSON) and exit")
    args = parser.parse_args(argv)
    if args.width < 1024:
        parser.error("--width: the benchmark is defined for mid-size configs (>= 1024)")
    dtypes, skipped = split_native([d.strip() for d in args.dtypes.split(",")], allow_slow=args.allow_slow)
    if not dtypes:
        parser.error(f"--dtypes: nothing left to run on this CPU ({skipped}); pass --allow-slow to run them anyway")
    config = {"width": args.width, "layers": args.layers, "image_px": args.image_px, "cfg_rows": 2,
              "threads": torch.get_num_threads(), "budget_s": args.budget_s}
    if args.dry_run:
        plan = {"bench": "dit_step", "config": config, "dtypes": dtypes, **report_fields(skipped, measure=False),
                "dry_run": True}
        print(json.dumps(plan))
        return plan
    runs = [measure(getattr(torch, dtype), args.width, args.layers, args.image_px, args.repeats, args.budget_s)
            for dtype in dtypes]
    best = max(runs, key=lambda r: r["step_gflops_per_s"])
    result = {
        "bench": "dit_step",
        "config": config,
        "runs": runs,
        "dtype": best["dtype"],
        "fraction_of_gemm": best["fraction_of_gemm"],
        "target_fraction_of_gemm": 0.5,
        **report_fields(skipped),
    }
    if not args.json:
        for run in runs:
            print(f"{run['dtype']:9s} step {run['step_ms']} ms  {run['step_gflops_per_s']} GFLOP/s  "
                  f"GEMM {run['gemm_gflops_per_s']} GFLOP/s  fraction {run['fraction_of_gemm']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
