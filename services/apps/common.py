"""What every Serve application builder shares: config from args, model lookup, metrics."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from contextlib import contextmanager
from typing import Any

from ray.serve import metrics

from ..config import IngressSettings, ServeConfig
from ..errors import Unauthenticated
from ..model_dir import ModelIndex
from ..render import deployment_config, stage_env_vars
from ..stage_setup import ensure_model


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
    options = deployment_config("", section, shutdown_grace_s=cfg.shutdown_grace_s)
    options.pop("name")
    env = stage_env_vars(cfg, stage)
    if env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return options


class ApiKeys:
    """The API keys every application checks (ingress and stage services alike).

    Keys are compared as SHA-256 digests with ``hmac.compare_digest``: constant time whatever
    the key's length, and any string (non-ASCII too) compares instead of raising. With
    ``auth_enabled`` and no key anywhere the replica refuses to start: a server that was told to
    check keys must never run open because an environment variable did not reach it.
    """

    def __init__(self, keys: list[str], *, enabled: bool):
        if enabled and not keys:
            raise RuntimeError("ingress.auth_enabled is true but no API key is configured: set ingress.api_keys "
                               "or the ingress.api_keys_env variable on every replica (refusing to run open)")
        self.enabled = enabled
        self._digests = [_digest(k) for k in keys]

    @classmethod
    def from_settings(cls, ingress: IngressSettings, environ: dict[str, str] | None = None) -> ApiKeys:
        environ = os.environ if environ is None else environ
        keys = list(ingress.api_keys)
        if ingress.api_keys_env and environ.get(ingress.api_keys_env):
            keys += [k.strip() for k in environ[ingress.api_keys_env].split(",") if k.strip()]
        return cls(keys, enabled=ingress.auth_enabled)

    def check(self, key: str | bytes | None) -> None:
        """``key``: text, or the raw bytes of an HTTP header (a non-ASCII key arrives as UTF-8)."""
        if not self.enabled:
            return
        digest = _digest(key or "")
        # every digest is compared (no early exit), so timing tells nothing about which key matched
        matched = [hmac.compare_digest(digest, d) for d in self._digests]
        if not key or not any(matched):
            raise Unauthenticated("missing or invalid API key")

    def check_grpc(self, grpc_context: Any) -> None:
        self.check(grpc_key(grpc_context))

    def check_headers(self, headers: Any) -> None:
        """``headers``: a case-insensitive mapping (Starlette ``Headers``, whose text is latin-1 of
        the raw bytes: encoded back, so a UTF-8 key on the wire matches the configured one)."""
        key = _bearer(headers.get("authorization")) or headers.get("x-api-key")
        self.check(key.encode("latin-1", "replace") if key else None)


def _digest(key: str | bytes) -> bytes:
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).digest()


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def grpc_key(grpc_context: Any) -> str | None:
    """``authorization: Bearer <key>`` or ``x-api-key`` from a call's metadata."""
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata() or ():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if key == "authorization" and _bearer(value):
            return _bearer(value)
        if key == "x-api-key":
            return value.strip()
    return None


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
