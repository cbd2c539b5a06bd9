"""Serve's HTTP proxy speaks the API's error shape, and a dead ingress replica is a 503.

Ray Serve 2.60's proxy ends a request whose ingress replica died while holding it (SIGKILL, OOM,
a node lost) without sending any answer; uvicorn then writes a plain-text "500 Internal Server
Error". Its own refusals (no route 404, request timeout 408, queue 429, no replica 503) are plain
text too. Clients of an OpenAI-style API expect JSON errors, and a replica that died is the
server's temporary state, not a bug: the promise is 503 with ``Retry-After``.

``middlewares`` is the callback Ray loads into every HTTP proxy from the documented variable
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``services.render.cluster_env`` sets it for
``mammoth serve`` and on every KubeRay pod). It only rewrites answers that did not come from
the ingress: every answer of ours is JSON, so a non-JSON error is the proxy's own.

Serve's gRPC proxy says INTERNAL for the same death, with Ray's text (actor id, pid, address), and
has no interceptor hook (its ``gRPCGenericServer`` is built with ``interceptors=()``). What it does
call is every function in ``grpc_servicer_functions`` with its server, before registering the
services: ``add_dead_ingress_guard`` (listed first by ``services.render``) wraps that server's
handler factory, so each routed method's final status passes ``guard_status``: INTERNAL caused by a
dead or unreachable replica becomes UNAVAILABLE with our message; everything else is untouched.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

import grpc
from starlette.datastructures import Headers
from starlette.middleware import Middleware

from .http_api import send_json_error

MAX_PROXY_MESSAGE = 300  # characters of the proxy's own text kept in the JSON message
DEAD_INGRESS_MESSAGE = "the ingress replica holding this request stopped before answering; retry"
# Proxy statuses -> OpenAI error types (the codes come from services.http_api.ERROR_CODES).
PROXY_ERROR_TYPES = {404: "invalid_request_error", 408: "timeout", 429: "rate_limit_error",
                     503: "service_unavailable"}
KEPT_HEADERS = (b"retry-after", b"x-request-id")
# Ray's texts for a replica actor that died or cannot be reached (ray.exceptions.ActorDiedError /
# ActorUnavailableError), as the gRPC proxy puts them in the details.
DEAD_REPLICA = re.compile(r"The actor died unexpectedly|ActorDiedError|ActorUnavailableError|The actor \S+ is unavailable")
GUARDED = "_mammoth_dead_ingress_guard"

logger = logging.getLogger("ray.serve")


class ProxyErrorsAsJSON:
    """ASGI middleware around Serve's proxy app: its plain-text errors become JSON with the same
    status, and a request it ended without any answer becomes a 503 (``Retry-After: 1``)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        rewrite: dict[str, Any] | None = None  # the proxy's own error being turned into JSON

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started, rewrite
            if message["type"] == "http.response.start":
                started = True
                headers = Headers(raw=message.get("headers", []))
                if message["status"] >= 400 and not headers.get("content-type", "").startswith("application/json"):
                    rewrite = {"status": message["status"], "body": b"",
                               "headers": [(k, v) for k, v in message.get("headers", []) if k.lower() in KEPT_HEADERS]}
                    return
            elif message["type"] == "http.response.body" and rewrite is not None:
                rewrite["body"] += message.get("body", b"")[:MAX_PROXY_MESSAGE]
                if not message.get("more_body", False):
                    status = rewrite["status"]
                    text = rewrite["body"].decode("utf-8", "replace").strip()[:MAX_PROXY_MESSAGE] or f"HTTP {status}"
                    await send_json_error(send, status, text, PROXY_ERROR_TYPES.get(status, "server_error"), None,
                                          rewrite["headers"])
                return
            await send(message)

        await self.app(scope, receive, guarded_send)
        if not started:
            request_id = Headers(scope=scope).get("x-request-id")
            headers = [(b"retry-after", b"1")]
            if request_id:
                headers.append((b"x-request-id", request_id.encode("latin-1", "replace")))
            message = f"{DEAD_INGRESS_MESSAGE} (request {request_id})" if request_id else DEAD_INGRESS_MESSAGE
            await send_json_error(send, 503, message, "service_unavailable", None, headers)


def middlewares() -> list[Middleware]:
    """What Serve's HTTP proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(ProxyErrorsAsJSON)]


# ------------------------------------------------------------------------------------ gRPC


def guard_status(context: Any) -> None:
    """After Serve's proxy set a call's final status: a dead ingress replica is UNAVAILABLE."""
    code = context.code()
    details = context.details() or ""
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INTERNAL.value[0]) and DEAD_REPLICA.search(details):
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(DEAD_INGRESS_MESSAGE)


def guarded_handler(handler: Callable) -> Callable:
    """``handler`` (one of the proxy's four call shapes) with ``guard_status`` at its end."""
    if inspect.isasyncgenfunction(handler):
        async def stream(request: Any, context: Any):
            try:
                async for message in handler(request, context):
                    yield message
            finally:
                guard_status(context)
        return stream

    async def unary(request: Any, context: Any) -> Any:
        try:
            return await handler(request, context)
        finally:
            guard_status(context)
    return unary


def add_dead_ingress_guard(servicer: Any, server: Any) -> None:
    """A "servicer function" that registers no service: Serve's gRPC proxy calls it with its
    server (listed before the real ones), and it wraps the server's handler factory once."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        logger.warning("this Ray Serve's gRPC server has no service_handler_factory: a dead ingress "
                       "replica stays INTERNAL over gRPC")
        return
    if getattr(factory, GUARDED, False):
        return

    def guarded_factory(service_method: str, streaming_type: Any) -> Callable:
        return guarded_handler(factory(service_method=service_method, streaming_type=streaming_type))

    setattr(guarded_factory, GUARDED, True)
    server.service_handler_factory = guarded_factory
