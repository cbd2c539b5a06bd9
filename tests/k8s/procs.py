"""Process bookkeeping for the tests that start Ray themselves: the process trees
they start, and a teardown that leaves none of them (and nothing else) behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every descendant alive now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def marked(marker: str) -> list[psutil.Process]:
    """Processes whose command line mentions ``marker`` (a temp dir only our cluster uses)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The ones still running (same pid *and* start time: a reused pid does not count)."""
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_gone(procs: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    procs = list(procs)
    deadline = time.monotonic() + timeout_s
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def terminate(procs: Iterable[psutil.Process], *, grace_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after ``grace_s``."""
    procs = alive(procs)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    for proc in wait_gone(procs, grace_s):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    wait_gone(procs, 10.0)


def start_serve(config: Path, log: Path) -> subprocess.Popen:
    """``mammoth serve --config`` in its own session (so its whole tree can be signalled), its
    output in ``log``, with none of the caller's Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--config", str(config)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_line(log: Path, prefix: str, proc: subprocess.Popen, timeout_s: float) -> str:
    """The first line of ``log`` starting with ``prefix``; fails if the server exits or the line
    does not come within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        assert proc.poll() is None, f"mammoth serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        time.sleep(1)
    raise AssertionError(f"no {prefix!r} line within {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
