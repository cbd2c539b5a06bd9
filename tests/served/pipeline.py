"""The one served pipeline every module of ``tests/served/`` talks to, and how to reach it.

Starting a pipeline (Ray, two vLLM planners, DiTs, VAEs) is the expensive part of these tests,
so the package shares one (``conftest.served``): the tiny image and video models behind API
keys, with the stage services exposed, the playground on and URL results. Each module asks it what a user of
its client would; none changes it for the others (a test that redeploys the ingress puts it back).
"""

from __future__ import annotations

import grpc

from services.config import ServeConfig
from tests.ports import free_port

API_KEY = "served-key-123"
HEADERS = {"authorization": f"Bearer {API_KEY}"}


def pipeline_config(cache_dir: str) -> ServeConfig:
    return ServeConfig.loads(f"""
models:
  image: {{preset: tiny-mammoth2, cache_dir: {cache_dir}}}
  video: {{preset: tiny-mammoth25, cache_dir: {cache_dir}}}
ingress: {{grpc_port: {free_port()}, http_port: {free_port()}, host: 127.0.0.1, expose_stages: true,
          auth_enabled: true, api_keys: [{API_KEY}], playground: true, image_url_ttl_s: 600,
          limits: {{max_width: 512, max_height: 512, max_frames: 17, max_steps: 100, max_images: 3}}}}
dit: {{engine: {{batch_wait_timeout_s: 0.2}}}}
""")


def metadata(app: str = "mammoth") -> list[tuple[str, str]]:
    """gRPC metadata: the Serve application to route to and the key."""
    return [("application", app), ("authorization", f"Bearer {API_KEY}")]


class _WithMetadata(grpc.UnaryStreamClientInterceptor, grpc.UnaryUnaryClientInterceptor,
                    grpc.StreamStreamClientInterceptor):
    """Adds ``metadata(app)`` to every call of a channel."""

    def __init__(self, app: str):
        self.extra = metadata(app)

    def _details(self, details):
        return _Details(details, list(details.metadata or []) + self.extra)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata):
        self.method, self.timeout, self.metadata = base.method, base.timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = base.credentials, base.wait_for_ready, None


def channel(cfg: ServeConfig, app: str = "mammoth") -> grpc.Channel:
    """A channel to ``app`` (the ingress, or a stage service) that sends the key on every call."""
    return grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{cfg.ingress.grpc_port}"), _WithMetadata(app))
