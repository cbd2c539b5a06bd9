"""Async planner engine on vLLM's ``AsyncLLM``: planning, prompt encoding, understanding.

Hidden states leave the engine through one POSIX shared-memory block per request (created and
unlinked here, written by the model in the worker; see ``runtime``), never through files or a
second LLM pass. AR-CFG runs the conditional and unconditional sequences as two requests in the
same vLLM batch; ``logits.MammothLogitsProcessor`` pairs them and samples once for both. Both
are admitted while the scheduler is paused so they enter the same step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_worker.checkpoint import DataclassConfig
from mammoth_common.cpu import engine_dtype

from .presets import DEFAULT_CONDITION_LAYERS
from .runtime import EXTRA_KEY
from .tokens import TokenLayout

logger = logging.getLogger(__name__)


@dataclass
class PlannerConfig(DataclassConfig):
    """Engine settings (CPU: KV-cache GiB + threads; GPU: memory fraction + TP)."""

    model: str = ""
    device: str = "cpu"  # "cpu" or "cuda"
    mode: str = "mammoth2"  # "mammoth2" (planning) or "mammoth25" (prompt encoder only)
    dtype: str = "auto"
    max_model_len: int = 4096
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    # CPU
    kv_cache_gib: float = 2.0  # VLLM_CPU_KVCACHE_SPACE
    cpu_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND ("auto", "0-3", "nobind")
    disable_multiprocessing: bool = True  # VLLM_ENABLE_V1_MULTIPROCESSING=0
    # GPU
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    # model behaviour
    condition_layers: tuple[int, ...] = tuple(DEFAULT_CONDITION_LAYERS)
    uncond_prompt_tokens: int = 10  # official: the CFG branch keeps only the last 10 prompt tokens
    text_condition_with_answer: bool = False  # official ``gen_text_condition_with_answer``
    system_prompt: str = "You are a helpful image generator."
    prompt_max_length: int = 512  # 2.5 prompt-encoder length (padding is the DiT's job)
    limit_images: int = 5
    limit_videos: int = 1

    def engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = dict(
            model=self.model,
            dtype=engine_dtype(self.dtype, "cpu", "PlannerConfig.dtype") if self.device == "cpu" else self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=False,  # every prompt token must pass the model (hidden states)
            logits_processors=["planner.logits:MammothLogitsProcessor"],
            limit_mm_per_prompt={"image": self.limit_images, "video": self.limit_videos},
            tensor_parallel_size=self.tensor_parallel_size,
            async_scheduling=False,
            disable_log_stats=True,
        )
        # A whole prompt fits in one step: pairs start together and prompts are not chunked.
        args["max_num_batched_tokens"] = self.max_num_batched_tokens or max(8192, 2 * self.max_model_len)
        if self.device != "cpu":
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        return args

    def apply_env(self) -> None:
        """vLLM reads these from the environment of the processes it starts."""
        if self.device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
            if self.cpu_threads_bind:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_threads_bind
        if self.disable_multiprocessing:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


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


class _SharedRows:
    """A [rows, dim] float32 block in POSIX shared memory, owned by this process."""

    def __init__(self, rows: int, dim: int):
        self.rows, self.dim = rows, dim
        self.shm = shared_memory.SharedMemory(create=True, size=max(rows * dim * 4, 4))
        self.name = self.shm.name

    def read(self, n: int) -> torch.Tensor:
        arr = np.ndarray((self.rows, self.dim), dtype=np.float32, buffer=self.shm.buf)
        return torch.from_numpy(arr[:n].copy())

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


def _clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class PlannerEngine:
    def __init__(self, config: PlannerConfig):
        self.config = config
        self.llm = None
        self.tokenizer = None
        self._ids = itertools.count()
        self._neg_cache: dict[str, asyncio.Future] = {}
        self._admit_lock = asyncio.Lock()
        self._live_blocks: set[_SharedRows] = set()
        self.hidden_size = 0
        self.layout = TokenLayout()
        self.num_layers = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> PlannerEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        cfg.apply_env()
        import json

        hf = json.loads((Path(cfg.model) / "config.json").read_text())
        text = hf.get("text_config", hf)
        self.hidden_size = int(text["hidden_size"])
        self.num_layers = int(text["num_hidden_layers"])
        self.layout = TokenLayout(int(hf.get("gen_vocab_start_index", 152064)), int(hf.get("gen_vocab_size", 32800)))
        args = AsyncEngineArgs(**cfg.engine_args())
        # Building the engine blocks for tens of seconds: keep the event loop free.
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self.tokenizer = self.llm.tokenizer
        return self

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
    def t2i_prompt(self, prompt: str, ar_height: int, ar_width: int, n_images: int = 0) -> str:
        content: list[dict] = [{"type": "image"} for _ in range(n_images)]
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
        rows = self.config.max_model_len
        block = _SharedRows(rows, self.hidden_size)
        self._live_blocks.add(block)
        rid = self._new_id("capture")
        spec = {"kind": "capture", "shm": block.name, "shm_rows": rows, "hidden": self.hidden_size,
                "layers": list(layers), "owner_pid": os.getpid()}
        try:
            collector = await self.llm.add_request(rid, prompt, self._params(1, spec))
            out = await self._run_to_end(collector)
            ids = list(out.prompt_token_ids)
            return block.read(len(ids)), ids
        except asyncio.CancelledError:
            await self.llm.abort(rid)
            raise
        finally:
            block.free()
            self._live_blocks.discard(block)

    async def negative_condition(self, negative_prompt: str) -> torch.Tensor:
        """Averaged condition layers over ALL tokens of the negative prompt; once per distinct text."""
        fut = self._neg_cache.get(negative_prompt)
        if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
            prompt = {"prompt_token_ids": self._encode(self.negative_prompt_text(negative_prompt))}
            fut = asyncio.ensure_future(self._capture(prompt, self.config.condition_layers))
            self._neg_cache[negative_prompt] = fut
        hidden, _ = await asyncio.shield(fut)
        return hidden

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
        negative_prompt: str | None = None,
        export_hidden: bool = True,
    ) -> PlanResult:
        """Plan ``ar_height x (ar_width + 1)`` visual tokens and export the DiT conditions.

        ``export_hidden=False`` skips the hidden-state export (the conditions are zeros); it
        exists to measure the export's cost."""
        if self.config.mode != "mammoth2":
            raise RuntimeError("plan_image needs a MammothModa2 planner (mode='mammoth2')")
        t0 = time.perf_counter()
        lay = self.layout
        seed = int(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        text = self.t2i_prompt(prompt, ar_height, ar_width, len(reference_images))
        text_ids = self._encode(text)
        n_uncond = self.config.uncond_prompt_tokens
        grid_len = ar_height * (ar_width + 1)
        if reference_images:
            cond_prompt: Any = {"prompt": text, "multi_modal_data": {"image": list(reference_images)}}
        else:
            cond_prompt = {"prompt_token_ids": text_ids}
        if len(text_ids) + grid_len + 2 > self.config.max_model_len:
            raise ValueError(f"prompt + {grid_len} planned tokens exceed max_model_len={self.config.max_model_len}")
        neg_task = (
            asyncio.ensure_future(self.negative_condition(negative_prompt)) if negative_prompt is not None else None
        )
        rows = self.config.max_model_len
        block = _SharedRows(rows, self.hidden_size)
        self._live_blocks.add(block)
        pair = self._new_id("plan")
        base = {
            "kind": "plan", "pair": pair, "ar_height": ar_height, "ar_width": ar_width,
            "cfg_scale": float(cfg_scale), "seed": seed, "temperature": float(temperature),
            "top_k": int(top_k), "top_p": float(top_p), "eol_id": lay.eol_id,
            "image_end_id": lay.image_end_id, "visual_start": lay.visual_start_id,
            "num_visual": lay.num_visual_codes,
        }
        cond_spec = {**base, "role": "cond", "shm": block.name if export_hidden else None, "shm_rows": rows, "hidden": self.hidden_size,
                     "layers": list(self.config.condition_layers), "owner_pid": os.getpid()}
        use_cfg = cfg_scale > 1.0
        ids = [pair + "-c"] + ([pair + "-u"] if use_cfg else [])
        try:
            async with self._admit_lock:
                # Paused, the scheduler queues both adds and releases them into the same step.
                paused = use_cfg and await self._pause()
                try:
                    collectors = [await self.llm.add_request(ids[0], cond_prompt, self._params(grid_len + 2, cond_spec))]
                    if use_cfg:
                        uncond = {"prompt_token_ids": text_ids[-n_uncond:]}
                        collectors.append(await self.llm.add_request(
                            ids[1], uncond, self._params(grid_len + 2, {**base, "role": "uncond"})))
                finally:
                    if paused:
                        await self.llm.engine_core.resume_scheduler_async()
            t_admit = time.perf_counter()
            outs = await asyncio.gather(*(self._run_to_end(c) for c in collectors))
            t_gen = time.perf_counter()
            out = outs[0]
            prompt_ids = list(out.prompt_token_ids)
            generated = list(out.outputs[0].token_ids)
            if len(generated) < grid_len + 1:
                raise RuntimeError(f"planning stopped early ({len(generated)} of {grid_len} tokens)")
            visual = torch.tensor(generated[:grid_len], dtype=torch.long)
            seq = torch.tensor(prompt_ids + generated[: grid_len + 1], dtype=torch.long)
            hidden = block.read(seq.numel()) if export_hidden else torch.zeros(seq.numel(), self.hidden_size)
        except asyncio.CancelledError:
            await self.llm.abort(ids)
            if neg_task is not None:
                neg_task.cancel()
            raise
        finally:
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
            timings={"admit_s": t_admit - t0, "generate_s": t_gen - t_admit, "total_s": t_end - t0},
            token_counts={"prompt": len(prompt_ids), "generated": grid_len, "uncond_prompt": n_uncond if use_cfg else 0},
        )

    async def _pause(self) -> bool:
        try:
            await self.llm.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)
            return True
        except Exception as exc:  # pragma: no cover - older vLLM without pause modes
            logger.warning("cannot pause the scheduler (%s); CFG pairs may start one step apart", exc)
            return False

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
    async def understand(self, messages: list[dict], sampling: dict | None = None) -> AsyncIterator[str]:
        """Chat with images / videos in, text deltas out (cancelling the iterator aborts)."""
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
        async for out in self.llm.generate(prompt, params, rid):
            delta = out.outputs[0].text if out.outputs else ""
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
