"""The one serving config: model, per-stage scaling and engine settings, ingress limits.

A single YAML file (``mammoth config render`` turns it into a Ray Serve config) so that every
replica count, queue bound and request limit is a reviewed value, not a constant in code. All
sections reject unknown keys, and every error names its field (``dit.autoscaling.max_replicas:
...``), because a typo in a deployment file must fail at load time, not silently fall back.

Stage engines leave ``device``/``dtype`` unset to follow the top-level ``device``; the
resolved values are what ``resolved_device()`` / ``resolved_dtype()`` return. A CPU stage
asking for a dtype this CPU cannot multiply natively (bf16 on AVX2: ~100x slower than float32)
is refused when the stage starts, naming the field and the CPU (``cpu_dtype_policy: warn`` only
logs it); ``mammoth_common.cpu`` decides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from mammoth_common.cpu import is_refused, resolve_dtype, slow_dtype_problem, warn_if_slow

Port = Annotated[int, Field(ge=1, le=65535)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Device = Literal["cpu", "gpu"]
EngineDevice = Literal["cpu", "cuda"]
DType = Literal["float32", "bfloat16", "float16"]
EngineDType = Literal["float32", "bfloat16", "float16", "auto"]  # auto: bf16 where the device runs it natively
MiB = 1024 * 1024
# diffusers AttentionBackendName values the DiT can run on (dit_worker.models.attention)
DiTAttentionBackend = Literal["native", "_native_flash", "_native_efficient", "_native_cudnn", "_native_math",
                              "flash", "flash_varlen", "_flash_3", "_flash_varlen_3", "sage", "sage_varlen",
                              "flex", "xformers", "native_varlen"]
DEFAULT_PRESET = "tiny-mammoth2"
# The embedded default serves one model of each family so every task works out of the box.
DEFAULT_MODELS = {"image": "tiny-mammoth2", "video": "tiny-mammoth25"}
ModelName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")]
Task = Literal["text_to_image", "image_edit", "text_to_video", "video_edit", "understand"]  # families.TASKS


class ConfigError(ValueError):
    """A config file that cannot be used as it is; one line per problem, each naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------------- Ray deployment parts


class AutoscalingSettings(_Section):
    """Ray Serve autoscaling. Defaults react in seconds (Serve's own: 30 s up, 600 s down)."""

    min_replicas: NonNegativeInt = 1
    max_replicas: PositiveInt = 2
    initial_replicas: NonNegativeInt | None = None
    target_ongoing_requests: PositiveFloat = 2.0
    upscale_delay_s: NonNegativeFloat = 3.0
    downscale_delay_s: NonNegativeFloat = 10.0
    look_back_period_s: PositiveFloat = 15.0

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} is above max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas: {self.initial_replicas} is outside [min_replicas, max_replicas]")
        return self


class ActorOptions(_Section):
    """Per-replica Ray resources. Fractional CPUs let many replicas share a small CPU box."""

    num_cpus: NonNegativeFloat = 0.25
    num_gpus: NonNegativeFloat = 0.0
    memory: NonNegativeInt | None = None  # bytes; Ray schedules by it, nothing enforces it
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    accelerator_type: str | None = None


class DeploymentSettings(_Section):
    """How one Ray Serve deployment is scaled and queued."""

    num_replicas: PositiveInt | None = None  # fixed count; default 1 unless autoscaling is set
    autoscaling: AutoscalingSettings | None = None
    max_ongoing_requests: PositiveInt = 8  # per replica, in flight at once
    max_queued_requests: Annotated[int, Field(ge=-1)] = 64  # per caller; -1 = unbounded; beyond: back-pressure
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    env_vars: dict[str, str] = Field(default_factory=dict)  # merged over the top-level env_vars

    @model_validator(mode="after")
    def _scaling(self) -> Self:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("num_replicas: set either num_replicas or autoscaling, not both")
        if self.autoscaling is not None and self.max_ongoing_requests < self.autoscaling.target_ongoing_requests:
            raise ValueError(
                f"max_ongoing_requests: {self.max_ongoing_requests} is below "
                f"autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests}): "
                "the deployment could never scale up"
            )
        return self

    @property
    def fixed_replicas(self) -> int | None:
        """The fixed replica count, or None when autoscaling."""
        return None if self.autoscaling is not None else (self.num_replicas or 1)


# ------------------------------------------------------------------------- stage engines


class _StageEngine(_Section):
    device: EngineDevice | None = None  # None: cuda when device is gpu, else cpu
    dtype: EngineDType | None = None  # None: bfloat16 on cuda, float32 on cpu; auto: bf16 on cpu only if native
    cpu_threads: PositiveInt | None = None  # OMP/torch threads per replica (DiT/VAE: per lane); None: library default


class _Lanes(_StageEngine):
    # batches the replica runs side by side, each in its own thread (services.stages.lanes): on a
    # CPU a forward costs what its rows cost, so spare cores run more batches, not wider ones;
    # 0: auto, one per cpu_threads (default 1) of the cores the replica may use (at most 4) on
    # CPU, one on GPU
    lanes: NonNegativeInt = 0


class PlannerEngine(_StageEngine):
    """vLLM engine arguments of the planner."""

    # CPU: kv_cache_memory_bytes, zeroed (resident) at start, so sized for the model: 0.25 GiB holds
    # ~29k tokens of the tiny fp32 planner (32 rows x ~900); GPU: kv_cache_memory_bytes if set
    kv_cache_gib: PositiveFloat | None = 0.25
    gpu_memory_utilization: Fraction = 0.85  # GPU, when kv_cache_gib is None
    tensor_parallel_size: PositiveInt = 1
    enforce_eager: bool = True  # must stay true: the planner's forward cannot be compiled (refused below)
    max_model_len: PositiveInt = 4096
    max_num_seqs: PositiveInt = 32  # rows in one batch: 16 AR-CFG requests (two rows each)
    multiprocessing: bool = False  # vLLM V1 engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING)
    # v1: hidden-state export (what the image pipeline needs); v2: Model Runner V2 (plans, no export)
    model_runner: Literal["v1", "v2"] = "v1"
    max_num_batched_tokens: PositiveInt | None = None  # None: max(8192, 2 * max_model_len)
    enable_prefix_caching: bool = True  # understanding / uncond rows; capturing requests opt out
    max_cfg_repairs: NonNegativeInt = 4  # resubmissions of an out-of-step AR-CFG pair before it fails
    admission_timeout_s: PositiveFloat = 10.0  # bound on adding both rows of a CFG pair to the engine
    negative_cache_size: NonNegativeInt = 64  # distinct negative prompts whose condition is kept (LRU)
    health_timeout_s: PositiveFloat = 10.0  # check_health: the engine core must answer within this

    @model_validator(mode="after")
    def _eager_only(self) -> Self:
        if not self.enforce_eager:
            raise ValueError(
                "planner.engine.enforce_eager: false is not supported: the planner's text model routes "
                "tokens to its generation experts by id and writes hidden states to shared memory inside "
                "forward(), which torch.compile / CUDA graphs cannot capture; keep enforce_eager: true")
        return self


class DiTParallel(_Section):
    """Expert/sequence/data-parallel DiT group (``dit_worker.parallel``): one replica = ``size``
    ranks (Ray actors in the replica's placement group, one GPU each on cuda). Applies to MoE
    (video) models; image DiTs stay single-process. ``size: 1`` keeps one process."""

    size: PositiveInt = 1
    mode: Literal["auto", "sp"] = "auto"  # auto: rows >= size -> split rows, else split sequence
    collective_timeout_s: PositiveFloat = 60.0  # a dead or hung rank fails the step after this
    placement_file: str | None = None  # expert -> rank JSON (``mammoth dit placement``); None: contiguous
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    rank_num_cpus: NonNegativeFloat = 0.25  # Ray CPUs per rank actor
    start_timeout_s: PositiveFloat = 300.0  # ranks loading their shards and joining the group


class DiTEngine(_Lanes):
    """Batched DiT engine (``dit_worker.engine``)."""

    max_batch_rows: PositiveInt = 16  # request x CFG-branch rows per forward
    max_batch_tokens: NonNegativeInt = 65536  # padded tokens (rows x longest row) per forward; 0: no limit
    mixed_shapes: bool = True  # requests of different latent sizes batch together (image DiT: one packed forward)
    max_padding: float = Field(0.5, ge=0.0, le=1.0)  # packed forward: largest padded share of a row
    batch_wait_timeout_s: NonNegativeFloat = 0.01  # how long a batch waits to fill
    parallel: DiTParallel = Field(default_factory=DiTParallel)
    # latent h*w (x frames) one request may ask for; 2.5's default 832x480x81 video is 32,760,
    # 1280x720x121 with the 16x Wan2.2 VAE 111,600
    max_latent_tokens: PositiveInt = 131072
    # diffusers attention backend of both DiTs (dit_worker.models.attention): native reaches
    # flash / memory-efficient SDPA on CUDA; native_varlen: torch's flash varlen kernel for padded
    # CFG rows (CUDA); flash_varlen / sage_varlen pack rows (flash-attn / sageattention packages)
    attention_backend: DiTAttentionBackend = "native"
    compile: bool = False  # torch.compile the DiT's repeated blocks (each new shape compiles once)


class VAEEngine(_Lanes):
    memory_budget_mb: PositiveInt = 2048  # decode/encode tile so a call stays under this
    max_batch_decodes: PositiveInt = 4  # concurrent decodes of one latent shape run as one batch
    # extra wait for company; 0: decodes that arrive while one runs join the next batch
    batch_wait_timeout_s: NonNegativeFloat = 0.0


class PlannerSettings(DeploymentSettings):
    max_ongoing_requests: PositiveInt = 16  # vLLM batches concurrent requests itself
    engine: PlannerEngine = Field(default_factory=PlannerEngine)


class DiTSettings(DeploymentSettings):
    engine: DiTEngine = Field(default_factory=DiTEngine)


class VAESettings(DeploymentSettings):
    engine: VAEEngine = Field(default_factory=VAEEngine)


# ------------------------------------------------------------------------- ingress


class RequestLimits(_Section):
    """Per-request limits enforced at the ingress, before any stage does work."""

    max_prompt_chars: PositiveInt = 4000
    max_width: PositiveInt = 2048
    max_height: PositiveInt = 2048
    max_frames: PositiveInt = 129
    max_steps: PositiveInt = 100
    max_reference_images: NonNegativeInt = 5
    max_image_bytes: PositiveInt = 20 * MiB  # one encoded input image
    max_video_bytes: PositiveInt = 200 * MiB  # one encoded input video
    max_request_bytes: PositiveInt = 256 * MiB  # a whole request message
    # Untrusted media before fitting (checked from headers first, then while decoding)
    max_input_pixels: PositiveInt = 40_000_000  # one input image (decompression bombs)
    max_input_video_frames: PositiveInt = 241
    max_input_video_seconds: PositiveFloat = 16.0
    media_decode_timeout_s: PositiveFloat = 60.0
    max_understand_tokens: PositiveInt = 2048
    max_ar_grid: PositiveInt = 64  # planner visual-token grid rows/columns
    max_guidance: PositiveFloat = 50.0  # any guidance scale (DiT and planner)
    max_fps: PositiveInt = 120
    max_messages: PositiveInt = 64  # Understand chat turns
    max_images: PositiveInt = 4  # images per prompt (OpenAI n, gRPC num_images)
    request_timeout_s: PositiveFloat = 600.0


class VideoJobSettings(_Section):
    """``/v1/videos`` jobs: one store shared by every ingress replica (a detached Ray actor)."""

    max_jobs: PositiveInt = 256  # jobs held (queued, running, finished); create beyond: 429
    max_running: PositiveInt = 16  # jobs queued or running at once; create beyond: 429
    max_bytes: PositiveInt = 1024 * MiB  # finished videos held; a job that would pass it fails
    result_ttl_s: PositiveFloat = 3600.0  # a finished job (and its video) is dropped after this
    store_name: str = Field("mammoth-video-jobs", pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # the actor's name


class IngressSettings(DeploymentSettings):
    max_ongoing_requests: PositiveInt = 32  # the ingress only awaits the stages
    max_queued_requests: Annotated[int, Field(ge=-1)] = 256
    # Requests Serve's proxy holds while it routes them to an ingress replica (beyond: Serve's own
    # plain-text 429). The ingress refuses beyond its bounds at once, so this only has to absorb a
    # burst's arrival: keep it well above the largest burst, never near max_queued_requests.
    proxy_max_queued_requests: PositiveInt = 4096
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.1))
    host: str = "0.0.0.0"
    http_port: Port = 8000
    grpc_port: Port = 9000
    auth_enabled: bool = False
    api_keys: list[str] = Field(default_factory=list, repr=False)  # prefer api_keys_env in real deployments
    api_keys_env: str | None = "MAMMOTH_API_KEYS"  # comma-separated keys read by the ingress at start
    grpc_health: bool = True  # serve grpc.health.v1.Health through the proxy (the ingress answers it)
    grpc_reflection: bool = True
    expose_stages: bool = False  # also route gRPC/HTTP to the stage apps (callers then pick the app)
    playground: bool = True  # the web playground at / (services.playground); off in the gpu default and k8s profiles
    limits: RequestLimits = Field(default_factory=RequestLimits)
    video_jobs: VideoJobSettings = Field(default_factory=VideoJobSettings)
    stage_retries: NonNegativeInt = 1  # a DiT/VAE (or not yet streaming planner) call whose replica died
    retry_wait_s: NonNegativeFloat = 30.0  # a retry waits this long for a live replica, else 503
    health_timeout_s: PositiveFloat = 5.0  # gRPC health / readiness: how long a stage may take to answer
    # task (text_to_image, image_edit, text_to_video, video_edit, understand) -> served model name
    # for requests without ``model``; unset tasks: the first model serving them (``models`` order)
    default_models: dict[Task, ModelName] = Field(default_factory=dict)
    image_url_ttl_s: PositiveFloat = 3600.0  # response_format: url -- how long /v1/images/files/{id} serves it

    @model_validator(mode="after")
    def _ingress(self) -> Self:
        if self.http_port == self.grpc_port:
            raise ValueError(f"grpc_port: {self.grpc_port} is also the http_port")
        if self.auth_enabled and not self.api_keys and not self.api_keys_env:
            raise ValueError("api_keys: auth_enabled needs api_keys or api_keys_env")
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("api_keys: empty key")
        return self


# ------------------------------------------------------------------------- model and root


class ModelSettings(_Section):
    """Which model to serve: a model directory, or a preset's directory under ``cache_dir``."""

    path: str | None = None
    preset: str | None = None
    cache_dir: str = "~/.cache/mammoth"

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.path is None) == (self.preset is None):
            raise ValueError("path: set exactly one of path or preset")
        if self.preset is not None:
            from .presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"preset: unknown {self.preset!r}; choose one of {sorted(PRESETS)}")
        return self

    def directory(self) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        return Path(self.cache_dir).expanduser() / str(self.preset)

    def family(self) -> str:
        """The model's family (``services.families``): the preset's, or a path's index's."""
        from .presets import get_preset

        if self.preset is not None:
            return get_preset(self.preset).family
        from .model_dir import read_index

        return read_index(self.directory()).family


# ------------------------------------------------------------------------- Kubernetes (KubeRay)

K8sName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")]  # DNS-1123 label


class K8sToleration(_Section):
    """A pod toleration (the Kubernetes field names)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class K8sGroup(_Section):
    """The pod shape of one KubeRay group. Unset sizes are derived from the stage's replicas."""

    cpus: PositiveInt | None = None  # Ray CPUs per pod (= request = limit); None: fits the replicas
    memory: str = Field("16Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)$")  # request = limit
    gpus: NonNegativeInt | None = None  # GPUs per pod; None: what one replica (or its placement group) needs
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[K8sToleration] | None = None  # None: the GPU taint toleration on GPU pods


class K8sModelVolume(_Section):
    """Where model directories come from inside the pods (mounted read-only)."""

    claim_name: str | None = "mammoth-models"  # a PersistentVolumeClaim; None: an emptyDir (tiny models)
    mount_path: str = "/models"


class K8sSettings(_Section):
    """How ``mammoth k8s render`` lays the pipeline out as a KubeRay RayService."""

    name: K8sName = "mammoth"
    namespace: K8sName = "default"
    image: str | None = None  # None: mammoth-serve:<version>-<cpu|gpu> (the Dockerfile's tag)
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    ray_version: str = "2.60.0"
    gpu_resource: str = "nvidia.com/gpu"
    api_keys_secret: K8sName | None = "mammoth-api-keys"  # Secret with the keys; exported as ingress.api_keys_env
    api_keys_secret_key: str = "api-keys"
    idle_timeout_s: PositiveInt = 120  # autoscaler: an idle worker pod is removed after this
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = "Default"
    termination_grace_s: PositiveInt = 90  # pod terminationGracePeriodSeconds (drain + Ray stop)
    max_unavailable: PositiveInt = 1  # PodDisruptionBudget per worker group
    operator_namespace: K8sName = "default"  # where the KubeRay operator runs (reaches the dashboard)
    model_volume: K8sModelVolume = Field(default_factory=K8sModelVolume)
    head: K8sGroup = Field(default_factory=lambda: K8sGroup(cpus=2, memory="8Gi"))
    planner: K8sGroup = Field(default_factory=lambda: K8sGroup(memory="64Gi"))
    dit: K8sGroup = Field(default_factory=lambda: K8sGroup(memory="64Gi"))
    vae: K8sGroup = Field(default_factory=lambda: K8sGroup(memory="32Gi"))


def _default_models() -> dict[str, ModelSettings]:
    return {name: ModelSettings(preset=preset) for name, preset in DEFAULT_MODELS.items()}


class ServeConfig(_Section):
    """The whole deployment. ``ServeConfig()`` is a working CPU config for the tiny preset."""

    version: Literal[1] = 1
    device: Device = "cpu"
    # Served models by name; each gets its own planner / DiT / VAE applications, several of one
    # family included. A request's ``model`` picks one; without it a task goes to
    # ingress.default_models[task], else to the first model here whose family serves the task.
    models: dict[ModelName, ModelSettings] = Field(default_factory=_default_models, min_length=1)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    dit: DiTSettings = Field(default_factory=DiTSettings)
    vae: VAESettings = Field(default_factory=VAESettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    metrics: bool = True  # request/stage metrics from the deployments (Ray's Prometheus export)
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    env_vars: dict[str, str] = Field(default_factory=dict)  # for every application
    # A CPU stage dtype without native matmuls on the replica's CPU: refuse to start, or warn and run
    cpu_dtype_policy: Literal["refuse", "warn"] = "refuse"
    # `mammoth serve` on SIGTERM/SIGINT: stop accepting, let in-flight requests finish this long
    shutdown_grace_s: NonNegativeFloat = 30.0
    # `mammoth serve`: how many models' applications start at once, in ``models`` order (the
    # ingress with the first); it serves once the first are up, the rest follow. 0: one model
    # per 4 CPUs of the Ray cluster (deploy.CPUS_PER_MODEL_START), at least 1; a RayService starts all at once
    start_models_together: NonNegativeInt = 0
    k8s: K8sSettings = Field(default_factory=K8sSettings)  # `mammoth k8s render` only

    @model_validator(mode="after")
    def _devices(self) -> Self:
        self._check_default_models()
        for stage in ("planner", "dit", "vae"):
            section: DeploymentSettings = getattr(self, stage)
            gpus = section.ray_actor_options.num_gpus
            on_cuda = self.resolved_device(stage) == "cuda"
            if on_cuda and gpus == 0:
                raise ValueError(f"{stage}.ray_actor_options.num_gpus: must be > 0 when {stage} runs on cuda "
                                 "(Ray hides GPUs from replicas that reserve none)")
            if not on_cuda and gpus > 0:
                raise ValueError(f"{stage}.ray_actor_options.num_gpus: {gpus} reserved but {stage} runs on cpu")
        if self.resolved_device("planner") == "cpu" and self.planner.engine.kv_cache_gib is None:
            raise ValueError("planner.engine.kv_cache_gib: required on cpu (vLLM would take ~90% of RAM)")
        return self

    def _check_default_models(self) -> None:
        """``ingress.default_models`` names served models, each serving its task (checked for
        preset models here; a path's family is read from its index when the ingress starts)."""
        from .families import get_family

        for task, name in self.ingress.default_models.items():
            if name not in self.models:
                raise ValueError(f"ingress.default_models.{task}: {name!r} is not a served model "
                                 f"(models: {sorted(self.models)})")
            model = self.models[name]
            if model.preset is not None and not get_family(model.family()).serves(task):
                raise ValueError(f"ingress.default_models.{task}: {name!r} ({model.preset}) does not serve {task}")

    # -- resolved engine placement

    def resolved_device(self, stage: str) -> EngineDevice:
        engine: _StageEngine = getattr(self, stage).engine
        if engine.device is not None:
            return engine.device
        return "cuda" if self.device == "gpu" else "cpu"

    def resolved_dtype(self, stage: str) -> DType:
        """The stage's dtype, checked against the CPU of the process asking (the replica's, at start)."""
        engine: _StageEngine = getattr(self, stage).engine
        device = self.resolved_device(stage)
        dtype = resolve_dtype(engine.dtype, device)
        field = f"{stage}.engine.dtype"
        if self.cpu_dtype_policy == "refuse" and is_refused(dtype, device):
            raise ConfigError(f"{field}: {slow_dtype_problem(dtype, device)}; use float32, auto or leave it unset "
                              "(or set cpu_dtype_policy: warn to run it anyway)")
        warn_if_slow(dtype, device, field)
        return dtype  # type: ignore[return-value]

    # -- construction

    @classmethod
    def default_cpu(cls, model_dir: str | Path | None = None) -> ServeConfig:
        """Fractional CPUs, one replica per stage, small vLLM KV cache: fits a 2-core box."""
        return cls(device="cpu", models=_models_for(model_dir))

    @classmethod
    def default_gpu(cls, model_dir: str | Path | None = None) -> ServeConfig:
        """One GPU each for planner and DiT, half a GPU for the VAE; DiT and VAE autoscale."""
        scale = AutoscalingSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=2)
        return cls(
            device="gpu",
            models=_models_for(model_dir),
            planner=PlannerSettings(
                max_ongoing_requests=64, ray_actor_options=ActorOptions(num_cpus=2, num_gpus=1),
                engine=PlannerEngine(kv_cache_gib=None, max_num_seqs=64, max_model_len=8192),  # eager: see PlannerEngine
            ),
            dit=DiTSettings(autoscaling=scale, max_ongoing_requests=8,
                            ray_actor_options=ActorOptions(num_cpus=2, num_gpus=1)),
            vae=VAESettings(autoscaling=scale, max_ongoing_requests=8,
                            ray_actor_options=ActorOptions(num_cpus=1, num_gpus=0.5),
                            engine=VAEEngine(memory_budget_mb=8192)),
            ingress=IngressSettings(playground=False),  # production: the API only
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> ServeConfig:
        """Validate a plain dict; errors become one ``ConfigError`` listing ``field: problem`` lines."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: invalid config\n" + format_errors(exc)) from None

    @classmethod
    def loads(cls, text: str, *, source: str = "config") -> ServeConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({exc})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        return cls.loads(text, source=str(path))

    @classmethod
    def from_app_args(cls, args: dict[str, Any]) -> ServeConfig:
        """Rebuild the config inside a Ray Serve application builder (``app(args)``)."""
        if "config" not in args:
            raise ConfigError("application args: missing 'config' (render with services.render)")
        return cls.from_dict(args["config"], source="application args")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def dump(self, path: str | Path | None = None) -> str:
        """YAML text of the full config (every default spelled out); also written to ``path``."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def _models_for(model_dir: str | Path | None) -> dict[str, ModelSettings]:
    return _default_models() if model_dir is None else {"main": ModelSettings(path=str(model_dir))}


_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.*)$", re.S)


def format_errors(exc: ValidationError) -> str:
    """One ``  dotted.field: message`` line per error.

    Section-level checks report ``field: message`` from inside the section; the section's own
    location is prefixed so every line carries the full dotted path.
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and (m := _FIELD_PREFIX.match(msg)):
            loc = f"{loc}.{m.group(1)}" if loc else m.group(1)
            msg = m.group(2)
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)
