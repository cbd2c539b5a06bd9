"""The DiT replica's rank group on Ray: N actors, one ``torch.distributed`` group.

The Serve replica (``apps.dit``) owns the batch: its ``DiTEngine`` drives a
``dit_worker.parallel.ParallelModel`` whose transport is this group. Rank ``r`` is an actor in
bundle ``r + 1`` of the replica's placement group (bundle 0 is the replica itself; STRICT_PACK
by default, one GPU per rank on cuda) or, without one, a plain fractional-CPU actor. Each
plan goes to rank 0, which broadcasts it to the others.

Failures: a dead or hung rank makes the step fail within the collective timeout (gloo / NCCL
raise; the call to rank 0 is bounded too). The group is then torn down and rebuilt in the
background, the failed call raises ``GroupUnavailable`` (UNAVAILABLE / 503) and the next call
waits for the fresh group.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dit_worker.parallel.group import GroupSpec, GroupUnavailable, free_address
from dit_worker.parallel.plan import StepPlan

from .config import DiTParallel

logger = logging.getLogger("ray.serve")

_CALL_MARGIN_S = 5.0  # beyond the collective timeout: rank 0's own work and the Ray hop


class RankActor:
    """One rank: a ``RankWorker`` in its own process (threaded actor: pings answer mid-step)."""

    def __init__(self, cpu_threads: int | None):
        import torch

        torch.set_num_threads(cpu_threads or 1)
        self.worker = None

    def address(self) -> str:
        return free_address()

    def start(self, directory: str, spec: GroupSpec, dtype: str, placement: str | None) -> int:
        from dit_worker.parallel.worker import RankWorker

        self.worker = RankWorker(directory, spec, dtype=dtype, placement=placement)
        return os.getpid()

    def follow(self) -> None:
        self.worker.follow()

    def submit(self, plan: StepPlan) -> Any:
        return self.worker.submit(plan)

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "ready": self.worker is not None}


class RankGroup:
    """``Transport`` of a ``ParallelModel`` over Ray actors; rebuilds itself after a failure."""

    def __init__(self, directory: str | Path, settings: DiTParallel, *, device: str, dtype: str,
                 cpu_threads: int | None = None):
        self.directory = str(directory)
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.cpu_threads = cpu_threads
        self.actors: list[Any] = []
        self.pids: list[int] = []
        self.generation = 0  # groups built so far
        self._follow_refs: list[Any] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._builder: threading.Thread | None = None
        self._last_plan = time.monotonic()
        self._closed = threading.Event()
        self._keepalive: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Build the group now (blocks until every rank has loaded its shard)."""
        self._build()
        self._keepalive = threading.Thread(target=self._keep_alive, name="dit-group-keepalive", daemon=True)
        self._keepalive.start()

    @property
    def keepalive_interval_s(self) -> float:
        return self.settings.collective_timeout_s / 4

    def _keep_alive(self) -> None:
        """Followers wait for the next plan inside a collective bounded by the collective timeout;
        an idle leader sends a no-op plan well within it, so idleness is never taken for a dead
        rank (a real failure still surfaces here, and the group is rebuilt as after a step)."""
        while not self._closed.wait(self.keepalive_interval_s / 2):
            if time.monotonic() - self._last_plan < self.keepalive_interval_s or not self._ready.is_set():
                continue
            if not self._lock.acquire(blocking=False):  # a step is running: that is traffic enough
                continue
            try:
                if self._ready.is_set() and self._error is None and self.actors:
                    self._submit_locked(StepPlan("keepalive"))
            except GroupUnavailable:
                pass  # _fail logged it and started the rebuild
            finally:
                self._lock.release()

    def _actor_options(self, rank: int) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.settings.rank_num_cpus,
                                   "num_gpus": 1 if self.device.startswith("cuda") else 0,
                                   "max_concurrency": 4, "max_restarts": 0}
        pg = ray.util.get_current_placement_group()
        if pg is not None and rank + 1 < len(pg.bundle_specs):
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=rank + 1, placement_group_capture_child_tasks=False)
        return options

    def _build(self) -> None:
        self._ready.clear()
        size, timeout = self.settings.size, self.settings.start_timeout_s
        remote = ray.remote(RankActor)
        actors = [remote.options(**self._actor_options(r)).remote(self.cpu_threads) for r in range(size)]
        try:
            init_method = ray.get(actors[0].address.remote(), timeout=timeout)
            specs = [GroupSpec(r, size, init_method, device=self.device, timeout_s=self.settings.collective_timeout_s)
                     for r in range(size)]
            pids = ray.get([a.start.remote(self.directory, s, self.dtype, self.settings.placement_file)
                            for a, s in zip(actors, specs)], timeout=timeout)
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            raise
        self.actors, self.pids = actors, pids
        self._follow_refs = [a.follow.remote() for a in actors[1:]]
        self.generation += 1
        self._error = None
        self._ready.set()
        logger.info("DiT group %d up: %d ranks, pids %s", self.generation, size, pids)

    def _teardown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors, self.pids, self._follow_refs = [], [], []

    def _rebuild_async(self) -> None:
        def run() -> None:
            try:
                self._build()
            except BaseException as exc:  # noqa: BLE001 - reported to the next caller
                logger.exception("DiT group rebuild failed")
                self._error = exc
                self._ready.set()

        self._builder = threading.Thread(target=run, name="dit-group-rebuild", daemon=True)
        self._builder.start()

    def _fail(self, reason: str) -> GroupUnavailable:
        logger.warning("DiT group %d failed (%s): rebuilding", self.generation, reason)
        self._teardown()
        self._rebuild_async()
        return GroupUnavailable(f"DiT rank group failed ({reason}); it is being rebuilt, retry")

    def shutdown(self) -> None:
        self._closed.set()
        with self._lock:
            if self.actors and self._ready.is_set():
                try:
                    ray.get(self.actors[0].submit.remote(StepPlan("stop")), timeout=5)
                except Exception:  # noqa: BLE001 - best effort before the kill
                    pass
            self._teardown()

    # -- transport --------------------------------------------------------------------------
    def submit(self, plan: StepPlan) -> Any:
        if plan.op == "stats":  # rank 0 answers from its last step, beside a running one
            if not self._ready.is_set() or self._error is not None or not self.actors:
                raise GroupUnavailable("DiT rank group is not up")
            try:
                return ray.get(self.actors[0].submit.remote(plan), timeout=_CALL_MARGIN_S)
            except (GetTimeoutError, RayError) as exc:
                raise GroupUnavailable(f"DiT rank 0 did not answer ({type(exc).__name__})") from None
        with self._lock:
            if not self._ready.wait(self.settings.start_timeout_s) or self._error is not None:
                raise GroupUnavailable(f"DiT rank group is not up ({self._error or 'still starting'})")
            return self._submit_locked(plan)

    def _submit_locked(self, plan: StepPlan) -> Any:
        ref = self.actors[0].submit.remote(plan)
        try:
            return ray.get(ref, timeout=self.settings.collective_timeout_s + _CALL_MARGIN_S)
        except GetTimeoutError:
            raise self._fail("step timed out") from None
        except RayError as exc:
            raise self._fail(type(getattr(exc, "cause", None) or exc).__name__) from None
        finally:
            self._last_plan = time.monotonic()

    def check_health(self) -> None:
        """Raise if a rank is gone (and start the rebuild); fine while a rebuild runs."""
        if not self._ready.is_set():
            return
        if self._error is not None:
            raise GroupUnavailable(f"DiT rank group could not be rebuilt: {self._error}")
        exited, _ = ray.wait(self._follow_refs, timeout=0) if self._follow_refs else ([], [])
        try:
            if exited:
                ray.get(exited[0], timeout=1)
                raise RuntimeError("a follower left its step loop")
            ray.get([a.ping.remote() for a in self.actors], timeout=_CALL_MARGIN_S)
        except (RayError, RuntimeError) as exc:
            if self._lock.acquire(timeout=0.1):  # a running step reports its own failure
                try:
                    raise self._fail(f"health check: {type(exc).__name__}") from None
                finally:
                    self._lock.release()

    def describe(self) -> dict[str, Any]:
        return {"size": self.settings.size, "generation": self.generation, "pids": list(self.pids),
                "ready": self._ready.is_set() and self._error is None, "at": time.time()}
