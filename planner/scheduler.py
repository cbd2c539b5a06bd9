"""vLLM scheduler that admits the two rows of an AR-CFG pair together, without pausing the engine.

The engine core receives requests one at a time; the conditional and unconditional rows of a
pair may arrive a step apart, and a row that samples while its partner is not in the batch
cannot be guided. Instead of pausing the whole scheduler around every pair's admission, the
first row to arrive is held back (not queued, not counted) until its partner arrives; then both
enter the waiting queue back to back and are scheduled in the same step. Other requests keep
running meanwhile. An abort of a held row drops it (the engine aborts both rows of a pair
whenever either side fails or is cancelled).

Selected with ``scheduler_cls="planner.scheduler.PairScheduler"`` (``PlannerConfig.engine_args``);
it runs inside the engine-core process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from .guidance import request_spec


def pair_of(request: Any) -> tuple[str, str] | None:
    """``(pair id, role)`` of a request that is one row of a two-row AR-CFG pair, else None."""
    spec = request_spec(getattr(request, "sampling_params", None))
    if not spec or spec.get("kind") != "plan" or int(spec.get("rows", 1)) != 2:
        return None
    return str(spec["pair"]), str(spec.get("role", "cond"))


class PairGate:
    """Holds the first row of each pair until its partner arrives (no vLLM in here)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, Any]] = {}  # pair id -> (role, request)

    def arrive(self, request: Any) -> list[Any]:
        """The requests to queue now, in order (conditional row first): [], [request] or both."""
        pair = pair_of(request)
        if pair is None:
            return [request]
        key, role = pair
        partner = self.held.pop(key, None)
        if partner is None:
            self.held[key] = (role, request)
            return []
        other_role, other = partner
        return [other, request] if other_role == "cond" else [request, other]

    def drop(self, request_ids: Iterable[str] | None) -> None:
        """Forget held rows that were aborted (``None``: all)."""
        if request_ids is None:
            self.held.clear()
            return
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        for key in [k for k, (_, r) in self.held.items() if r.request_id in ids]:
            del self.held[key]


class PairScheduler(Scheduler):
    """vLLM's scheduler with AR-CFG pairs admitted together (``PairGate``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pair_gate = PairGate()

    def add_request(self, request: Any) -> None:
        if request.request_id in self.requests:  # streaming update of a known request
            super().add_request(request)
            return
        for ready in self.pair_gate.arrive(request):
            super().add_request(ready)

    def finish_requests(self, request_ids: Any, finished_status: Any) -> list[Any]:
        if request_ids is not None and not isinstance(request_ids, str):
            request_ids = list(request_ids)
        self.pair_gate.drop(request_ids)
        return super().finish_requests(request_ids, finished_status)
