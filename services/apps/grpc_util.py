"""gRPC plumbing shared by the applications: status mapping and small message helpers."""

from __future__ import annotations

from typing import Any, NoReturn

from protos import common_pb2

from ..errors import classify


class GrpcAbort(Exception):
    """Raised after the status is set on the context: Ray Serve then returns that status."""


def grpc_abort(grpc_context: Any, exc: BaseException, request_id: str = "", *,
               field_value_errors: bool = False) -> NoReturn:
    """End a gRPC call with the status ``exc`` maps to (never INTERNAL for client errors).

    Under the Ray Serve proxy a plain exception surfaces as INTERNAL, and a status set on the
    context of a stream that yields nothing is dropped; setting the code and then raising is
    the one path that reaches the client for unary and streaming methods alike.
    ``field_value_errors``: see ``errors.classify`` (stage services parsing raw tensors).
    """
    error = classify(exc, request_id or _serve_request_id(), field_value_errors=field_value_errors)
    if grpc_context is not None:
        grpc_context.set_code(error.grpc_code)
        grpc_context.set_details(error.message)
    raise GrpcAbort(error.message) from None


def timings_proto(timings: dict[str, float]) -> common_pb2.Timings:
    return common_pb2.Timings(seconds={k: float(v) for k, v in timings.items()})


def stage_grpc_abort(grpc_context: Any, exc: BaseException, request_id: str = "") -> NoReturn:
    """``grpc_abort`` for the stage services: their callers send raw tensors, whose checks
    (``protos.tensors``, the engines' request validation) raise ``ValueError`` naming the field."""
    grpc_abort(grpc_context, exc, request_id, field_value_errors=True)


def _serve_request_id() -> str:
    try:
        from ray import serve

        return serve.context._get_serve_request_context().request_id or ""
    except Exception:  # noqa: BLE001 - outside a replica
        return ""
