"""Throughput of the served pipeline, mixed-size DiT batching and the DiT step cache.

Parts (``--parts``, all by default):

  served   through Ray Serve (gRPC) on the tiny image model: 1, 8 and 32 concurrent T2I requests
           (256 px, 20 steps, AR-CFG on): requests/s, p50/p95 latency; the same requests one at
           a time in the same run, and the ratio of requests/s (target >= 3x at 8 concurrent);
  mixed    the DiT stage's batching loop in-process (tiny model): 256^2 and 512^2 requests
           interleaved, big first, with mixed shapes on (default padding rule, and packing every
           size into one padded forward) and off (one shape per batch): wall time, p50 latency
           of the small requests, forwards run, and the ratios;
  cache    the DiT engine directly, tiny and a mid-size image DiT (random weights): for each
           step-cache threshold the fraction of steps computed, DiT evaluations saved and the
           relative L2 error of the final latents vs uncached; the tuned threshold is the one
           with the fewest evaluations at error <= 1e-2 (target >= 1.8x fewer);
  startup  ``bench.startup.run``: time from ``mammoth serve`` to the first answered request and
           PSS per process at idle and under load (the embedded default).

``cpu_capability`` records the CPU. Prints JSON on the last line. Run under ``/work/tools/e2e``
on shared machines::

    python -m bench.throughput --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from mammoth_common.cpu import report_fields

PARTS = ("served", "mixed", "cache", "startup")
PROMPT = "a lighthouse on a cliff at dusk"
MAX_CACHE_ERROR = 1e-2
TARGET_CONCURRENT_RATIO = 3.0
# per-request stage timings (seconds, from the result) reported as medians per level
STAGE_TIMINGS = ("planner", "dit_queue", "dit", "vae_decode")
TARGET_FEWER_EVALUATIONS = 1.8


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def _latency_fields(latencies: list[float], wall: float) -> dict[str, float]:
    return {"requests_per_s": round(len(latencies) / wall, 3), "wall_s": round(wall, 2),
            "p50_s": round(_percentile(latencies, 50), 3), "p95_s": round(_percentile(latencies, 95), 3)}


# ------------------------------------------------------------------------------------- served


def served(concurrency: list[int], steps: int, size: int, grpc_port: int, http_port: int) -> dict[str, Any]:
    """Concurrent vs one-at-a-time T2I through the served pipeline (gRPC)."""
    from services.client import MammothClient
    from services.config import ServeConfig
    from services.deploy import serve_down, serve_up
    from services.stage_setup import ensure_model

    cache = tempfile.mkdtemp(prefix="mammoth-bench-")
    cfg = ServeConfig.loads(f"models: {{image: {{preset: tiny-mammoth2, cache_dir: {cache}}}}}\n"
                            f"ingress: {{grpc_port: {grpc_port}, http_port: {http_port}, host: 127.0.0.1}}")
    index = ensure_model(cfg, "image")
    options = {"steps": steps, "width": size, "height": size,
               "ar_cfg_scale": max(float(index.defaults.get("ar_cfg_scale", 3.0)), 2.0)}
    result: dict[str, Any] = {"request": {"prompt": PROMPT, **options}, "levels": {}}
    started = time.perf_counter()
    serve_up(cfg)
    result["serve_up_s"] = round(time.perf_counter() - started, 1)
    client = MammothClient(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
    computed: list[float] = []
    stages: list[dict[str, float]] = []

    def one(seed: int) -> float:
        t0 = time.perf_counter()
        out = client.generate_image(PROMPT, seed=seed, **options)
        computed.append(out.timings.get("dit_steps_computed", float("nan")))
        stages.append({k: out.timings[k] for k in STAGE_TIMINGS if k in out.timings})
        return time.perf_counter() - t0

    def stage_medians() -> dict[str, float]:
        """Median seconds per stage of the requests since the last call (what dominates)."""
        taken = stages[:]
        stages.clear()
        return {k: round(statistics.median(t[k] for t in taken if k in t), 3)
                for k in STAGE_TIMINGS if any(k in t for t in taken)}

    try:
        one(0)  # warm every stage up
        for n in concurrency:
            seeds = list(range(1000 * n, 1000 * n + n))
            stage_medians()
            with ThreadPoolExecutor(n) as pool:
                t0 = time.perf_counter()
                together = list(pool.map(one, seeds))
                wall = time.perf_counter() - t0
            together_stages = stage_medians()
            t0 = time.perf_counter()
            alone = [one(s) for s in seeds]
            alone_wall = time.perf_counter() - t0
            level = {"concurrent": {**_latency_fields(together, wall), "stage_s": together_stages},
                     "one_at_a_time": {**_latency_fields(alone, alone_wall), "stage_s": stage_medians()}}
            level["ratio_requests_per_s"] = round(alone_wall / wall, 3)
            result["levels"][str(n)] = level
            print(json.dumps({"served_level": n, **level}), file=sys.stderr, flush=True)  # partial figures
        result["dit_steps_computed_per_request"] = sorted(set(computed))  # step cache off by default
    finally:
        client.close()
        serve_down()
    ratio8 = result["levels"].get("8", {}).get("ratio_requests_per_s")
    result["target_ratio_at_8"] = TARGET_CONCURRENT_RATIO
    result["meets_target_at_8"] = ratio8 is not None and ratio8 >= TARGET_CONCURRENT_RATIO
    result["dit_engine"] = cfg.dit.engine.model_dump(include={"max_batch_rows", "max_batch_tokens", "mixed_shapes",
                                                              "max_padding"})
    return result


# -------------------------------------------------------------------------------------- mixed


def _tiny_engine(config: Any = None) -> Any:
    from dit_worker import presets
    from dit_worker.engine import DiTEngine
    from dit_worker.families import ImageFamily
    from dit_worker.models.transformer_mammoth2 import Mammoth2DiTConfig, Mammoth2Transformer

    torch.manual_seed(0)
    model = Mammoth2Transformer(config or Mammoth2DiTConfig.tiny())
    presets._perturb(model, seed=1)
    return model.eval(), ImageFamily(), DiTEngine


async def _stage_run(stage: Any, sizes: list[int], steps: int) -> tuple[float, list[tuple[int, float]]]:
    import numpy as np

    from protos import dit_pb2
    from services.handoff import ImageConditions
    from services.stage_messages import denoise_job

    async def one(i: int, latent: int) -> tuple[int, float]:
        rng = np.random.default_rng(i)
        conditions = ImageConditions(rng.standard_normal((12, 128), dtype=np.float32),
                                     rng.standard_normal((16, 128), dtype=np.float32),
                                     rng.standard_normal((6, 128), dtype=np.float32), 0)
        job = denoise_job(dit_pb2.DenoiseRequest(request_id=f"r{i}", latent_height=latent, latent_width=latent,
                                                 steps=steps, seed=i, text_guidance=5.0), "mammoth2", {})
        t0 = time.perf_counter()
        async for _ in stage.denoise(job, conditions):
            pass
        return latent, time.perf_counter() - t0

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(i, s) for i, s in enumerate(sizes)))
    return time.perf_counter() - t0, list(done)


def _mixed_variant(engine: Any, sizes: list[int], steps: int) -> tuple[float, list[tuple[int, float]], int]:
    """One run of ``sizes`` through a fresh stage on ``engine``: wall, (latent, latency)s, forwards."""
    from services.stages.dit import DiTStage

    calls: list[int] = []

    async def main() -> tuple[float, list[tuple[int, float]]]:
        stage = DiTStage(engine, max_batch_requests=len(sizes), batch_wait_timeout_s=0.05)
        await _stage_run(stage, [32], 2)  # warm up
        calls.clear()
        try:
            return await _stage_run(stage, sizes, steps)
        finally:
            await stage.close()

    handle = engine.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        wall, done = asyncio.run(main())
    finally:
        handle.remove()
    return wall, done, len(calls)


def mixed(steps: int, pairs: int) -> dict[str, Any]:
    """256^2 and 512^2 (latents 32 and 64) interleaved, the big one first, through ``DiTStage``."""
    from dit_worker.engine import DiTEngineConfig

    model, family, engine_cls = _tiny_engine()
    sizes = [64, 32] * pairs
    variants = {"mixed_default": DiTEngineConfig(),
                "mixed_one_padded_forward": DiTEngineConfig(max_padding=1.0),
                "one_shape_per_batch": DiTEngineConfig(mixed_shapes=False)}
    result: dict[str, Any] = {"requests": {"pixels": [s * 8 for s in sizes], "steps": steps, "text_guidance": 5.0}}
    for name, config in variants.items():
        wall, done, forwards = _mixed_variant(engine_cls(model, family, config), sizes, steps)
        small = [t for latent, t in done if latent == 32]
        big = [t for latent, t in done if latent == 64]
        result[name] = {"wall_s": round(wall, 3), "small_p50_s": round(statistics.median(small), 3),
                        "big_p50_s": round(statistics.median(big), 3), "forwards": forwards}
    base = result["one_shape_per_batch"]
    for name in ("mixed_default", "mixed_one_padded_forward"):
        result[name]["ratio_wall_vs_one_shape"] = round(result[name]["wall_s"] / base["wall_s"], 3)
        result[name]["ratio_small_p50_vs_one_shape"] = round(result[name]["small_p50_s"] / base["small_p50_s"], 3)
    result["packing"] = "padded to the longest row with a [B, S] key mask and per-row RoPE (native SDPA); " \
                        "rows shorter than (1 - max_padding) x the longest get their own forward in the same step"
    return result


# -------------------------------------------------------------------------------------- cache


def _mid_config() -> Any:
    from dit_worker.models.transformer_mammoth2 import Mammoth2DiTConfig, Mammoth2ImageEmbedderConfig

    return Mammoth2DiTConfig(hidden_size=384, num_layers=8, num_refiner_layers=1, num_attention_heads=6,
                             num_kv_heads=2, axes_dim_rope=(16, 24, 24), axes_lens=(1024, 256, 256),
                             text_feat_dim=128, llm_hidden_size=128,
                             gen_image_condition_refiner_config=Mammoth2ImageEmbedderConfig(num_queries=16))


def _cache_requests(steps: int, latent: int, count: int, params: Any) -> list[Any]:
    from dit_worker.requests import ImageDenoiseRequest, SamplingParams

    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        out.append(ImageDenoiseRequest(
            request_id=f"c{i}", text=torch.randn(12, 128, generator=g), image=torch.randn(16, 128, generator=g),
            negative=torch.randn(6, 128, generator=g), latent_height=latent, latent_width=latent, text_guidance=5.0,
            sampling=SamplingParams(steps=steps, seed=i, step_cache=params)))
    return out


def cache_sweep(name: str, config: Any, thresholds: list[float], steps: int, latent: int, count: int,
                warmup: float, max_cached: int) -> dict[str, Any]:
    from dit_worker.step_cache import StepCacheParams

    model, family, engine_cls = _tiny_engine(config)
    engine = engine_cls(model, family)
    t0 = time.perf_counter()
    reference = engine.generate(_cache_requests(steps, latent, count, StepCacheParams()))
    uncached_s = time.perf_counter() - t0
    rows = []
    for threshold in thresholds:
        params = StepCacheParams(threshold=threshold, warmup=warmup, max_cached_steps=max_cached)
        t0 = time.perf_counter()
        outputs = engine.generate(_cache_requests(steps, latent, count, params))
        seconds = time.perf_counter() - t0
        computed = sum(o.computed_steps for o in outputs)
        errors = [float((o.latents.float() - r.latents.float()).norm() / r.latents.float().norm())
                  for o, r in zip(outputs, reference)]
        rows.append({"threshold": threshold, "fraction_computed": round(computed / (steps * count), 3),
                     "fewer_evaluations": round(steps * count / computed, 3), "rel_l2_max": float(f"{max(errors):.3g}"),
                     "rel_l2_mean": float(f"{statistics.mean(errors):.3g}"),
                     "wall_speedup": round(uncached_s / seconds, 3)})
    good = [r for r in rows if r["rel_l2_max"] <= MAX_CACHE_ERROR]
    tuned = max(good, key=lambda r: r["fewer_evaluations"]) if good else None
    return {"config": name, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
            "latent": latent, "steps": steps, "requests": count, "warmup": warmup, "max_cached_steps": max_cached,
            "uncached_s": round(uncached_s, 3), "sweep": rows, "tuned": tuned,
            "meets_target": bool(tuned and tuned["fewer_evaluations"] >= TARGET_FEWER_EVALUATIONS)}


def cache(steps: int, thresholds: list[float], count: int) -> dict[str, Any]:
    from dit_worker.models.transformer_mammoth2 import Mammoth2DiTConfig

    return {"tiny": cache_sweep("tiny-mammoth2", Mammoth2DiTConfig.tiny(), thresholds, steps, 32, count, 0.1, 3),
            "mid": cache_sweep("mid (384 wide, 8 layers)", _mid_config(), thresholds, steps, 32, count, 0.1, 3),
            "max_rel_l2": MAX_CACHE_ERROR, "target_fewer_evaluations": TARGET_FEWER_EVALUATIONS,
            "note": "random weights: the error/threshold curve of a trained checkpoint differs; tune per model"}


# ------------------------------------------------------------------------------------ startup


def startup(concurrency: int) -> dict[str, Any]:
    try:
        from bench.startup import run
    except ImportError as exc:
        return {"skipped": f"bench.startup not importable: {exc}"}
    figures = run(None, concurrency, 600.0)
    keys = ("serving_s", "first_answer_s", "pss_idle_mb", "pss_idle_total_mb", "pss_load_peak_mb",
            "pss_load_peak_total_mb", "load", "error")
    return {k: figures[k] for k in keys if k in figures}


# --------------------------------------------------------------------------------------- main


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="served requests' pixels (square)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--mixed-pairs", type=int, default=3, help="256^2 + 512^2 pairs in the mixed part")
    parser.add_argument("--cache-thresholds", default="0.02,0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--cache-requests", type=int, default=4)
    parser.add_argument("--startup-concurrency", type=int, default=4)
    parser.add_argument("--grpc-port", type=int, default=9317)
    parser.add_argument("--http-port", type=int, default=8317)
    parser.add_argument("--dry-run", action="store_true", help="print the plan (JSON) and exit")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    concurrency = [int(v) for v in args.concurrency.split(",") if v]
    thresholds = _floats(args.cache_thresholds)
    result: dict[str, Any] = {"bench": "throughput", "parts": parts}
    if args.dry_run:
        result.update({"dry_run": True, "steps": args.steps, "size": args.size, "concurrency": concurrency,
                       "cache_thresholds": thresholds, **report_fields(measure=False)})
        print(json.dumps(result))
        return result
    skipped: dict[str, str] = {}
    if "served" in parts:
        result["served"] = served(concurrency, args.steps, args.size, args.grpc_port, args.http_port)
    if "mixed" in parts:
        result["mixed"] = mixed(args.steps, args.mixed_pairs)
    if "cache" in parts:
        result["cache"] = cache(args.steps, thresholds, args.cache_requests)
    if "startup" in parts:
        result["startup"] = startup(args.startup_concurrency)
        if "skipped" in result["startup"]:
            skipped["startup"] = result["startup"]["skipped"]
    result.update(report_fields(skipped))
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
