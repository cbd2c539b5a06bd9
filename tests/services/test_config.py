"""The serving config: defaults, YAML round trip, field-naming errors, Ray Serve rendering."""

from __future__ import annotations

import importlib

import pytest
import yaml

from services.config import AutoscalingSettings, ConfigError, ServeConfig
from services.render import (
    GRPC_GUARD,
    HEALTH_SERVICER,
    INGRESS_APP,
    STAGE_APPS,
    grpc_servicer_functions,
    render_serve_config,
    render_yaml,
    stage_app_name,
    validate_serve_config,
    without_api_keys,
)

CUSTOM_YAML = """
device: cpu
models: {main: {path: /models/tiny2}}
planner:
  num_replicas: 2
  engine: {kv_cache_gib: 3, cpu_threads: 2, max_num_seqs: 4}
dit:
  autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 2, upscale_delay_s: 3,
                downscale_delay_s: 10, look_back_period_s: 15}
  max_ongoing_requests: 4
  max_queued_requests: 16
  ray_actor_options: {num_cpus: 0.1}
  engine: {max_batch_rows: 8, batch_wait_timeout_s: 0.02}
vae:
  engine: {memory_budget_mb: 512, cpu_threads: 1}
ingress:
  grpc_port: 50051
  http_port: 8080
  auth_enabled: true
  api_keys: [k1, k2]
  limits: {max_steps: 30, max_width: 512, max_height: 512}
env_vars: {HF_HUB_OFFLINE: "1"}
"""


def _app(rendered: dict, name: str) -> dict:
    """An application by name; a bare stage name means that stage of the first model."""
    apps = [a for a in rendered["applications"] if a["name"] == name]
    if not apps and name in STAGE_APPS:
        apps = [a for a in rendered["applications"] if a["name"].endswith(f"-{name}")][:1]
    (app,) = apps
    return app


def _spec(app_name: str):
    stage = app_name.rsplit("-", 1)[-1]
    return STAGE_APPS.get(stage, INGRESS_APP)


# ---------------------------------------------------------------- defaults and YAML


def test_defaults_are_a_working_cpu_config():
    cfg = ServeConfig()
    assert cfg == ServeConfig.loads("") == ServeConfig.loads("{}")
    assert cfg.device == "cpu" and {k: m.preset for k, m in cfg.models.items()} == {
        "image": "tiny-mammoth2", "video": "tiny-mammoth25"}
    assert [m.family() for m in cfg.models.values()] == ["mammoth2", "mammoth25"]
    assert cfg.ingress.grpc_port == 9000 and cfg.ingress.http_port == 8000
    for stage in ("planner", "dit", "vae"):
        section = getattr(cfg, stage)
        assert section.fixed_replicas == 1
        assert 0 < section.ray_actor_options.num_cpus < 1, "fractional CPUs so replicas fit a small box"
        assert section.ray_actor_options.num_gpus == 0
        assert cfg.resolved_device(stage) == "cpu" and cfg.resolved_dtype(stage) == "float32"
    assert cfg.planner.engine.kv_cache_gib is not None
    assert cfg.ingress.default_models == {}  # each task: the first model serving it


def test_two_models_of_one_family_side_by_side():
    """Several image models are served at once (each its own apps); a default per task may be set."""
    cfg = ServeConfig.loads("models:\n  image: {preset: tiny-mammoth2}\n  image-b: {preset: tiny-mammoth2}\n"
                            "  video: {preset: tiny-mammoth25}\n"
                            "ingress: {default_models: {text_to_image: image-b, understand: video}}")
    assert [m.family() for m in cfg.models.values()] == ["mammoth2", "mammoth2", "mammoth25"]
    assert cfg.ingress.default_models == {"text_to_image": "image-b", "understand": "video"}
    names = [app["name"] for app in render_serve_config(cfg, validate=False)["applications"]]
    assert len(names) == len(set(names)) == 3 * 3 + 1
    assert {"image-dit", "image-b-dit", "video-dit"} <= set(names)


def test_default_cpu_and_gpu_constructors(tmp_path):
    cpu = ServeConfig.default_cpu(tmp_path)
    assert cpu.models["main"].path == str(tmp_path) and cpu.models["main"].preset is None
    assert cpu.models["main"].directory() == tmp_path
    gpu = ServeConfig.default_gpu(tmp_path)
    assert gpu.device == "gpu"
    for stage in ("planner", "dit", "vae"):
        assert getattr(gpu, stage).ray_actor_options.num_gpus > 0
        assert gpu.resolved_device(stage) == "cuda" and gpu.resolved_dtype(stage) == "bfloat16"
    assert gpu.dit.autoscaling is not None


def test_preset_model_directory_lives_under_the_cache_dir(tmp_path):
    cfg = ServeConfig.loads(f"models: {{v: {{preset: tiny-mammoth25, cache_dir: {tmp_path}}}}}")
    assert cfg.models["v"].directory() == tmp_path / "tiny-mammoth25"


@pytest.mark.parametrize("make", [ServeConfig, lambda: ServeConfig.default_gpu("/m"), lambda: ServeConfig.loads(CUSTOM_YAML)],
                         ids=["default", "gpu", "custom"])
def test_yaml_round_trip(make, tmp_path):
    cfg = make()
    text = cfg.dump(tmp_path / "mammoth.yaml")
    assert ServeConfig.loads(text) == cfg
    assert ServeConfig.load(tmp_path / "mammoth.yaml") == cfg
    assert ServeConfig.from_dict(yaml.safe_load(text)) == cfg


def test_custom_values_are_read():
    cfg = ServeConfig.loads(CUSTOM_YAML)
    assert cfg.planner.fixed_replicas == 2 and cfg.planner.engine.kv_cache_gib == 3
    assert cfg.dit.fixed_replicas is None and cfg.dit.autoscaling.max_replicas == 3
    assert cfg.dit.engine.max_batch_rows == 8 and cfg.vae.engine.memory_budget_mb == 512
    assert cfg.ingress.limits.max_steps == 30 and cfg.ingress.limits.max_frames == 129  # untouched default
    assert "k1" not in repr(cfg.ingress), "API keys stay out of reprs and logs"


# ---------------------------------------------------------------- errors name the field


@pytest.mark.parametrize(
    "text,field,fragment",
    [
        ("dit: {num_replicas: -1}", "dit.num_replicas", "greater than 0"),
        ("planner: {num_replicas: 0}", "planner.num_replicas", "greater than 0"),
        ("dit: {autoscaling: {min_replicas: 3, max_replicas: 2}}", "dit.autoscaling.min_replicas", "above max_replicas"),
        ("vae: {autoscaling: {min_replicas: -1}}", "vae.autoscaling.min_replicas", "greater than or equal to 0"),
        ("dit: {autoscaling: {initial_replicas: 5, max_replicas: 2}}", "dit.autoscaling.initial_replicas", "outside"),
        ("dit: {num_replicas: 2, autoscaling: {}}", "dit.num_replicas", "not both"),
        ("dit: {max_ongoing_requests: 1, autoscaling: {}}", "dit.max_ongoing_requests", "target_ongoing_requests"),
        ("ingress: {grpc_port: 70000}", "ingress.grpc_port", "less than or equal to 65535"),
        ("ingress: {http_port: 0}", "ingress.http_port", "greater than or equal to 1"),
        ("ingress: {http_port: 9000}", "ingress.grpc_port", "also the http_port"),
        ("ingress: {auth_enabled: true, api_keys_env: null}", "ingress.api_keys", "auth_enabled"),
        ("ingress: {limits: {max_steps: 0}}", "ingress.limits.max_steps", "greater than 0"),
        ("ingress: {limits: {max_tokens: 5}}", "ingress.limits.max_tokens", "Extra inputs"),
        ("planner: {engine: {gpu_memory_utilization: 1.5}}", "planner.engine.gpu_memory_utilization", "less than or equal"),
        ("vae: {engine: {foo: 1}}", "vae.engine.foo", "Extra inputs"),
        ("dit: {engine: {dtype: float64}}", "dit.engine.dtype", "float32"),
        ("unknown_section: {}", "unknown_section", "Extra inputs"),
        ("device: tpu", "device", "'cpu' or 'gpu'"),
        ("device: gpu", "planner.ray_actor_options.num_gpus", "must be > 0"),
        ("dit: {ray_actor_options: {num_gpus: 1}}", "dit.ray_actor_options.num_gpus", "runs on cpu"),
        ("planner: {engine: {kv_cache_gib: null}}", "planner.engine.kv_cache_gib", "required on cpu"),
        ("models: {a: {path: /m, preset: tiny-mammoth2}}", "models.a.path", "exactly one"),
        ("models: {a: {preset: huge-9000}}", "models.a.preset", "unknown 'huge-9000'"),
        ("models: {a: {preset: tiny-mammoth2}}\ningress: {default_models: {text_to_video: a}}",
         "ingress.default_models.text_to_video", "does not serve text_to_video"),
        ("models: {a: {preset: tiny-mammoth2}}\ningress: {default_models: {text_to_image: b}}",
         "ingress.default_models.text_to_image", "'b' is not a served model"),
        ("ingress: {default_models: {t2i: image}}", "ingress.default_models.t2i.[key]", "text_to_image"),
        ("models: {Bad_Name: {preset: tiny-mammoth2}}", "models.Bad_Name.[key]", "should match pattern"),
        ("models: {}", "models", "at least 1"),
        ("version: 2", "version", "1"),
    ],
)
def test_bad_values_name_the_field(text, field, fragment):
    with pytest.raises(ConfigError) as err:
        ServeConfig.loads(text, source="bad.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == "bad.yaml: invalid config"
    assert any(line.strip().startswith(f"{field}: ") and fragment in line for line in lines[1:]), lines


def test_load_reports_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        ServeConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        ServeConfig.load(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("dit: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ServeConfig.load(tmp_path / "broken.yaml")


def test_assignment_is_validated_too():
    cfg = ServeConfig()
    with pytest.raises(ValueError, match="also the http_port"):
        cfg.ingress.http_port = cfg.ingress.grpc_port
    cfg.dit.autoscaling = AutoscalingSettings(max_replicas=4)
    with pytest.raises(ValueError, match="not both"):
        cfg.dit.num_replicas = 2


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("make", [ServeConfig, lambda: ServeConfig.default_gpu("/m"), lambda: ServeConfig.loads(CUSTOM_YAML),
                                  lambda: ServeConfig.loads("ingress: {expose_stages: true}")],
                         ids=["default", "gpu", "custom", "exposed"])
def test_render_validates_against_rays_schema(make):
    cfg = make()
    rendered = render_serve_config(cfg, validate=False)
    schema = validate_serve_config(rendered)
    expected = [stage_app_name(m, s) for m in cfg.models for s in STAGE_APPS] + ["mammoth"]
    assert [a.name for a in schema.applications] == expected
    assert schema.grpc_options.port == cfg.ingress.grpc_port and schema.http_options.port == cfg.ingress.http_port
    for app in schema.applications:
        spec = _spec(app.name)
        assert app.import_path == spec.import_path
        assert [d.name for d in app.deployments] == [spec.deployment]
        assert ServeConfig.from_app_args(app.args) == without_api_keys(cfg), "builders rebuild the same config"
        assert app.args.get("model") in (None, *cfg.models)


def test_route_prefixes_and_servicers_follow_expose_stages():
    hidden = render_serve_config(ServeConfig())
    assert _app(hidden, "mammoth")["route_prefix"] == "/"
    assert all(a["route_prefix"] is None for a in hidden["applications"] if a["name"] != "mammoth")
    assert hidden["grpc_options"]["grpc_servicer_functions"] == [GRPC_GUARD, INGRESS_APP.servicer, HEALTH_SERVICER]

    exposed = render_serve_config(ServeConfig.loads("ingress: {expose_stages: true, grpc_health: false}"))
    assert [_app(exposed, s)["route_prefix"] for s in STAGE_APPS] == [
        "/stages/image-planner", "/stages/image-dit", "/stages/image-vae"]
    assert exposed["grpc_options"]["grpc_servicer_functions"] == [
        GRPC_GUARD, INGRESS_APP.servicer, *(spec.servicer for spec in STAGE_APPS.values())
    ]


def test_servicer_functions_are_importable():
    # The Ray Serve proxy imports these by path; a typo would crash-loop it (and take HTTP down).
    cfg = ServeConfig.loads("ingress: {expose_stages: true}")
    for path in grpc_servicer_functions(cfg):
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), path


def test_autoscaling_lands_in_the_right_deployment():
    rendered = render_serve_config(ServeConfig.loads(CUSTOM_YAML))
    (dit,) = _app(rendered, "dit")["deployments"]
    assert dit["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2.0,
        "upscale_delay_s": 3.0, "downscale_delay_s": 10.0, "look_back_period_s": 15.0,
    }
    assert "num_replicas" not in dit
    assert dit["max_ongoing_requests"] == 4 and dit["max_queued_requests"] == 16
    assert dit["ray_actor_options"] == {"num_cpus": 0.1, "num_gpus": 0.0}
    (planner,) = _app(rendered, "planner")["deployments"]
    assert planner["num_replicas"] == 2 and "autoscaling_config" not in planner
    for name in ("vae", "mammoth"):
        (dep,) = _app(rendered, name)["deployments"]
        assert dep["num_replicas"] == 1 and "autoscaling_config" not in dep
    schema = validate_serve_config(rendered)
    assert schema.applications[1].deployments[0].autoscaling_config["max_replicas"] == 3


def test_runtime_env_carries_engine_env_vars():
    cpu = render_serve_config(ServeConfig.loads(CUSTOM_YAML))
    planner_env = _app(cpu, "planner")["runtime_env"]["env_vars"]
    assert planner_env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert planner_env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert planner_env["OMP_NUM_THREADS"] == "2" and planner_env["HF_HUB_OFFLINE"] == "1"
    assert _app(cpu, "vae")["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in _app(cpu, "dit")["runtime_env"]["env_vars"]
    gpu = render_serve_config(ServeConfig.default_gpu("/m"))
    assert "VLLM_CPU_KVCACHE_SPACE" not in _app(gpu, "planner")["runtime_env"]["env_vars"]
    # per-stage env_vars win over the global ones
    over = render_serve_config(ServeConfig.loads("env_vars: {A: g}\ndit: {env_vars: {A: d}}"))
    assert _app(over, "dit")["runtime_env"]["env_vars"]["A"] == "d"
    assert _app(over, "vae")["runtime_env"]["env_vars"]["A"] == "g"


def test_limits_reach_the_proxies():
    rendered = render_serve_config(ServeConfig.loads("ingress: {limits: {request_timeout_s: 42}, grpc_reflection: false}"))
    assert rendered["http_options"]["request_timeout_s"] == 42
    assert rendered["grpc_options"]["request_timeout_s"] == 42
    assert rendered["grpc_options"]["enable_reflection"] is False


def test_render_yaml_is_plain_yaml_of_the_same_config():
    cfg = ServeConfig.loads(CUSTOM_YAML)
    text = render_yaml(cfg, source="mammoth.yaml")
    assert text.startswith("# Ray Serve config rendered by `mammoth config render` from mammoth.yaml")
    assert "&id" not in text and "*id" not in text, "no YAML anchors (KubeRay embeds this as a string)"
    assert yaml.safe_load(text) == render_serve_config(cfg)


def test_rays_schema_rejects_what_it_should():
    # guards against validate_serve_config silently accepting anything
    rendered = render_serve_config(ServeConfig.loads("ingress: {expose_stages: true}"))
    _app(rendered, "dit")["route_prefix"] = "/"
    with pytest.raises(ValueError, match="route"):
        validate_serve_config(rendered)


def test_starting_resources_count_replicas_and_placement_groups():
    from services.render import resource_shortfall, starting_resources

    cfg = ServeConfig.from_dict({"models": {"image": {"preset": "tiny-mammoth2"}, "video": {"preset": "tiny-mammoth25"}},
                                 "planner": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}},
                                 "dit": {"engine": {"parallel": {"size": 2, "rank_num_cpus": 0.25}},
                                         "ray_actor_options": {"num_cpus": 0.1}}})
    need = starting_resources(render_serve_config(cfg))
    assert need["image-planner"] == {"CPU": 1.0}  # two replicas of 0.5
    assert need["video-dit"] == {"CPU": 0.6}  # its group: the replica's bundle and two ranks
    assert need["image-dit"] == {"CPU": 0.1}  # no MoE: no group
    total = sum(n.get("CPU", 0.0) for n in need.values())
    assert resource_shortfall(render_serve_config(cfg), {"CPU": total}) is None
    why = resource_shortfall(render_serve_config(cfg), {"CPU": 2.0})
    assert why.startswith(f"CPU: the replicas need {total:g} at start, the Ray cluster has 2") and "image-planner 1" in why
    gpu = resource_shortfall(render_serve_config(ServeConfig.default_gpu()), {"CPU": 64.0})
    assert gpu and gpu.startswith("GPU: the replicas need")
