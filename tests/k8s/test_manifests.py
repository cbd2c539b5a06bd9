"""`mammoth k8s render`: every object validates (core kinds strictly, the RayService against the
KubeRay CRD), the embedded serveConfigV2 is a Ray Serve config that pins each stage to its group,
and the checked-in examples are what the renderer prints today."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.cli import main
from services.config import ConfigError, ServeConfig
from services.k8s.manifests import manifests_yaml, profile_config, ray_start_args, render_manifests
from services.k8s.topology import HEAD, STAGE_GROUPS, groups, stage_group
from services.render import STAGE_APPS, stage_app_name, validate_serve_config

from .crd import CRD_DIR, validate_custom

K8S_VERSION = "1.37.0"
EXAMPLES = Path(__file__).resolve().parents[2] / "k8s"
needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not at {CRD_DIR}")


def _objects(profile: str) -> list[dict]:
    return render_manifests(profile_config(profile), profile)


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _serve(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _cluster(rayservice: dict) -> dict:
    return rayservice["spec"]["rayClusterConfig"]


def _pods(rayservice: dict) -> dict[str, dict]:
    cluster = _cluster(rayservice)
    pods = {HEAD: cluster["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


# ---------------------------------------------------------------------------- validity


@needs_crds
@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_every_object_validates(profile):
    objects = _objects(profile)
    assert [o["kind"] for o in objects] == ["RayService", "Service", *["PodDisruptionBudget"] * 3, "NetworkPolicy"]
    validate_custom(objects[0])
    for obj in objects[1:]:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for name, template in _pods(objects[0]).items():  # the embedded pod templates as core Pods, strictly
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@needs_crds
@pytest.mark.parametrize("break_it, where", [
    (lambda rs: _cluster(rs)["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"),
     "imagePullPolcy"),
    (lambda rs: _cluster(rs)["workerGroupSpecs"][0].update(minReplicas="one"), "one"),
    (lambda rs: _cluster(rs).update(enableInTreeAutoscalng=True), "enableInTreeAutoscalng"),
    (lambda rs: _cluster(rs)["autoscalerOptions"].update(upscalingMode="Eager"), "Eager"),
    (lambda rs: _cluster(rs)["workerGroupSpecs"][1].pop("groupName"), "groupName"),
], ids=["typo-in-pod", "wrong-type", "typo-in-cluster", "bad-enum", "missing-required"])
def test_broken_rayservice_fails_the_crd_schema(break_it, where):
    rayservice = copy.deepcopy(_objects("gpu")[0])
    break_it(rayservice)
    with pytest.raises(jsonschema.ValidationError, match=where):
        validate_custom(rayservice)


@pytest.mark.parametrize("break_it", [
    lambda svc: svc["spec"].update(typ="ClusterIP"),
    lambda svc: svc["spec"]["ports"][0].update(port="nine-thousand"),
], ids=["typo", "wrong-type"])
def test_broken_core_object_fails_strict_validation(break_it):
    service = copy.deepcopy(_by_kind(_objects("gpu"), "Service")[0])
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    break_it(service)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------- serveConfigV2 and placement


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_serve_config_names_every_stage_and_pins_it_to_its_group(profile):
    cfg = profile_config(profile)
    rayservice = _objects(profile)[0]
    schema = validate_serve_config(_serve(rayservice))
    expected = [stage_app_name(m, s) for m in cfg.models for s in STAGE_APPS] + ["mammoth"]
    assert [a.name for a in schema.applications] == expected
    cluster = _cluster(rayservice)
    declared = {HEAD: cluster["headGroupSpec"]["resources"]}
    declared.update({g["groupName"]: g["resources"] for g in cluster["workerGroupSpecs"]})
    for app in schema.applications:
        stage = "ingress" if app.name == "mammoth" else app.name.rsplit("-", 1)[1]
        group = HEAD if stage == "ingress" else stage
        (deployment,) = app.deployments
        resources = deployment.ray_actor_options.resources
        assert resources == {f"mammoth_{group}": 1.0}, app.name
        assert f"mammoth_{group}" in declared[group] and all(f"mammoth_{group}" not in v
                                                            for g, v in declared.items() if g != group)
        section = getattr(cfg, stage)
        if section.autoscaling is not None:
            assert deployment.autoscaling_config["max_replicas"] == section.autoscaling.max_replicas
        else:
            assert deployment.num_replicas == section.fixed_replicas
        assert deployment.graceful_shutdown_timeout_s == cfg.shutdown_grace_s


def test_gpu_groups_follow_the_stages_autoscaling_bounds():
    cfg = profile_config("gpu")
    rayservice = _objects("gpu")[0]
    cluster = _cluster(rayservice)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == cfg.k8s.idle_timeout_s
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    workers = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert list(workers) == list(STAGE_GROUPS)
    n_models = len(cfg.models)
    # DiT: one GPU per replica, autoscaling 1..4 per model -> 2..8 pods
    assert (workers["dit"]["minReplicas"], workers["dit"]["maxReplicas"]) == (
        cfg.dit.autoscaling.min_replicas * n_models, cfg.dit.autoscaling.max_replicas * n_models)
    # VAE: half a GPU per replica -> two replicas per one-GPU pod
    assert workers["vae"]["resources"] == {"mammoth_vae": "2"}
    assert workers["vae"]["maxReplicas"] == cfg.vae.autoscaling.max_replicas * n_models // 2
    # planner: fixed replicas -> min = max
    assert workers["planner"]["minReplicas"] == workers["planner"]["maxReplicas"] == n_models
    for name, pod in _pods(rayservice).items():
        (container,) = pod["spec"]["containers"]
        res = container["resources"]
        assert res["requests"] == res["limits"], name
        gpus = res["limits"].get("nvidia.com/gpu")
        assert (gpus is None) == (name == HEAD), name
        if gpus:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        assert "raylet_healthz" in " ".join(container["readinessProbe"]["exec"]["command"])
        assert "raylet_healthz" in " ".join(container["livenessProbe"]["exec"]["command"])
    (service,) = _by_kind(_objects("gpu"), "Service")
    assert service["spec"]["selector"]["ray.io/serve"] == "true", "traffic follows Serve's proxy health"


def test_dit_pods_fit_the_parallel_group(monkeypatch):
    cfg = profile_config("gpu")
    if hasattr(cfg.dit.engine, "parallel"):  # the expert-parallel pool's field, where it has landed
        cfg = ServeConfig.from_dict({**cfg.to_dict(), "dit": {**cfg.to_dict()["dit"], "engine": {
            **cfg.to_dict()["dit"]["engine"], "parallel": {**cfg.to_dict()["dit"]["engine"]["parallel"], "size": 4}}}})
    else:
        monkeypatch.setattr("services.k8s.topology.dit_parallel_size", lambda _cfg: 4)
    shape = stage_group(cfg, "dit")
    # STRICT_PACK placement group: the replica's bundle (no GPU) plus one GPU per rank, on one pod
    assert shape.gpus == 4 and shape.replicas_per_pod == 1
    assert shape.max_pods == cfg.dit.autoscaling.max_replicas * len(cfg.models)
    too_small = cfg.model_copy(update={"k8s": cfg.k8s.model_copy(update={
        "dit": cfg.k8s.dit.model_copy(update={"gpus": 2})})})
    with pytest.raises(ValueError, match=r"k8s\.dit\.gpus"):
        stage_group(too_small, "dit")


def test_cpu_profile_is_the_same_topology_with_fractional_cpus():
    gpu, cpu = _objects("gpu")[0], _objects("cpu")[0]
    assert [g["groupName"] for g in _cluster(cpu)["workerGroupSpecs"]] == \
        [g["groupName"] for g in _cluster(gpu)["workerGroupSpecs"]]
    serve = _serve(cpu)
    for app in serve["applications"]:
        opts = app["deployments"][0]["ray_actor_options"]
        assert 0 < opts["num_cpus"] < 1 and opts["num_gpus"] == 0
    for name, pod in _pods(cpu).items():
        assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"]["limits"], name
        assert "tolerations" not in pod["spec"]
    assert all(m["models"]["preset"].startswith("tiny") for m in
               [{"models": v} for v in profile_config("cpu").to_dict()["models"].values()])


def test_ray_start_args_carry_the_group_resources():
    shapes = groups(profile_config("cpu"))
    args = ray_start_args(shapes["dit"])
    assert "--num-gpus=0" in args and '--resources={"mammoth_dit": 4}' in args


# ---------------------------------------------------------------------------- secrets, network


def test_api_keys_come_from_the_secret_never_inline():
    cfg = profile_config("gpu")
    objects = render_manifests(cfg, "gpu")
    text = manifests_yaml(objects, command="test")
    for template in _pods(objects[0]).values():
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        ref = env[cfg.ingress.api_keys_env]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": cfg.k8s.api_keys_secret, "key": cfg.k8s.api_keys_secret_key, "optional": False}
    inline = ServeConfig.from_dict({**cfg.to_dict(), "ingress": {**cfg.to_dict()["ingress"], "api_keys": ["s3cret-key"]}})
    with pytest.raises(ConfigError, match=r"ingress\.api_keys"):
        render_manifests(inline, "gpu")
    assert "s3cret-key" not in text
    for app in _serve(objects[0])["applications"]:
        assert app["args"]["config"]["ingress"]["api_keys"] == []


def test_every_pod_starts_ray_with_the_proxies_settings():
    """Serve's proxies read these only from the environment of the node they start on."""
    from services.render import cluster_env

    cfg = profile_config("gpu")
    for template in _pods(render_manifests(cfg, "gpu")[0]).values():
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert cluster_env(cfg).items() <= env.items()
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(cfg.ingress.limits.max_request_bytes)


def test_serve_config_render_leaves_inline_keys_out(tmp_path, capsys):
    path = tmp_path / "mammoth.yaml"
    path.write_text("ingress: {auth_enabled: true, api_keys: [s3cret-key]}\n")
    with pytest.warns(UserWarning, match="ingress.api_keys"):
        assert main(["config", "render", "--config", str(path)]) == 0
    assert "s3cret-key" not in capsys.readouterr().out


def test_network_policy_opens_only_the_serving_ports_to_the_outside():
    cfg = profile_config("gpu")
    (policy,) = _by_kind(_objects("gpu"), "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    open_rules = [r for r in rules if "from" not in r]
    assert open_rules == [{"ports": [{"protocol": "TCP", "port": cfg.ingress.grpc_port},
                                     {"protocol": "TCP", "port": cfg.ingress.http_port}]}]
    peers = [r["from"] for r in rules if "from" in r]
    assert [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": cfg.k8s.name}}}] in peers
    (service,) = _by_kind(_objects("gpu"), "Service")
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [8000, 9000]
    budgets = _by_kind(_objects("gpu"), "PodDisruptionBudget")
    assert sorted(b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for b in budgets) == \
        sorted(STAGE_GROUPS)


# ---------------------------------------------------------------------------- CLI and examples


def test_cli_profile_mismatch_and_namespace(tmp_path, capsys):
    path = tmp_path / "cpu.yaml"
    path.write_text("device: cpu\n")
    assert main(["k8s", "render", "--profile", "gpu", "--config", str(path)]) == 2
    assert "--profile is gpu" in capsys.readouterr().err
    assert main(["k8s", "render", "--profile", "cpu", "--namespace", "serving", "--image", "reg/m:1"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {d["metadata"]["namespace"] for d in docs} == {"serving"}
    assert {c["image"] for t in _pods(docs[0]).values() for c in t["spec"]["containers"]} == {"reg/m:1"}


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_checked_in_examples_are_up_to_date(profile, capsys):
    assert main(["k8s", "render", "--profile", profile]) == 0
    fresh = capsys.readouterr().out
    path = EXAMPLES / f"rayservice-{profile}.yaml"
    assert path.read_text() == fresh, (f"{path} is stale: regenerate with "
                                       f"`mammoth k8s render --profile {profile} -o k8s/{path.name}`")


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_parallel_dit_placement_is_rendered_as_the_builder_builds_it(profile):
    from services.apps.dit import app as dit_app

    data = profile_config(profile).to_dict()
    data["dit"]["engine"]["parallel"]["size"] = 2
    cfg = ServeConfig.from_dict(data)
    serve = _serve(render_manifests(cfg, profile)[0])
    validate_serve_config(serve)
    for app in serve["applications"]:
        if not app["name"].endswith("-dit"):
            continue
        (deployment,) = app["deployments"]
        built = dit_app(app["args"])._bound_deployment._replica_config
        if cfg.models[app["args"]["model"]].family() == "mammoth25":
            assert deployment["placement_group_bundles"] == built.placement_group_bundles
            assert deployment["placement_group_strategy"] == built.placement_group_strategy == "STRICT_PACK"
            assert deployment["placement_group_bundles"][0]["mammoth_dit"] == 1.0, "bundle 0 holds the group pin"
            assert deployment["ray_actor_options"]["num_gpus"] == built.ray_actor_options["num_gpus"] == 0
            gpus = sum(b.get("GPU", 0) for b in deployment["placement_group_bundles"])
            assert gpus == (2 if profile == "gpu" else 0)
        else:  # image DiTs stay one process
            assert "placement_group_bundles" not in deployment and built.placement_group_bundles is None
