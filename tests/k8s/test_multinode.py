"""The CPU profile's serveConfigV2 on a real multi-node Ray cluster, the way KubeRay runs it.

A head and one worker node per worker group start on this machine with ``ray start`` and the
same Ray resources the rendered groups declare (token auth on, as ``ray start`` does by
default); the rendered ``serveConfigV2`` is submitted to the head's dashboard with
``serve deploy`` (KubeRay submits it to the same endpoint); one text-to-image and one
understanding request go over gRPC and over HTTP; Serve's own status then shows every stage's
replicas on the node of its group. Every Ray process started here is stopped in ``finally``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from services.client import MammothClient
from services.config import ServeConfig
from services.k8s.manifests import profile_config, ray_start_args, render_manifests
from services.k8s.topology import HEAD, STAGE_GROUPS, group_resource, groups
from services.stage_setup import ensure_model
from tests.ports import free_port

from .procs import marked, terminate, tree, wait_gone

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
DEPLOY_TIMEOUT_S = 1800


def _test_config(models_dir: Path) -> ServeConfig:
    """The CPU profile with this machine's free ports and a shared tiny-model directory, serving its
    image model only (the requests below are image ones; a second vLLM start-up would only add minutes)."""
    data = profile_config("cpu").to_dict()
    data["ingress"].update(grpc_port=free_port(), http_port=free_port())
    data["models"] = {name: {**m, "cache_dir": str(models_dir)} for name, m in data["models"].items()
                      if name == "image"}
    return ServeConfig.from_dict(data)


def _node_ports() -> list[str]:
    """Per-node ports: every node of this cluster shares one machine. (Nodes start one after the
    other: each picks the next free raylet/plasma socket name in the shared session dir.)"""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--object-store-memory=200000000", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]


class _Dashboard:
    def __init__(self, port: int, token: str):
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def get(self, path: str):
        response = self.http.get(path)
        response.raise_for_status()
        return response.json()

    def nodes(self) -> list[dict]:
        return [n for n in self.get("/api/v0/nodes?detail=true&limit=100")["data"]["result"]["result"]
                if n["state"] == "ALIVE"]

    def applications(self) -> dict:
        return self.get("/api/serve/applications/")["applications"]


def _wait(what: str, check, timeout_s: float, procs: list[subprocess.Popen]):
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{what}: `{' '.join(p.args[:3])}` exited with {p.returncode}"
        try:
            result = check()
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            result, last = None, exc
        if result:
            return result
        time.sleep(3)
    pytest.fail(f"{what}: not within {timeout_s:.0f}s (last: {last})")


def _deployed(dashboard: _Dashboard, names: list[str]):
    apps = dashboard.applications()
    failed = {n: a.get("message") for n, a in apps.items() if a["status"] == "DEPLOY_FAILED"}
    assert not failed, f"applications failed to deploy: {failed}"
    return set(names) <= set(apps) and all(apps[n]["status"] == "RUNNING" for n in names) and apps


def test_cpu_profile_serves_across_worker_groups(tmp_path):
    cfg = _test_config(tmp_path / "models")
    for name in cfg.models:  # the nodes share this filesystem; build once, before replicas race
        ensure_model(cfg, name)
    rayservice = render_manifests(cfg, "cpu")[0]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    shapes = groups(cfg)
    marker = tempfile.mkdtemp(prefix="mk8s-", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="1",
               # four raylets on one machine each see all of its memory (and the other tests'):
               # their OOM monitors would kill replicas for memory the cluster is not using
               RAY_memory_monitor_refresh_ms="0")
    gcs_port, dashboard_port = free_port(), free_port()
    started: list[subprocess.Popen] = []
    seen = []

    def start(args: list[str], log: str) -> None:
        out = open(tmp_path / f"{log}.log", "wb")  # noqa: SIM115 (closed with the process)
        started.append(subprocess.Popen([RAY, "start", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True))

    try:
        start(["--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}", f"--temp-dir={marker}",
               *ray_start_args(shapes[HEAD]), *_node_ports()], "head")
        dashboard = _Dashboard(dashboard_port, token)
        _wait("the head", lambda: dashboard.nodes(), 300, started)
        for i, stage in enumerate(STAGE_GROUPS, start=2):  # one node per worker group, its declared resources
            start([f"--address=127.0.0.1:{gcs_port}", *ray_start_args(shapes[stage]), *_node_ports()],
                  stage)
            _wait(f"the {stage} node", lambda n=i: len(dashboard.nodes()) == n, 300, started)
        nodes = dashboard.nodes()
        node_group = {}
        for node in nodes:
            (group,) = [g for g in shapes if group_resource(g) in node["resources_total"]]
            node_group[node["node_id"]] = group
        assert sorted(node_group.values()) == sorted(shapes)

        config_file = tmp_path / "serve.yaml"
        config_file.write_text(yaml.safe_dump(serve_config, sort_keys=False))
        deploy = subprocess.run([SERVE, "deploy", str(config_file), f"--address={dashboard.url}"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        names = [a["name"] for a in serve_config["applications"]]
        apps = _wait("applications RUNNING", lambda: _deployed(dashboard, names), DEPLOY_TIMEOUT_S, started)

        ingress = cfg.ingress
        for use_http in (False, True):
            client = MammothClient(f"127.0.0.1:{ingress.grpc_port}", f"http://127.0.0.1:{ingress.http_port}",
                                   use_http=use_http, timeout_s=600)
            try:
                image = client.generate_image("a red bicycle", seed=3, steps=2, width=64, height=64)
                assert image.mime_type == "image/png" and (image.width, image.height) == (64, 64)
                answer = "".join(client.ask("what is in this picture?", [("image", image.data)], max_tokens=8, seed=1))
                assert answer, "the understanding request streamed no text"
            finally:
                client.close()

        apps = dashboard.applications()  # Serve's view, after the requests ran
        for app_name, app in apps.items():
            group = HEAD if app_name == "mammoth" else app_name.rsplit("-", 1)[1]
            for dep_name, dep in app["deployments"].items():
                running = [r for r in dep["replicas"] if r["state"] == "RUNNING"]
                assert running, f"{app_name}/{dep_name} has no running replica"
                where = {node_group[r["node_id"]] for r in running}
                assert where == {group}, f"{app_name}/{dep_name} replicas on {where}, not on the {group} group"
        assert {a.rsplit("-", 1)[1] for a in apps if a != "mammoth"} == set(STAGE_GROUPS)
    finally:
        for proc in started:
            seen += tree(proc.pid)
        seen += marked(marker)
        for proc in reversed(started):  # workers first, then the head
            terminate(tree(proc.pid), grace_s=30)
        terminate(marked(marker), grace_s=10)
        for proc in started:
            proc.wait(timeout=30)
    assert not wait_gone(seen + marked(marker), 30), "Ray processes left behind"
    shutil.rmtree(marker, ignore_errors=True)
