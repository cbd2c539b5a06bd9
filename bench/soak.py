"""Soak: replay prompts against the served pipeline at a fixed concurrency for a bounded time.

Reports requests, errors (by status), p50/p95 latency per flow, retries the ingress made, and the
PSS of every Ray process of the cluster sampled throughout, with the growth from the first to the
last third of the run and a least-squares slope (MiB/min). ``soak()`` is what
``tests/reliability`` runs against its own served pipeline; ``python -m bench.soak`` starts one
(the tiny image model, on this machine) and prints JSON on its last line.

    python -m bench.soak --seconds 60 --concurrency 2 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "prompts" / "geneval_prompts.txt"
MiB = 1024 * 1024


def load_prompts(path: Path = PROMPTS, limit: int = 200) -> list[str]:
    """GenEval prompts from ``../shared/prompts`` (a few fixed ones when the file is absent)."""
    if path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if lines:
            return lines[:limit]
    return ["a photo of a bench", "a photo of a cow", "a red bicycle", "a lighthouse at dusk"]


def cluster_pss(root_pid: int) -> int:
    """Bytes of PSS of ``root_pid`` and all its descendants (the Ray cluster a driver started)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 2:
        return 0.0
    xs, ys = [t for t, _ in samples], [b / MiB for _, b in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def image_request(prompt: str, seed: int) -> tuple[str, str, dict[str, Any]]:
    return "image", "/v1/images/generations", {"prompt": prompt, "size": "64x64", "steps": 2, "seed": seed}


def soak(base_url: str, prompts: Iterable[str], *, seconds: float, concurrency: int, api_key: str | None = None,
         pss: Callable[[], int] | None = None, make_request: Callable[[str, int], tuple[str, str, dict]] = image_request,
         request_timeout_s: float = 300.0, sample_every_s: float = 1.0) -> dict[str, Any]:
    """Run the load and return the figures (see the module docstring)."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    prompt_cycle = itertools.cycle(list(prompts))
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {}
    statuses: Counter[str] = Counter()
    retries = 0
    stop_at = time.monotonic() + seconds
    samples: list[tuple[float, int]] = []
    started = time.monotonic()

    def worker(index: int) -> None:
        nonlocal retries
        with httpx.Client(base_url=base_url, timeout=request_timeout_s, headers=headers) as client:
            for n in itertools.count():
                if time.monotonic() >= stop_at:
                    return
                with lock:
                    prompt = next(prompt_cycle)
                flow, path, body = make_request(prompt, index * 100_000 + n)
                begin = time.monotonic()
                try:
                    response = client.post(path, json=body)
                    status = str(response.status_code)
                    if response.status_code == 200:
                        retries_here = int(response.json().get("retries", 0))
                    else:
                        retries_here = 0
                except httpx.HTTPError as exc:
                    status, retries_here = type(exc).__name__, 0
                with lock:
                    statuses[status] += 1
                    retries += retries_here
                    if status == "200":
                        latencies.setdefault(flow, []).append(time.monotonic() - begin)

    def sampler() -> None:
        while time.monotonic() < stop_at:
            if pss is not None:
                samples.append((time.monotonic() - started, pss()))
            time.sleep(sample_every_s)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + request_timeout_s + 5)
    third = max(len(samples) // 3, 1)
    first = statistics.fmean(b for _, b in samples[:third]) / MiB if samples else 0.0
    last = statistics.fmean(b for _, b in samples[-third:]) / MiB if samples else 0.0
    return {
        "seconds": seconds, "concurrency": concurrency,
        "requests": sum(statuses.values()), "errors": sum(v for k, v in statuses.items() if k != "200"),
        "statuses": dict(statuses), "retries": retries,
        "latency_s": {flow: {"p50": _percentile(v, 0.5), "p95": _percentile(v, 0.95), "n": len(v)}
                      for flow, v in latencies.items()},
        "pss_mib": {"first_third": first, "last_third": last, "growth_ratio": (last / first) if first else 0.0,
                    "slope_mib_per_min": _slope_mib_per_min(samples), "samples": len(samples)},
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--url", help="an already running server's HTTP URL (else one is started here)")
    parser.add_argument("--api-key", default=os.environ.get("MAMMOTH_API_KEY"))
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    prompts = load_prompts()
    if args.url:
        result = soak(args.url, prompts, seconds=args.seconds, concurrency=args.concurrency, api_key=args.api_key)
    else:
        from services.config import ServeConfig
        from services.deploy import serve_down, serve_up

        http_port, grpc_port = _free_port(), _free_port()
        cfg = ServeConfig.from_dict({"models": {"image": {"preset": "tiny-mammoth2"}},
                                     "ingress": {"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port}})
        serve_up(cfg)
        try:
            result = soak(f"http://127.0.0.1:{http_port}", prompts, seconds=args.seconds,
                          concurrency=args.concurrency, pss=lambda: cluster_pss(os.getpid()))
        finally:
            serve_down()
    from mammoth_common.cpu import report_fields

    result.update(report_fields(measure=False))  # stages run the config's CPU defaults (float32)
    if not args.json:
        print(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
