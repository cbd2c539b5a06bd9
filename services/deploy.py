"""Bring the served pipeline up on a Ray cluster (local or joined) and take it down.

The same rendered Serve config a RayService embeds drives this: proxies from
``http_options``/``grpc_options``, then every application through its builder. Stage apps are
independent (the ingress finds them by name at request time), so ``mammoth serve``, which can
answer before every model is up, deploys them model by model where cores are few
(``start_models_together``): on a small machine two vLLM engines and their replicas importing
torch at once only slow each other down, and the first model serves sooner with the cores to
itself; the ingress starts with the first wave. Callers that need every model (the demo,
tests) deploy all at once, which has them all up soonest.

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
from .stages.lanes import available_cpus

logger = logging.getLogger("mammoth.deploy")
CPUS_PER_MODEL_START = 4  # a planner replica, its engine core, a DiT and a VAE replica importing at once


def _builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def start_waves(cfg: ServeConfig, applications: list[dict[str, Any]], cpus: int) -> list[list[dict[str, Any]]]:
    """The rendered ``applications`` grouped in deploy order: ``start_models_together`` models
    per wave (0: one per ``CPUS_PER_MODEL_START`` of ``cpus``), in ``models`` order, the
    ingress (no ``model`` arg) in the first wave."""
    together = cfg.start_models_together or max(1, cpus // CPUS_PER_MODEL_START)
    models = list(cfg.models)
    waves = [[app for app in applications if app["args"].get("model") in models[i:i + together]]
             for i in range(0, len(models), together)]
    waves[0] += [app for app in applications if app["args"].get("model") is None]
    return waves


def wave_models(wave: list[dict[str, Any]]) -> list[str]:
    """The models a wave brings up (in order, once each)."""
    return list(dict.fromkeys(app["args"]["model"] for app in wave if app["args"].get("model") is not None))


def serve_up(cfg: ServeConfig, *, address: str | None = None, wait: bool = True,
             after_ray_init: Callable[[], None] | None = None,
             on_model_ready: Callable[[list[str]], None] | None = None) -> dict[str, Any]:
    """Start (or join) Ray, start Serve's proxies and deploy every application of ``cfg``.

    Returns once every application is RUNNING (all deployed at once), or, with
    ``on_model_ready``, once the first wave of ``start_waves`` is: the others then deploy in a
    background thread, wave by wave. ``on_model_ready(models)`` is called as each wave comes
    up, the first before this returns. ``after_ray_init`` runs right after ``ray.init`` (which
    installs Ray's own SIGTERM handler)."""
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
    resources = ray.cluster_resources()
    shortfall = resource_shortfall(rendered, resources)
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
    if on_model_ready is None or not wait:  # the caller needs everything: all at once is soonest
        _deploy(cfg, rendered["applications"], wait)
        return rendered
    # the cluster's CPUs: a joined cluster's nodes start the replicas, not this machine
    waves = start_waves(cfg, rendered["applications"], int(resources.get("CPU", 0)) or available_cpus())
    _deploy(cfg, waves[0], wait)
    on_model_ready(wave_models(waves[0]))
    if len(waves) > 1:
        threading.Thread(target=_deploy_rest, args=(cfg, waves[1:], on_model_ready), name="mammoth-deploy",
                         daemon=True).start()
    return rendered


def _deploy(cfg: ServeConfig, wave: list[dict[str, Any]], wait: bool) -> None:
    from ray import serve

    start = time.perf_counter()
    serve.run_many([serve.RunTarget(target=_builder(app["import_path"])(_in_memory_args(cfg, app)), name=app["name"],
                                    route_prefix=app["route_prefix"]) for app in wave],
                   wait_for_applications_running=wait)
    logger.info("deployed %d applications in %.1fs (%s)", len(wave), time.perf_counter() - start,
                ", ".join(app["name"] for app in wave))


def _deploy_rest(cfg: ServeConfig, waves: list[list[dict[str, Any]]], on_model_ready: Callable[[list[str]], None]
                 ) -> None:
    """The waves after the first, while the first serves (a stop meanwhile ends it quietly)."""
    for wave in waves:
        try:
            _deploy(cfg, wave, True)
        except Exception as exc:  # noqa: BLE001 - Serve shutting down under us, or a failed app
            # the models already up keep serving; calls to these wait until their deadline
            said = str(exc).splitlines()
            logger.warning("deploying %s stopped: %s", ", ".join(wave_models(wave)), said[0] if said else repr(exc))
            return
        on_model_ready(wave_models(wave))


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
        self.ready: list[str] = []  # models whose applications are RUNNING

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

    def run(self, on_ready: Callable[[dict[str, Any], list[str]], None] | None = None,
            on_model_ready: Callable[[list[str]], None] | None = None) -> int:
        """``on_ready(rendered, starting)`` once the ingress and the first models serve
        (``starting``: the models still coming up); ``on_model_ready(models)`` as they do."""
        self.install_signal_handlers()
        try:
            rendered = serve_up(self.cfg, address=self.address, after_ray_init=self.install_signal_handlers,
                                on_model_ready=lambda models: self._model_ready(models, on_model_ready))
            self.phase = "serving"
            if on_ready is not None:
                on_ready(rendered, [m for m in self.cfg.models if m not in self.ready])
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

    def _model_ready(self, models: list[str], callback: Callable[[list[str]], None] | None) -> None:
        """The first wave's models before ``on_ready``; later ones from the deploy thread."""
        first = self.phase == "starting"
        self.ready.extend(models)
        if callback is not None and not first and not self.stopping.is_set():
            callback(models)
