"""The ingress's own bound on generation requests: a few run, a few wait, the rest get 429 at once.

Serve's proxy rejects a full deployment queue itself, with a plain-text body (Serve 2.60's
``BackpressureConfig`` sets only the status and ``Retry-After``), so the API's error shape
(429 JSON / RESOURCE_EXHAUSTED with our message) can only come from the replica. The ingress
therefore lets Serve deliver more than it runs (``services.render`` sets Serve's per-replica
``max_ongoing_requests`` to ``max_ongoing + max_queued`` plus room for probes and job reads) and
enforces the configured bounds here, per replica: ``max_ongoing`` flows at once, up to
``max_queued`` waiting for one, any further one refused with ``Busy`` without waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..errors import Busy


class Admission:
    """``max_queued`` -1: unbounded waiting (only Serve's own queue bound applies)."""

    def __init__(self, max_ongoing: int, max_queued: int):
        if max_ongoing < 1:
            raise ValueError(f"max_ongoing: expected >= 1, got {max_ongoing}")
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_ongoing)
        self.running = 0
        self.waiting = 0
        self.refused = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``max_ongoing`` slots for the body; ``Busy`` at once when the queue is full."""
        if self.running >= self.max_ongoing and 0 <= self.max_queued <= self.waiting:
            self.refused += 1
            raise Busy(f"server is at capacity ({self.running} running, {self.waiting} queued), retry later")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "waiting": self.waiting, "refused": self.refused}
