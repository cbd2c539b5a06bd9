"""Standard gRPC health checking and server reflection for our own (non-Ray) gRPC servers.

Kubernetes gRPC probes and load balancers speak ``grpc.health.v1.Health``; grpcurl/grpcui use
reflection. Every service starts SERVING, plus the overall ("") status; flip them with
``health.set(name, NOT_SERVING)`` while a stage warms up or drains.

Under the Ray Serve gRPC proxy these helpers do not apply: Serve 2.60 enables reflection itself
(``grpc_options.enable_reflection``), and a Health service given in ``grpc_servicer_functions``
is routed to the ingress deployment like any user method (see ``services.render``).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import dit_pb2, generation_pb2, planner_pb2, vae_pb2

# Full names of our services, e.g. "mammoth.v1.Generation".
SERVICE_NAMES: dict[str, str] = {
    "generation": generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    "planner": planner_pb2.DESCRIPTOR.services_by_name["Planner"].full_name,
    "dit": dit_pb2.DESCRIPTOR.services_by_name["DiT"].full_name,
    "vae": vae_pb2.DESCRIPTOR.services_by_name["VAE"].full_name,
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _names(service_names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(service_names))
    if any(not n or "/" in n for n in names):
        raise ValueError(f"service_names: expected full service names like 'mammoth.v1.DiT', got {names}")
    return names


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register Health (all given services SERVING) and reflection on a ``grpc.Server``."""
    if isinstance(server, grpc.aio.Server):
        raise TypeError("add_health_and_reflection: use add_health_and_reflection_async for grpc.aio servers")
    names = _names(service_names)
    servicer = health.HealthServicer()
    for name in ["", *names]:
        servicer.set(name, SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def add_health_and_reflection_async(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    """The same for a ``grpc.aio.Server``; the returned servicer's ``set`` is a coroutine."""
    names = _names(service_names)
    servicer = health.aio.HealthServicer()
    for name in ["", *names]:
        await servicer.set(name, SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer
