"""The ingress's own generation bounds (services.apps.admission) and their Serve options."""

from __future__ import annotations

import asyncio

import pytest

from services.apps.admission import Admission
from services.config import IngressSettings
from services.errors import Busy, classify
from services.render import INGRESS_HEADROOM, deployment_config

pytestmark = pytest.mark.reliability


async def _hold(admission: Admission, started: asyncio.Event, release: asyncio.Event) -> str:
    async with admission.slot():
        started.set()
        await release.wait()
    return "done"


def test_beyond_running_and_queued_a_request_is_refused_at_once_as_429():
    async def scenario():
        admission = Admission(max_ongoing=2, max_queued=1)
        release = asyncio.Event()
        events = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(_hold(admission, e, release)) for e in events]
        await asyncio.wait_for(asyncio.gather(events[0].wait(), events[1].wait()), 5)
        await asyncio.sleep(0)
        assert admission.stats() == {"running": 2, "waiting": 1, "refused": 0}
        with pytest.raises(Busy) as info:
            async with admission.slot():
                pass
        error = classify(info.value)
        assert (error.http_status, error.kind, error.grpc_code.name) == (429, "rate_limit_error", "RESOURCE_EXHAUSTED")
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == ["done"] * 3  # the queued one ran too
        assert admission.stats() == {"running": 0, "waiting": 0, "refused": 1}
        async with admission.slot():  # free again
            assert admission.running == 1

    asyncio.run(scenario())


def test_a_cancelled_waiter_and_a_failing_body_give_their_slot_back():
    async def scenario():
        admission = Admission(max_ongoing=1, max_queued=4)
        release = asyncio.Event()
        started = asyncio.Event()
        holder = asyncio.create_task(_hold(admission, started, release))
        await started.wait()
        waiter = asyncio.create_task(_hold(admission, asyncio.Event(), release))
        await asyncio.sleep(0.01)
        assert admission.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert admission.waiting == 0
        release.set()
        await holder
        with pytest.raises(RuntimeError):
            async with admission.slot():
                raise RuntimeError("boom")
        assert admission.stats()["running"] == 0 and not admission._slots.locked()

    asyncio.run(scenario())


def test_unbounded_queue_never_refuses():
    async def scenario():
        admission = Admission(max_ongoing=1, max_queued=-1)
        release = asyncio.Event()
        events = [asyncio.Event() for _ in range(20)]
        tasks = [asyncio.create_task(_hold(admission, e, release)) for e in events]
        await asyncio.sleep(0.01)
        assert admission.waiting == 19
        release.set()
        await asyncio.gather(*tasks)
        assert admission.refused == 0

    asyncio.run(scenario())


def test_serve_delivers_the_ingress_queue_so_the_ingress_answers_429_itself():
    settings = IngressSettings(max_ongoing_requests=6, max_queued_requests=8)
    options = deployment_config("Ingress", settings)
    assert options["max_ongoing_requests"] == 6 + 8 + INGRESS_HEADROOM
    # the proxy's own bound stays, far behind ours: a burst of 32 queued there a moment and met
    # Serve's plain-text 429 when it was 8 (tests/reliability/test_served.py)
    assert options["max_queued_requests"] == settings.proxy_max_queued_requests > 8 * 32
    assert options["backpressure_config"]["status_code"] == 429
    unbounded = deployment_config("Ingress", IngressSettings(max_ongoing_requests=6, max_queued_requests=-1))
    assert unbounded["max_ongoing_requests"] == 6 + INGRESS_HEADROOM
