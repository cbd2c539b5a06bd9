"""Each stage's health from its own ``check_health``, for gRPC health and HTTP readiness.

Serve's controller runs every replica's ``check_health`` (the planner asks its vLLM engine core,
the DiT its batching loop and ranks, the VAE decodes a tiny latent) but ``serve.status()`` only
shows the last verdict as a replica state, seconds late. Here the same method is called on each
replica actor directly (the call the controller makes; it does not take a request slot, so a
stage that is merely busy still answers), and a stage is SERVING while at least one of its
replicas passes. Probes are shared: callers within ``max_age_s`` get the last result, and a
caller waits at most ``answer_s`` for a running probe (else the last known states).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from grpc_health.v1 import health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve's replica actor names: SERVE_REPLICA::<app>#<deployment>#<id>


def health_service_names(model: str, stage: str) -> tuple[str, ...]:
    """The gRPC health names of one model's stage: ``mammoth.planner.image`` and its app ``image-planner``."""
    return f"mammoth.{stage}.{model}", f"{model}-{stage}"


def _replica_actors(deployments: dict[str, str]) -> dict[str, list[Any]]:
    """app -> handles of the live replica actors of its deployment (blocking GCS calls)."""
    import ray

    found: dict[str, list[Any]] = {app: [] for app in deployments}
    prefixes = {app: f"{REPLICA_PREFIX}{app}#{deployment}#" for app, deployment in deployments.items()}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        for app, prefix in prefixes.items():
            if name.startswith(prefix):
                try:
                    found[app].append(ray.get_actor(name, namespace=entry["namespace"]))
                except ValueError:  # died since it was listed
                    pass
    return found


async def _passes(actor: Any, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(actor.check_health.remote(), timeout_s)
        return True
    except Exception:  # noqa: BLE001 - failed, timed out or died: not serving
        return False


class StageHealth:
    """``deployments``: stage app name -> its deployment name (``image-dit`` -> ``DiT``)."""

    def __init__(self, deployments: dict[str, str], *, probe_timeout_s: float, answer_s: float,
                 max_age_s: float = 1.0):
        self.deployments = dict(deployments)
        self.probe_timeout_s = probe_timeout_s
        self.answer_s = answer_s
        self.max_age_s = max_age_s
        self._last: tuple[float, dict[str, int]] | None = None
        self._probe: asyncio.Task | None = None

    async def _run_probe(self) -> dict[str, int]:
        try:
            actors = await asyncio.wait_for(asyncio.to_thread(_replica_actors, self.deployments), self.probe_timeout_s)
        except Exception:  # noqa: BLE001 - the GCS not answering: nothing is known to serve
            actors = {app: [] for app in self.deployments}
        results = await asyncio.gather(*(asyncio.gather(*(_passes(a, self.probe_timeout_s) for a in replicas))
                                         for replicas in actors.values()))
        states = {app: SERVING if any(passed) else NOT_SERVING for app, passed in zip(actors, results)}
        self._last = (time.monotonic(), states)
        return states

    async def states(self) -> dict[str, int]:
        """app -> SERVING / NOT_SERVING."""
        if self._last is not None and time.monotonic() - self._last[0] < self.max_age_s:
            return self._last[1]
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._run_probe())
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), self.answer_s)
        except TimeoutError:
            return self._last[1] if self._last is not None else dict.fromkeys(self.deployments, NOT_SERVING)
