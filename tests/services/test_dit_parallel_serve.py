"""The served pipeline with a 2-rank DiT group (Ray Serve, tiny video model, gloo on CPU).

T2V and video editing over gRPC and HTTP; then one rank's process is killed in the middle of
a request: the request fails promptly with UNAVAILABLE / 503 (not a hang, not INTERNAL) and
the next request succeeds on the rebuilt group. Stage retries are off so the failure reaches
the client (with the default single retry the ingress would re-run the request on the
rebuilt group instead).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from services.client import ClientError, MammothClient
from services.config import ServeConfig
from tests.ports import free_port as _free_port

pytestmark = pytest.mark.slow
TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from services.deploy import serve_down, serve_up

    cache = tmp_path_factory.mktemp("models")
    cfg = ServeConfig.loads(
        f"""
models:
  video: {{preset: tiny-mammoth25, cache_dir: {cache}}}
ingress: {{grpc_port: {_free_port()}, http_port: {_free_port()}, host: 127.0.0.1, stage_retries: 0,
          limits: {{max_frames: 17, max_steps: 200}}}}
dit: {{engine: {{parallel: {{size: 2, collective_timeout_s: {TIMEOUT_S}, rank_num_cpus: 0.1}}}}}}
"""
    )
    serve_up(cfg)
    try:
        yield cfg
    finally:
        serve_down()


def _client(cfg: ServeConfig, use_http: bool) -> MammothClient:
    return MammothClient(f"127.0.0.1:{cfg.ingress.grpc_port}", f"http://127.0.0.1:{cfg.ingress.http_port}",
                         use_http=use_http)


def _group(handle) -> dict:
    return handle.stats.remote().result()["group"]


@pytest.mark.parametrize("use_http", [False, True], ids=["grpc", "http"])
def test_group_serves_video_then_survives_a_killed_rank(served, use_http):
    from ray import serve

    dit = serve.get_app_handle("video-dit")
    client = _client(served, use_http)
    video = client.generate_video("waves on a beach", seed=5, steps=2, frames=5, width=64, height=64)
    assert video.mime_type == "video/mp4" and video.frames == 5
    edited = client.edit_video(video.data, "make it night", seed=6, steps=2)
    assert edited.frames == 5 and (edited.width, edited.height) == (64, 64)
    group = _group(dit)
    assert group["size"] == 2 and group["ready"] and len(group["pids"]) == 2

    killed: dict = {}

    def kill_mid_request(phase: str, step: int, total: int) -> None:
        # gRPC reports each step, HTTP a polled percentage that may skip any given value
        if phase == "denoise" and step >= 3 and not killed:
            os.kill(group["pids"][1], signal.SIGKILL)
            killed["at"] = time.monotonic()

    with pytest.raises(ClientError) as failure:
        client.generate_video("a long one", seed=1, steps=200, frames=5, width=64, height=64,
                              progress=kill_mid_request)
    assert killed, "the request finished before the rank was killed"
    assert time.monotonic() - killed["at"] < TIMEOUT_S + 15  # bounded by the collective timeout
    # gRPC: the stream's status; HTTP: the /v1/videos job fails with the 503 error type
    assert str(failure.value.code) == ("service_unavailable" if use_http else "UNAVAILABLE"), failure.value
    again = client.generate_video("after the failure", seed=2, steps=2, frames=5, width=64, height=64)
    assert again.frames == 5
    rebuilt = _group(dit)
    assert rebuilt["generation"] == group["generation"] + 1 and group["pids"][1] not in rebuilt["pids"]
