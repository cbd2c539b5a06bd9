"""What every Serve application builder shares: config from args, model lookup, metrics."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any

from ray.serve import metrics

from ..config import ServeConfig
from ..local import ensure_model
from ..model_dir import ModelIndex
from ..render import deployment_config, stage_env_vars


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    return ServeConfig.from_app_args(args)


def model_from_args(cfg: ServeConfig, args: dict[str, Any]) -> tuple[str, ModelIndex]:
    name = args.get("model") or next(iter(cfg.models))
    if name not in cfg.models:
        raise ValueError(f"application args: model {name!r} is not in the config ({sorted(cfg.models)})")
    return name, ensure_model(cfg, name)


def deployment_options(cfg: ServeConfig, stage: str) -> dict[str, Any]:
    """``Deployment.options(...)`` from the config, so ``serve.run(app(args))`` scales and queues
    exactly like the rendered Serve config says (which repeats the same values)."""
    section = cfg.ingress if stage == "mammoth" else getattr(cfg, stage)
    options = deployment_config("", section)
    options.pop("name")
    env = stage_env_vars(cfg, stage)
    if env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return options


def apply_threads(cpu_threads: int | None) -> None:
    if cpu_threads:
        import torch

        torch.set_num_threads(cpu_threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads))


class StageMetrics:
    """Per-stage Prometheus metrics through Ray Serve's metrics API (exported by Ray)."""

    def __init__(self, stage: str, model: str):
        self.tags = {"stage": stage, "model": model}
        self.latency = metrics.Histogram(
            "mammoth_stage_latency_seconds", description="time a stage call takes",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
            tag_keys=("stage", "model", "method"))
        self.in_flight = metrics.Gauge("mammoth_stage_in_flight", description="calls in progress (queue depth)",
                                       tag_keys=("stage", "model"))
        self.errors = metrics.Counter("mammoth_stage_errors_total", description="failed stage calls",
                                      tag_keys=("stage", "model", "method"))
        self._in_flight = 0

    @contextmanager
    def call(self, method: str):
        self._in_flight += 1
        self.in_flight.set(self._in_flight, tags=self.tags)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.errors.inc(tags={**self.tags, "method": method})
            raise
        finally:
            self._in_flight -= 1
            self.in_flight.set(self._in_flight, tags=self.tags)
            self.latency.observe(time.perf_counter() - start, tags={**self.tags, "method": method})
