"""Start-up and memory sizing of the planner engine (fast: no engine is started).

The vLLM engine arguments derived for the tiny preset must bound the multi-modal warm-up by the
checkpoint's own processor limits, size the KV cache for the model (not a GiB per engine), and
pick the pair-admitting scheduler; ``PairGate`` admits the two rows of an AR-CFG pair together.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from planner.engine import PlannerConfig, planner_config_from_dir
from planner.guidance import EXTRA_KEY
from planner.sizing import GIB, SCHEDULER_CLS, kv_cache_bytes, max_pixels, mm_dummy_options


def _request(rid: str, pair: str | None = None, role: str = "cond", rows: int = 2):
    spec = {"kind": "plan", "pair": pair, "role": role, "rows": rows} if pair else {"kind": "understand"}
    return SimpleNamespace(request_id=rid, sampling_params=SimpleNamespace(extra_args={EXTRA_KEY: spec}))


def test_mm_warmup_is_bounded_by_the_checkpoint_processor(tiny_planner_dir):
    args = planner_config_from_dir(tiny_planner_dir, dtype="float32").engine_args()
    limits = args["limit_mm_per_prompt"]
    proc = json.loads((tiny_planner_dir / "preprocessor_config.json").read_text())
    image_max = proc["size"]["longest_edge"]
    assert max_pixels(tiny_planner_dir) == image_max
    image = limits["image"]
    assert image["count"] == 5
    # the dummy image is the checkpoint's largest (a square a patch-merge multiple wide)
    assert image["width"] * image["height"] <= image_max < (image["width"] + 32) * (image["height"] + 32)
    video = limits["video"]
    assert video["count"] == 1 and video["num_frames"] == 2
    assert video["num_frames"] * video["width"] * video["height"] <= max_pixels(
        tiny_planner_dir, "video_preprocessor_config.json")
    assert args["mm_processor_cache_gb"] <= 0.25


def test_no_media_modality_gets_no_dummy(tiny_planner_dir):
    limits = mm_dummy_options(tiny_planner_dir, {"image": 0, "video": 0})
    assert limits == {"image": {"count": 0}, "video": {"count": 0}}
    # a checkpoint without processor configs: counts only (vLLM's own bounds apply)
    assert mm_dummy_options(tiny_planner_dir / "missing", {"image": 2}) == {"image": {"count": 2}}


def test_kv_cache_is_sized_for_the_tiny_model(tiny_planner_dir, monkeypatch):
    cfg = planner_config_from_dir(tiny_planner_dir, dtype="float32")
    args = cfg.engine_args()
    hf = json.loads((tiny_planner_dir / "config.json").read_text())
    text = hf.get("text_config", hf)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 4  # fp32 K and V
    tokens = args["kv_cache_memory_bytes"] // per_token
    # 16 CFG requests (32 rows) of the tiny default (prompt ~60 + an 8x9 grid) fit many times
    # over, and one sequence of max_model_len fits (vLLM refuses to start otherwise) ...
    assert tokens >= args["max_num_seqs"] * 512 and tokens >= args["max_model_len"]
    # ... in a fraction of the GiB per engine the default used to zero at start
    assert args["kv_cache_memory_bytes"] <= GIB // 2
    # the legacy whole-GiB variable (still in rendered envs) would override it: removed
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg.apply_env()
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert kv_cache_bytes(0.25) == GIB // 4
    with pytest.raises(ValueError):
        kv_cache_bytes(0)


def test_defaults_batch_sixteen_cfg_requests_with_the_pair_scheduler():
    from services.config import ServeConfig
    from services.stages.planner import planner_config

    assert PlannerConfig().max_num_seqs >= 32
    cfg = ServeConfig.default_cpu()
    assert cfg.planner.engine.max_num_seqs >= 32 and cfg.planner.max_ongoing_requests >= 16
    settings = planner_config(cfg.models["image"].directory(), cfg.planner.engine, "cpu", "float32")
    assert settings.kv_cache_gib == cfg.planner.engine.kv_cache_gib < 1
    args = PlannerConfig(model="/nonexistent").engine_args()
    assert args["scheduler_cls"] == SCHEDULER_CLS
    assert args["max_num_batched_tokens"] >= args["max_model_len"]


def test_pair_gate_admits_both_rows_together_conditional_first():
    pytest.importorskip("vllm")
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from planner.scheduler import PairGate, PairScheduler

    assert resolve_obj_by_qualname(SCHEDULER_CLS) is PairScheduler  # how vLLM loads scheduler_cls

    gate = PairGate()
    chat = _request("chat-1")
    assert gate.arrive(chat) == [chat]  # not a pair: queued at once
    uncond = _request("p-u", "p", "uncond")
    assert gate.arrive(uncond) == []  # held for its partner
    assert gate.arrive(_request("x-1")) != []  # others are not held up meanwhile
    cond = _request("p-c", "p", "cond")
    assert gate.arrive(cond) == [cond, uncond]
    assert gate.held == {}
    lone = _request("l-c", "l", "cond", rows=1)  # cfg_scale <= 1: one row, never held
    assert gate.arrive(lone) == [lone]


def test_pair_gate_drops_aborted_rows():
    pytest.importorskip("vllm")
    from planner.scheduler import PairGate

    gate = PairGate()
    gate.arrive(_request("a-c", "a"))
    gate.arrive(_request("b-c", "b"))
    gate.drop(["a-c", "a-u"])
    assert set(gate.held) == {"b"}
    gate.drop("b-c")
    assert gate.held == {}
    gate.arrive(_request("c-c", "c"))
    gate.drop(None)
    assert gate.held == {}


def test_the_processor_joined_around_vllms_tokenizer_equals_transformers_own(tiny_planner_dir):
    """``hf_processor`` skips transformers' reload of the tokenizer; what it builds must process
    a chat with an image and a video exactly as ``Qwen3VLProcessor.from_pretrained`` does, with
    the call-time flags vLLM passes when the model normalizes on the device too."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, Qwen3VLProcessor

    from planner import hf_processor

    reference = Qwen3VLProcessor.from_pretrained(str(tiny_planner_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_planner_dir))
    device_normalized = {"do_normalize": False, "do_rescale": False}
    joined = hf_processor.joined_processor(Qwen3VLProcessor, tiny_planner_dir, tokenizer, device_normalized)
    assert joined is hf_processor.joined_processor(Qwen3VLProcessor, str(tiny_planner_dir), tokenizer, {})
    assert joined.chat_template == reference.chat_template
    assert joined.image_processor.to_dict() == reference.image_processor.to_dict()
    assert joined.video_processor.to_dict() == reference.video_processor.to_dict()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    video = rng.integers(0, 255, (4, 64, 48, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what?"}]}]
    text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert joined.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    for call in ({}, device_normalized):
        kwargs = {"videos_kwargs": {"do_sample_frames": False}, **call}
        want = reference(text=[text], images=[image], videos=[video], return_tensors="pt", **kwargs)
        got = joined(text=[text], images=[image], videos=[video], return_tensors="pt", **kwargs)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key


def test_the_checkpoints_processor_is_joined_only_where_it_is_exact(tiny_planner_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer, Qwen3VLProcessor

    from planner.hf_processor import joined_processor

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_planner_dir))
    assert joined_processor(Qwen3VLProcessor, tiny_planner_dir, tokenizer, {"videos_kwargs": {"fps": None}})
    assert joined_processor(Qwen3VLProcessor, tiny_planner_dir, tokenizer, {"chat_template": "x"}) is None
    own = shutil.copytree(tiny_planner_dir, tmp_path / "own", ignore=shutil.ignore_patterns("*.safetensors"))
    (own / "processor_config.json").write_text("{}")  # processor-level settings of its own
    assert joined_processor(Qwen3VLProcessor, own, tokenizer, {}) is None
    assert joined_processor(Qwen3VLProcessor, tmp_path / "missing", tokenizer, {}) is None
