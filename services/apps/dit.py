"""DiT application: the batched DiT engine of one model (expert-parallel MoE for video).

Final latents are put in Ray's object store once and handed on as a reference, so the
ingress forwards them to the VAE without ever reading them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import ray
from ray import serve

from dit_worker.parallel.placement import imbalance
from dit_worker.parallel.proxy import parallel_engine
from protos import dit_pb2
from protos.tensors import tensor_to_proto

from ..config import ServeConfig
from ..dit_group import RankGroup
from ..families import ModelFamily, get_family
from ..handoff import DenoiseDone, DenoiseStepEvent, EncodedMedia, ImageConditions, PromptConditions
from ..stage_messages import denoise_job
from ..stage_setup import dit_engine_config, stage_lanes
from ..stages.dit import DiTStage, load_glyph_encoder
from .common import (
    ApiKeys,
    StageMetrics,
    apply_threads,
    config_from_args,
    deployment_options,
    model_from_args,
)
from .grpc_util import stage_grpc_abort, timings_proto


class PublishedLatents:
    """Puts final latents in the object store and keeps them alive until they are fetched.

    The ref travels inside a streamed event, and Ray does not count a ref nested in a
    streaming-generator item as borrowed: without an owner-side reference the object can be
    freed before the VAE reads it. This replica (the owner) therefore holds each ref until it is
    older than ``keep_s`` or the held bytes pass ``keep_bytes`` (oldest dropped first).
    """

    def __init__(self, keep_s: float, keep_bytes: int):
        self.keep_s = keep_s
        self.keep_bytes = keep_bytes
        self._held: collections.deque[tuple[float, int, ray.ObjectRef]] = collections.deque()
        self._bytes = 0

    def __call__(self, array: np.ndarray) -> list:
        ref = ray.put(array)
        now = time.monotonic()
        self._held.append((now, array.nbytes, ref))
        self._bytes += array.nbytes
        while self._held and (self._held[0][0] < now - self.keep_s or self._bytes > self.keep_bytes):
            self._bytes -= self._held.popleft()[1]
        # A list: Ray resolves only top-level refs in handle arguments, so it stays a reference.
        return [ref]


@serve.deployment(name="DiT")
class DiTDeployment:
    def __init__(self, args: dict[str, Any]):
        self.cfg = config_from_args(args)
        self.model, index = model_from_args(self.cfg, args)
        self.family = get_family(index.family)
        self.defaults = index.defaults
        apply_threads(self.cfg.dit.engine.cpu_threads)
        self.auth = ApiKeys.from_settings(self.cfg.ingress)  # its gRPC service, with expose_stages
        publish = PublishedLatents(self.cfg.ingress.limits.request_timeout_s, 2 * 1024**3)
        self.group = _rank_group(self.cfg, index.root, self.family)
        if self.group is None:
            self.stage = DiTStage.from_model_dir(index.root, dit_engine_config(self.cfg),
                                                 batch_wait_timeout_s=self.cfg.dit.engine.batch_wait_timeout_s,
                                                 publish=publish, engine_cls=self.family.engine_class("dit"),
                                                 lanes=stage_lanes(self.cfg, "dit"))
        else:  # the engine runs here on CPU tensors; the ranks hold the model
            engine_cfg = dataclasses.replace(dit_engine_config(self.cfg), device="cpu")
            parallel = self.cfg.dit.engine.parallel
            engine = parallel_engine(index.root / "dit", engine_cfg, self.group, world_size=parallel.size,
                                     mode=parallel.mode)
            self.stage = DiTStage(engine, max_batch_requests=max(1, engine_cfg.max_batch_rows // 2),
                                  batch_wait_timeout_s=self.cfg.dit.engine.batch_wait_timeout_s, publish=publish,
                                  glyph_encoder=load_glyph_encoder(index.root / "dit", engine))
        self.metrics = StageMetrics("dit", self.model)
        self.step_time = serve.metrics.Histogram(
            "mammoth_denoise_step_seconds", description="wall time of one denoising step of a request",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30], tag_keys=("model",))
        self.expert_tokens = serve.metrics.Counter(
            "mammoth_expert_tokens_total", description="tokens routed to each MoE expert (all layers)",
            tag_keys=("model", "expert"))
        self.batch_size = serve.metrics.Gauge("mammoth_dit_batch_size", description="requests in the running batch",
                                              tag_keys=("model",))
        self.expert_imbalance = serve.metrics.Gauge(
            "mammoth_expert_load_imbalance", description="max/mean tokens per expert in the last step (all layers)",
            tag_keys=("model",))
        self.rank_imbalance = serve.metrics.Gauge(
            "mammoth_dit_rank_load_imbalance", description="max/mean expert rows per rank in the last step",
            tag_keys=("model",))
        self.rank_tokens = serve.metrics.Counter(
            "mammoth_dit_rank_tokens_total", description="expert rows each rank of the DiT group ran",
            tag_keys=("model", "rank"))
        self._layer_totals: dict[str, list[int]] = {}

    async def denoise(self, request: dit_pb2.DenoiseRequest, conditions: ImageConditions | PromptConditions,
                      *media: EncodedMedia) -> AsyncIterator[DenoiseStepEvent | DenoiseDone]:
        """Handle method: a ``DenoiseRequest`` without tensors, the planner's conditions and the
        VAE's encoded edit inputs beside it (Ray resolves them; none of it passes the ingress)."""
        job = denoise_job(request, self.family, self.defaults, self.cfg.ingress.limits,
                          max_latent_tokens=self.cfg.dit.engine.max_latent_tokens)
        tags = {"model": self.model}
        with self.metrics.call("denoise"):
            last = time.perf_counter()
            async for event in self.stage.denoise(job, conditions, EncodedMedia.merge(media)):
                now = time.perf_counter()
                if isinstance(event, DenoiseStepEvent):
                    self.step_time.observe(now - last, tags=tags)
                    self.batch_size.set(self.stage.last_batch_size, tags=tags)
                last = now
                yield event
            await asyncio.to_thread(self._record_expert_load)

    def stats(self) -> dict[str, Any]:
        """Load of this replica (for tests and debugging): batches run, requests in the engine,
        and the rank group (size, generation, pids) when the DiT is parallel."""
        stats: dict[str, Any] = {"batches_run": self.stage.batches_run, "last_batch_size": self.stage.last_batch_size,
                                 "active_requests": self.stage.active_requests}
        if self.group is not None:
            stats["group"] = self.group.describe()
        return stats

    async def check_health(self) -> None:
        """Serve's probe: the batching loop is alive and the engine (every rank) answers."""
        await asyncio.to_thread(self.stage.check_health)

    async def expert_metrics(self) -> dict[str, Any]:
        """Per-layer tokens per expert since start (what ``mammoth dit placement --from-metrics``
        reads): the group counts every step; a single process sums the last step of each request."""
        counts = self._layer_totals
        if self.group is not None:
            counts = (await asyncio.to_thread(self.stage.engine.model.stats))["total_expert_counts"]
        return {"model": self.model, "expert_counts": counts}

    def _record_expert_load(self) -> None:
        """Runs in a thread: with a group, the counts come from rank 0."""
        tags = {"model": self.model}
        if self.group is not None:
            stats = self.stage.engine.model.stats()
            load, ranks = stats["expert_counts"], stats["rank_tokens"]
            for rank, count in enumerate(ranks):
                self.rank_tokens.inc(count, tags={**tags, "rank": str(rank)})
            self.rank_imbalance.set(imbalance(ranks), tags=tags)
        else:
            load = self.stage.engine.expert_load()
            for name, counts in load.items():
                totals = self._layer_totals.setdefault(name, [0] * len(counts))
                self._layer_totals[name] = [a + b for a, b in zip(totals, counts)]
        if not load:
            return
        totals = np.sum([np.asarray(v) for v in load.values()], axis=0)
        self.expert_imbalance.set(imbalance(totals.tolist()), tags=tags)
        for expert, count in enumerate(totals.tolist()):
            if count:
                self.expert_tokens.inc(count, tags={"model": self.model, "expert": str(expert)})

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()

    # -- gRPC: mammoth.v1.DiT (the same call, tensors read from / put into the messages) ----
    async def Denoise(self, request: dit_pb2.DenoiseRequest, grpc_context=None):  # noqa: N802
        try:
            self.auth.check_grpc(grpc_context)
            conditions, media = self._tensors(request)
            async for event in self.denoise(request, conditions, *media):
                out = dit_pb2.DenoiseEvent(request_id=request.request_id)
                if isinstance(event, DenoiseStepEvent):
                    out.step.step, out.step.total = event.step, event.total
                    if event.preview_latents is not None:
                        tensor_to_proto(event.preview_latents, out=out.step.preview_latents)
                else:
                    latents = ray.get(event.latents[0]) if isinstance(event.latents, list) else event.latents
                    tensor_to_proto(np.asarray(latents), out=out.result.latents)
                    out.result.timings.CopyFrom(timings_proto(event.timings))
                yield out
        except Exception as exc:  # noqa: BLE001
            stage_grpc_abort(grpc_context, exc, request.request_id)

    def _tensors(self, request: dit_pb2.DenoiseRequest) -> tuple[Any, list[EncodedMedia]]:
        return self.family.dit_inputs(request)


def _parallel_size(cfg: ServeConfig, family: ModelFamily) -> int:
    """Ranks per replica: ``dit.engine.parallel.size`` for families whose DiT runs as a group
    (the MoE video DiT), else 1."""
    return cfg.dit.engine.parallel.size if family.parallel_dit else 1


def _rank_group(cfg: ServeConfig, root: Any, family: ModelFamily) -> RankGroup | None:
    if _parallel_size(cfg, family) == 1:
        return None
    group = RankGroup(root / "dit", cfg.dit.engine.parallel, device=cfg.resolved_device("dit"),
                      dtype=cfg.resolved_dtype("dit"), cpu_threads=cfg.dit.engine.cpu_threads)
    group.start()
    return group


def app(args: dict[str, Any]) -> serve.Application:
    cfg = config_from_args(args)
    options = deployment_options(cfg, "dit")
    name = args.get("model") or next(iter(cfg.models))
    size = _parallel_size(cfg, get_family(cfg.models[name].family())) if name in cfg.models else 1
    if size > 1:  # bundle 0: the replica; bundle r + 1: rank r (one GPU each on cuda)
        actor = cfg.dit.ray_actor_options
        parallel = cfg.dit.engine.parallel
        # The replica's engine runs on CPU tensors (the ranks hold the model): no GPU of its own.
        options["ray_actor_options"]["num_gpus"] = 0
        # the replica's custom resources too (Serve requires them in bundle 0; k8s pins groups by them)
        replica = {"CPU": actor.num_cpus, **actor.resources}
        rank = {"CPU": parallel.rank_num_cpus,
                **({"GPU": 1.0} if cfg.resolved_device("dit") == "cuda" else {})}
        options["placement_group_bundles"] = [replica] + [rank] * size
        options["placement_group_strategy"] = parallel.placement_strategy
    return DiTDeployment.options(**options).bind(args)
