"""Serving overhead: the same tiny text-to-image request in-process vs through Ray Serve.

Three paths, interleaved request by request so machine noise hits them alike:
  in-process  the stage services called directly (``services.local``), no Ray;
  gRPC        the Ray Serve gRPC proxy -> ingress -> stage applications;
  HTTP        the Ray Serve HTTP proxy -> the same ingress.
Also the per-hop cost of a 32 MB tensor between Serve replicas, sent the way the pipeline
sends tensors (numpy through the object store) and, for contrast, as a pickled torch tensor.
Stages run the config's CPU defaults (float32, native on every CPU); ``cpu_capability`` records
the CPU. Prints JSON on the last line.

    python -m bench.serve_overhead --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from mammoth_common.cpu import report_fields
from protos import generation_pb2

TENSOR_BYTES = 32 * 1024 * 1024


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def _local_request(stages: Any, job_args: dict[str, Any], defaults: dict, limits: Any,
                         ) -> tuple[float, dict[str, float]]:
    from services import flows
    from services.jobs import image_job

    job = image_job(generation_pb2.GenerateImageRequest(**job_args), defaults, limits, edit=False)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    async for event in flows.text_to_image(stages, job):
        if isinstance(event, flows.Result):
            timings = event.timings
    return time.perf_counter() - start, timings


def _phase_medians(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for s in samples for k in s})
    return {k: round(_median([s[k] for s in samples if k in s]), 4) for k in keys}


def _hop_costs(repeats: int) -> dict[str, float]:
    """Median ms of sending 32 MB replica -> replica, minus the same call with a tiny payload."""
    import torch
    from ray import serve

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    class Sink:
        def take(self, value: Any) -> int:
            return int(value.nbytes if hasattr(value, "nbytes") else value.numel() * value.element_size())

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    class Source:
        def __init__(self, sink):
            self.sink = sink
            self.array = np.ones(TENSOR_BYTES // 4, dtype=np.float32)
            self.tensor = torch.ones(TENSOR_BYTES // 4)
            self.tiny = np.ones(1, dtype=np.float32)

        async def send(self, kind: str) -> float:
            value = {"numpy": self.array, "torch": self.tensor, "tiny": self.tiny}[kind]
            start = time.perf_counter()
            await self.sink.take.remote(value)
            return time.perf_counter() - start

    handle = serve.run(Source.bind(Sink.bind()), name="bench-hop", route_prefix=None)
    results: dict[str, list[float]] = {"numpy": [], "torch": [], "tiny": []}
    for _ in range(repeats):
        for kind in results:
            results[kind].append(handle.send.remote(kind).result())
    serve.delete("bench-hop")
    tiny = _median(results["tiny"])
    return {
        "hop_32mb_numpy_ms": round((_median(results["numpy"]) - tiny) * 1e3, 2),
        "hop_32mb_torch_pickled_ms": round((_median(results["torch"]) - tiny) * 1e3, 2),
        "hop_tiny_ms": round(tiny * 1e3, 2),
    }


def _stage_dtypes(cfg: Any) -> dict[str, str]:
    return {stage: cfg.resolved_dtype(stage) for stage in ("planner", "dit", "vae")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dry-run", action="store_true", help="print what would run (JSON) and exit")
    args = parser.parse_args(argv)
    if args.dry_run:
        from services.config import ServeConfig

        plan = {"bench": "serve_overhead", "stage_dtypes": _stage_dtypes(ServeConfig()),
                **report_fields(measure=False), "dry_run": True}
        print(json.dumps(plan))
        return plan

    from services.client import MammothClient
    from services.config import ServeConfig
    from services.deploy import serve_down, serve_up
    from services.local import start_local_stages
    from services.stage_setup import ensure_model

    cache = tempfile.mkdtemp(prefix="mammoth-bench-")
    cfg = ServeConfig.loads(f"models: {{image: {{preset: tiny-mammoth2, cache_dir: {cache}}}}}\n"
                            "ingress: {grpc_port: 9310, http_port: 8310, host: 127.0.0.1}")
    index = ensure_model(cfg, "image")
    request = {"prompt": "a lighthouse on a cliff", "seed": 1, "steps": args.steps, "width": 256, "height": 256}
    times: dict[str, list[float]] = {"in_process": [], "grpc": [], "http": []}
    phases: dict[str, list[dict[str, float]]] = {"in_process": [], "grpc": [], "http": []}
    loop = asyncio.new_event_loop()
    stages = loop.run_until_complete(start_local_stages(cfg, "image"))
    try:
        serve_up(cfg)
        grpc_client = MammothClient("127.0.0.1:9310", "http://127.0.0.1:8310")
        http_client = MammothClient("127.0.0.1:9310", "http://127.0.0.1:8310", use_http=True)
        options = {k: v for k, v in request.items() if k != "prompt"}
        for warm in (True,) + (False,) * args.repeats:  # first round warms every path up
            local, local_phases = loop.run_until_complete(
                _local_request(stages, request, index.defaults, cfg.ingress.limits))
            start = time.perf_counter()
            grpc_out = grpc_client.generate_image(request["prompt"], **options)
            grpc_s = time.perf_counter() - start
            start = time.perf_counter()
            http_out = http_client.generate_image(request["prompt"], **options)
            http_s = time.perf_counter() - start
            if not warm:
                for key, seconds, phase in (("in_process", local, local_phases), ("grpc", grpc_s, grpc_out.timings),
                                            ("http", http_s, http_out.timings)):
                    times[key].append(seconds)
                    phases[key].append(phase)
        hops = _hop_costs(max(5, args.repeats))
    finally:
        loop.run_until_complete(stages.close())
        serve_down()
    medians = {k: _median(v) for k, v in times.items()}
    result = {
        "bench": "serve_overhead",
        "request": request,
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "median_phase_s": {k: _phase_medians(v) for k, v in phases.items()},
        "ratio_grpc": round(medians["grpc"] / medians["in_process"], 3),
        "ratio_http": round(medians["http"] / medians["in_process"], 3),
        "target_ratio": 1.10,
        **hops,
        "target_hop_32mb_ms": 30,
        "stage_dtypes": _stage_dtypes(cfg),
        **report_fields(),
    }
    if not args.json:
        print(f"in-process {medians['in_process']:.3f}s  gRPC {medians['grpc']:.3f}s  HTTP {medians['http']:.3f}s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
