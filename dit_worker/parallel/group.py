"""The ranks' ``torch.distributed`` group: NCCL on GPU, gloo on CPU, with a collective timeout.

A rank that dies or hangs makes its peers' next collective fail within ``timeout_s`` (gloo
raises; NCCL's watchdog aborts the communicator), so a step never blocks forever; the owner of
the group then tears it down and starts a fresh one.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


class GroupUnavailable(ConnectionError):
    """A rank of the DiT group died, hung past the collective timeout, or the group is being
    rebuilt: retryable, never the client's fault (UNAVAILABLE / 503)."""


@dataclass(frozen=True)
class GroupSpec:
    rank: int
    world_size: int
    init_method: str  # tcp://host:port of rank 0's rendezvous
    device: str = "cpu"
    timeout_s: float = 60.0

    @property
    def backend(self) -> str:
        return "nccl" if torch.device(self.device).type == "cuda" else "gloo"

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def free_address(host: str | None = None) -> str:
    """A ``tcp://host:port`` rendezvous on this machine (rank 0 calls it, the others connect)."""
    host = host or socket.gethostbyname(socket.gethostname())
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"tcp://{host}:{port}"


def init_group(spec: GroupSpec) -> torch.device:
    """Join the default process group of this process; returns the rank's device."""
    device = torch.device(spec.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=spec.rank,
                            world_size=spec.world_size, timeout=datetime.timedelta(seconds=spec.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return device


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
