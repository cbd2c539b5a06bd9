"""One place that maps failures to gRPC codes and HTTP statuses, with client-safe messages.

Clients get a status and a one-line message; never a traceback. Bad input names its field
(INVALID_ARGUMENT / 422), backpressure is RESOURCE_EXHAUSTED / 429, a stage that is down or
restarting is UNAVAILABLE / 503, a spent deadline is DEADLINE_EXCEEDED / 504.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

logger = logging.getLogger("ray.serve")  # shows in the replica logs


class Unauthenticated(Exception):
    """Missing or wrong API key."""


@dataclass(frozen=True)
class ClientError:
    grpc_code: grpc.StatusCode
    http_status: int
    message: str
    kind: str  # OpenAI-style error type


def _ray_types() -> dict[str, tuple[type, ...]]:
    try:
        from ray.exceptions import (
            ActorDiedError,
            ActorUnavailableError,
            GetTimeoutError,
            OutOfMemoryError,
            RayActorError,
            WorkerCrashedError,
        )
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
    except ImportError:  # in-process use without Ray installed
        return {"backpressure": (), "unavailable": (), "timeout": (), "cancelled": ()}
    return {
        "backpressure": (BackPressureError,),
        # a replica or worker died (crash, memory monitor): retryable, not the client's fault
        "unavailable": (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError, RayActorError,
                        OutOfMemoryError, WorkerCrashedError),
        "timeout": (GetTimeoutError,),
        "cancelled": (RequestCancelledError,),
    }


def _root(exc: BaseException) -> BaseException:
    """A replica's exception arrives as Ray's ``RayTaskError`` (a subclass of the original type
    whose text is the remote traceback); classify and word it by the original exception."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def classify(exc: BaseException, request_id: str = "") -> ClientError:
    """The client-facing status for ``exc``; unexpected errors are logged here with their trace."""
    ray_types = _ray_types()
    exc = _root(exc)
    if isinstance(exc, Unauthenticated):
        return ClientError(grpc.StatusCode.UNAUTHENTICATED, 401, str(exc) or "invalid API key", "authentication_error")
    if isinstance(exc, ray_types["backpressure"]):
        return ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "server is at capacity, retry later",
                           "rate_limit_error")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, *ray_types["timeout"])):
        return ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "deadline exceeded", "timeout")
    if isinstance(exc, ray_types["unavailable"]):
        return ClientError(grpc.StatusCode.UNAVAILABLE, 503, "a serving stage is unavailable, retry later",
                           "service_unavailable")
    if isinstance(exc, (asyncio.CancelledError, *ray_types["cancelled"])):
        return ClientError(grpc.StatusCode.CANCELLED, 499, "request cancelled", "cancelled")
    if isinstance(exc, ValueError):  # InvalidArgument, MediaError, engine validation
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ClientError(grpc.StatusCode.INVALID_ARGUMENT, 422, message, "invalid_request_error")
    logger.exception("request %s failed", request_id, exc_info=exc)
    suffix = f" (request {request_id})" if request_id else ""
    return ClientError(grpc.StatusCode.INTERNAL, 500, f"internal error{suffix}", "server_error")
