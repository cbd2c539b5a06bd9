"""The shared video job store: bounded, never cancels a running job, expiry and deadlines."""

from __future__ import annotations

import pytest

from services.config import VideoJobSettings
from services.errors import Busy, classify
from services.video_jobs import VideoJobStore

pytestmark = pytest.mark.reliability


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, **settings) -> VideoJobStore:
    return VideoJobStore(VideoJobSettings(**{"max_jobs": 3, "max_running": 2, "max_bytes": 100,
                                             "result_ttl_s": 60, **settings}), deadline_s=30, clock=clock)


def test_lifecycle_queued_in_progress_completed_with_content():
    store = _store(Clock())
    assert store.create("v1")["status"] == "queued"
    store.progress("v1", 40)
    assert store.get("v1")["status"] == "in_progress" and store.get("v1")["progress"] == 40
    done = store.finish("v1", {"width": 64, "seed": 3}, b"mp4-bytes", "video/mp4")
    assert done["status"] == "completed" and done["progress"] == 100 and done["width"] == 64
    assert store.content("v1") == ("completed", b"mp4-bytes", "video/mp4")
    assert store.counts() == {"jobs": 1, "running": 0, "bytes": 9}


def test_full_store_refuses_new_jobs_and_never_cancels_running_ones():
    clock = Clock()
    store = _store(clock)
    store.create("a")
    store.create("b")
    with pytest.raises(Busy) as info:  # two running: the running bound
        store.create("c")
    assert classify(info.value).http_status == 429
    assert [store.get(j)["status"] for j in "ab"] == ["queued", "queued"]  # untouched
    store.finish("a", {}, b"x", "video/mp4")
    store.create("c")
    with pytest.raises(Busy):  # three held: the count bound, with a finished job still readable
        store.create("d")
    assert store.get("a")["status"] == "completed" and store.get("b")["status"] == "queued"


def test_finished_jobs_expire_after_the_ttl_and_free_their_bytes():
    clock = Clock()
    store = _store(clock)
    store.create("a")
    store.finish("a", {}, b"x" * 50, "video/mp4")
    clock.now += 59
    assert store.get("a") is not None and store.counts()["bytes"] == 50
    clock.now += 2
    assert store.get("a") is None and store.content("a") is None
    assert store.counts() == {"jobs": 0, "running": 0, "bytes": 0}


def test_a_job_past_its_deadline_fails_and_late_results_are_dropped():
    clock = Clock()
    store = _store(clock)
    store.create("a")
    store.progress("a", 10)
    clock.now += 31  # its replica died or hung
    job = store.get("a")
    assert job["status"] == "failed" and job["error"]["type"] == "timeout"
    assert store.finish("a", {}, b"late", "video/mp4") is None
    assert store.content("a") == ("failed", None, "")
    assert store.counts()["running"] == 0


def test_a_video_that_would_pass_the_byte_bound_fails_its_job_only():
    store = _store(Clock())
    store.create("a")
    store.create("b")
    store.finish("a", {}, b"x" * 80, "video/mp4")
    failed = store.finish("b", {}, b"y" * 30, "video/mp4")
    assert failed["status"] == "failed" and failed["error"]["type"] == "rate_limit_error"
    assert store.content("a")[1] == b"x" * 80 and store.counts()["bytes"] == 80


def test_duplicate_ids_are_refused():
    store = _store(Clock())
    store.create("a")
    with pytest.raises(ValueError):
        store.create("a")
