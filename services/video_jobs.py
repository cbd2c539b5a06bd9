"""The ``/v1/videos`` job store, shared by every ingress replica.

A job is created by the replica that runs it and read by whichever replica a later ``GET``
reaches, so jobs live outside the replicas: in one detached, named Ray actor
(``VideoJobStoreActor``). It outlives ingress restarts (finished jobs stay readable), bounds
what it holds (jobs, running jobs, bytes of finished videos; a create beyond a bound is
refused with ``Busy``, never by cancelling another job), drops finished jobs after
``result_ttl_s`` and fails a job still unfinished past its deadline (its replica died or hung).

``VideoJobStore`` is the plain logic (a clock is injectable for tests); the actor wraps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import VideoJobSettings
from .errors import Busy

ACTIVE = ("queued", "in_progress")
ACTOR_NAMESPACE = "mammoth"


@dataclass
class _Job:
    id: str
    created_at: float
    deadline_at: float
    status: str = "queued"  # queued -> in_progress -> completed | failed
    progress: int = 0
    finished_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # model, seed, size, timings of the result
    data: bytes | None = None
    mime_type: str = ""
    error: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "video", "status": self.status, "progress": self.progress,
                               "created_at": int(self.created_at), **self.meta}
        if self.error is not None:
            out["error"] = self.error
        return out


class VideoJobStore:
    """Bounded video jobs with expiry and deadlines; every method sweeps first."""

    def __init__(self, settings: VideoJobSettings, deadline_s: float, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.deadline_s = deadline_s
        self.clock = clock
        self._jobs: dict[str, _Job] = {}
        self._bytes = 0

    def create(self, job_id: str) -> dict[str, Any]:
        """Admit a new job or raise ``Busy``; existing jobs are never evicted or cancelled for it."""
        self._sweep()
        if job_id in self._jobs:
            raise ValueError(f"video job {job_id!r} exists")
        if len(self._jobs) >= self.settings.max_jobs:
            raise Busy(f"the video job store is full ({self.settings.max_jobs} jobs), retry later")
        running = sum(job.status in ACTIVE for job in self._jobs.values())
        if running >= self.settings.max_running:
            raise Busy(f"{running} video jobs are running (limit {self.settings.max_running}), retry later")
        now = self.clock()
        job = self._jobs[job_id] = _Job(job_id, now, now + self.deadline_s)
        return job.as_json()

    def progress(self, job_id: str, progress: int) -> None:
        job = self._active(job_id)
        if job is not None:
            job.status, job.progress = "in_progress", max(job.progress, min(int(progress), 99))

    def finish(self, job_id: str, meta: dict[str, Any], data: bytes, mime_type: str) -> dict[str, Any] | None:
        """Store the video; one that would pass ``max_bytes`` fails the job instead."""
        job = self._active(job_id)
        if job is None:
            return None
        if self._bytes + len(data) > self.settings.max_bytes:
            return self._end(job, "failed", error={
                "message": f"the video store is full ({self.settings.max_bytes} bytes), retry later",
                "type": "rate_limit_error"})
        job.meta, job.data, job.mime_type = dict(meta), bytes(data), mime_type
        self._bytes += len(job.data)
        return self._end(job, "completed", progress=100)

    def fail(self, job_id: str, error: dict[str, Any]) -> dict[str, Any] | None:
        job = self._active(job_id)
        return None if job is None else self._end(job, "failed", error=dict(error))

    def get(self, job_id: str) -> dict[str, Any] | None:
        self._sweep()
        job = self._jobs.get(job_id)
        return None if job is None else job.as_json()

    def content(self, job_id: str) -> tuple[str, bytes | None, str] | None:
        """(status, video bytes or None until completed, mime type), or None if unknown."""
        self._sweep()
        job = self._jobs.get(job_id)
        return None if job is None else (job.status, job.data, job.mime_type)

    def counts(self) -> dict[str, int]:
        self._sweep()
        return {"jobs": len(self._jobs), "running": sum(j.status in ACTIVE for j in self._jobs.values()),
                "bytes": self._bytes}

    # -- internals -----------------------------------------------------------------------------
    def _active(self, job_id: str) -> _Job | None:
        self._sweep()
        job = self._jobs.get(job_id)
        return job if job is not None and job.status in ACTIVE else None

    def _end(self, job: _Job, status: str, *, progress: int | None = None,
             error: dict[str, Any] | None = None) -> dict[str, Any]:
        job.status, job.finished_at, job.error = status, self.clock(), error
        if progress is not None:
            job.progress = progress
        return job.as_json()

    def _sweep(self) -> None:
        now = self.clock()
        for job_id, job in list(self._jobs.items()):
            if job.status in ACTIVE and now > job.deadline_at:
                self._end(job, "failed", error={"message": "deadline exceeded", "type": "timeout"})
            if job.finished_at is not None and now > job.finished_at + self.settings.result_ttl_s:
                self._bytes -= len(job.data or b"")
                del self._jobs[job_id]


class VideoJobStoreActor(VideoJobStore):
    """The store as a Ray actor: ``store_actor()`` creates it once and every replica finds it."""


def store_actor(settings: VideoJobSettings, deadline_s: float) -> Any:
    """The cluster's one store (created by the first ingress replica that asks; detached, so it
    outlives ingress replicas and their restarts)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=1)(VideoJobStoreActor)
    return actor_cls.options(name=settings.store_name, namespace=ACTOR_NAMESPACE, lifetime="detached",
                             get_if_exists=True).remote(settings, deadline_s)
