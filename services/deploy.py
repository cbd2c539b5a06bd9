"""Bring the served pipeline up on a Ray cluster (local or joined) and take it down.

The same rendered Serve config a RayService embeds drives this: proxies from
``http_options``/``grpc_options``, then every application through its builder, deployed
concurrently (stage apps are independent; the ingress finds them by name at request time).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

from .config import ServeConfig
from .local import ensure_model
from .render import render_serve_config

logger = logging.getLogger("mammoth.deploy")


def _builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def serve_up(cfg: ServeConfig, *, address: str | None = None, wait: bool = True) -> dict[str, Any]:
    """Start (or join) Ray, start Serve's proxies and deploy every application of ``cfg``."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    for name in cfg.models:  # build tiny checkpoints once, before replicas race to do it
        ensure_model(cfg, name)
    rendered = render_serve_config(cfg)
    if not ray.is_initialized():
        # Replicas import torch at once; keep each of them to its share of a small machine.
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        # The Serve gRPC proxy refuses bigger messages before reading them whole (its default is 2 GiB).
        os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(cfg.ingress.limits.max_request_bytes))
        ray.init(address=address, namespace="mammoth", include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    grpc = rendered["grpc_options"]
    serve.start(
        http_options={"host": rendered["http_options"]["host"], "port": rendered["http_options"]["port"],
                      "request_timeout_s": rendered["http_options"]["request_timeout_s"]},
        grpc_options=gRPCOptions(port=grpc["port"], grpc_servicer_functions=grpc["grpc_servicer_functions"],
                                 request_timeout_s=grpc["request_timeout_s"]),
    )
    targets = [
        serve.RunTarget(target=_builder(app["import_path"])(app["args"]), name=app["name"],
                        route_prefix=app["route_prefix"])
        for app in rendered["applications"]
    ]
    start = time.perf_counter()
    serve.run_many(targets, wait_for_applications_running=wait)
    logger.info("deployed %d applications in %.1fs", len(targets), time.perf_counter() - start)
    return rendered


def serve_down() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
