"""``mammoth k8s apply|status|delete`` with the official ``kubernetes`` client.

Apply is idempotent: create, and on 409 (it exists) a merge patch of the same object. The
RayService goes through ``CustomObjectsApi``; the core kinds through their typed APIs (one row
per kind below). Every API error becomes one ``K8sError`` line naming the object and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RAY_GROUP, RAY_VERSION, RAYSERVICE_PLURAL = "ray.io", "v1", "rayservices"


class K8sError(RuntimeError):
    """One line: what failed against the Kubernetes API and why."""


@dataclass(frozen=True)
class KindOps:
    """How one kind is created, patched, read and deleted."""

    api: str  # kubernetes.client class name
    create: str
    patch: str
    read: str
    delete: str


KINDS: dict[str, KindOps] = {
    "Service": KindOps("CoreV1Api", "create_namespaced_service", "patch_namespaced_service",
                       "read_namespaced_service", "delete_namespaced_service"),
    "PodDisruptionBudget": KindOps("PolicyV1Api", "create_namespaced_pod_disruption_budget",
                                   "patch_namespaced_pod_disruption_budget",
                                   "read_namespaced_pod_disruption_budget",
                                   "delete_namespaced_pod_disruption_budget"),
    "NetworkPolicy": KindOps("NetworkingV1Api", "create_namespaced_network_policy",
                             "patch_namespaced_network_policy", "read_namespaced_network_policy",
                             "delete_namespaced_network_policy"),
}

_HINTS = {
    401: "unauthorized: the cluster rejected the credentials (check --kubeconfig / --context)",
    403: "forbidden: the user lacks RBAC permission for this",
    404: "not found",
    409: "conflict: the object changed or exists (apply again)",
    422: "invalid",
}


def _reason(exc: Any) -> str:
    import json

    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (TypeError, ValueError):
        message = ""
    hint = _HINTS.get(exc.status, f"HTTP {exc.status} {exc.reason}")
    return f"{hint}: {message}" if message else hint


def api_error(action: str, kind: str, namespace: str, name: str, exc: Any) -> K8sError:
    where = f"{kind} {namespace}/{name}"
    if exc.status == 404 and action == "create" and kind == "RayService":
        return K8sError(f"create {where}: the RayService kind is not served (is the KubeRay operator installed?)")
    return K8sError(f"{action} {where}: {_reason(exc)}")


def api_client(*, kubeconfig: str | None = None, context: str | None = None) -> Any:
    """An ``ApiClient`` from the kubeconfig (file, context), or the in-cluster service account."""
    from kubernetes import client, config

    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except config.ConfigException as exc:
        if kubeconfig is None and context is None:
            try:
                config.load_incluster_config()
                return client.ApiClient()
            except config.ConfigException:
                pass
        raise K8sError(f"kubeconfig: {exc}") from None


class Cluster:
    """The objects of one deployment on one cluster."""

    def __init__(self, api: Any):
        from kubernetes import client

        self._client = client
        self.api = api
        self.custom = client.CustomObjectsApi(api)

    def _typed(self, kind: str) -> tuple[KindOps, Any]:
        ops = KINDS[kind]
        return ops, getattr(self._client, ops.api)(self.api)

    def _call(self, action: str, obj_kind: str, namespace: str, name: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as exc:
            raise api_error(action, obj_kind, namespace, name, exc) from None

    def apply(self, obj: dict[str, Any]) -> str:
        """Create ``obj``, or patch it when it exists; returns ``created`` or ``configured``."""
        from kubernetes.client.exceptions import ApiException

        kind, meta = obj["kind"], obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if kind == "RayService":
            create = lambda: self.custom.create_namespaced_custom_object(  # noqa: E731
                RAY_GROUP, RAY_VERSION, ns, RAYSERVICE_PLURAL, obj)
            patch = lambda: self.custom.patch_namespaced_custom_object(  # noqa: E731
                RAY_GROUP, RAY_VERSION, ns, RAYSERVICE_PLURAL, name, obj)
        else:
            ops, typed = self._typed(kind)
            create = lambda: getattr(typed, ops.create)(ns, obj)  # noqa: E731
            patch = lambda: getattr(typed, ops.patch)(name, ns, obj)  # noqa: E731
        try:
            create()
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise api_error("create", kind, ns, name, exc) from None
        self._call("patch", kind, ns, name, patch)
        return "configured"

    def delete(self, obj: dict[str, Any]) -> str:
        """Delete ``obj``; ``deleted``, or ``absent`` when it was not there."""
        from kubernetes.client.exceptions import ApiException

        kind, meta = obj["kind"], obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            if kind == "RayService":
                self.custom.delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, RAYSERVICE_PLURAL, name)
            else:
                ops, typed = self._typed(kind)
                getattr(typed, ops.delete)(name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return "absent"
            raise api_error("delete", kind, ns, name, exc) from None
        return "deleted"

    def rayservice(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call("get", "RayService", namespace, name, lambda: self.custom.get_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, RAYSERVICE_PLURAL, name))


# ------------------------------------------------------------------------- status


def parse_status(obj: dict[str, Any]) -> dict[str, Any]:
    """Readiness from a RayService's ``status``: the service, each application and deployment,
    and the cluster's worker replica counts (active cluster, and the pending one of an upgrade)."""
    status = obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {})

    def cluster(entry: dict[str, Any] | None) -> dict[str, Any] | None:
        if not entry:
            return None
        apps = {}
        for app_name, app in sorted((entry.get("applicationStatuses") or {}).items()):
            deployments = {
                dep: {"status": d.get("status", "UNKNOWN"), "healthy": d.get("status") == "HEALTHY",
                      "message": d.get("message", "")}
                for dep, d in sorted((app.get("serveDeploymentStatuses") or {}).items())
            }
            apps[app_name] = {"status": app.get("status", "UNKNOWN"), "running": app.get("status") == "RUNNING",
                              "message": app.get("message", ""), "deployments": deployments}
        ray = entry.get("rayClusterStatus") or {}
        replicas = {key: ray.get(field) for key, field in (
            ("ready", "readyWorkerReplicas"), ("available", "availableWorkerReplicas"),
            ("desired", "desiredWorkerReplicas"), ("min", "minWorkerReplicas"), ("max", "maxWorkerReplicas"))}
        return {"ray_cluster": entry.get("rayClusterName"), "state": ray.get("state"),
                "worker_replicas": replicas, "applications": apps}

    return {
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace"),
        "ready": ready.get("status") == "True",
        "reason": ready.get("reason", ""),
        "service_status": status.get("serviceStatus", ""),
        "serve_endpoints": status.get("numServeEndpoints", 0),
        "active": cluster(status.get("activeServiceStatus")),
        "pending": cluster(status.get("pendingServiceStatus")),
    }


def format_status(parsed: dict[str, Any]) -> str:
    lines = [f"RayService {parsed['namespace']}/{parsed['name']}: "
             f"{'READY' if parsed['ready'] else 'NOT READY'}"
             f"{' (' + parsed['reason'] + ')' if parsed['reason'] else ''}"
             f"  serve endpoints {parsed['serve_endpoints']}"]
    for label in ("active", "pending"):
        entry = parsed[label]
        if entry is None:
            continue
        r = entry["worker_replicas"]
        lines.append(f"  {label} cluster {entry['ray_cluster']}: {entry['state'] or '?'}  workers ready "
                     f"{r['ready']}/{r['desired']} (available {r['available']}, min {r['min']}, max {r['max']})")
        for app_name, app in entry["applications"].items():
            lines.append(f"    app {app_name}: {app['status']}" + (f" - {app['message']}" if app["message"] else ""))
            for dep, d in app["deployments"].items():
                lines.append(f"      {dep}: {d['status']}" + (f" - {d['message']}" if d["message"] else ""))
    return "\n".join(lines)
