"""Serve's HTTP proxy errors in the API's shape: the middleware around the proxy's ASGI app, as
Ray loads it (its own callback loader and validator), and the env every node gets for it."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import httpx
import pytest

from services.config import ServeConfig
from services.proxy_errors import DEAD_INGRESS_MESSAGE, ProxyErrorsAsJSON, add_dead_ingress_guard
from services.render import PROXY_CALLBACK, cluster_env


def _call(app, path: str = "/v1/images/generations", headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=ProxyErrorsAsJSON(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.post(path, json={"prompt": "x"}, headers=headers or {})
    return asyncio.run(go())


def _answer(status: int, content_type: bytes, *chunks: bytes, headers=()):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), *headers]})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
    return app


async def _no_answer(scope, receive, send):  # what Serve's proxy does when the ingress replica died
    return None


def test_a_request_the_proxy_ended_without_an_answer_is_a_json_503_with_retry_after():
    response = _call(_no_answer, headers={"x-request-id": "req-7"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1" and response.headers["x-request-id"] == "req-7"
    error = response.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "service_unavailable"
    assert error["message"] == f"{DEAD_INGRESS_MESSAGE} (request req-7)"


@pytest.mark.parametrize("status,kind", [(429, "rate_limit_error"), (503, "service_unavailable"),
                                         (404, "invalid_request_error"), (408, "timeout")])
def test_the_proxys_plain_text_errors_become_json_with_the_same_status(status, kind):
    app = _answer(status, b"text/plain; charset=utf-8", b"Request dropped ", b"due to backpressure",
                  headers=[(b"retry-after", b"2"), (b"x-other", b"dropped")])
    response = _call(app)
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "2" and "x-other" not in response.headers
    assert response.json()["error"] == {"message": "Request dropped due to backpressure", "type": kind,
                                        "param": None, "code": response.json()["error"]["code"]}


def test_the_ingress_answers_pass_untouched():
    ours = b'{"error": {"message": "internal error (request err-1)", "type": "server_error"}}'
    response = _call(_answer(500, b"application/json", ours))
    assert response.status_code == 500 and response.content == ours
    streamed = _call(_answer(200, b"text/event-stream", b"data: 1\n\n", b"data: 2\n\n"))
    assert streamed.status_code == 200 and streamed.text == "data: 1\n\ndata: 2\n\n"
    media = _call(_answer(200, b"image/png", b"\x89PNG"))
    assert media.content == b"\x89PNG"


def test_the_callback_is_what_ray_loads_and_every_node_gets_its_variable():
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(PROXY_CALLBACK))
    assert [m.cls for m in middlewares] == [ProxyErrorsAsJSON]
    cfg = ServeConfig()
    env = cluster_env(cfg)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == PROXY_CALLBACK
    assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(cfg.ingress.limits.max_request_bytes)


# ------------------------------------------------------------------------------------ gRPC


class _Context:  # the part of grpc.aio's ServicerContext the proxy and the guard use
    def __init__(self):
        self._code, self._details = None, ""

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details


def _proxy_factory(code, details):
    """Serve's proxy handler factory in small: the four call shapes, each ending by setting the
    call's final status (grpc_util.set_grpc_code_and_details)."""
    def factory(service_method, streaming_type):
        if streaming_type == "unary":
            async def unary(request, context):
                context.set_code(code)
                context.set_details(details)
                return b"reply"
            return unary

        async def stream(request, context):
            yield b"first"
            context.set_code(code)
            context.set_details(details)
        return stream
    return factory


def _run(handler, context):
    async def go():
        if inspect.isasyncgenfunction(handler):
            return [m async for m in handler(b"req", context)]
        return await handler(b"req", context)
    return asyncio.run(go())


@pytest.mark.parametrize("shape", ["unary", "stream"])
def test_a_dead_ingress_replica_is_unavailable_over_grpc(shape):
    class Server:
        service_handler_factory = staticmethod(_proxy_factory(
            grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task. class_name: "
            "ServeReplica:mammoth:Ingress actor_id: 3f pid: 4242 ip: 10.0.0.7"))

    server = Server()
    add_dead_ingress_guard(None, server)
    add_dead_ingress_guard(None, server)  # listed twice or called by two proxies: wrapped once
    context = _Context()
    out = _run(server.service_handler_factory(service_method="/mammoth.v1.Generation/GenerateImage",
                                              streaming_type=shape), context)
    assert out == (b"reply" if shape == "unary" else [b"first"])
    assert context.code() == grpc.StatusCode.UNAVAILABLE and context.details() == DEAD_INGRESS_MESSAGE
    assert "pid" not in context.details() and "10.0.0.7" not in context.details()


@pytest.mark.parametrize("code,details", [
    (grpc.StatusCode.INTERNAL, "internal error (request err-1)"),  # our own, with its id
    (grpc.StatusCode.INVALID_ARGUMENT, "width: must be a multiple of 16"),
    (grpc.StatusCode.OK, ""),
])
def test_every_other_grpc_status_is_untouched(code, details):
    class Server:
        service_handler_factory = staticmethod(_proxy_factory(code, details))

    server = Server()
    add_dead_ingress_guard(None, server)
    context = _Context()
    _run(server.service_handler_factory(service_method="/m", streaming_type="unary"), context)
    assert (context.code(), context.details()) == (code, details)


def test_the_guard_wraps_the_installed_serves_grpc_server():
    """The attribute it wraps is the one this Ray's gRPC server reads when services register."""
    from ray.serve._private.grpc_util import gRPCGenericServer

    from protos import generation_pb2_grpc

    made = []

    def factory(service_method, streaming_type):
        made.append(service_method)
        async def handler(request, context):
            return b""
        return handler

    async def build():  # a grpc.aio server needs a running loop
        server = gRPCGenericServer(factory)
        add_dead_ingress_guard(None, server)
        generation_pb2_grpc.add_GenerationServicer_to_server(generation_pb2_grpc.GenerationServicer(), server)
        return server

    server = asyncio.run(build())
    assert made and all(m.startswith("/mammoth.v1.Generation/") for m in made)
    assert server.service_handler_factory._mammoth_dead_ingress_guard
