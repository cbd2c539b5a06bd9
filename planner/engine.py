"""Async planner engine on vLLM's ``AsyncLLM``: planning, prompt encoding, understanding.

Hidden states leave the engine through one POSIX shared-memory block per request (created,
checked and unlinked here, written by the model in the worker; see ``runtime``), never through
files or a second LLM pass; every row read must have been written exactly once.

AR-CFG runs the conditional and unconditional sequences as two requests in the same vLLM batch;
the logits processor (``logits`` for Model Runner V1, ``logits_v2`` for V2, both on
``guidance``) pairs them and samples once for both. The engine core's scheduler
(``scheduler.PairScheduler``) holds the first row of a pair until its partner arrives and queues
both together, so they start in the same step while every other request keeps running (no
engine-wide pause), and the engine never puts more sequences in flight than ``max_num_seqs``
so a pair is never cut by it. A pair that still
falls out of step (preemption, chunked prefill) stops at the first position it could not guide
and is resubmitted with its guided prefix in both prompts (``max_cfg_repairs`` times), or fails
with ``GuidanceError``; ``stats`` counts each.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammoth_common.cpu import engine_dtype
from mammoth_common.dataclass_config import DataclassConfig

from . import visual_refs
from .presets import DEFAULT_CONDITION_LAYERS
from .runtime import EXTRA_KEY, block_bytes, block_views
from .sizing import SCHEDULER_CLS, kv_cache_bytes, mm_dummy_options
from .tokens import TokenLayout

logger = logging.getLogger(__name__)


PROCESSORS = {  # model runner -> the logits processor implementing its interface
    "v1": "planner.logits:MammothLogitsProcessor",
    "v2": "planner.logits_v2:MammothLogitsProcessorV2",
}
EAGER_ONLY = (
    "enforce_eager=False is not supported by the planner: its text model routes tokens to the "
    "generation experts by id, reads the batch layout and writes hidden states to shared memory "
    "inside forward(), which torch.compile / CUDA graphs cannot capture; set enforce_eager: true"
)


class GuidanceError(RuntimeError):
    """An AR-CFG pair fell out of step and could not be repaired (no unguided image is returned)."""


class ExportError(RuntimeError):
    """The hidden-state export of a request is incomplete (rows never written)."""


@dataclass
class PlannerConfig(DataclassConfig):
    """Engine settings (CPU: KV-cache GiB + threads; GPU: memory fraction + TP)."""

    model: str = ""
    device: str = "cpu"  # "cpu" or "cuda"
    mode: str = "mammoth2"  # "mammoth2" (planning) or "mammoth25" (prompt encoder only)
    dtype: str = "auto"
    max_model_len: int = 4096
    max_num_seqs: int = 32  # rows: 16 AR-CFG requests (two rows each) in one batch
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True  # must stay True (EAGER_ONLY)
    # "v1": hidden-state export + grid-only logits; "v2" (vLLM's default on GPU): planning and
    # AR-CFG, no hidden-state export (requests that need it are refused).
    model_runner: str = "v1"
    enable_prefix_caching: bool = True  # capturing requests opt out per request
    block_size: int | None = None  # KV block size (None: vLLM's default)
    num_kv_blocks: int | None = None  # override the KV-cache block count (tests: force preemption)
    # CPU: the KV cache is allocated (and zeroed, so resident) at start: size it for the model
    kv_cache_gib: float = 0.25  # -> kv_cache_memory_bytes (fractions allowed)
    cpu_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND ("auto", "0-3", "nobind")
    disable_multiprocessing: bool = True  # VLLM_ENABLE_V1_MULTIPROCESSING=0
    # GPU
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    # serving behaviour
    max_cfg_repairs: int = 4  # resubmissions of a desynchronised AR-CFG pair before it fails
    admission_timeout_s: float = 10.0  # bound on the scheduler pause that admits a pair
    negative_cache_size: int = 64  # distinct negative prompts whose condition is kept (LRU)
    health_timeout_s: float = 10.0  # check_health: the engine core must answer within this
    # model behaviour
    condition_layers: tuple[int, ...] = tuple(DEFAULT_CONDITION_LAYERS)
    uncond_prompt_tokens: int = 10  # official: the CFG branch keeps only the last 10 prompt tokens
    text_condition_with_answer: bool = False  # official ``gen_text_condition_with_answer``
    system_prompt: str = "You are a helpful image generator."
    prompt_max_length: int = 512  # 2.5 prompt-encoder length (padding is the DiT's job)
    limit_images: int = 5
    limit_videos: int = 1
    mm_processor_cache_gib: float = 0.25  # vLLM's processed-media LRU, held by frontend and core each

    def __post_init__(self) -> None:
        if not self.enforce_eager:
            raise ValueError(EAGER_ONLY)
        if self.model_runner not in PROCESSORS:
            raise ValueError(f"model_runner must be one of {sorted(PROCESSORS)}, got {self.model_runner!r}")
        for name in ("max_cfg_repairs", "negative_cache_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("admission_timeout_s", "health_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    def engine_args(self) -> dict[str, Any]:
        """vLLM engine arguments. The multi-modal warm-up and profiling inputs are bounded by the
        checkpoint's own processor limits (``sizing.mm_dummy_options``)."""
        limits = mm_dummy_options(self.model, {"image": self.limit_images, "video": self.limit_videos})
        args: dict[str, Any] = dict(
            model=self.model,
            dtype=engine_dtype(self.dtype, "cpu", "PlannerConfig.dtype") if self.device == "cpu" else self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            limit_mm_per_prompt=limits,
            mm_processor_cache_gb=self.mm_processor_cache_gib,
            tensor_parallel_size=self.tensor_parallel_size,
            async_scheduling=False,
            disable_log_stats=True,
            scheduler_cls=SCHEDULER_CLS,
        )
        # Whole prompts usually fit one step (pairs then start together); smaller budgets chunk
        # prefills, which the pair repair handles.
        args["max_num_batched_tokens"] = self.max_num_batched_tokens or max(8192, 2 * self.max_model_len)
        if self.block_size:
            args["block_size"] = self.block_size
        if self.num_kv_blocks:
            args["num_gpu_blocks_override"] = self.num_kv_blocks
        if self.device != "cpu":
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            args["kv_cache_memory_bytes"] = kv_cache_bytes(self.kv_cache_gib)
        return args

    def apply_env(self) -> None:
        """vLLM reads these from the environment of the processes it starts."""
        if self.device == "cpu":
            # The legacy whole-GiB variable would override kv_cache_memory_bytes (engine_args).
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            if self.cpu_threads_bind:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_threads_bind
        if self.disable_multiprocessing:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if self.model_runner == "v2" else "0"


@dataclass
class PlanResult:
    visual_token_ids: torch.Tensor  # [ar_height * (ar_width + 1)], EOL at each row end
    text_condition: torch.Tensor  # [Lt, D] float32
    image_condition: torch.Tensor  # [Li, D] float32
    negative_condition: torch.Tensor | None  # [Ln, D] float32
    prompt_token_ids: list[int]
    ar_height: int
    ar_width: int
    timings: dict[str, float] = field(default_factory=dict)
    token_counts: dict[str, int] = field(default_factory=dict)

    def codes(self, visual_start: int) -> torch.Tensor:
        """[H, W] visual codebook indices (EOL columns dropped)."""
        grid = self.visual_token_ids.view(self.ar_height, self.ar_width + 1)[:, : self.ar_width]
        return grid - visual_start


BLOCK_PREFIX = "mammoth-hs"  # /dev/shm/mammoth-hs-<owner pid>-<random>
SHM_DIR = Path("/dev/shm")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def sweep_orphaned_blocks(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink hidden-state blocks whose owning engine process is gone.

    A SIGKILLed planner cannot unlink its own blocks, and its resource tracker dies with it (Ray
    kills a dead worker's children), so the next engine on the node sweeps them at start. Blocks
    of live engines (another replica on the same node) are left alone.
    """
    swept = []
    for path in shm_dir.glob(f"{BLOCK_PREFIX}-*-*"):
        owner = path.name[len(BLOCK_PREFIX) + 1:].split("-", 1)[0]
        if owner.isdigit() and not _pid_alive(int(owner)):
            try:
                path.unlink()
                swept.append(path.name)
            except FileNotFoundError:
                pass
    if swept:
        logger.warning("unlinked %d hidden-state blocks left by dead planner processes", len(swept))
    return swept


class _SharedRows:
    """A [rows, dim] float32 block (+ per-row write counts) in POSIX shared memory, owned here.

    Its name carries the owner's pid so a later engine can tell an orphan (``sweep_orphaned_blocks``).
    """

    def __init__(self, rows: int, dim: int):
        self.rows, self.dim = rows, dim
        self.shm = shared_memory.SharedMemory(name=f"{BLOCK_PREFIX}-{os.getpid()}-{secrets.token_hex(8)}",
                                              create=True, size=block_bytes(rows, dim))
        self.name = self.shm.name
        _, counts = block_views(self.shm.buf, rows, dim)
        counts[:] = 0
        del counts

    def read(self, n: int) -> torch.Tensor:
        """Rows ``[0, n)``, each of which must have been written exactly once."""
        data, counts = block_views(self.shm.buf, self.rows, self.dim)
        try:
            bad = np.flatnonzero(counts[:n] != 1)
            if n > self.rows or bad.size:
                raise ExportError(
                    f"hidden-state export incomplete: {bad.size + max(n - self.rows, 0)} of {n} rows not written "
                    f"exactly once (first: {bad[:8].tolist()})")
            return data[:n].clone()
        finally:
            del data, counts

    def written_prefix(self) -> int:
        """How many leading rows are written (a repaired attempt may read those from the cache)."""
        _, counts = block_views(self.shm.buf, self.rows, self.dim)
        try:
            unwritten = np.flatnonzero(counts != 1)
            return int(unwritten[0]) if unwritten.size else self.rows
        finally:
            del counts

    def free(self) -> None:
        if self.shm is None:
            return
        try:
            self.shm.close()
        finally:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
            self.shm = None


class _SeqSlots:
    """Sequences in flight, at most ``max_num_seqs``: vLLM's scheduler then never has to leave
    one member of an AR-CFG pair waiting for a free sequence slot. Acquire is all-or-nothing."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free = capacity
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(f"a request needing {n} sequences cannot run with max_num_seqs={self.capacity}")
        async with self._cond:
            await self._cond.wait_for(lambda: self.free >= n)
            self.free -= n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.free += n
            self._cond.notify_all()


class _Slot:
    def __init__(self, slots: _SeqSlots, n: int):
        self.slots, self.n = slots, n

    async def __aenter__(self):
        await self.slots.acquire(self.n)
        return self

    async def __aexit__(self, *exc):
        await asyncio.shield(self.slots.release(self.n))


def _clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class PlannerEngine:
    def __init__(self, config: PlannerConfig):
        self.config = config
        self.llm = None
        self.tokenizer = None
        self.vllm_config = None
        self._ids = itertools.count()
        self._neg_cache: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()
        self._slots = _SeqSlots(config.max_num_seqs)
        self._live_blocks: set[_SharedRows] = set()
        self.hidden_size = 0
        self.layout = TokenLayout()
        self.num_layers = 0
        # cfg_desyncs: pairs that fell out of step; cfg_repairs: resubmissions; cfg_failures:
        # requests failed with GuidanceError; export_errors: incomplete hidden-state exports.
        self.stats: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> PlannerEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        cfg.apply_env()
        if SHM_DIR.is_dir():
            sweep_orphaned_blocks()
        import json

        hf = json.loads((Path(cfg.model) / "config.json").read_text())
        text = hf.get("text_config", hf)
        self.hidden_size = int(text["hidden_size"])
        self.num_layers = int(text["num_hidden_layers"])
        self.layout = TokenLayout.from_checkpoint(cfg.model)  # ids from t2i_generation_config.json
        args = AsyncEngineArgs(**cfg.engine_args())

        def build():
            vllm_config = args.create_engine_config()
            # The processor must implement the interface of the runner vLLM actually picked.
            runner = "v2" if vllm_config.use_v2_model_runner else "v1"
            vllm_config.model_config.logits_processors = [PROCESSORS[runner]]
            return vllm_config, AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True)

        # Building the engine blocks for tens of seconds: keep the event loop free.
        self.vllm_config, self.llm = await asyncio.to_thread(build)
        self.tokenizer = self.llm.tokenizer
        return self

    @property
    def model_runner(self) -> str:
        return "v2" if self.vllm_config is not None and self.vllm_config.use_v2_model_runner else "v1"

    def _check_export(self) -> None:
        if self.model_runner != "v1":
            raise ExportError("hidden-state export needs Model Runner V1 (planner engine model_runner: v1)")

    async def check_health(self) -> None:
        """Raise unless the vLLM engine is alive and its core answers within ``health_timeout_s``."""
        if self.llm is None:
            raise RuntimeError("planner engine is not running")
        await self.llm.check_health()  # EngineDeadError once the engine core has died
        try:
            await asyncio.wait_for(self.llm.engine_core.is_sleeping_async(), self.config.health_timeout_s)
        except TimeoutError as exc:
            raise RuntimeError(f"planner engine core did not answer within {self.config.health_timeout_s}s") from exc

    async def shutdown(self) -> None:
        for block in list(self._live_blocks):
            block.free()
        self._live_blocks.clear()
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ prompts
    def t2i_prompt(self, prompt: str, ar_height: int, ar_width: int, n_images: int = 0, n_coded: int = 0) -> str:
        """``n_images`` references shown to the ViT; ``n_coded`` written as MammothTok visual tokens
        (one ``<|gen_placeholder|>`` each here, spliced by ``visual_refs.splice_references``)."""
        content: list[dict] = [{"type": "image"} for _ in range(n_images)]
        content += [{"type": "text", "text": visual_refs.PLACEHOLDER} for _ in range(n_coded)]
        content.append({"type": "text", "text": prompt})
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.config.system_prompt}]},
            {"role": "user", "content": content},
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{text}<|image start|>{ar_height}*{ar_width}<|image token|>"

    def negative_prompt_text(self, negative: str) -> str:
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.config.system_prompt}]},
            {"role": "user", "content": [{"type": "text", "text": negative}]},
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ requests
    def _params(self, max_tokens: int, spec: dict | None, **kw):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=kw.pop("temperature", 0.0),
            ignore_eos=kw.pop("ignore_eos", True),
            detokenize=kw.pop("detokenize", False),
            output_kind=kw.pop("output_kind", RequestOutputKind.FINAL_ONLY),
            extra_args={EXTRA_KEY: spec} if spec else None,
            **kw,
        )

    async def _run_to_end(self, collector) -> Any:
        out = None
        while out is None or not out.finished:
            out = collector.get_nowait() or await collector.get()
        return out

    async def _capture(self, prompt: Any, layers: Sequence[int], n_prompt_hint: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of every prompt token (averaged over ``layers``) from one prefill."""
        self._check_export()
        rows = self.config.max_model_len
        block = _SharedRows(rows, self.hidden_size)
        self._live_blocks.add(block)
        rid = self._new_id("capture")
        spec = {"kind": "capture", "shm": block.name, "shm_rows": rows, "hidden": self.hidden_size,
                "layers": list(layers), "owner_pid": os.getpid()}
        try:
            async with _Slot(self._slots, 1):
                # Every prompt row must be computed to be captured: no prefix-cache reads.
                collector = await self.llm.add_request(rid, prompt, self._params(1, spec, skip_reading_prefix_cache=True))
                try:
                    out = await self._run_to_end(collector)
                except asyncio.CancelledError:
                    await asyncio.shield(self.llm.abort(rid))
                    raise
            ids = list(out.prompt_token_ids)
            return self._read(block, len(ids)), ids
        finally:
            block.free()
            self._live_blocks.discard(block)

    def _read(self, block: _SharedRows, n: int) -> torch.Tensor:
        try:
            return block.read(n)
        except ExportError:
            self.stats["export_errors"] += 1
            raise

    async def negative_condition(self, negative_prompt: str) -> torch.Tensor:
        """Averaged condition layers over ALL tokens of the negative prompt; once per distinct
        text, the last ``negative_cache_size`` distinct texts kept (LRU)."""
        fut = self._neg_cache.get(negative_prompt)
        if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
            prompt = {"prompt_token_ids": self._encode(self.negative_prompt_text(negative_prompt))}
            fut = asyncio.ensure_future(self._capture(prompt, self.config.condition_layers))
            self._neg_cache[negative_prompt] = fut
            while len(self._neg_cache) > self.config.negative_cache_size:
                self._neg_cache.popitem(last=False)
        else:
            self._neg_cache.move_to_end(negative_prompt)
        hidden, _ = await asyncio.shield(fut)
        return hidden

    def negative_cache_len(self) -> int:
        return len(self._neg_cache)

    async def plan_image(
        self,
        prompt: str,
        *,
        ar_height: int = 32,
        ar_width: int = 32,
        cfg_scale: float = 7.0,
        seed: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        reference_images: Sequence[Any] = (),
        reference_codes: Sequence[Any] = (),
        negative_prompt: str | None = None,
        export_hidden: bool = True,
    ) -> PlanResult:
        """Plan ``ar_height x (ar_width + 1)`` visual tokens and export the DiT conditions.

        Edit references come either as images (``reference_images``: shown to the ViT) or as
        MammothTok code grids (``reference_codes``, int ``[rows, cols]`` each: written into the
        prompt as visual tokens, the official edit prompt; no pixels reach the model, so the
        conditions captured in this pass are the official recompute without pixel values).
        ``export_hidden=False`` skips the hidden-state export (the conditions are zeros); it
        exists to measure the export's cost."""
        if self.config.mode != "mammoth2":
            raise RuntimeError("plan_image needs a MammothModa2 planner (mode='mammoth2')")
        if export_hidden:
            self._check_export()
        t0 = time.perf_counter()
        lay = self.layout
        seed = int(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        if reference_images and reference_codes:
            raise ValueError("reference_codes: give the references as images or as codes, not both")
        text = self.t2i_prompt(prompt, ar_height, ar_width, len(reference_images), len(reference_codes))
        text_ids = self._encode(text)
        if reference_codes:
            text_ids = visual_refs.splice_references(text_ids, reference_codes, lay, self._encode)
        n_uncond = self.config.uncond_prompt_tokens
        grid_len = ar_height * (ar_width + 1)
        if len(text_ids) + grid_len + 2 > self.config.max_model_len:
            # with coded references their visual tokens dominate: name them, not the prompt text
            what = "reference_images: the prompt with the references' visual tokens" if reference_codes else "prompt"
            raise ValueError(f"{what} ({len(text_ids)} tokens) + {grid_len} planned tokens exceed "
                             f"max_model_len={self.config.max_model_len}")
        use_cfg = cfg_scale > 1.0
        if use_cfg and self.config.max_num_seqs < 2:
            raise ValueError("cfg_scale > 1 needs max_num_seqs >= 2 (the pair runs as two sequences)")
        neg_task = (
            asyncio.ensure_future(self.negative_condition(negative_prompt)) if negative_prompt is not None else None
        )
        rows = self.config.max_model_len
        block = _SharedRows(rows, self.hidden_size) if export_hidden else None
        if block is not None:
            self._live_blocks.add(block)
        base = {
            "kind": "plan", "ar_height": ar_height, "ar_width": ar_width,
            "cfg_scale": float(cfg_scale), "seed": seed, "temperature": float(temperature),
            "top_k": int(top_k), "top_p": float(top_p), "eol_id": lay.eol_id,
            "image_end_id": lay.image_end_id, "visual_start": lay.visual_start_id,
            "num_visual": lay.num_visual_codes, "stop_id": lay.endoftext_id,
        }
        capture = {"shm": block.name, "shm_rows": rows, "hidden": self.hidden_size,
                   "layers": list(self.config.condition_layers), "owner_pid": os.getpid()} if block else {}
        guided: list[int] = []  # tokens chosen with guidance by earlier (desynchronised) attempts
        prompt_rows = 0
        held = 0  # sequence slots this plan holds
        try:
            for attempt in itertools.count():
                # A repair runs alone (all slots, taken after releasing ours: no deadlock), so
                # no other request's prefill or decode takes the step budget its pair needs.
                want = self._slots.capacity if attempt > 0 and use_cfg else (2 if use_cfg else 1)
                if want != held:
                    if held:
                        await self._slots.release(held)
                        held = 0
                    await self._slots.acquire(want)
                    held = want
                if reference_images:
                    # Multimodal prompts restart from scratch (the processor expands them anew).
                    guided = []
                    cond_prompt: Any = {"prompt": text, "multi_modal_data": {"image": list(reference_images)}}
                else:
                    cond_prompt = {"prompt_token_ids": text_ids + guided}
                uncond_prompt = {"prompt_token_ids": text_ids[-n_uncond:] + guided} if use_cfg else None
                spec = {**base, "pair": self._new_id("plan"), "offset": len(guided), "rows": 2 if use_cfg else 1}
                # A repair may read the rows an earlier attempt already exported from the
                # prefix cache: the pair's prefills then shrink to about one block each and
                # fit one step even under a small token budget (chunked prefill).
                known = len(text_ids) + len(guided) if not reference_images else prompt_rows
                reads_cache = block is None or (attempt > 0 and block.written_prefix() >= known - 1)
                out, stopped = await self._run_pair(spec, capture, cond_prompt, uncond_prompt,
                                                    grid_len + 2 - len(guided), reads_cache)
                prompt_rows = len(out.prompt_token_ids)
                if stopped is None:
                    break
                self.stats["cfg_desyncs"] += 1
                if attempt >= self.config.max_cfg_repairs:
                    self.stats["cfg_failures"] += 1
                    raise GuidanceError(
                        f"AR-CFG pair fell out of step at grid position {len(guided) + stopped} "
                        f"{attempt + 1} times (preemption or token budget); refusing an unguided plan")
                guided = guided + list(out.outputs[0].token_ids[:stopped])
                self.stats["cfg_repairs"] += 1
                logger.warning("AR-CFG pair out of step at grid position %d; resubmitting (repair %d)",
                               len(guided), attempt + 1)
            t_gen = time.perf_counter()
            full = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
            prompt_len = len(full) - len(out.outputs[0].token_ids) - len(guided)
            prompt_ids = full[:prompt_len]
            generated = full[prompt_len:]
            if len(generated) < grid_len + 1:
                raise RuntimeError(f"planning stopped early ({len(generated)} of {grid_len} tokens)")
            visual = torch.tensor(generated[:grid_len], dtype=torch.long)
            seq = torch.tensor(prompt_ids + generated[: grid_len + 1], dtype=torch.long)
            hidden = self._read(block, seq.numel()) if block is not None else torch.zeros(seq.numel(), self.hidden_size)
        except BaseException:
            if neg_task is not None:
                neg_task.cancel()
            raise
        finally:
            if held:
                await asyncio.shield(self._slots.release(held))
            if block is not None:
                block.free()
                self._live_blocks.discard(block)
        text_cond, image_cond = self.split_condition(seq, hidden, len(prompt_ids))
        negative = await neg_task if neg_task is not None else None
        t_end = time.perf_counter()
        return PlanResult(
            visual_token_ids=visual,
            text_condition=text_cond,
            image_condition=image_cond,
            negative_condition=negative,
            prompt_token_ids=prompt_ids,
            ar_height=ar_height,
            ar_width=ar_width,
            timings={"generate_s": t_gen - t0, "total_s": t_end - t0},
            token_counts={"prompt": len(prompt_ids), "generated": grid_len, "uncond_prompt": n_uncond if use_cfg else 0,
                          "guided_prefix": len(guided)},
        )

    async def _run_pair(self, spec: dict, capture: dict, cond_prompt: Any, uncond_prompt: Any | None,
                        max_tokens: int, cond_reads_cache: bool) -> tuple[Any, int | None]:
        """Run one attempt of a plan; returns the conditional output and, when the pair fell out
        of step, the output position where both stopped (else ``None``)."""
        stop = [int(spec["stop_id"])]
        ids = [spec["pair"] + "-c"] + ([spec["pair"] + "-u"] if uncond_prompt is not None else [])
        cond_params = self._params(max_tokens, {**spec, "role": "cond", **capture}, stop_token_ids=stop,
                                   skip_reading_prefix_cache=not cond_reads_cache)
        tasks: list[asyncio.Future] = []
        try:
            collectors = await self._admit([(ids[0], cond_prompt, cond_params)] + (
                [(ids[1], uncond_prompt, self._params(max_tokens, {**spec, "role": "uncond"}, stop_token_ids=stop))]
                if uncond_prompt is not None else []))
            tasks = [asyncio.ensure_future(self._run_to_end(c)) for c in collectors]
            outs: list[Any] = [None] * len(tasks)
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    outs[tasks.index(task)] = task.result()
                stopped = [self._stop_position(o, stop[0]) for o in outs if o is not None]
                if pending and any(p is not None for p in stopped):
                    break  # out of step: the partner's output is not needed
            position = next((p for p in (self._stop_position(o, stop[0]) for o in outs if o is not None) if p is not None), None)
            if position is not None:
                await self.llm.abort(ids)
                for task in tasks:
                    task.cancel()
                return outs[0] if outs[0] is not None else next(o for o in outs if o is not None), position
            return outs[0], None
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.shield(self.llm.abort(ids))
            raise

    @staticmethod
    def _stop_position(out: Any, stop_id: int) -> int | None:
        tokens = list(out.outputs[0].token_ids)
        return tokens.index(stop_id) if stop_id in tokens else None

    async def _admit(self, requests: list[tuple[str, Any, Any]]) -> list[Any]:
        """Add the requests; the engine core's ``PairScheduler`` queues the rows of a pair together
        once both arrived (no scheduler pause). Bounded by ``admission_timeout_s``; on a timeout
        or a cancel the rows already added are aborted by the caller (``_run_pair``)."""
        if len(requests) == 1:
            rid, prompt, params = requests[0]
            return [await self.llm.add_request(rid, prompt, params)]
        try:
            async with asyncio.timeout(self.config.admission_timeout_s):
                return [await self.llm.add_request(rid, prompt, params) for rid, prompt, params in requests]
        except TimeoutError as exc:
            await asyncio.shield(self.llm.abort([r[0] for r in requests]))
            raise GuidanceError(f"admitting an AR-CFG pair took over {self.config.admission_timeout_s}s") from exc

    def split_condition(self, seq: torch.Tensor, hidden: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Official masks: text = question tokens minus vision placeholders and gen tokens;
        image = gen-vocabulary tokens in the answer (last ``uncond_prompt_tokens`` prompt tokens on)."""
        lay = self.layout
        pos = torch.arange(seq.numel())
        answer_start = prompt_len - self.config.uncond_prompt_tokens
        gen = seq >= lay.gen_vocab_start_index
        vision = torch.isin(seq, torch.tensor([lay.image_pad_id, lay.video_pad_id, lay.vision_start_id, lay.vision_end_id]))
        text_mask = ~(vision | gen)
        if not self.config.text_condition_with_answer:
            text_mask &= pos < answer_start
        image_mask = (pos >= answer_start) & gen
        return hidden[text_mask], hidden[image_mask]

    async def encode_prompt(self, prompt: str) -> torch.Tensor:
        """2.5 prompt encoder: final normed hidden state per token, truncated (not padded) to
        ``config.prompt_max_length``; the DiT pads to that length with a mask."""
        ids = self._encode(_clean_prompt(prompt))[: self.config.prompt_max_length]
        hidden, _ = await self._capture({"prompt_token_ids": ids}, (-1,))
        return hidden

    # ------------------------------------------------------------------ understanding
    async def understand(self, messages: list[dict], sampling: dict | None = None,
                         info: dict | None = None) -> AsyncIterator[str]:
        """Chat with images / videos in, text deltas out (cancelling the iterator aborts).
        ``info``, when given, is filled at the end with ``prompt_tokens``, ``completion_tokens``
        and ``finish_reason`` ("stop" or "length")."""
        from vllm.sampling_params import RequestOutputKind

        sampling = dict(sampling or {})
        images: list[Any] = []
        videos: list[Any] = []
        norm_messages = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str):
                norm_messages.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
                continue
            items = []
            for item in content or []:
                kind = item.get("type")
                if kind in ("image", "image_url", "input_image"):
                    images.append(item.get("image", item.get("image_url")))
                    items.append({"type": "image"})
                elif kind == "video":
                    videos.append(self._video_input(item))
                    items.append({"type": "video"})
                elif kind == "text":
                    items.append({"type": "text", "text": item.get("text", "")})
            norm_messages.append({"role": m["role"], "content": items})
        text = self.tokenizer.apply_chat_template(norm_messages, tokenize=False, add_generation_prompt=True)
        prompt: dict[str, Any] = {"prompt": text}
        mm: dict[str, Any] = {}
        if images:
            mm["image"] = images
        if videos:
            mm["video"] = videos
        if mm:
            prompt["multi_modal_data"] = mm
        params = self._params(
            int(sampling.pop("max_tokens", 256)),
            {"kind": "understand"},
            temperature=float(sampling.pop("temperature", 1.0)),
            top_p=float(sampling.pop("top_p", 1.0)),
            stop=sampling.pop("stop", None),
            seed=sampling.pop("seed", None),
            ignore_eos=False,
            detokenize=True,
            output_kind=RequestOutputKind.DELTA,
            **sampling,
        )
        rid = self._new_id("chat")
        async with _Slot(self._slots, 1):  # prefix caching stays on for understanding
            async for out in self.llm.generate(prompt, params, rid):
                delta = out.outputs[0].text if out.outputs else ""
                if info is not None:
                    if out.prompt_token_ids:
                        info["prompt_tokens"] = len(out.prompt_token_ids)
                    if out.outputs:
                        info["completion_tokens"] = info.get("completion_tokens", 0) + len(out.outputs[0].token_ids)
                        info["finish_reason"] = out.outputs[0].finish_reason or info.get("finish_reason")
                if delta:
                    yield delta

    @staticmethod
    def _video_input(item: dict) -> Any:
        frames = np.asarray(item["video"], dtype=np.uint8)
        fps = float(item.get("fps", 2.0))
        n = frames.shape[0]
        meta = {"fps": fps, "duration": n / fps, "total_num_frames": n, "frames_indices": list(range(n)),
                "video_backend": "opencv", "do_sample_frames": False}
        return (frames, meta)

    # ------------------------------------------------------------------ misc
    def live_shared_blocks(self) -> int:
        """Open shared-memory blocks (0 when idle: nothing leaks after finish or cancel)."""
        return len(self._live_blocks)


def planner_config_from_dir(model: str | Path, **overrides: Any) -> PlannerConfig:
    """Defaults from ``planner_settings.json`` (written by ``write_random_checkpoint``)."""
    import json

    settings_path = Path(model) / "planner_settings.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    cfg = PlannerConfig(model=str(model), mode=settings.get("mode", "mammoth2"))
    if "condition_layers" in settings:
        cfg = cfg.replace(condition_layers=tuple(settings["condition_layers"]))
    if "prompt_max_length" in settings:
        cfg = cfg.replace(prompt_max_length=int(settings["prompt_max_length"]))
    return dataclasses.replace(cfg, **overrides)
