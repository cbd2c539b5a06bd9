"""Auth, body limits and error mapping without a cluster: the pieces every route and method uses."""

from __future__ import annotations

import asyncio
import base64
import logging

import grpc
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.apps.common import ApiKeys, grpc_key
from services.config import IngressSettings, RequestLimits
from services.errors import Busy, RequestTooLarge, Unauthenticated, classify, is_unavailable
from services.http_api import LimitedBody, RequireKey, decode_b64
from services.jobs import InvalidArgument, check_text

pytestmark = pytest.mark.reliability


# ----------------------------------------------------------------------------------- keys


def test_auth_on_without_any_key_refuses_to_start():
    settings = IngressSettings(auth_enabled=True, api_keys_env="MAMMOTH_TEST_KEYS")
    with pytest.raises(RuntimeError, match="auth_enabled.*no API key"):
        ApiKeys.from_settings(settings, environ={})
    # the same settings with the variable present start and check
    keys = ApiKeys.from_settings(settings, environ={"MAMMOTH_TEST_KEYS": " k1 , k2 "})
    keys.check("k2")
    with pytest.raises(Unauthenticated):
        keys.check("k3")


@pytest.mark.parametrize("key", ["", None, "wrong", "ключ", "k\x00", "a" * 10_000, "\ud800"])
def test_any_presented_key_is_compared_without_raising_anything_but_unauthenticated(key):
    keys = ApiKeys(["sécret-ключ"], enabled=True)
    with pytest.raises(Unauthenticated):
        keys.check(key)
    keys.check("sécret-ключ")  # a non-ASCII configured key works too


def test_auth_off_accepts_everything():
    ApiKeys([], enabled=False).check(None)


class _Context:
    def __init__(self, metadata):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


def test_grpc_key_from_bearer_or_x_api_key():
    assert grpc_key(_Context([("authorization", "Bearer abc ")])) == "abc"
    assert grpc_key(_Context([("authorization", "bearer abc")])) == "abc"
    assert grpc_key(_Context([("x-api-key", "xyz")])) == "xyz"
    assert grpc_key(_Context([("authorization", "Basic abc")])) is None
    assert grpc_key(None) is None


def _app(max_bytes: int = 1000) -> tuple[FastAPI, object]:
    app = FastAPI()
    reads: list[int] = []

    async def echo(request: Request):
        try:
            body = await request.body()
        except RequestTooLarge as exc:
            return JSONResponse({"error": str(exc)}, status_code=413)
        reads.append(len(body))
        return JSONResponse({"bytes": len(body)})

    app.add_api_route("/v1/echo", echo, methods=["POST"])
    app.add_api_route("/health", lambda: {"ok": True}, methods=["GET"])
    keys = ApiKeys(["k"], enabled=True)
    return RequireKey(LimitedBody(app, max_bytes), keys.check_headers, {"/health"}), reads


def _client(asgi) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://test")


@pytest.mark.parametrize("path,method", [("/v1/echo", "POST"), ("/docs", "GET"), ("/openapi.json", "GET"),
                                         ("/redoc", "GET"), ("/nope", "GET")])
def test_every_http_path_but_probes_needs_the_key(path, method):
    asgi, _ = _app()

    async def run():
        async with _client(asgi) as client:
            bare = await client.request(method, path)
            wrong = await client.request(method, path, headers={"authorization": "Bearer wrong"})
            good = await client.request(method, path, headers={"authorization": "Bearer k"})
            health = await client.get("/health")
            return bare, wrong, good, health

    bare, wrong, good, health = asyncio.run(run())
    assert bare.status_code == wrong.status_code == 401
    assert bare.json()["error"]["type"] == "authentication_error"
    assert good.status_code != 401 and health.status_code == 200


def test_body_over_the_limit_is_refused_from_content_length_before_it_is_read():
    asgi, reads = _app(max_bytes=1000)
    received = []

    async def run():
        scope = {"type": "http", "method": "POST", "path": "/v1/echo", "raw_path": b"/v1/echo", "query_string": b"",
                 "headers": [(b"authorization", b"Bearer k"), (b"content-length", b"5000000")],
                 "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}

        async def receive():
            received.append(1)
            return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

        sent = []

        async def send(message):
            sent.append(message)

        await asgi(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 413 and b"body" in sent[1]["body"]
    assert received == [] and reads == []  # not one chunk was read


def test_chunked_body_over_the_limit_fails_while_reading():
    asgi, reads = _app(max_bytes=1000)

    async def chunks():
        for _ in range(50):
            yield b"y" * 100

    async def run():
        async with _client(asgi) as client:
            return await client.post("/v1/echo", content=chunks(), headers={"authorization": "Bearer k"})

    response = asyncio.run(run())
    assert response.status_code == 413 and "1000 bytes" in response.json()["error"]
    assert reads == []


def test_body_under_the_limit_passes():
    asgi, reads = _app(max_bytes=1000)

    async def run():
        async with _client(asgi) as client:
            return await client.post("/v1/echo", content=b"z" * 999, headers={"x-api-key": "k"})

    assert asyncio.run(run()).json() == {"bytes": 999} and reads == [999]


def test_base64_media_over_the_limit_is_refused_before_decoding():
    big = base64.b64encode(b"\x00" * 5000).decode()
    with pytest.raises(InvalidArgument) as info:
        decode_b64("images[0]", "data:image/png;base64," + big, max_bytes=1000)
    assert info.value.field == "images[0]"
    assert decode_b64("images[0]", big, max_bytes=5000) == b"\x00" * 5000


@pytest.mark.parametrize("text", ["a\x00b", "bell\x07", "esc\x1b[31m", "del\x7f", "\x9b"])
def test_control_characters_in_prompts_are_refused(text):
    with pytest.raises(InvalidArgument, match="prompt"):
        check_text("prompt", text, RequestLimits())
    assert check_text("prompt", "tab\tnew\nline\r ok", RequestLimits())


# --------------------------------------------------------------------------------- errors


def _ray_errors():
    from ray.exceptions import (
        ActorDiedError,
        ActorUnavailableError,
        NodeDiedError,
        ObjectLostError,
        OwnerDiedError,
        RayActorError,
        RayTaskError,
        WorkerCrashedError,
    )
    from ray.serve.exceptions import DeploymentUnavailableError

    lost = ObjectLostError("ab" * 14, "owner", "call site")
    owner = OwnerDiedError("ab" * 14, "owner", "call site")
    wrapped = RayTaskError("denoise", "Traceback (most recent call last):\n  File \"/x.py\"", ActorDiedError())
    nested = RayTaskError("decode", "tb", RayTaskError("denoise", "tb", owner))
    return [ActorDiedError(), ActorUnavailableError("gone", b"a" * 16), RayActorError(), lost, owner,
            WorkerCrashedError(), NodeDiedError("n"), DeploymentUnavailableError("image-dit"), wrapped, nested]


def test_a_dead_or_restarting_stage_of_any_kind_is_unavailable_503():
    from vllm.v1.engine.exceptions import EngineDeadError

    from dit_worker.parallel.group import GroupUnavailable

    for exc in [*_ray_errors(), EngineDeadError(), GroupUnavailable("rank 1 died")]:
        error = classify(exc)
        assert (error.grpc_code, error.http_status) == (grpc.StatusCode.UNAVAILABLE, 503), type(exc)
        assert is_unavailable(exc)
        assert "Traceback" not in error.message and "/" not in error.message


def test_every_backpressure_is_resource_exhausted_429():
    from ray.exceptions import PendingCallsLimitExceeded
    from ray.serve.exceptions import BackPressureError

    for exc in (BackPressureError(num_queued_requests=3, max_queued_requests=2), PendingCallsLimitExceeded(),
                Busy("the video job store is full")):
        error = classify(exc)
        assert (error.grpc_code, error.http_status, error.kind) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")
        assert not is_unavailable(exc)


def test_only_client_errors_are_invalid_argument(caplog):
    from vae_worker.media.errors import CorruptMedia

    assert classify(InvalidArgument("steps", "too many")).http_status == 422
    assert classify(CorruptMedia("truncated", field="reference_images[0]")).http_status == 422
    assert classify(RequestTooLarge("body", 10)).http_status == 413
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        error = classify(ValueError("/srv/app/secret.py: bad shape"), request_id="image-42")
    assert (error.grpc_code, error.http_status) == (grpc.StatusCode.INTERNAL, 500)
    assert error.message == "internal error (request image-42)"  # no path, no detail
    assert any("image-42" in r.getMessage() and r.exc_info for r in caplog.records)  # logged with its trace


def test_internal_errors_without_an_id_get_a_fresh_one_in_message_and_log(caplog):
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        error = classify(KeyError("x"))
    error_id = error.message.removeprefix("internal error (request ").rstrip(")")
    assert error_id.startswith("err-") and any(error_id in r.getMessage() for r in caplog.records)


def test_stage_services_treat_tensor_value_errors_as_the_callers():
    error = classify(ValueError("latents: negative dimension"), field_value_errors=True)
    assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and error.message.startswith("latents")
    assert classify(RuntimeError("x"), field_value_errors=True).grpc_code == grpc.StatusCode.INTERNAL


def test_a_non_ascii_key_matches_from_raw_http_header_bytes():
    from starlette.datastructures import Headers

    keys = ApiKeys(["ключ"], enabled=True)
    raw = Headers(raw=[(b"authorization", "Bearer ключ".encode())])  # what a server hands over
    keys.check_headers(raw)
    with pytest.raises(Unauthenticated):
        keys.check_headers(Headers(raw=[(b"authorization", "Bearer ключь".encode())]))
