"""Which KubeRay group each Serve deployment lands on, and the pod shape of every group.

One worker group per stage kind (planner, DiT, VAE); the ingress runs on the head. Each group
declares a custom Ray resource (``mammoth_<group>``) and every replica of that kind asks for one
unit of it, so the scheduler puts replicas on their own group and the autoscaler, seeing a
pending replica's demand, scales exactly that group. The node declares as many units as replicas
fit in one pod, so the same number packs the pod and sizes the group:
``minReplicas``/``maxReplicas`` = the stage's Serve replica bounds (summed over the served models)
divided by the replicas one pod holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import DeploymentSettings, K8sGroup, ServeConfig

STAGE_GROUPS = ("planner", "dit", "vae")
HEAD = "head"


def group_resource(group: str) -> str:
    """The custom Ray resource that marks a node of ``group``."""
    return f"mammoth_{group}"


def dit_parallel_size(cfg: ServeConfig) -> int:
    """Ranks in the largest DiT replica: ``dit.engine.parallel.size`` when a MoE (video) model is
    served (image DiTs stay one process), 1 on configs without the field."""
    parallel = getattr(cfg.dit.engine, "parallel", None)
    size = int(getattr(parallel, "size", 1) or 1)
    if size > 1 and not any(_parallel_dit(m) for m in cfg.models.values()):
        return 1
    return size


def _parallel_dit(model: Any) -> bool:
    """Whether the model's family runs its DiT as a group (``services.families``)."""
    from ..families import get_family

    try:
        return get_family(model.family()).parallel_dit
    except (OSError, ValueError, LookupError):  # a model path not readable here: assume it may be MoE
        return True


def replica_gpus(cfg: ServeConfig, stage: str) -> float:
    """GPUs one replica of ``stage`` holds, its worker ranks included.

    The planner runs vLLM's tensor-parallel ranks inside the replica. A parallel DiT replica is
    a STRICT_PACK placement group (``render.dit_placement``): the replica's bundle (no GPU) plus
    one bundle of one GPU per rank, so the whole group must fit on one node."""
    gpus = getattr(cfg, stage).ray_actor_options.num_gpus
    if cfg.resolved_device(stage) != "cuda":
        return 0.0
    if stage == "planner":
        return max(gpus, float(cfg.planner.engine.tensor_parallel_size))
    if stage == "dit" and dit_parallel_size(cfg) > 1:
        return float(dit_parallel_size(cfg))  # the ranks' GPUs; the replica itself holds none
    return gpus


def replica_cpus(cfg: ServeConfig, stage: str) -> float:
    """Ray CPUs one replica of ``stage`` holds (a parallel DiT: its rank actors' too)."""
    cpus = getattr(cfg, stage).ray_actor_options.num_cpus
    size = dit_parallel_size(cfg) if stage == "dit" else 1
    if size > 1:
        cpus += size * getattr(getattr(cfg.dit.engine, "parallel", None), "rank_num_cpus", 0.0)
    return cpus


def replica_bounds(cfg: ServeConfig, section: DeploymentSettings, copies: int) -> tuple[int, int]:
    """(min, max) replicas of a deployment over ``copies`` applications of it."""
    if section.autoscaling is not None:
        return section.autoscaling.min_replicas * copies, section.autoscaling.max_replicas * copies
    n = (section.fixed_replicas or 1) * copies
    return n, n


@dataclass(frozen=True)
class GroupShape:
    """One KubeRay group: pod size, Ray resources, and how many pods the autoscaler may run."""

    name: str
    cpus: int  # Ray CPUs = pod CPU request = limit
    gpus: int
    memory: str
    replicas_per_pod: int
    min_pods: int
    max_pods: int
    settings: K8sGroup
    ray_resources: dict[str, int] = field(default_factory=dict)

    @property
    def resource(self) -> str:
        return group_resource(self.name)


def _per_pod(cpus_each: float, gpus_each: float, pod_cpus: int, pod_gpus: int) -> int:
    fits = []
    if gpus_each > 0:
        fits.append(math.floor(pod_gpus / gpus_each + 1e-9))
    if cpus_each > 0:
        fits.append(math.floor(pod_cpus / cpus_each + 1e-9))
    return min(fits) if fits else 0


def stage_group(cfg: ServeConfig, stage: str) -> GroupShape:
    """The worker group of one stage kind; errors name the ``k8s.<stage>`` field that does not fit."""
    section: DeploymentSettings = getattr(cfg, stage)
    settings: K8sGroup = getattr(cfg.k8s, stage)
    gpus_each, cpus_each = replica_gpus(cfg, stage), replica_cpus(cfg, stage)
    lo, hi = replica_bounds(cfg, section, len(cfg.models))
    pod_gpus = settings.gpus if settings.gpus is not None else math.ceil(gpus_each - 1e-9)
    if gpus_each > 0 and pod_gpus < gpus_each:
        raise ValueError(f"k8s.{stage}.gpus: {pod_gpus} GPUs per pod cannot hold one {stage} replica "
                         f"({gpus_each:g} GPUs with its ranks)")
    if settings.cpus is not None:
        pod_cpus = settings.cpus
    elif gpus_each > 0:  # as many replicas as the GPUs hold, with the CPUs they ask for
        pod_cpus = max(1, math.ceil(math.floor(pod_gpus / gpus_each + 1e-9) * cpus_each - 1e-9))
    else:  # CPU only: one pod holds every replica of the kind
        pod_cpus = max(1, math.ceil(hi * cpus_each - 1e-9))
    per_pod = _per_pod(cpus_each, gpus_each, pod_cpus, pod_gpus)
    if per_pod < 1:
        raise ValueError(f"k8s.{stage}.cpus: {pod_cpus} CPUs per pod cannot hold one {stage} replica "
                         f"({cpus_each:g} CPUs with its ranks)")
    return GroupShape(name=stage, cpus=pod_cpus, gpus=pod_gpus, memory=settings.memory, replicas_per_pod=per_pod,
                      min_pods=math.ceil(lo / per_pod), max_pods=max(1, math.ceil(hi / per_pod)),
                      settings=settings, ray_resources={group_resource(stage): per_pod})


def head_group(cfg: ServeConfig) -> GroupShape:
    """The head: GCS, Serve controller, a proxy and the ingress replicas; never a GPU."""
    settings = cfg.k8s.head
    lo, hi = replica_bounds(cfg, cfg.ingress, 1)
    cpus = settings.cpus if settings.cpus is not None else max(1, math.ceil(hi * cfg.ingress.ray_actor_options.num_cpus))
    per_pod = _per_pod(cfg.ingress.ray_actor_options.num_cpus, 0.0, cpus, 0)
    if per_pod < hi:
        raise ValueError(f"k8s.head.cpus: {cpus} CPUs cannot hold {hi} ingress replicas "
                         f"({cfg.ingress.ray_actor_options.num_cpus:g} CPUs each)")
    if cfg.ingress.ray_actor_options.num_gpus:
        raise ValueError("ingress.ray_actor_options.num_gpus: the ingress runs on the head, which has no GPU")
    return GroupShape(name=HEAD, cpus=cpus, gpus=0, memory=settings.memory, replicas_per_pod=hi, min_pods=1,
                      max_pods=1, settings=settings, ray_resources={group_resource(HEAD): hi})


def groups(cfg: ServeConfig) -> dict[str, GroupShape]:
    """Head first, then one worker group per stage kind."""
    return {HEAD: head_group(cfg), **{stage: stage_group(cfg, stage) for stage in STAGE_GROUPS}}


def placed_config(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with every deployment asking for one unit of its group's resource: the Serve
    config embedded in the RayService is rendered from this."""
    update = {}
    for stage, group in (*((s, s) for s in STAGE_GROUPS), ("ingress", HEAD)):
        section: DeploymentSettings = getattr(cfg, stage)
        opts = section.ray_actor_options
        resources = {**opts.resources, group_resource(group): 1.0}
        update[stage] = section.model_copy(update={"ray_actor_options": opts.model_copy(update={"resources": resources})})
    return cfg.model_copy(update=update)
