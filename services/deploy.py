"""Bring the served pipeline up on a Ray cluster (local or joined) and take it down.

The same rendered Serve config a RayService embeds drives this: proxies from
``http_options``/``grpc_options``, then every application through its builder, deployed
concurrently (stage apps are independent; the ingress finds them by name at request time).

``ServeProcess`` is the ``mammoth serve`` lifecycle: SIGTERM (how Kubernetes and process
managers stop a process) and SIGINT mean the same graceful stop: proxies report unhealthy, the
ingress application is deleted so no new request is routed while its replicas finish the
in-flight ones (up to ``shutdown_grace_s``), then Serve and the Ray processes this process
started are shut down and it exits 0. A second signal skips what is left of the drain.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import ConfigError, ServeConfig
from .render import INGRESS_APP, cluster_env, render_serve_config, resource_shortfall
from .stage_setup import ensure_model

logger = logging.getLogger("mammoth.deploy")


def _builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def serve_up(cfg: ServeConfig, *, address: str | None = None, wait: bool = True,
             after_ray_init: Callable[[], None] | None = None) -> dict[str, Any]:
    """Start (or join) Ray, start Serve's proxies and deploy every application of ``cfg``.

    ``after_ray_init`` runs right after ``ray.init`` (which installs Ray's own SIGTERM handler)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    for name in cfg.models:  # build tiny checkpoints once, before replicas race to do it
        ensure_model(cfg, name)
    rendered = render_serve_config(cfg)
    started_here = not ray.is_initialized() and address is None and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        # Replicas import torch at once; keep each of them to its share of a small machine.
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name, value in cluster_env(cfg).items():  # read by Serve's proxies (a local cluster inherits them)
            os.environ.setdefault(name, value)
        ray.init(address=address, namespace="mammoth", include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    if after_ray_init is not None:
        after_ray_init()
    shortfall = resource_shortfall(rendered, ray.cluster_resources())
    if shortfall and started_here:  # a fixed, local cluster: the deploy would wait forever
        raise ConfigError(shortfall)
    if shortfall:  # a cluster that may autoscale: say why the deploy may wait
        logger.warning("the applications may not all start yet: %s", shortfall)
    grpc = rendered["grpc_options"]
    serve.start(
        http_options={"host": rendered["http_options"]["host"], "port": rendered["http_options"]["port"],
                      "request_timeout_s": rendered["http_options"]["request_timeout_s"]},
        grpc_options=gRPCOptions(port=grpc["port"], grpc_servicer_functions=grpc["grpc_servicer_functions"],
                                 request_timeout_s=grpc["request_timeout_s"]),
    )
    targets = [
        serve.RunTarget(target=_builder(app["import_path"])(_in_memory_args(cfg, app)), name=app["name"],
                        route_prefix=app["route_prefix"])
        for app in rendered["applications"]
    ]
    start = time.perf_counter()
    serve.run_many(targets, wait_for_applications_running=wait)
    logger.info("deployed %d applications in %.1fs", len(targets), time.perf_counter() - start)
    return rendered


def _in_memory_args(cfg: ServeConfig, app: dict[str, Any]) -> dict[str, Any]:
    """Rendered args plus the inline API keys: they reach the replicas through Serve's
    controller, never through a rendered file."""
    if cfg.ingress.api_keys:
        return {**app["args"], "config": cfg.to_dict()}
    return app["args"]


def drain(grace_s: float) -> bool:
    """Stop taking requests and let in-flight ones finish, for at most ``grace_s`` (+ a margin).

    Proxies first report unhealthy on ``/-/healthz`` (readiness probes and load balancers stop
    sending traffic), then the ingress application is deleted: its route goes at once, while
    its replicas keep serving what they hold for up to ``graceful_shutdown_timeout_s`` (the
    rendered ``shutdown_grace_s``); the stage applications stay up meanwhile so those requests
    can complete. True when the ingress was gone within the grace period."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    try:
        controller = _get_global_client()._controller
        proxies = ray.get(controller.get_proxies.remote(), timeout=10)
        ray.get([p.update_draining.remote(True) for p in proxies.values()], timeout=10)
    except Exception as exc:  # best effort: the delete below is what stops routing
        logger.warning("could not mark the Serve proxies draining: %s", exc)
    done = threading.Event()

    def _delete() -> None:
        try:
            serve.delete(INGRESS_APP.name, _blocking=True)
        except Exception as exc:
            logger.warning("deleting the ingress application failed: %s", exc)
        finally:
            done.set()

    threading.Thread(target=_delete, name="mammoth-drain", daemon=True).start()
    finished = done.wait(grace_s + 10.0)
    if not finished:
        logger.warning("in-flight requests still running after %.0fs; stopping anyway", grace_s)
    return finished


def serve_down() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


class _Interrupt(Exception):
    """A stop signal arrived while starting or draining: skip to shutting down."""


class ServeProcess:
    """``mammoth serve``: start, serve until SIGTERM or SIGINT, drain, shut down, exit 0."""

    def __init__(self, cfg: ServeConfig, *, address: str | None = None):
        self.cfg = cfg
        self.address = address
        self.phase = "starting"  # -> serving -> draining -> stopping
        self.stopping = threading.Event()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        first = not self.stopping.is_set()
        self.stopping.set()
        if self.phase == "serving" and first:
            logger.info("%s: draining for up to %.0fs", name, self.cfg.shutdown_grace_s)
        elif self.phase in ("starting", "draining"):
            logger.info("%s while %s: stopping now", name, self.phase)
            raise _Interrupt(name)
        # stopping: let the shutdown finish; Kubernetes escalates to SIGKILL after its grace period

    def install_signal_handlers(self) -> None:
        """Ours for SIGTERM and SIGINT (also over ``ray.init``'s, which exits 1 mid-request)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def run(self, on_ready: Callable[[dict[str, Any]], None] | None = None) -> int:
        self.install_signal_handlers()
        try:
            rendered = serve_up(self.cfg, address=self.address, after_ray_init=self.install_signal_handlers)
            self.phase = "serving"
            if on_ready is not None:
                on_ready(rendered)
            while not self.stopping.wait(0.5):
                pass
            self.phase = "draining"
            drain(self.cfg.shutdown_grace_s)
        except _Interrupt:
            pass
        finally:
            self.phase = "stopping"
            serve_down()
            logger.info("stopped")
        return 0
