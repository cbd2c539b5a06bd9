"""`mammoth k8s apply|status|delete` through the real `kubernetes` client against kmock's
in-memory Kubernetes API (an HTTP server on localhost; it keeps objects, merges patches)."""

from __future__ import annotations

import asyncio
import json

import kmock
import pytest

from services.cli import main
from services.k8s.kubectl import parse_status
from services.k8s.manifests import profile_config

RAYSERVICES = kmock.resource("ray.io", "v1", "rayservices")


def _kubeconfig(tmp_path, url) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "mock",
        "clusters": [{"name": "mock", "cluster": {"server": str(url)}}],
        "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "tester"}}],
        "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
    }))
    return str(path)


async def _mammoth(*argv: str) -> int:
    """The CLI in a thread: the kubernetes client is blocking, the emulator lives on this loop."""
    return await asyncio.to_thread(main, list(argv))


def _stored(emulator, kind_resource, name: str, namespace: str = "default"):
    return emulator.objects[kind_resource, namespace, name]


@pytest.mark.asyncio
async def test_apply_creates_then_patches_then_delete_removes(kmock, tmp_path, capsys):
    kc = _kubeconfig(tmp_path, kmock.url)
    assert await _mammoth("k8s", "apply", "--profile", "cpu", "--kubeconfig", kc, "--image", "reg/m:1") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["RayService default/mammoth created", "Service default/mammoth-ingress created",
                   *[f"PodDisruptionBudget default/mammoth-{g} created" for g in ("planner", "dit", "vae")],
                   "NetworkPolicy default/mammoth created"]
    head = _stored(kmock, RAYSERVICES, "mammoth")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"] == "reg/m:1"

    assert await _mammoth("k8s", "apply", "--profile", "cpu", "--kubeconfig", kc, "--image", "reg/m:2") == 0
    assert all(line.endswith(" configured") for line in capsys.readouterr().out.splitlines())
    head = _stored(kmock, RAYSERVICES, "mammoth")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"] == "reg/m:2", "re-apply patched the object"
    assert len(kmock[kmock.resource("ray.io", "v1", "rayservices")]["patch"]) == 1

    assert await _mammoth("k8s", "delete", "--profile", "cpu", "--kubeconfig", kc) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "NetworkPolicy default/mammoth deleted" and lines[-1] == "RayService default/mammoth deleted"
    assert not [k for k, obj in kmock.objects.items() if not obj.deleted]
    assert await _mammoth("k8s", "delete", "--profile", "cpu", "--kubeconfig", kc) == 0
    assert all(line.endswith(" absent") for line in capsys.readouterr().out.splitlines())


def _kuberay_status(cfg) -> dict:
    apps = {name: {"status": "RUNNING", "serveDeploymentStatuses": {"Planner": {"status": "HEALTHY"}}}
            for name in ("image-planner", "video-planner")}
    apps["image-dit"] = {"status": "DEPLOYING", "message": "Deploying 1 replica",
                         "serveDeploymentStatuses": {"DiT": {"status": "UPSCALING", "message": "waiting for a GPU"}}}
    return {"status": {
        "serviceStatus": "Running", "numServeEndpoints": 1,
        "conditions": [{"type": "Ready", "status": "False", "reason": "UpgradeInProgress", "message": "",
                        "lastTransitionTime": "2026-12-01T00:00:00Z"}],
        "activeServiceStatus": {"rayClusterName": "mammoth-raycluster-abcde", "applicationStatuses": apps,
                                "rayClusterStatus": {"state": "ready", "readyWorkerReplicas": 3,
                                                     "availableWorkerReplicas": 3, "desiredWorkerReplicas": 4,
                                                     "minWorkerReplicas": 3, "maxWorkerReplicas": 14}},
    }}


@pytest.mark.asyncio
async def test_status_reports_applications_deployments_and_replicas(kmock, tmp_path, capsys):
    kc = _kubeconfig(tmp_path, kmock.url)
    assert await _mammoth("k8s", "apply", "--profile", "cpu", "--kubeconfig", kc) == 0
    capsys.readouterr()
    _stored(kmock, RAYSERVICES, "mammoth").patch(_kuberay_status(profile_config("cpu")))
    assert await _mammoth("k8s", "status", "--profile", "cpu", "--kubeconfig", kc, "--json") == 3, "not ready: 3"
    parsed = json.loads(capsys.readouterr().out)
    active = parsed["active"]
    assert parsed["ready"] is False and parsed["reason"] == "UpgradeInProgress" and parsed["pending"] is None
    assert active["worker_replicas"] == {"ready": 3, "available": 3, "desired": 4, "min": 3, "max": 14}
    assert active["applications"]["image-planner"]["running"] is True
    dit = active["applications"]["image-dit"]
    assert dit["running"] is False and dit["deployments"]["DiT"] == {
        "status": "UPSCALING", "healthy": False, "message": "waiting for a GPU"}
    assert await _mammoth("k8s", "status", "--profile", "cpu", "--kubeconfig", kc) == 3
    text = capsys.readouterr().out
    assert "NOT READY (UpgradeInProgress)" in text and "workers ready 3/4" in text
    assert "app image-dit: DEPLOYING - Deploying 1 replica" in text and "DiT: UPSCALING - waiting for a GPU" in text


def test_parse_status_ready_and_empty():
    assert parse_status({"metadata": {"name": "m", "namespace": "n"}})["ready"] is False
    ready = parse_status({"metadata": {"name": "m"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert ready["ready"] is True and ready["active"] is None


@pytest.mark.asyncio
@pytest.mark.parametrize("code, message, expect", [
    (401, "Unauthorized", "unauthorized: the cluster rejected the credentials"),
    (403, 'rayservices.ray.io is forbidden: User "tester" cannot create', "forbidden: the user lacks RBAC"),
    (404, "the server could not find the requested resource", "is the KubeRay operator installed?"),
    (422, 'RayService.ray.io "mammoth" is invalid: spec.rayClusterConfig: Required value', "invalid: RayService"),
])
@pytest.mark.asyncio
async def test_api_errors_are_one_clear_line(kmock, tmp_path, capsys, code, message, expect):
    kc = _kubeconfig(tmp_path, kmock.url)
    kmock["post"] << code << {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                              "message": message}
    assert await _mammoth("k8s", "apply", "--profile", "cpu", "--kubeconfig", kc) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mammoth k8s apply: create RayService default/mammoth: ") and expect in err


@pytest.mark.asyncio
async def test_conflict_on_patch_and_missing_status_are_one_line(kmock, tmp_path, capsys):
    kc = _kubeconfig(tmp_path, kmock.url)
    assert await _mammoth("k8s", "status", "--profile", "cpu", "--kubeconfig", kc) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mammoth k8s status: get RayService default/mammoth: not found") and "\n" not in err
    assert await _mammoth("k8s", "apply", "--profile", "cpu", "--kubeconfig", kc) == 0
    kmock["patch"] << 409 << {"kind": "Status", "code": 409, "message": "the object has been modified"}
    assert await _mammoth("k8s", "apply", "--profile", "cpu", "--kubeconfig", kc) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("mammoth k8s apply: patch RayService default/mammoth: conflict: the object changed or exists "
                   "(apply again): the object has been modified")


@pytest.mark.asyncio
async def test_bad_kubeconfig_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert await _mammoth("k8s", "status", "--profile", "cpu", "--kubeconfig", str(missing)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mammoth k8s status: kubeconfig:") and len(err.splitlines()) == 1
