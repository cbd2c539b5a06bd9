"""Render a ``ServeConfig`` into a Ray Serve config (``serve run``/``serve deploy``/KubeRay).

The output is the multi-application schema Ray validates as ``ServeDeploySchema`` and that a
KubeRay ``RayService`` embeds as ``serveConfigV2``: one application per stage plus the
``mammoth`` ingress application. Every application gets the whole config as ``args`` so its
builder rebuilds the same ``ServeConfig`` (``ServeConfig.from_app_args(args)``), except inline
API keys: a rendered file is copied around (a RayService's ``serveConfigV2``, logs, the Ray
dashboard), so keys never go into it; the ingress reads them from ``ingress.api_keys_env`` (a
Kubernetes Secret in production), and ``mammoth serve`` hands inline keys to it in memory.

gRPC through the Serve proxy (Ray 2.60): the proxy imports the ``add_*Servicer_to_server``
functions listed here and routes every method of those services to the application named by
the caller's ``application`` metadata, or to the only application with a route prefix. Stage
apps therefore get ``route_prefix: null`` by default: they are reached through deployment
handles only, the ingress is the single routable app, and clients need no metadata. With
``ingress.expose_stages`` they get ``/stages/<name>`` and their services are registered too;
callers must then send ``application: <name>`` metadata (``mammoth`` for Generation).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import yaml

from .config import ConfigError, DeploymentSettings, IngressSettings, ServeConfig
from .families import get_family


@dataclass(frozen=True)
class AppSpec:
    name: str  # Serve application name
    import_path: str  # module:builder, called with the application args
    deployment: str  # the deployment in that application whose options we set
    servicer: str  # import path of the gRPC add_*Servicer_to_server function


STAGE_APPS: dict[str, AppSpec] = {
    "planner": AppSpec("planner", "services.apps.planner:app", "Planner",
                       "protos.planner_pb2_grpc.add_PlannerServicer_to_server"),
    "dit": AppSpec("dit", "services.apps.dit:app", "DiT", "protos.dit_pb2_grpc.add_DiTServicer_to_server"),
    "vae": AppSpec("vae", "services.apps.vae:app", "VAE", "protos.vae_pb2_grpc.add_VAEServicer_to_server"),
}
INGRESS_APP = AppSpec("mammoth", "services.apps.pipeline:app", "Ingress",
                      "protos.generation_pb2_grpc.add_GenerationServicer_to_server")
# Routed to the ingress deployment like any user method: it must define Check (and Watch).
# Ingress requests beyond its own generation bounds that Serve must still deliver: probes, health
# watches, job and file reads (generations past the bounds get the ingress's 429, services.apps.admission).
INGRESS_HEADROOM = 16
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"


def _actor_options(section: DeploymentSettings) -> dict[str, Any]:
    opts = section.ray_actor_options
    out: dict[str, Any] = {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus}
    if opts.memory is not None:
        out["memory"] = opts.memory
    if opts.resources:
        out["resources"] = dict(opts.resources)
    if opts.accelerator_type is not None:
        out["accelerator_type"] = opts.accelerator_type
    return out


def deployment_config(name: str, section: DeploymentSettings, *, shutdown_grace_s: float | None = None
                      ) -> dict[str, Any]:
    """One deployment's Serve options (scaling, queue bounds, resources) from its config section.

    ``shutdown_grace_s``: how long a stopping replica (scale-down, node drain, ``serve.delete``)
    keeps serving its in-flight requests before Serve kills it."""
    out: dict[str, Any] = {"name": name}
    if section.autoscaling is not None:
        a = section.autoscaling
        auto: dict[str, Any] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
        }
        if a.initial_replicas is not None:
            auto["initial_replicas"] = a.initial_replicas
        out["autoscaling_config"] = auto
    else:
        out["num_replicas"] = section.fixed_replicas
    out["max_ongoing_requests"] = section.max_ongoing_requests
    out["max_queued_requests"] = section.max_queued_requests
    if isinstance(section, IngressSettings):
        # the ingress enforces its bounds itself (services.apps.admission: 429 JSON); Serve delivers
        # its queue too, plus room for probes, health watches and job reads
        out["max_ongoing_requests"] += max(section.max_queued_requests, 0) + INGRESS_HEADROOM
        # a burst arrives faster than Serve's router learns replica capacity: it queues here a moment
        out["max_queued_requests"] = section.proxy_max_queued_requests
    out["ray_actor_options"] = _actor_options(section)
    if shutdown_grace_s is not None:
        out["graceful_shutdown_timeout_s"] = shutdown_grace_s
    if isinstance(section, IngressSettings):
        # the proxy's own rejection when the ingress queue is full: 429 as the API promises, not 503
        out["backpressure_config"] = {"status_code": 429, "retry_after_s": 1}
    return out


PROXY_CALLBACK = "services.proxy_errors:middlewares"  # Serve's HTTP proxy callback (services.proxy_errors)
GRPC_GUARD = "services.proxy_errors.add_dead_ingress_guard"  # the gRPC proxy's (services.proxy_errors)


def cluster_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment every Ray node needs at start, for what Serve's proxies read only from env vars:
    the gRPC proxy refuses messages over the request limit before reading them whole (its default
    is 2 GiB), and the HTTP proxy loads our error middleware (``services.proxy_errors``)."""
    return {
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(cfg.ingress.limits.max_request_bytes),
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
    }


def stage_env_vars(cfg: ServeConfig, stage: str) -> dict[str, str]:
    """Environment of one application's replicas: engine settings that only exist as env vars."""
    section: DeploymentSettings = cfg.ingress if stage == INGRESS_APP.name else getattr(cfg, stage)
    env: dict[str, str] = {}
    engine = getattr(section, "engine", None)
    if engine is not None and engine.cpu_threads is not None:
        env["OMP_NUM_THREADS"] = str(engine.cpu_threads)
    if stage == "planner":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.planner.engine.multiprocessing else "0"
        if cfg.resolved_device("planner") == "cpu":
            # vLLM on CPU otherwise sizes its KV cache from total RAM (~90%). It reads whole GiB
            # only; the planner passes the exact size (a fraction too) as kv_cache_memory_bytes.
            kv = float(cfg.planner.engine.kv_cache_gib or 0)
            if kv.is_integer():
                env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv))
    env.update(cfg.env_vars)
    env.update(section.env_vars)
    return dict(sorted(env.items()))


def stage_app_name(model: str, stage: str) -> str:
    """Serve application of one model's stage, e.g. ``image-dit``; also the gRPC ``application``
    metadata a client sends to reach that stage's service directly."""
    return f"{model}-{stage}"


def dit_placement(cfg: ServeConfig, model: str) -> dict[str, Any] | None:
    """A parallel DiT replica's placement group (families whose DiT runs as a group, the MoE video
    DiT, with ``dit.engine.parallel.size`` > 1):
    bundle 0 the replica (its CPUs and custom resources, no GPU: the ranks hold the model), then
    one bundle per rank (one GPU each on cuda). ``services.apps.dit.app`` builds the same options;
    the rendered config must carry them too, since its ``ray_actor_options`` override the builder's."""
    parallel = cfg.dit.engine.parallel
    if parallel.size <= 1 or model not in cfg.models:
        return None
    try:
        family = get_family(cfg.models[model].family())
    except (OSError, ValueError, LookupError) as exc:
        raise ConfigError(f"models.{model}: cannot tell whether dit.engine.parallel applies ({exc})") from None
    if not family.parallel_dit:
        return None
    actor = cfg.dit.ray_actor_options
    rank = {"CPU": parallel.rank_num_cpus, **({"GPU": 1.0} if cfg.resolved_device("dit") == "cuda" else {})}
    return {"num_gpus": 0, "placement_group_bundles": [{"CPU": actor.num_cpus, **actor.resources}] + [rank] * parallel.size,
            "placement_group_strategy": parallel.placement_strategy}


def _application(cfg: ServeConfig, spec: AppSpec, section: DeploymentSettings, route_prefix: str | None,
                 args: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    deployment = deployment_config(spec.deployment, section, shutdown_grace_s=cfg.shutdown_grace_s)
    placement = dit_placement(cfg, args.get("model", "")) if spec.name == "dit" else None
    if placement is not None:
        deployment["ray_actor_options"]["num_gpus"] = placement.pop("num_gpus")
        deployment.update(placement)
    app: dict[str, Any] = {
        "name": name or spec.name,
        "import_path": spec.import_path,
        "route_prefix": route_prefix,
        "args": copy.deepcopy(args),  # no shared objects: plain YAML without anchors
        "deployments": [deployment],
    }
    env = stage_env_vars(cfg, spec.name)
    if env:
        app["runtime_env"] = {"env_vars": env}
    return app


def grpc_servicer_functions(cfg: ServeConfig) -> list[str]:
    functions = [GRPC_GUARD, INGRESS_APP.servicer]  # the guard first: it wraps what the others register
    if cfg.ingress.grpc_health:
        functions.append(HEALTH_SERVICER)
    if cfg.ingress.expose_stages:
        functions += [spec.servicer for spec in STAGE_APPS.values()]
    return functions


def without_api_keys(cfg: ServeConfig) -> ServeConfig:
    """The config as rendered into application args: inline ``ingress.api_keys`` removed."""
    return cfg.model_copy(update={"ingress": cfg.ingress.model_copy(update={"api_keys": []})})


def render_serve_config(cfg: ServeConfig, *, validate: bool = True) -> dict[str, Any]:
    """The Ray Serve config dict; checked against Ray's own ``ServeDeploySchema`` unless told not to.

    Application args never carry inline API keys (see the module docstring)."""
    ingress = cfg.ingress
    args = {"config": without_api_keys(cfg).to_dict()}
    timeout = ingress.limits.request_timeout_s
    applications = []
    for model in cfg.models:
        for stage, spec in STAGE_APPS.items():
            name = stage_app_name(model, stage)
            route = f"/stages/{name}" if ingress.expose_stages else None
            applications.append(_application(cfg, spec, getattr(cfg, stage), route, {**args, "model": model}, name))
    applications.append(_application(cfg, INGRESS_APP, ingress, "/", args))
    out: dict[str, Any] = {
        "proxy_location": cfg.proxy_location,
        "http_options": {"host": ingress.host, "port": ingress.http_port, "request_timeout_s": timeout},
        "grpc_options": {
            "port": ingress.grpc_port,
            "grpc_servicer_functions": grpc_servicer_functions(cfg),
            "request_timeout_s": timeout,
            "enable_reflection": ingress.grpc_reflection,
        },
        "applications": applications,
    }
    if validate:
        validate_serve_config(out)
    return out


def starting_resources(rendered: dict[str, Any]) -> dict[str, dict[str, float]]:
    """What each application's replicas reserve at start (``{app: {resource: amount}}``), as Serve
    schedules them: the starting replica count (``num_replicas``, else the autoscaler's
    ``initial_replicas`` or ``min_replicas``) times one replica's actor options, or its placement
    group's bundles where it has one (the replica actor sits in bundle 0). Serve's default
    replica reserves one CPU."""
    out: dict[str, dict[str, float]] = {}
    for app in rendered["applications"]:
        need = out.setdefault(app["name"], {})
        for deployment in app["deployments"]:
            scaling = deployment.get("autoscaling_config") or {}
            replicas = deployment.get("num_replicas")
            if not isinstance(replicas, int):
                replicas = scaling.get("initial_replicas") or scaling.get("min_replicas", 1)
            options = deployment.get("ray_actor_options") or {}
            bundles = deployment.get("placement_group_bundles") or [{
                "CPU": options.get("num_cpus", 1.0), "GPU": options.get("num_gpus") or 0.0,
                **(options.get("resources") or {})}]
            for bundle in bundles:
                for resource, amount in bundle.items():
                    if amount:
                        need[resource] = need.get(resource, 0.0) + replicas * float(amount)
    return out


def resource_shortfall(rendered: dict[str, Any], available: dict[str, float]) -> str | None:
    """Why the starting replicas cannot all be placed on a cluster with ``available`` resources
    (``ray.cluster_resources()``), or None when they fit in total. A deploy that does not fit
    waits for resources forever; on a fixed cluster that is a config error."""
    per_app = starting_resources(rendered)
    total: dict[str, float] = {}
    for need in per_app.values():
        for resource, amount in need.items():
            total[resource] = total.get(resource, 0.0) + amount
    short = {r: (need, float(available.get(r, 0.0))) for r, need in total.items()
             if need > float(available.get(r, 0.0)) + 1e-9}
    if not short:
        return None
    lines = [f"{r}: the replicas need {need:g} at start, the Ray cluster has {have:g}" for r, (need, have) in short.items()]
    by_app = ", ".join(f"{app} {need[r]:g}" for r in short for app, need in per_app.items() if need.get(r))
    return "; ".join(lines) + f" ({by_app}); lower the stages' num_cpus/num_gpus or replicas"


def validate_serve_config(config: dict[str, Any]) -> Any:
    """Validate with Ray Serve's own schema (what ``serve deploy`` and KubeRay submit to)."""
    with warnings.catch_warnings():  # Ray 2.60's schema module trips pydantic deprecation warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.serve.schema import ServeDeploySchema  # heavy import: only when asked
    return ServeDeploySchema.model_validate(config)


def render_yaml(cfg: ServeConfig, *, source: str | None = None) -> str:
    if cfg.ingress.api_keys:
        warnings.warn(f"ingress.api_keys: {len(cfg.ingress.api_keys)} inline key(s) left out of the rendered "
                      f"config; the ingress reads keys from ${cfg.ingress.api_keys_env or '<ingress.api_keys_env>'}",
                      stacklevel=2)
    header = "# Ray Serve config rendered by `mammoth config render`"
    header += f" from {source}" if source else " from the default config"
    header += ".\n# Edit the Mammoth config and render again rather than editing this file.\n"
    return header + yaml.safe_dump(render_serve_config(cfg), sort_keys=False, default_flow_style=False)
