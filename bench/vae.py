"""VAE stage throughput and memory: video decode tiled vs untiled, image decode batch 1 vs 4.

Every measurement runs in a fresh child process (so its peak RSS is its own): the child loads the
engine, records RSS, decodes once to warm up, times ``--repeats`` decodes (fewer when the warm-up
says they would pass ``--budget-s``: tiled decodes are slow on CPU), and reports
``ru_maxrss`` (peak) and the peak minus the RSS after loading (the decode's own working set).
Tiled runs get half the untiled decode's estimated memory as their budget, so the planner picks
the tile it would pick in service (``vae_worker.memory``). Random-weight tiny presets by default: absolute figures are for the tiny VAEs,
the ratios are what carries over. The VAEs run in float32 (exact, native on every CPU);
``cpu_capability`` records the CPU. Prints JSON last.

    python -m bench.vae --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from mammoth_common.cpu import report_fields


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    from vae_worker.engine import ImageVAE, VideoVAE

    cls = VideoVAE if spec["kind"] == "video" else ImageVAE
    vae = cls.from_pretrained(spec["path"], memory_budget_mb=spec["budget_mb"])
    f = vae.spatial_compression
    h, w = spec["height"] // f, spec["width"] // f
    gen = torch.Generator().manual_seed(0)
    if spec["kind"] == "video":
        t = vae.num_latent_frames(spec["frames"])
        latents = torch.randn(spec["batch"], vae.latent_channels, t, h, w, generator=gen)
    else:
        latents = torch.randn(spec["batch"], vae.latent_channels, h, w, generator=gen)
    base = _rss_mb()
    warm = time.perf_counter()
    vae.decode(latents)  # warm-up (same shapes: the peak is the same)
    repeats = max(1, min(spec["repeats"], int(spec["budget_s"] / max(time.perf_counter() - warm, 1e-9))))
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = vae.decode(latents)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds, cpu_seconds = min(times), min(cpu_times)
    frames = out.shape[0] * (out.shape[1] if spec["kind"] == "video" else 1)
    plan = vae.last_plan
    return {
        "seconds": round(seconds, 4),
        "items_per_s": round(frames / seconds, 3),
        "cpu_seconds": round(cpu_seconds, 4),  # less sensitive to other processes on a shared box
        "items_per_cpu_s": round(frames / cpu_seconds, 3),
        "peak_rss_mb": round(_peak_mb(), 1),
        "decode_rss_mb": round(_peak_mb() - base, 1),
        "estimate_mb": round(plan.estimate_bytes / 2**20, 1),
        "tile": plan.tile,
        "out_shape": list(out.shape),
        "repeats": repeats,
    }


def _run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.vae", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {spec}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON summary line")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--image-preset", default="tiny-mammoth2")
    parser.add_argument("--video-preset", default="tiny-mammoth25")
    parser.add_argument("--video-sizes", default="192,256", help="square frame sides in px (two sizes)")
    parser.add_argument("--frames", type=int, default=5, help="frames per video (4k+1)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=20.0, help="timed decodes per measurement at most this long")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--dry-run", action="store_true", help="print what would run (JSON) and exit")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if args.dry_run:
        print(json.dumps({"bench": "vae", "dtypes": ["float32"], **report_fields(measure=False), "dry_run": True}))
        return 0

    from vae_worker.memory import wan_bytes
    from vae_worker.presets import stage_config, write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(args.video_preset, f"{tmp}/video", seed=0)
        write_random_checkpoint(args.image_preset, f"{tmp}/image", seed=0)
        common = {"threads": args.threads, "repeats": args.repeats, "budget_s": args.budget_s}
        video = {}
        for side in (int(s) for s in args.video_sizes.split(",")):
            row = {}
            half = wan_bytes(stage_config(args.video_preset), args.frames, side, side, 4) / 2 / 2**20
            for mode, budget in (("untiled", 1 << 20), ("tiled", half)):
                spec = {**common, "kind": "video", "path": f"{tmp}/video", "budget_mb": budget, "batch": 1,
                        "frames": args.frames, "height": side, "width": side}
                row[mode] = _run(spec)
                if not args.json:
                    print(f"video {side}px {mode}: {row[mode]}", file=sys.stderr)
            row["tiled_vs_untiled_fps"] = round(row["tiled"]["items_per_s"] / row["untiled"]["items_per_s"], 3)
            row["tiled_vs_untiled_fps_per_cpu_s"] = round(
                row["tiled"]["items_per_cpu_s"] / row["untiled"]["items_per_cpu_s"], 3)
            row["tiled_vs_untiled_decode_rss"] = round(
                row["tiled"]["decode_rss_mb"] / max(row["untiled"]["decode_rss_mb"], 1e-6), 3)
            video[f"{side}x{side}x{args.frames}"] = row
        image = {}
        for batch in (1, 4):
            spec = {**common, "kind": "image", "path": f"{tmp}/image", "budget_mb": 1 << 20, "batch": batch,
                    "frames": 1, "height": args.image_size, "width": args.image_size}
            image[f"batch{batch}"] = _run(spec)
            if not args.json:
                print(f"image batch {batch}: {image[f'batch{batch}']}", file=sys.stderr)
        image["batch4_vs_batch1_throughput"] = round(
            image["batch4"]["items_per_s"] / image["batch1"]["items_per_s"], 3)
        image["batch4_vs_batch1_throughput_per_cpu_s"] = round(
            image["batch4"]["items_per_cpu_s"] / image["batch1"]["items_per_cpu_s"], 3)
    summary = {
        "bench": "vae",
        "device": "cpu",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "threads": args.threads,
        "video_preset": args.video_preset,
        "image_preset": args.image_preset,
        "video_decode": video,
        "image_decode": {"size": args.image_size, **image},
        "dtype": "float32",
        **report_fields(),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
