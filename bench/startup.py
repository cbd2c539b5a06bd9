"""Start-up time and memory of ``mammoth serve`` on the embedded default (tiny CPU models).

Builds the tiny checkpoints first (outside the timing: the question is a restart with the
checkpoints on disk), then starts ``mammoth serve`` as a subprocess on free ports with its own
Ray temp dir, and measures:

* ``serving_s``: start -> the ``serving:`` line (the ingress and the first model RUNNING; on a
  small machine later models start after it, ``start_models_together``);
* ``first_answer_s``: start -> the first answered text-to-image request (a tiny one), sent as
  soon as the ``serving:`` line appears;
* ``all_models_s``: start -> every model serving (the last ``ready:`` line);
* ``stages``: what the Serve / vLLM logs of this run say (replica init times, vLLM's
  multi-modal warm-up, engine init), to tell what dominates;
* PSS per process (``/proc/<pid>/smaps_rollup``) of every process the server started (Ray
  GCS/raylet, Serve controller/proxy, each replica by its Ray title), at idle and the peak under
  a small concurrent load.

Prints JSON last. Run it under ``/work/tools/e2e`` on shared machines::

    python -m bench.startup --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Log lines that say where start-up time goes (regex -> figure name; the first group is seconds
# where there is one).
LOG_FIGURES = {
    r"Multi-modal warmup completed in ([0-9.]+)s": "vllm_mm_warmup_s",
    r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) seconds": "vllm_engine_init_s",
    r"Loading weights took ([0-9.]+) seconds": "vllm_load_weights_s",
    r"Model loading took .*? and ([0-9.]+) seconds": "vllm_model_loading_s",
    r"deployed \d+ applications in ([0-9.]+)s": "serve_run_many_s",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (Ray's GCS, raylet and workers are all children)."""
    children = _children_map()
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def process_name(pid: int) -> str:
    """Ray sets worker titles (``ray::ServeReplica:image-planner:Planner``); others: the command."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    parts = [p for p in raw.decode(errors="replace").split("\0") if p]
    if not parts:
        return "?"
    title = parts[0]
    if title.startswith("ray::") or title.startswith("VLLM") or " " in title:
        return title.split()[0] if title.startswith("ray::") else title[:80]
    name = Path(title).name
    if name.startswith("python") and len(parts) > 1:
        script = next((p for p in parts[1:] if not p.startswith("-")), "")
        if script:
            return f"python {Path(script).name}"[:80]
    return name[:80]


def pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_snapshot(root: int) -> dict[str, float]:
    """MB of PSS by process name (same-named processes summed, with a ``xN`` suffix)."""
    totals: dict[str, list[float]] = {}
    for pid in descendants(root):
        kib = pss_kib(pid)
        if kib is None or kib == 0:
            continue
        totals.setdefault(process_name(pid), []).append(kib / 1024)
    out = {}
    for name, values in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        out[name if len(values) == 1 else f"{name} x{len(values)}"] = round(sum(values), 1)
    return out


def log_figures(log_dir: Path) -> dict[str, list[float]]:
    """Every ``LOG_FIGURES`` match in the run's Ray logs (one list per figure: one per replica)."""
    found: dict[str, list[float]] = {}
    patterns = [(re.compile(p), name) for p, name in LOG_FIGURES.items()]
    for path in sorted(log_dir.rglob("*")):
        if not path.is_file() or path.suffix not in (".log", ".out", ".err"):
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for pattern, name in patterns:
            for m in pattern.finditer(text):
                found.setdefault(name, []).append(float(m.group(1)))
    return found


def replica_init_times(log_dir: Path) -> dict[str, float]:
    """Seconds from a replica's first log line to its 'finished initializing' line, per app."""
    out: dict[str, float] = {}
    stamp = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3})")
    for path in sorted((log_dir / "serve").glob("replica_*.log")):
        lines = path.read_text(errors="replace").splitlines()
        times = []
        done = None
        for line in lines:
            m = stamp.search(line)
            if not m:
                continue
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            times.append(t)
            if done is None and re.search(r"[Ff]inished initializing replica|initialized", line):
                done = t
        if times and done is not None:
            app = path.name[len("replica_"):].rsplit("_", 1)[0]
            out[app] = round(done - times[0], 1)
    return out


def _build_models(cfg) -> None:
    from services.stage_setup import ensure_model

    for name in cfg.models:
        ensure_model(cfg, name)


def _config(cache_dir: str | None):
    from services.config import ServeConfig

    cfg = ServeConfig.default_cpu()
    data = cfg.to_dict()
    for model in data["models"].values():
        if cache_dir:
            model["cache_dir"] = cache_dir
    data["ingress"]["http_port"] = _free_port()
    data["ingress"]["grpc_port"] = _free_port()
    return ServeConfig.from_dict(data)


def _starting_models(serving_line: str) -> set[str]:
    """``serving: ... models image, starting video (Ctrl-C ...)`` -> ``{"video"}``: the models
    ``mammoth serve`` deploys after the first (``start_models_together``)."""
    if ", starting " not in serving_line:
        return set()
    return set(serving_line.split(", starting ", 1)[1].split(" (", 1)[0].split(", "))


class _Server:
    """``mammoth serve --config`` as a subprocess; its output is collected line by line."""

    def __init__(self, config_path: Path, ray_tmp: Path):
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
        mammoth = Path(sys.executable).with_name("mammoth")
        cmd = [str(mammoth)] if mammoth.exists() else [sys.executable, "-m", "services.cli"]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([*cmd, "serve", "--config", str(config_path)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.serving = threading.Event()
        self.all_ready = threading.Event()  # every model serving (the serving: line, or a later ready: line)
        self.starting: set[str] = set()
        self.ready_at = 0.0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pids: set[int] = set()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.t0, line.rstrip()))
            if line.startswith("serving:"):
                self.serving.set()
                self.starting = _starting_models(line)
            elif line.startswith("ready: models "):
                self.starting -= set(line[len("ready: models "):].strip().split(", "))
            if self.serving.is_set() and not self.starting and not self.all_ready.is_set():
                self.ready_at = time.perf_counter()
                self.all_ready.set()

    def remember_pids(self) -> None:
        self.pids.update(descendants(self.proc.pid))

    def stop(self, timeout: float = 90.0) -> float:
        """SIGTERM, wait; whatever of ours is still alive afterwards is killed by pid."""
        self.remember_pids()
        start = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        took = time.perf_counter() - start
        time.sleep(1.0)
        for pid in self.pids:
            if pid != os.getpid() and Path(f"/proc/{pid}").exists():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        return took


def _image(client, seed: int) -> float:
    start = time.perf_counter()
    client.generate_image(f"a red bicycle number {seed}", steps=2, seed=seed)
    return time.perf_counter() - start


def _peak_memory(root: int, busy: threading.Event, interval: float = 0.5) -> dict[str, float]:
    peak: dict[str, float] = {}
    while busy.is_set():
        snap = memory_snapshot(root)
        if sum(snap.values()) > sum(peak.values()):
            peak = snap
        time.sleep(interval)
    return peak


def run(cache_dir: str | None, concurrency: int, start_timeout: float, keep: bool = False) -> dict:
    from services.client import MammothClient

    cfg = _config(cache_dir)
    t_build = time.perf_counter()
    _build_models(cfg)
    build_s = time.perf_counter() - t_build
    work = Path(tempfile.mkdtemp(prefix="mst-", dir="/tmp"))  # short: Ray's socket paths are length-bound
    config_path = work / "mammoth.yaml"
    cfg.dump(config_path)
    server = _Server(config_path, work)
    result: dict = {"bench": "startup", "models": sorted(cfg.models), "checkpoint_build_s": round(build_s, 1)}
    try:
        while not server.serving.wait(1.0):
            server.remember_pids()
            if server.proc.poll() is not None:
                raise RuntimeError("mammoth serve exited before serving:\n" + "\n".join(text for _, text in server.lines[-40:]))
            if time.perf_counter() - server.t0 > start_timeout:
                raise TimeoutError(f"not serving after {start_timeout}s")
        result["serving_s"] = round(time.perf_counter() - server.t0, 1)
        client = MammothClient(f"127.0.0.1:{cfg.ingress.grpc_port}", f"http://127.0.0.1:{cfg.ingress.http_port}")
        try:
            try:
                first = _image(client, 0)
            except Exception as exc:  # the figures so far still count; say what failed
                result["error"] = f"first request: {exc}"
                return result
            result["first_answer_s"] = round(time.perf_counter() - server.t0, 1)
            result["first_request_s"] = round(first, 2)
            if not server.all_ready.wait(start_timeout):
                raise TimeoutError(f"not every model serving after {start_timeout}s")
            result["all_models_s"] = round(server.ready_at - server.t0, 1)
            server.remember_pids()
            time.sleep(3.0)
            idle = memory_snapshot(server.proc.pid)
            result["pss_idle_mb"] = idle
            result["pss_idle_total_mb"] = round(sum(idle.values()), 1)
            busy = threading.Event()
            busy.set()
            with ThreadPoolExecutor(concurrency + 1) as pool:
                watcher = pool.submit(_peak_memory, server.proc.pid, busy)
                t_load = time.perf_counter()
                latencies = list(pool.map(lambda s: _image(client, s), range(1, concurrency + 1)))
                load_s = time.perf_counter() - t_load
                busy.clear()
                peak = watcher.result()
            result["load"] = {"concurrency": concurrency, "wall_s": round(load_s, 2),
                              "median_latency_s": round(sorted(latencies)[len(latencies) // 2], 2)}
            result["pss_load_peak_mb"] = peak
            result["pss_load_peak_total_mb"] = round(sum(peak.values()), 1)
        finally:
            client.close()
    finally:
        result["stop_s"] = round(server.stop(), 1)
        logs = work / "ray" / "session_latest" / "logs"
        if logs.is_dir():
            result["stages"] = {k: v for k, v in log_figures(logs).items()}
            result["replica_init_s"] = replica_init_times(logs)
        if keep:
            result["work_dir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["cpu_count"] = os.cpu_count()
    return result


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="tiny checkpoints (default: the config's ~/.cache/mammoth)")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent T2I requests for the load figure")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--keep", action="store_true", help="keep the run's Ray logs (their folder is printed)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = run(args.cache_dir, args.concurrency, args.start_timeout, args.keep)
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
