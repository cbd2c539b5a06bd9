"""The ``/v1/videos`` job store, shared by every ingress replica.

A job is created by the replica that runs it and read by whichever replica a later ``GET``
reaches, so jobs live outside the replicas: in one detached, named Ray actor
(``VideoJobStoreActor``). It outlives ingress restarts (finished jobs stay readable), bounds
what it holds (jobs, running jobs, bytes of finished videos; a create beyond a bound is
refused with ``Busy``, never by cancelling another job), drops finished jobs after
``result_ttl_s`` and fails a job still unfinished past its deadline (its replica died or hung).
A deleted job is gone at once; one still running is cancelled by its replica, which learns it
from ``progress`` returning False. The same store keeps the images of ``response_format: url``
responses (``put_file``/``file``) until their expiry, within the same byte bound.

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
    meta: dict[str, Any] = field(default_factory=dict)  # model, size, seconds, prompt; then the result's
    ttl_s: float = 0.0
    data: bytes | None = None
    mime_type: str = ""
    error: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        """OpenAI's video object (``completed_at``/``expires_at`` once finished) plus Mammoth's fields."""
        finished = self.finished_at is not None
        out: dict[str, Any] = {"model": "", "size": "", "seconds": "", "prompt": None, **self.meta,
                               "id": self.id, "object": "video", "status": self.status, "progress": self.progress,
                               "created_at": int(self.created_at),
                               "completed_at": int(self.finished_at) if finished else None,
                               "expires_at": int(self.finished_at + self.ttl_s) if finished else None,
                               "remixed_from_video_id": None, "error": None}
        if self.error is not None:
            out["error"] = {"code": self.error.get("type", "error"), "param": None, **self.error}
        return out


class VideoJobStore:
    """Bounded video jobs with expiry and deadlines; every method sweeps first."""

    def __init__(self, settings: VideoJobSettings, deadline_s: float, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.deadline_s = deadline_s
        self.clock = clock
        self._jobs: dict[str, _Job] = {}
        self._files: dict[str, tuple[bytes, str, float]] = {}  # id -> (bytes, mime type, expires at)
        self._bytes = 0

    def create(self, job_id: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Admit a new job or raise ``Busy``; existing jobs are never evicted or cancelled for it.
        ``meta`` is what the job says from the start (model, size, seconds, prompt)."""
        self._sweep()
        if job_id in self._jobs:
            raise ValueError(f"video job {job_id!r} exists")
        if len(self._jobs) >= self.settings.max_jobs:
            raise Busy(f"the video job store is full ({self.settings.max_jobs} jobs), retry later")
        running = sum(job.status in ACTIVE for job in self._jobs.values())
        if running >= self.settings.max_running:
            raise Busy(f"{running} video jobs are running (limit {self.settings.max_running}), retry later")
        now = self.clock()
        job = self._jobs[job_id] = _Job(job_id, now, now + self.deadline_s, meta=dict(meta or {}),
                                        ttl_s=self.settings.result_ttl_s)
        return job.as_json()

    def progress(self, job_id: str, progress: int) -> bool:
        """Record progress; False when the job is no longer running (deleted or failed): stop it."""
        job = self._active(job_id)
        if job is not None:
            job.status, job.progress = "in_progress", max(job.progress, min(int(progress), 99))
        return job is not None

    def finish(self, job_id: str, meta: dict[str, Any], data: bytes, mime_type: str) -> dict[str, Any] | None:
        """Store the video; one that would pass ``max_bytes`` fails the job instead."""
        job = self._active(job_id)
        if job is None:
            return None
        if self._bytes + len(data) > self.settings.max_bytes:
            return self._end(job, "failed", error={
                "message": f"the video store is full ({self.settings.max_bytes} bytes), retry later",
                "type": "rate_limit_error"})
        job.meta, job.data, job.mime_type = {**job.meta, **meta}, bytes(data), mime_type
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

    def list(self, after: str | None = None, limit: int = 20, order: str = "desc") -> dict[str, Any]:
        """One page of jobs by creation time (OpenAI's cursor page: ``after`` is the last id seen)."""
        self._sweep()
        jobs = sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id), reverse=order == "desc")
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        page = [j.as_json() for j in jobs[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(jobs) > limit}

    def delete(self, job_id: str) -> bool:
        """Forget a job whatever its state (a running one stops at its next ``progress``)."""
        self._sweep()
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._bytes -= len(job.data or b"")
        return job is not None

    def put_file(self, file_id: str, data: bytes, mime_type: str, ttl_s: float) -> int:
        """Keep an image for ``ttl_s``; returns its expiry (Unix seconds). ``Busy`` when it would
        pass ``max_bytes``."""
        self._sweep()
        if self._bytes + len(data) > self.settings.max_bytes:
            raise Busy(f"the media store is full ({self.settings.max_bytes} bytes), retry later")
        expires = self.clock() + ttl_s
        self._files[file_id] = (bytes(data), mime_type, expires)
        self._bytes += len(data)
        return int(expires)

    def file(self, file_id: str) -> tuple[bytes, str] | None:
        self._sweep()
        found = self._files.get(file_id)
        return None if found is None else found[:2]

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
        for file_id, (data, _, expires) in list(self._files.items()):
            if now > expires:
                self._bytes -= len(data)
                del self._files[file_id]


class VideoJobStoreActor(VideoJobStore):
    """The store as a Ray actor: ``store_actor()`` creates it once and every replica finds it."""


def store_actor(settings: VideoJobSettings, deadline_s: float) -> Any:
    """The cluster's one store (created by the first ingress replica that asks; detached, so it
    outlives ingress replicas and their restarts)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=1)(VideoJobStoreActor)
    return actor_cls.options(name=settings.store_name, namespace=ACTOR_NAMESPACE, lifetime="detached",
                             get_if_exists=True).remote(settings, deadline_s)
