"""Shared fixtures: one tiny checkpoint per session, one engine per module (engines are slow)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_planner_dir(tmp_path_factory):
    from planner.presets import write_random_checkpoint

    return write_random_checkpoint("tiny-mammoth2", tmp_path_factory.mktemp("tiny-planner"), seed=0)


def load_reference(model_dir):
    """The pure-PyTorch reference planner with a checkpoint's weights (strict)."""
    import json

    import torch
    from safetensors.torch import load_file

    from planner.reference import ReferencePlanner

    cfg = json.loads((model_dir / "config.json").read_text())
    model = ReferencePlanner(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    assert not missing and not unexpected
    return model.eval().to(torch.float32)


@pytest.fixture(scope="session")
def reference(tiny_planner_dir):
    return load_reference(tiny_planner_dir)


@pytest.fixture(scope="session")
def tiny_preview_dir(tmp_path_factory):
    from planner.presets import write_random_checkpoint

    return write_random_checkpoint("tiny-mammoth2-preview", tmp_path_factory.mktemp("tiny-preview"), seed=0)


@pytest.fixture(scope="session")
def preview_reference(tiny_preview_dir):
    return load_reference(tiny_preview_dir)


class LoopThread:
    """An event loop in a thread so sync tests can drive the async engine (module scoped)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_engine(model_dir, **overrides):
    from planner.engine import PlannerEngine, planner_config_from_dir

    loop = LoopThread()
    settings = dict(kv_cache_gib=1, max_model_len=2048, limit_videos=0, limit_images=2, dtype="float32")
    cfg = planner_config_from_dir(model_dir, **{**settings, **overrides})
    engine = loop.run(PlannerEngine(cfg).start(), timeout=600)
    return loop, engine
