"""Free TCP ports for the servers tests start, picked below the kernel's ephemeral range.

A port the kernel hands out for ``bind(("", 0))`` comes from the ephemeral range, the same
range every outgoing connection (and every other port-0 bind) draws its local port from: with
Ray starting a dozen processes that connect to each other, a port found free and released can
be taken before the server it was meant for binds it (seen as Ray's client server failing
"Address already in use"). Ports between Ray's worker-port range (10002-19999) and the
ephemeral range are handed out by nobody, so a free one stays free until the test binds it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOW = 20000  # above Ray's default worker ports (min/max_worker_port 10002-19999)
_taken: set[int] = set()  # ports handed out to this process's tests


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nobody listens on now, not handed out before by this process."""
    high = max(_ephemeral_low(), LOW + 1000)
    for _ in range(200):
        port = random.randrange(LOW, high)
        if port in _taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError(f"no free port in {LOW}-{high}")
