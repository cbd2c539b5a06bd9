"""The batched DiT engine: several requests denoise together, of one or of mixed latent sizes.

Per request, once: validation, the guidance chain, the model's timestep-independent
``prepare`` (condition encoders, refiners, reference tokens), the seeded initial noise and its
own scheduler. Per step, one forward over every active branch of every active request (CFG
branches batched, not sequential), then each request combines its branches and steps its own
scheduler. Requests may have different step counts or schedules; a finished or aborted request
leaves the batch (and is handed over at once), and a new request of the same latent shape may
join at any step boundary (continuous batching). Noise comes from a per-request CPU generator,
so a request gives the same output alone or in any batch.

Mixed sizes (``mixed_shapes``): requests of different latent sizes share the batch. A model with
``supports_packing`` (the image DiT) steps them in one forward, image tokens padded to the
longest row and masked, per-row RoPE; others (the video DiT) get one forward per latent shape
within the same step. Forwards are cut request-aligned under ``max_batch_rows``, a padded token
budget ``max_batch_tokens`` (rows x longest row) and ``max_padding``, largest requests first, so
a small request steps at every step of a big batch instead of waiting for it to end.

Step cache (``dit_worker.step_cache``): per request, off unless its ``step_cache.threshold`` > 0;
the result reports computed vs cached steps.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mammoth_common.cpu import engine_dtype

from .checkpoint import CONFIG_NAME, CheckpointError, load_state_into
from .families import Family, condition_to, config_class_for, family_for
from .guidance import GuidanceChain, combine
from .models.attention import set_attention_backend
from .models.compilation import compile_repeated_blocks
from .requests import ImageDenoiseRequest, VideoDenoiseRequest
from .sampling import FlowMatchSampler
from .step_cache import ForwardCache, RequestCache

DenoiseRequest = ImageDenoiseRequest | VideoDenoiseRequest

# progress(request_id, step_done (1-based), num_steps, latents) after every step.
ProgressFn = Callable[[str, int, int, torch.Tensor], None]
# on_done(result) as soon as a request finishes or is aborted, before the rest of the batch.
DoneFn = Callable[["DenoiseOutput | RequestAborted"], None]
# admit(free_slots) at every step boundary: requests of the batch's latent shape that join now.
AdmitFn = Callable[[int], Sequence["DenoiseRequest"]]


class RequestAborted(Exception):
    """Raised for a request whose abort was requested while it was denoising."""

    @property
    def request_id(self) -> str:
        return str(self.args[0])


@dataclass
class DiTEngineConfig:
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_rows: int = 16  # rows (request x CFG branch) per forward; larger cohorts are chunked
    max_batch_tokens: int = 65536  # padded tokens (rows x longest row) per forward; 0: no limit
    mixed_shapes: bool = True  # requests of different latent sizes batch together
    # packed forwards: the largest share of a row that may be padding; a shorter row gets its own
    # forward in the same step (on CPU padding costs what it pads; 1.0: pack every size)
    max_padding: float = 0.5
    max_latent_tokens: int = 131072  # latent h*w (x frames) a single request may ask for
    max_ref_images: int = 5
    attention_backend: str = "native"  # diffusers attention backend name (models.attention)
    compile: bool = False  # torch.compile the repeated transformer blocks


@dataclass
class DenoiseOutput:
    request_id: str
    latents: torch.Tensor
    steps: int
    seconds: float
    forward_rows: int  # model rows this request cost (steps x active branches)
    computed_steps: int = 0  # steps whose transformer blocks ran (step cache)
    cached_steps: int = 0  # steps that reused the cached residual


@dataclass
class _Active:
    request: DenoiseRequest
    chain: GuidanceChain
    sampler: FlowMatchSampler
    latents: torch.Tensor
    branches: list[Any]  # the chain's conditions on the engine's device
    row_offset: int
    cache: RequestCache
    shape: tuple[int, ...]
    tokens: int = 0  # generated (patch) tokens of one row
    prefix_lens: list[int] = field(default_factory=list)  # condition tokens of each branch's row
    started: float = field(default_factory=time.perf_counter)
    forward_rows: int = 0


class DiTEngine:
    """Denoises batches of requests on one model; thread-safe ``abort`` from other threads."""

    def __init__(self, model: torch.nn.Module, family: Family, config: DiTEngineConfig | None = None):
        self.config = config or DiTEngineConfig()
        self.device = torch.device(self.config.device)
        self.dtype = getattr(torch, engine_dtype(self.config.dtype, self.config.device, "DiTEngineConfig.dtype"))
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        set_attention_backend(self.model, self.config.attention_backend, self.device)
        if self.config.compile:
            compile_repeated_blocks(self.model)
        self.family = family
        self.latent_channels = int(model.config.in_channels)
        self._aborted: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: DiTEngineConfig | None = None) -> DiTEngine:
        """Load ``<model>/dit`` (config.json + safetensors); the family comes from ``_class_name``."""
        config = config or DiTEngineConfig()
        directory = Path(directory)
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"missing {CONFIG_NAME} in {directory}")
        data = json.loads(path.read_text())  # read once: _class_name picks the family
        model_config = config_class_for(data.get("_class_name", "")).from_dict(data)
        family = family_for(model_config, directory)
        with torch.device("meta"):
            model = family.model_cls(model_config)
        load_state_into(model, directory, device=config.device,
                        dtype=getattr(torch, engine_dtype(config.dtype, config.device, "DiTEngineConfig.dtype")))
        return cls(model.eval(), family, config)

    # -- control ---------------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def _take_abort(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._aborted:
                self._aborted.discard(request_id)
                return True
            return False

    def expert_load(self) -> dict[str, list[int]]:
        """Per-layer expert token counts of the last forward (MoE models), for load metrics."""
        counts = getattr(self.model, "expert_counts", None)
        return counts() if callable(counts) else {}

    # -- denoising -------------------------------------------------------------------------
    def validate(self, request: DenoiseRequest) -> None:
        """Raise ValueError naming the offending field; never touches the model."""
        if not isinstance(request, self.family.request_cls):
            raise ValueError(f"request: this engine serves {self.family.name} requests, got {type(request).__name__}")
        if isinstance(request, ImageDenoiseRequest):
            request.validate(max_ref_images=self.config.max_ref_images)
        else:
            request.validate(glyph_dim=self.family.glyph_dim(self.model.config))
        shape = self.family.latent_shape(request, self.latent_channels)
        tokens = 1
        for dim in shape[1:]:
            tokens *= dim
        if tokens > self.config.max_latent_tokens:
            raise ValueError(f"size: {tokens} latent positions exceed the limit {self.config.max_latent_tokens}")

    def generate(self, requests: Sequence[DenoiseRequest], progress: ProgressFn | None = None, *,
                 on_done: DoneFn | None = None, admit: AdmitFn | None = None,
                 max_requests: int | None = None) -> list[DenoiseOutput | RequestAborted]:
        """Denoise ``requests`` together; aborted ones come back as ``RequestAborted``.

        Continuous batching: with ``admit``, requests (of the batch's latent shape unless
        ``mixed_shapes``) join at step
        boundaries (up to ``max_requests`` at once) instead of waiting for the batch to end;
        ``on_done`` hands each result over the moment it is ready. Returns every result, the
        joined requests' after the first ones, in admission order."""
        if not requests:
            return []
        for request in requests:
            self.validate(request)
        shapes = {self.family.latent_shape(r, self.latent_channels) for r in requests}
        if len(shapes) != 1 and not self.config.mixed_shapes:
            raise ValueError(f"a batch needs one latent shape, got {sorted(shapes)}")
        shape = next(iter(shapes))
        capacity = max(max_requests or len(requests), len(requests))
        admitted = list(requests)
        active = self._admit(requests)
        prepared = self._prepare(active)
        results: dict[str, DenoiseOutput | RequestAborted] = {}
        try:
            while active:
                if admit is not None and len(active) < capacity:
                    joining = list(admit(capacity - len(active)))
                    for request in joining:
                        self.validate(request)
                        if not self.config.mixed_shapes and \
                                self.family.latent_shape(request, self.latent_channels) != shape:
                            raise ValueError(f"a joining request must have the batch's latent shape {shape}")
                    if joining:
                        admitted.extend(joining)
                        active = active + self._admit(joining)
                        prepared = self._prepare(active)  # timestep-independent: redone only on a join
                done = len(results)
                active = self._step(active, prepared, results, progress)
                if on_done is not None:
                    for result in list(results.values())[done:]:
                        on_done(result)
        finally:
            with self._lock:  # an abort that raced with completion must not linger
                self._aborted.difference_update(r.request_id for r in admitted)
        return [results[r.request_id] for r in admitted]

    @torch.inference_mode()
    def _admit(self, requests: Sequence[DenoiseRequest]) -> list[_Active]:
        active: list[_Active] = []
        for request in requests:
            chain = self.family.chain(request)
            shape = self.family.latent_shape(request, self.latent_channels)
            generator = torch.Generator(device="cpu").manual_seed(request.sampling.seed)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            latent_dtype = self.family.latent_dtype or self.dtype
            patch = self._patch_volume()
            active.append(_Active(request, chain, self.family.sampler(request), noise.to(self.device, latent_dtype),
                                  [self._to_device(b) for b in chain.branches], row_offset=0,
                                  cache=RequestCache(request.sampling.step_cache), shape=shape,
                                  tokens=max(1, math.prod(shape[1:]) // patch)))
        return active

    def _patch_volume(self) -> int:
        patch = getattr(self.model.config, "patch_size", 1)
        return math.prod(patch) if isinstance(patch, list | tuple) else int(patch) ** 2

    @torch.inference_mode()
    def _prepare(self, active: list[_Active]) -> Any:
        """Condition encoders over every branch of ``active``; sets each request's first row."""
        branches: list[Any] = []
        for item in active:
            item.row_offset = len(branches)
            branches.extend(item.branches)
        prepared = self.model.prepare(branches)
        lens = _prefix_lengths(prepared)  # read back once per (re)prepare, not per step
        for item in active:
            item.prefix_lens = lens[item.row_offset:item.row_offset + len(item.branches)]
        return prepared

    def _to_device(self, condition: Any) -> Any:
        return condition_to(condition, self.device, self.dtype)

    @torch.inference_mode()
    def _step(self, active: list[_Active], prepared: Any, results: dict, progress: ProgressFn | None) -> list[_Active]:
        still: list[_Active] = []
        for item in active:
            if self._take_abort(item.request.request_id):
                results[item.request.request_id] = RequestAborted(item.request.request_id)
            else:
                still.append(item)
        if not still:
            return []
        plan: list[tuple[_Active, list[int], list[float]]] = []
        for item in still:
            step, num_steps = item.sampler.step_index, item.sampler.num_steps
            item.cache.begin_step(step, num_steps)
            plan.append((item, item.chain.active_branches(step, num_steps), item.chain.active_scales(step, num_steps)))
        outputs = self._forward_plan(plan, prepared)
        next_active: list[_Active] = []
        for item, branch_ids, scales in plan:
            velocity = combine(outputs[id(item)], scales)
            item.latents = item.sampler.step(velocity, item.latents)
            item.forward_rows += len(branch_ids)
            item.cache.end_step()
            if progress is not None:
                progress(item.request.request_id, item.sampler.step_index, item.sampler.num_steps, item.latents)
            if item.sampler.done:
                results[item.request.request_id] = DenoiseOutput(
                    item.request.request_id, item.latents, item.sampler.num_steps,
                    time.perf_counter() - item.started, item.forward_rows,
                    computed_steps=item.cache.computed, cached_steps=item.cache.cached)
            else:
                next_active.append(item)
        return next_active

    def _chunks(self, plan: list[tuple[_Active, list[int], list[float]]]) -> list[list[tuple[_Active, list[int],
                                                                                      list[float]]]]:
        """Request-aligned forwards: one per latent shape unless the model packs sizes, each cut
        under the row limit and the padded token budget, largest requests first."""
        packs = self.config.mixed_shapes and getattr(self.model, "supports_packing", False)
        groups: dict[Any, list] = {}
        for entry in plan:
            groups.setdefault(None if packs else entry[0].shape, []).append(entry)
        rows_limit, token_limit = self.config.max_batch_rows, self.config.max_batch_tokens
        chunks: list[list] = []
        for entries in groups.values():
            if packs and len({e[0].shape for e in entries}) > 1:
                entries = sorted(entries, key=lambda e: -e[0].tokens)
            chunk: list = []
            rows = longest = most = 0  # most: the chunk's largest generated-token count
            for entry in entries:
                item, branch_ids, _ = entry
                n = len(branch_ids)
                length = item.tokens + max((item.prefix_lens[b] for b in branch_ids), default=0)
                new_rows, new_longest = rows + n, max(longest, length)
                over = new_rows > rows_limit or (token_limit and new_rows * new_longest > token_limit) \
                    or item.tokens < (1.0 - self.config.max_padding) * most
                if chunk and over:
                    chunks.append(chunk)
                    chunk, new_rows, new_longest, most = [], n, length, 0
                chunk.append(entry)
                rows, longest, most = new_rows, new_longest, max(most, item.tokens)
            if chunk:
                chunks.append(chunk)
        return chunks

    def _forward_plan(self, plan: list[tuple[_Active, list[int], list[float]]], prepared: Any) -> dict[int, list]:
        """Every active branch's prediction, by request (``id(item)``), in branch order."""
        can_cache = getattr(self.model, "supports_step_cache", False)
        outputs: dict[int, list] = {}
        for chunk in self._chunks(plan):
            rows: list[int] = []
            latents: list[torch.Tensor] = []
            timesteps: list[float] = []
            cache_rows = []
            for item, branch_ids, _ in chunk:
                rows.extend(item.row_offset + b for b in branch_ids)
                latents.extend([item.latents.to(self.dtype)] * len(branch_ids))  # model input; latents keep theirs
                timesteps.extend([item.sampler.model_timestep()] * len(branch_ids))
                cache_rows.extend((item.cache, b) for b in branch_ids)
            use_cache = can_cache and any(item.cache.params.enabled for item, _, _ in chunk)
            uniform = len({item.shape for item, _, _ in chunk}) == 1
            out = self._forward(torch.stack(latents) if uniform else latents,
                                torch.tensor(timesteps, dtype=torch.float32), prepared, rows,
                                ForwardCache(cache_rows) if use_cache else None)
            cursor = 0
            for item, branch_ids, _ in chunk:
                outputs[id(item)] = list(out[cursor:cursor + len(branch_ids)])
                cursor += len(branch_ids)
        return outputs

    def _forward(self, latents: torch.Tensor | list[torch.Tensor], timesteps: torch.Tensor, prepared: Any,
                 rows: list[int], step_cache: ForwardCache | None = None) -> torch.Tensor | list[torch.Tensor]:
        timesteps = timesteps.to(self.device, torch.float32)  # bf16 would round 937.5 to 936
        kwargs = {} if step_cache is None else {"step_cache": step_cache}
        if rows != list(range(prepared.batch_size)):
            prepared = prepared.select(rows)
        return self.model(latents, timesteps, prepared, **kwargs)


def _prefix_lengths(prepared: Any) -> list[int]:
    """Condition tokens in front of each prepared row (host-side), for the token budget."""
    lens = getattr(prepared, "extra_lens", None)
    if lens is not None:
        return list(lens)
    mask = getattr(prepared, "prefix_mask", None)
    if mask is not None:
        return mask.sum(1).tolist()
    return [0] * prepared.batch_size
