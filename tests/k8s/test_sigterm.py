"""SIGTERM on `mammoth serve` under load (how Kubernetes and process managers stop it): requests
in flight finish or end UNAVAILABLE, the process exits 0, no Ray process it started is left,
and no crash trace is printed."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from services.client import ClientError, MammothClient
from tests.ports import free_port

from .procs import start_serve, terminate, tree, wait_for_line, wait_gone

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 1500
GRACE_S = 90


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path):
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "mammoth.yaml"
    config.write_text(f"""
models:
  image: {{preset: tiny-mammoth2, cache_dir: {tmp_path / 'models'}}}
ingress: {{grpc_port: {grpc_port}, http_port: {http_port}, host: 127.0.0.1}}
shutdown_grace_s: {GRACE_S}
""")
    log = tmp_path / "serve.log"
    proc = start_serve(config, log)
    started = []
    try:
        wait_for_line(log, "serving:", proc, START_TIMEOUT_S)
        started = tree(proc.pid)
        assert any("raylet" in " ".join(p.cmdline()) for p in started[1:]), "serve started its own Ray"

        n = 3
        in_flight = [threading.Event() for _ in range(n)]
        outcomes: list[tuple[str, float]] = [("none", 0.0)] * n

        def request(i: int) -> None:
            client = MammothClient(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", timeout_s=600)

            def progress(phase, step, total):
                if phase == "denoise":
                    in_flight[i].set()

            try:
                out = client.generate_image("a lighthouse", seed=i, steps=40, width=64, height=64,
                                            progress=progress)
                outcomes[i] = ("ok" if out.width == 64 else "bad", time.monotonic())
            except ClientError as exc:
                outcomes[i] = (str(exc.code), time.monotonic())
            finally:
                in_flight[i].set()
                client.close()

        threads = [threading.Thread(target=request, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for event in in_flight:
            assert event.wait(600), "requests never reached the DiT"
        signalled = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(GRACE_S + 120)
        assert proc.wait(timeout=GRACE_S + 180) == 0, log.read_text()[-4000:]
        kinds = [kind for kind, _ in outcomes]
        assert set(kinds) <= {"ok", "UNAVAILABLE"}, kinds
        assert any(kind == "ok" and at > signalled for kind, at in outcomes), \
            f"no in-flight request completed after SIGTERM: {outcomes}"
        assert not wait_gone(started, 60), "Ray processes started by `mammoth serve` are left"
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-4000:]
        assert text.rstrip().endswith("stopped")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        terminate(started + tree(proc.pid), grace_s=10)


def test_signal_handler_phases():
    """Starting or draining: a signal stops at once; serving: the first one starts the drain."""
    from services.config import ServeConfig
    from services.deploy import ServeProcess, _Interrupt

    process = ServeProcess(ServeConfig())
    with pytest.raises(_Interrupt):
        process._on_signal(signal.SIGTERM, None)  # still starting
    process = ServeProcess(ServeConfig())
    process.phase = "serving"
    process._on_signal(signal.SIGINT, None)
    assert process.stopping.is_set()
    process.phase = "draining"
    with pytest.raises(_Interrupt):
        process._on_signal(signal.SIGTERM, None)  # a second signal skips the rest of the drain
    process.phase = "stopping"
    process._on_signal(signal.SIGTERM, None)  # shutting down: ignored, the shutdown finishes


def test_inline_keys_reach_replicas_in_memory_only():
    from services.config import ServeConfig
    from services.deploy import _in_memory_args
    from services.render import render_serve_config

    cfg = ServeConfig.loads("ingress: {auth_enabled: true, api_keys: [k-1]}")
    rendered = render_serve_config(cfg)
    for app in rendered["applications"]:
        assert app["args"]["config"]["ingress"]["api_keys"] == []
        assert _in_memory_args(cfg, app)["config"]["ingress"]["api_keys"] == ["k-1"]
        assert _in_memory_args(cfg, app).get("model") == app["args"].get("model")
