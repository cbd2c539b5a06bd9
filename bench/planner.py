"""Planner stage throughput on the real vLLM engine vs the pure-PyTorch reference, same run.

Measures planning tokens/s (visual grid tokens, EOLs included) at batch 1 and batch 8 (8
concurrent ``plan_image`` calls sharing vLLM's batch), with and without the hidden-state export,
and with AR-CFG (pairs in one batch). The baseline is ``ReferencePlanner.generate_plan`` on the
same weights: the official loop (full 184.8k-wide logits every step, KV cache grown by
concatenation, one request after another). Optionally (``--full-logits``) a second engine with
the grid-restricted logits switched off (``MAMMOTH_PLANNER_FULL_LOGITS=1``) shows what skipping the
text head saves. Random-weight tiny preset by default: absolute figures are for the tiny model,
the ratios are what carries over. Both sides run float32 (native on every CPU; bf16 is ~100x
slower than float32 on AVX2); ``cpu_capability`` records the CPU. Prints JSON last.

    python -m bench.planner --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path


async def _plans(engine, n: int, h: int, w: int, **kw) -> float:
    """Wall seconds for ``n`` concurrent plans."""
    start = time.perf_counter()
    await asyncio.gather(*(engine.plan_image(f"a picture number {i}", ar_height=h, ar_width=w, seed=i,
                                             negative_prompt=None, **kw) for i in range(n)))
    return time.perf_counter() - start


async def _engine_figures(model_dir: Path, h: int, w: int, repeats: int, full_logits: bool) -> dict:
    from planner.engine import PlannerEngine, planner_config_from_dir

    os.environ["MAMMOTH_PLANNER_FULL_LOGITS"] = "1" if full_logits else "0"
    cfg = planner_config_from_dir(model_dir, kv_cache_gib=2, max_model_len=4096, limit_videos=0, dtype="float32")
    t0 = time.perf_counter()
    engine = await PlannerEngine(cfg).start()
    start_s = time.perf_counter() - t0
    tokens = h * (w + 1)
    out: dict = {"engine_start_s": round(start_s, 1)}
    try:
        await _plans(engine, 1, 2, 2, cfg_scale=1.0)  # warm-up
        cases = {
            "batch1": (1, dict(cfg_scale=1.0)),
            "batch1_no_export": (1, dict(cfg_scale=1.0, export_hidden=False)),
            "batch8": (8, dict(cfg_scale=1.0)),
            "batch8_no_export": (8, dict(cfg_scale=1.0, export_hidden=False)),
            "batch1_cfg": (1, dict(cfg_scale=7.0)),
            "batch8_cfg": (8, dict(cfg_scale=7.0)),
        }
        if full_logits:
            cases = {k: v for k, v in cases.items() if k in ("batch1_no_export", "batch8_no_export")}
        for name, (n, kw) in cases.items():
            best = min([await _plans(engine, n, h, w, **kw) for _ in range(repeats)])
            out[f"{name}_tok_s"] = round(n * tokens / best, 1)
        # AR-CFG pairs that fell out of step (and were repaired) during the run: 0 is the aim.
        out["cfg_desyncs"] = int(engine.stats["cfg_desyncs"])
        out["cfg_failures"] = int(engine.stats["cfg_failures"])
    finally:
        await engine.shutdown()
    return out


def _reference_tok_s(model_dir: Path, h: int, w: int, cfg_scale: float) -> float:
    import torch
    from safetensors.torch import load_file

    from planner.reference import ReferencePlanner
    from planner.tokens import TokenLayout

    cfg = json.loads((model_dir / "config.json").read_text())
    model = ReferencePlanner(cfg)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    model.eval()
    lay = TokenLayout()
    ids = list(range(1000, 1040))
    kw = dict(eol_id=lay.eol_id, visual_start=lay.visual_start_id, num_visual=lay.num_visual_codes,
              cfg_scale=cfg_scale, greedy=False, generator=torch.Generator().manual_seed(0))
    model.generate_plan(ids, ar_height=1, ar_width=2, **kw)  # warm-up
    start = time.perf_counter()
    model.generate_plan(ids, ar_height=h, ar_width=w, **kw)
    return round(h * (w + 1) / (time.perf_counter() - start), 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--model", help="planner checkpoint directory (default: a fresh tiny-mammoth2)")
    parser.add_argument("--grid", type=int, default=8, help="ar_height = ar_width (official: 32)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--full-logits", action="store_true", help="also run an engine without grid-restricted logits")
    parser.add_argument("--dry-run", action="store_true", help="print what would run (JSON) and exit")
    args = parser.parse_args(argv)
    from mammoth_common.cpu import report_fields

    if args.dry_run:
        plan = {"bench": "planner", "dtypes": ["float32"], **report_fields(measure=False), "dry_run": True}
        print(json.dumps(plan))
        return plan
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            from planner.presets import write_random_checkpoint

            model_dir = write_random_checkpoint("tiny-mammoth2", Path(tmp) / "planner", seed=0)
        h = w = args.grid
        ref1 = _reference_tok_s(model_dir, h, w, 1.0)
        ref_cfg = _reference_tok_s(model_dir, h, w, 7.0)
        vllm = asyncio.run(_engine_figures(model_dir, h, w, args.repeats, full_logits=False))
        full = asyncio.run(_engine_figures(model_dir, h, w, args.repeats, full_logits=True)) if args.full_logits else None
    result = {
        "bench": "planner",
        "model": "tiny-mammoth2" if not args.model else str(args.model),
        "grid": f"{h}x{w}",
        "tokens_per_plan": h * (w + 1),
        "reference_batch1_tok_s": ref1,
        "reference_batch1_cfg_tok_s": ref_cfg,
        **{f"vllm_{k}": v for k, v in vllm.items()},
        "ratio_batch1_vs_reference": round(vllm["batch1_tok_s"] / ref1, 2),
        "ratio_batch8_vs_reference": round(vllm["batch8_tok_s"] / ref1, 2),
        "ratio_cfg_batch1_vs_reference_cfg": round(vllm["batch1_cfg_tok_s"] / ref_cfg, 2),
        "ratio_cfg_batch8_vs_reference_cfg": round(vllm["batch8_cfg_tok_s"] / ref_cfg, 2),
        "export_cost_batch1_ratio": round(vllm["batch1_tok_s"] / vllm["batch1_no_export_tok_s"], 3),
        "export_cost_batch8_ratio": round(vllm["batch8_tok_s"] / vllm["batch8_no_export_tok_s"], 3),
        "note": "reference = official-style loop (full logits, one request after another); "
                "export ratio = tok/s with export / without (1.0 = free)",
        "dtype": "float32",
        **report_fields(),
    }
    if full:
        result["grid_logits_gain_batch1"] = round(vllm["batch1_no_export_tok_s"] / full["batch1_no_export_tok_s"], 3)
        result["grid_logits_gain_batch8"] = round(vllm["batch8_no_export_tok_s"] / full["batch8_no_export_tok_s"], 3)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>40}: {value}", file=sys.stderr)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
