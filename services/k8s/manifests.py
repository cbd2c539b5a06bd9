"""Render the production deployment as Kubernetes objects: a KubeRay ``RayService`` (its
``serveConfigV2`` is the same Serve config ``mammoth config render`` prints, with every replica
pinned to its group), a Service for the gRPC and HTTP ports, PodDisruptionBudgets and a
NetworkPolicy.

Secrets never appear here: with ``ingress.auth_enabled`` every pod gets ``ingress.api_keys_env``
from the Secret ``k8s.api_keys_secret``, and inline ``ingress.api_keys`` are refused.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml

from ..config import ConfigError, K8sToleration, ServeConfig
from ..render import cluster_env, render_serve_config
from .topology import HEAD, STAGE_GROUPS, GroupShape, groups, placed_config

Profile = Literal["gpu", "cpu"]
VERSION = "0.1.0"
APP_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_CACHE_CPU = "/tmp/mammoth-models"  # CPU profile: tiny checkpoints built in each pod (emptyDir /tmp)
UID = 1000
DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365
RAYLET_HEALTH = f"wget -q -T 2 -O- http://localhost:{DASHBOARD_AGENT_PORT}/api/local_raylet_healthz | grep -q success"
GCS_HEALTH = f"wget -q -T 2 -O- http://localhost:{DASHBOARD_PORT}/api/gcs_healthz | grep -q success"


def serve_health(port: int) -> str:
    """Ray Serve's proxy health: 200 "success" once routes are in, 503 while draining."""
    return f"wget -q -T 2 -O- http://localhost:{port}/-/healthz | grep -q success"


# ------------------------------------------------------------------------- profiles


def profile_config(profile: Profile) -> ServeConfig:
    """The built-in config of a profile (``--config`` replaces it).

    gpu: the real presets read from the model volume, API keys on, HeadOnly proxies.
    cpu: the tiny presets built inside each pod, fractional CPUs, no model volume."""
    if profile == "gpu":
        base = ServeConfig.default_gpu().to_dict()
        base["models"] = {"image": {"preset": "mammoth2-dev", "cache_dir": "/models"},
                          "video": {"preset": "mammoth25-20b-a3b", "cache_dir": "/models"}}
        base["ingress"]["auth_enabled"] = True
    else:
        base = ServeConfig.default_cpu().to_dict()
        base["models"] = {name: {**m, "cache_dir": MODEL_CACHE_CPU} for name, m in base["models"].items()}
        base["k8s"].update(model_volume={"claim_name": None, "mount_path": "/models"},
                           head={"cpus": 1, "memory": "4Gi"}, planner={"memory": "12Gi"},
                           dit={"memory": "4Gi"}, vae={"memory": "4Gi"})
    base["proxy_location"] = "HeadOnly"  # the ingress lives on the head: one hop less
    base["ingress"]["playground"] = False  # a cluster serves the API only (set it in --config to have the page)
    return ServeConfig.from_dict(base, source=f"{profile} profile")


def check_profile(cfg: ServeConfig, profile: Profile) -> None:
    if cfg.device != profile:
        raise ConfigError(f"device: the config serves on {cfg.device} but --profile is {profile}")


def _image(cfg: ServeConfig, profile: Profile, image: str | None) -> str:
    return image or cfg.k8s.image or f"mammoth-serve:{VERSION}-{profile}"


# ------------------------------------------------------------------------- pod templates


def _labels(cfg: ServeConfig, component: str) -> dict[str, str]:
    return {APP_LABEL: "mammoth-serve", INSTANCE_LABEL: cfg.k8s.name, COMPONENT_LABEL: component}


def _resources(cfg: ServeConfig, shape: GroupShape) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(shape.cpus), "memory": shape.memory}
    if shape.gpus:
        amounts[cfg.k8s.gpu_resource] = str(shape.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}  # requests = limits: Guaranteed QoS


def _tolerations(cfg: ServeConfig, shape: GroupShape) -> list[dict[str, str]]:
    tolerations = shape.settings.tolerations
    if tolerations is None:
        tolerations = ([K8sToleration(key=cfg.k8s.gpu_resource, operator="Exists", effect="NoSchedule")]
                       if shape.gpus else [])
    return [t.model_dump(exclude_none=True) for t in tolerations]


def _env(cfg: ServeConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # `ray start` drains its node on SIGTERM for this long (Serve proxies stop taking traffic,
        # replicas finish); stay inside the pod's grace period.
        {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": str(max(1, cfg.k8s.termination_grace_s - 15))},
        *({"name": name, "value": value} for name, value in cluster_env(cfg).items()),
    ]
    ingress = cfg.ingress
    if ingress.auth_enabled and cfg.k8s.api_keys_secret and ingress.api_keys_env:
        env.append({"name": ingress.api_keys_env, "valueFrom": {"secretKeyRef": {
            "name": cfg.k8s.api_keys_secret, "key": cfg.k8s.api_keys_secret_key, "optional": False}}})
    return env


def _volumes(cfg: ServeConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volume = cfg.k8s.model_volume
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},  # Ray's session dir, compile caches, tiny checkpoints
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # the object store (default /dev/shm is 64 MiB)
    ]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if volume.claim_name:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": volume.claim_name, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": volume.mount_path, "readOnly": True})
    return volumes, mounts


def _probe(command: str, *, period: int, failures: int) -> dict[str, Any]:
    return {"exec": {"command": ["bash", "-c", command]}, "initialDelaySeconds": 10, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def _pod_template(cfg: ServeConfig, shape: GroupShape, image: str) -> dict[str, Any]:
    head = shape.name == HEAD
    volumes, mounts = _volumes(cfg)
    container: dict[str, Any] = {
        "name": "ray-head" if head else "ray-worker",
        "image": image,
        "imagePullPolicy": cfg.k8s.image_pull_policy,
        "env": _env(cfg),
        "resources": _resources(cfg, shape),
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    if head:
        container["ports"] = [
            {"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": cfg.ingress.http_port},
            {"name": "grpc", "containerPort": cfg.ingress.grpc_port},
        ]
        # Not the proxy's health: KubeRay submits serveConfigV2 once the head is ready, so that
        # would never come. Serving traffic follows Serve health through the ray.io/serve label
        # (KubeRay sets it from each proxy's /-/healthz), which the Service selects on.
        ready = alive = f"{RAYLET_HEALTH} && {GCS_HEALTH}"
    else:
        # HeadOnly proxies: a worker is ready when its raylet is; with EveryNode also its proxy.
        ready = RAYLET_HEALTH if cfg.proxy_location == "HeadOnly" else \
            f"{RAYLET_HEALTH} && {serve_health(cfg.ingress.http_port)}"
        alive = RAYLET_HEALTH
    container["readinessProbe"] = _probe(ready, period=5, failures=10)
    container["livenessProbe"] = _probe(alive, period=10, failures=12)
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": cfg.k8s.termination_grace_s,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if shape.settings.node_selector:
        spec["nodeSelector"] = dict(shape.settings.node_selector)
    tolerations = _tolerations(cfg, shape)
    if tolerations:
        spec["tolerations"] = tolerations
    return {"metadata": {"labels": _labels(cfg, shape.name)}, "spec": spec}


def _ray_start_params(shape: GroupShape) -> dict[str, str]:
    params = {"num-cpus": str(shape.cpus), "num-gpus": str(shape.gpus)}
    if shape.name == HEAD:
        params["dashboard-host"] = "0.0.0.0"
    return params


def ray_start_args(shape: GroupShape) -> list[str]:
    """The ``ray start`` flags a node of this group gets (what KubeRay passes; also the test's)."""
    import json

    args = [f"--{k}={v}" for k, v in _ray_start_params(shape).items() if k != "dashboard-host"]
    return [*args, f"--resources={json.dumps(shape.ray_resources)}"]


# ------------------------------------------------------------------------- objects


def _serve_config_text(cfg: ServeConfig) -> str:
    return yaml.safe_dump(render_serve_config(placed_config(cfg)), sort_keys=False, default_flow_style=False)


def rayservice(cfg: ServeConfig, profile: Profile, image: str | None = None) -> dict[str, Any]:
    shapes = groups(cfg)
    image = _image(cfg, profile, image)
    head = shapes[HEAD]
    workers = []
    for stage in STAGE_GROUPS:
        shape = shapes[stage]
        workers.append({
            "groupName": stage,
            "replicas": shape.min_pods,
            "minReplicas": shape.min_pods,
            "maxReplicas": shape.max_pods,
            "idleTimeoutSeconds": cfg.k8s.idle_timeout_s,
            "rayStartParams": _ray_start_params(shape),
            "resources": {k: str(v) for k, v in shape.ray_resources.items()},
            "labels": {"mammoth.io/stage": stage},
            "template": _pod_template(cfg, shape, image),
        })
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": cfg.k8s.name, "namespace": cfg.k8s.namespace, "labels": _labels(cfg, "rayservice")},
        "spec": {
            "serveConfigV2": _serve_config_text(cfg),
            "rayClusterConfig": {
                "rayVersion": cfg.k8s.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": cfg.k8s.upscaling_mode,
                    "idleTimeoutSeconds": cfg.k8s.idle_timeout_s,
                    "imagePullPolicy": cfg.k8s.image_pull_policy,
                    "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                  "limits": {"cpu": "500m", "memory": "512Mi"}},
                    "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}},
                },
                "headGroupSpec": {
                    "rayStartParams": _ray_start_params(head),
                    "resources": {k: str(v) for k, v in head.ray_resources.items()},
                    "labels": {"mammoth.io/stage": "ingress"},
                    "template": _pod_template(cfg, head, image),
                },
                "workerGroupSpecs": workers,
            },
        },
    }


def _serving_selector(cfg: ServeConfig) -> dict[str, str]:
    """Pods whose Serve proxy is healthy (KubeRay keeps ``ray.io/serve`` in step with
    ``/-/healthz``: not yet deployed or draining -> no traffic); HeadOnly: the head only."""
    selector = {INSTANCE_LABEL: cfg.k8s.name, "ray.io/serve": "true"}
    if cfg.proxy_location == "HeadOnly":
        selector[COMPONENT_LABEL] = HEAD
    return selector


def ingress_service(cfg: ServeConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{cfg.k8s.name}-ingress", "namespace": cfg.k8s.namespace,
                     "labels": _labels(cfg, "ingress")},
        "spec": {
            "type": "ClusterIP",
            "selector": _serving_selector(cfg),
            "ports": [
                {"name": "grpc", "port": cfg.ingress.grpc_port, "targetPort": cfg.ingress.grpc_port,
                 "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
                {"name": "http", "port": cfg.ingress.http_port, "targetPort": cfg.ingress.http_port,
                 "protocol": "TCP"},
            ],
        },
    }


def disruption_budgets(cfg: ServeConfig) -> list[dict[str, Any]]:
    """One per worker group: voluntary evictions (node drains, upgrades) take pods one at a time.
    The head gets none: a budget on a single pod would block every node drain."""
    return [{
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{cfg.k8s.name}-{stage}", "namespace": cfg.k8s.namespace, "labels": _labels(cfg, stage)},
        "spec": {"maxUnavailable": cfg.k8s.max_unavailable,
                 "selector": {"matchLabels": {INSTANCE_LABEL: cfg.k8s.name, COMPONENT_LABEL: stage}}},
    } for stage in STAGE_GROUPS]


def network_policy(cfg: ServeConfig) -> dict[str, Any]:
    """Ingress to the pods: the gRPC and HTTP ports from anywhere, everything between the
    cluster's own pods (GCS, raylets, object transfer, workers), the dashboard from the operator."""
    ours = {"podSelector": {"matchLabels": {INSTANCE_LABEL: cfg.k8s.name}}}
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cfg.k8s.operator_namespace}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": cfg.k8s.name, "namespace": cfg.k8s.namespace, "labels": _labels(cfg, "network")},
        "spec": {
            "podSelector": {"matchLabels": {INSTANCE_LABEL: cfg.k8s.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"protocol": "TCP", "port": cfg.ingress.grpc_port},
                           {"protocol": "TCP", "port": cfg.ingress.http_port}]},
                {"from": [ours]},
                {"from": [operator], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT},
                                               {"protocol": "TCP", "port": DASHBOARD_AGENT_PORT}]},
            ],
        },
    }


def render_manifests(cfg: ServeConfig, profile: Profile, *, image: str | None = None,
                     namespace: str | None = None) -> list[dict[str, Any]]:
    """Every object of the deployment, RayService first."""
    check_profile(cfg, profile)
    if cfg.ingress.api_keys:
        raise ConfigError("ingress.api_keys: inline keys are never written into manifests; put them in the "
                          f"Secret {cfg.k8s.api_keys_secret or '<k8s.api_keys_secret>'} "
                          f"(key {cfg.k8s.api_keys_secret_key}) and leave ingress.api_keys empty")
    if cfg.ingress.auth_enabled and not (cfg.k8s.api_keys_secret and cfg.ingress.api_keys_env):
        raise ConfigError("k8s.api_keys_secret: auth_enabled needs a Secret and ingress.api_keys_env to carry the keys")
    if namespace is not None:
        cfg = cfg.model_copy(update={"k8s": cfg.k8s.model_copy(update={"namespace": namespace})})
    return [rayservice(cfg, profile, image), ingress_service(cfg), *disruption_budgets(cfg), network_policy(cfg)]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so ``serveConfigV2`` stays readable YAML in YAML."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def manifests_yaml(objects: list[dict[str, Any]], *, command: str) -> str:
    header = (f"# Rendered by `{command}`; edit the Mammoth config and render again.\n"
              "# API keys: kubectl create secret generic <k8s.api_keys_secret> --from-literal=api-keys=KEY1,KEY2\n")
    return header + "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
                                 for o in objects)
