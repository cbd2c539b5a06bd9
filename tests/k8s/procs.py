"""Process bookkeeping for the tests that start Ray themselves: the process trees
they start, and a teardown that leaves none of them (and nothing else) behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

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
