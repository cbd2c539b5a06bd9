"""One place that maps failures to gRPC codes and HTTP statuses, with client-safe messages.

Clients get a status and a one-line message; never a traceback or a file path. Bad input
names its field (INVALID_ARGUMENT / 422; only ``InvalidArgument`` and ``MediaError``, the two
types raised for client mistakes), backpressure is RESOURCE_EXHAUSTED / 429, a stage that is
down or restarting (a dead replica, a lost object, a dead vLLM engine) is UNAVAILABLE / 503,
a spent deadline is DEADLINE_EXCEEDED / 504. Anything else is INTERNAL / 500, logged with its
trace under the request id the client also sees.

Two answers never pass through here, because Serve's proxy gives them itself: a request beyond
Serve's own queue bound (the ingress bounds generations first, ``services.apps.admission``, so
callers get our 429 JSON / RESOURCE_EXHAUSTED), and a request whose ingress replica died while
holding it (SIGKILL, OOM): ``services.proxy_errors``, loaded into Serve's proxies, makes that a
JSON 503 / UNAVAILABLE. The stage replicas' deaths are 503 / UNAVAILABLE (or retried) because
the ingress catches them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import grpc

logger = logging.getLogger("ray.serve")  # shows in the replica logs


class Unauthenticated(Exception):
    """Missing or wrong API key."""


class Busy(Exception):
    """A bound of ours is full (e.g. the video job store): the client should retry later."""


class StageUnavailable(Exception):
    """A stage answered that it cannot serve now (unhealthy, restarting)."""


class RequestTooLarge(Exception):
    """A request body over ``ingress.limits.max_request_bytes`` (refused while reading)."""

    def __init__(self, field: str, limit: int):
        super().__init__(f"{field}: request exceeds the limit of {limit} bytes")
        self.field = field
        self.limit = limit

    def __reduce__(self):
        return type(self), (self.field, self.limit)


@dataclass(frozen=True)
class ClientError:
    grpc_code: grpc.StatusCode
    http_status: int
    message: str
    kind: str  # OpenAI-style error type


# Exception type names (module prefix, class name) that mean "a stage is down", for engines we do
# not import in the ingress (vLLM's engine process died: every request after it fails).
_UNAVAILABLE_NAMES = {("vllm", "EngineDeadError"), ("planner", "GuidanceError"),  # the latter: retry later
                      ("dit_worker", "GroupUnavailable")}  # a DiT rank died / hung; the group is rebuilt


def _ray_types() -> dict[str, tuple[type, ...]]:
    try:
        from ray.exceptions import (
            GetTimeoutError,
            PendingCallsLimitExceeded,
            RayError,
            RayTaskError,
            TaskCancelledError,
        )
        from ray.serve.exceptions import BackPressureError, RayServeException, RequestCancelledError
    except ImportError:  # in-process use without Ray installed
        return {k: () for k in ("backpressure", "timeout", "cancelled", "task", "system")}
    return {
        "backpressure": (BackPressureError, PendingCallsLimitExceeded),
        "timeout": (GetTimeoutError,),
        "cancelled": (RequestCancelledError, TaskCancelledError),
        "task": (RayTaskError,),
        # Any other Ray/Serve system error: a replica, worker, node or object owner died, an
        # object was lost, a deployment is (re)starting. Retryable, never the client's fault.
        "system": (RayError, RayServeException),
    }


def root_cause(exc: BaseException) -> BaseException:
    """A replica's exception arrives as Ray's ``RayTaskError`` (a subclass of the original type
    whose text is the remote traceback), possibly nested when it crossed several stages;
    classify and word it by the innermost original exception."""
    task_types = _ray_types()["task"]
    for _ in range(8):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            exc = cause
            continue
        if task_types and isinstance(exc, task_types) and isinstance(exc.__cause__, BaseException):
            exc = exc.__cause__
            continue
        break
    return exc


def _is_named_unavailable(exc: BaseException) -> bool:
    return any(cls.__module__.split(".")[0] == module and cls.__name__ == name
               for cls in type(exc).__mro__ for module, name in _UNAVAILABLE_NAMES)


def _client_field_error(exc: BaseException) -> bool:
    from .jobs import InvalidArgument

    try:
        from vae_worker.media.errors import MediaError
    except ImportError:  # pragma: no cover - the media package is part of this project
        MediaError = InvalidArgument  # noqa: N806
    return isinstance(exc, (InvalidArgument, MediaError))


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means a stage died or is restarting: the one case worth a retry."""
    return _status(root_cause(exc)) == grpc.StatusCode.UNAVAILABLE


def _status(exc: BaseException) -> grpc.StatusCode:
    ray_types = _ray_types()
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, (Busy, *ray_types["backpressure"])):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, RequestTooLarge):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, *ray_types["timeout"])):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, (asyncio.CancelledError, *ray_types["cancelled"])):
        return grpc.StatusCode.CANCELLED
    if _client_field_error(exc):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, (StageUnavailable, *ray_types["system"])) or _is_named_unavailable(exc):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def new_error_id() -> str:
    return f"err-{uuid.uuid4().hex[:16]}"


def classify(exc: BaseException, request_id: str = "", *, field_value_errors: bool = False) -> ClientError:
    """The client-facing status for ``exc``; unexpected errors are logged here with their trace
    and the id (``request_id``, or a fresh one) that the client's message carries.

    ``field_value_errors``: a stage service parsing a direct caller's tensors (``protos.tensors``,
    the engines' request checks) raises plain ``ValueError`` naming the field; there it is the
    caller's mistake. In the ingress every client check raises ``InvalidArgument``, so a plain
    ``ValueError`` is a bug of ours and INTERNAL."""
    exc = root_cause(exc)
    code = _status(exc)
    if code == grpc.StatusCode.INTERNAL and field_value_errors and type(exc) is ValueError:
        logger.warning("request %s: rejected (%s)", request_id or "-", str(exc).splitlines()[0] if str(exc) else "")
        code = grpc.StatusCode.INVALID_ARGUMENT
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ClientError(code, 401, str(exc) or "invalid API key", "authentication_error")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = str(exc) if isinstance(exc, Busy) and str(exc) else "server is at capacity, retry later"
        return ClientError(code, 429, message, "rate_limit_error")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(code, 504, "deadline exceeded", "timeout")
    if code == grpc.StatusCode.CANCELLED:
        return ClientError(code, 499, "request cancelled", "cancelled")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ClientError(code, 413 if isinstance(exc, RequestTooLarge) else 422, message, "invalid_request_error")
    if code == grpc.StatusCode.UNAVAILABLE:
        logger.warning("request %s: a stage is unavailable (%s)", request_id or "-", type(exc).__name__)
        return ClientError(code, 503, "a serving stage is unavailable, retry later", "service_unavailable")
    request_id = request_id or new_error_id()
    logger.error("request %s failed", request_id, exc_info=exc)
    return ClientError(code, 500, f"internal error (request {request_id})", "server_error")
