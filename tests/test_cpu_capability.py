"""CPU capability awareness: detection, the injected AVX2 / AVX-512 paths, and what follows from it
(stage engine defaults, the serving config's refusal, the engines' warnings). Every case injects
its CPU, so the suite asserts the same on an AVX2 box as on an AVX-512 BF16 one."""

from __future__ import annotations

import logging

import pytest
import torch

from mammoth_common import cpu
from mammoth_common.cpu import (
    OVERRIDE_ENV,
    CpuCapability,
    cpu_capability,
    parse_override,
    resolve_dtype,
    slow_dtype_problem,
    split_native,
)
from services.config import ConfigError, ServeConfig

AVX2 = "AVX2"
AVX512 = "AVX512"  # Skylake-like: AVX-512 core, no bf16 instructions
AVX512_BF16 = "AVX512+avx512_bf16"
SAPPHIRE = "AVX512+avx512_bf16+amx_bf16+avx512_fp16+amx_fp16"


@pytest.fixture
def as_cpu(monkeypatch):
    """Pretend to run on the CPU named like ``MAMMOTH_CPU_CAPABILITY``; warnings start fresh."""
    for name in cpu.ONEDNN_ENVS:
        monkeypatch.delenv(name, raising=False)
    cpu._warn_once.cache_clear()

    def use(value: str) -> CpuCapability:
        monkeypatch.setenv(OVERRIDE_ENV, value)
        return cpu_capability()

    yield use
    cpu._warn_once.cache_clear()


# ------------------------------------------------------------------ the capability itself


@pytest.mark.parametrize(("override", "bf16", "fp16", "bf16_path"), [
    (AVX2, False, False, "reference"),
    (AVX512, False, False, "emulated"),
    (AVX512_BF16, True, False, "native"),
    (SAPPHIRE, True, True, "native"),
    ("SVE256+bf16", True, False, "native"),
    ("SVE256+bf16+fp16_arith", True, True, "native"),
    ("DEFAULT", False, False, "reference"),
])
def test_override_paths(as_cpu, override, bf16, fp16, bf16_path):
    cap = as_cpu(override)
    assert cap.source == OVERRIDE_ENV
    assert cap.is_native("bfloat16") is bf16 and cap.is_native(torch.float16) is fp16
    assert cap.matmul_path("bfloat16") == bf16_path
    assert cap.is_native("float32") and cap.native_dtypes()[0] == "float32"
    assert ("bfloat16" in cap.native_dtypes()) is bf16 and ("float16" in cap.native_dtypes()) is fp16


def test_notes_name_the_isa(as_cpu):
    assert as_cpu(AVX2).why_not_native("bfloat16") == "no native bf16 on AVX2"
    assert as_cpu(AVX512).why_not_native(torch.bfloat16) == "no native bf16 on AVX512"
    assert as_cpu(AVX512_BF16).why_not_native("float16") == "no native fp16 on AVX512"
    assert as_cpu(AVX512_BF16).why_not_native("bfloat16") is None


@pytest.mark.parametrize(("limit", "path"), [
    ("AVX2", "reference"), ("AVX512_CORE", "emulated"), ("AVX512_CORE_BF16", "native"), ("ALL", "native"),
])
def test_onednn_cap_hides_native_kernels(limit, path):
    """oneDNN runs torch's bf16 matmuls; ONEDNN_MAX_CPU_ISA below the bf16 ISA turns them off."""
    cap = parse_override(AVX512_BF16, onednn_max_isa=limit)
    assert cap.matmul_path("bfloat16") == path
    if path != "native":
        assert cap.why_not_native("bfloat16") == f"no native bf16: ONEDNN_MAX_CPU_ISA={limit}"


def test_onednn_env_is_read(as_cpu, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert as_cpu(AVX512_BF16).matmul_path("bfloat16") == "reference"


@pytest.mark.parametrize(("value", "field"), [("AVX3", "unknown ISA 'AVX3'"), ("AVX512+avx512bf16", "avx512bf16")])
def test_bad_override_names_the_variable(as_cpu, value, field):
    with pytest.raises(ValueError, match=f"{OVERRIDE_ENV}: .*{field}"):
        as_cpu(value)


def test_default_reads_the_real_cpu(monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    cap = cpu_capability()
    assert cap.source == "detected" and cap.isa == torch.backends.cpu.get_cpu_capability()
    real = torch.cpu.get_capabilities()
    for flag in ("avx512_bf16", "amx_bf16", "avx512_fp16"):
        if real.get(flag) is True:
            assert flag in cap.flags
    assert cap is cpu_capability()  # cached


def test_cpuinfo_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16 sse\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu._cpuinfo_flags(x86) == {"avx2", "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimdhp bf16 svebf16\n")
    assert cpu._cpuinfo_flags(arm) == {"fp16_arith", "bf16", "sve_bf16"}
    assert cpu._cpuinfo_flags(tmp_path / "missing") == frozenset()


def test_matmul_probe_is_a_positive_ratio_and_restores_threads():
    threads = torch.get_num_threads()
    assert cpu.matmul_time_vs_float32("bfloat16", n=32, repeats=1) > 0
    assert torch.get_num_threads() == threads


# ------------------------------------------------------------------ decisions that follow


def test_resolve_dtype(as_cpu):
    as_cpu(AVX2)
    assert resolve_dtype(None, "cpu") == "float32" and resolve_dtype(None, "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("float16", "cpu") == "float16"
    as_cpu(AVX512_BF16)
    assert resolve_dtype("auto", "cpu") == "bfloat16" and resolve_dtype(None, "cpu") == "float32"


def test_split_native(as_cpu):
    as_cpu(AVX2)
    assert split_native(["bfloat16", "float32"]) == (["float32"], {"bfloat16": "no native bf16 on AVX2"})
    assert split_native(["bfloat16", "float32"], allow_slow=True) == (["bfloat16", "float32"], {})
    as_cpu(AVX512_BF16)
    assert split_native(["bfloat16", "float32", "float16"]) == (
        ["bfloat16", "float32"], {"float16": "no native fp16 on AVX512"})


def test_slow_problem_only_on_cpu(as_cpu):
    as_cpu(AVX2)
    assert "~50-100x slower" in slow_dtype_problem("bfloat16", "cpu")
    assert slow_dtype_problem("bfloat16", "cuda") is None and slow_dtype_problem("float32", "cpu") is None
    as_cpu(AVX512)
    assert "emulated" in slow_dtype_problem("bfloat16", "cpu")


def test_config_refuses_slow_cpu_dtype_naming_field_and_cpu(as_cpu):
    as_cpu(AVX2)
    cfg = ServeConfig.loads("dit: {engine: {dtype: bfloat16}}")  # loads anywhere (e.g. rendering elsewhere)
    with pytest.raises(ConfigError, match=r"dit\.engine\.dtype: bfloat16 .*no native bf16 on AVX2.*cpu_dtype_policy"):
        cfg.resolved_dtype("dit")
    assert cfg.resolved_dtype("vae") == "float32"
    as_cpu(AVX512_BF16)
    assert cfg.resolved_dtype("dit") == "bfloat16"


def test_config_warn_policy_runs_it_with_a_warning(as_cpu, caplog):
    as_cpu(AVX2)
    cfg = ServeConfig.loads("cpu_dtype_policy: warn\nplanner: {engine: {dtype: float16}}")
    with caplog.at_level(logging.WARNING, logger="mammoth_common.cpu"):
        assert cfg.resolved_dtype("planner") == "float16"
    assert "planner.engine.dtype: float16 matmuls fall to reference kernels" in caplog.text


def test_config_emulated_bf16_warns_not_refuses(as_cpu, caplog):
    as_cpu(AVX512)
    cfg = ServeConfig.loads("vae: {engine: {dtype: bfloat16}}")
    with caplog.at_level(logging.WARNING, logger="mammoth_common.cpu"):
        assert cfg.resolved_dtype("vae") == "bfloat16"
    assert "vae.engine.dtype: bfloat16 matmuls are emulated" in caplog.text


def test_config_auto_and_defaults_follow_the_cpu(as_cpu):
    cfg = ServeConfig.loads("dit: {engine: {dtype: auto}}")
    as_cpu(AVX2)
    assert cfg.resolved_dtype("dit") == "float32" and cfg.resolved_dtype("planner") == "float32"
    as_cpu(AVX512_BF16)
    assert cfg.resolved_dtype("dit") == "bfloat16" and cfg.resolved_dtype("planner") == "float32"


def test_config_cuda_stage_is_not_checked(as_cpu):
    as_cpu(AVX2)
    cfg = ServeConfig.loads("dit: {engine: {device: cuda, dtype: bfloat16}, ray_actor_options: {num_gpus: 1}}")
    assert cfg.resolved_dtype("dit") == "bfloat16"


def test_config_rejects_unknown_policy():
    with pytest.raises(ConfigError, match="cpu_dtype_policy"):
        ServeConfig.loads("cpu_dtype_policy: ignore")


# ------------------------------------------------------------------ stage engines


def test_planner_engine_args_dtype_follows_the_cpu(as_cpu, caplog):
    from planner.engine import PlannerConfig

    as_cpu(AVX2)
    assert PlannerConfig(model="m").engine_args()["dtype"] == "float32"  # default "auto"
    assert PlannerConfig(model="m", device="cuda").engine_args()["dtype"] == "auto"  # vLLM's own choice
    with caplog.at_level(logging.WARNING, logger="mammoth_common.cpu"):
        assert PlannerConfig(model="m", dtype="bfloat16").engine_args()["dtype"] == "bfloat16"
    assert "PlannerConfig.dtype: bfloat16" in caplog.text
    as_cpu(AVX512_BF16)
    assert PlannerConfig(model="m").engine_args()["dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    from dit_worker import presets

    path = tmp_path_factory.mktemp("dit")
    presets.write_random_checkpoint("tiny-mammoth2", path, seed=0)
    return path


def test_dit_engine_auto_dtype(as_cpu, dit_dir):
    from dit_worker.engine import DiTEngine, DiTEngineConfig

    as_cpu(AVX2)
    engine = DiTEngine.from_pretrained(dit_dir, DiTEngineConfig(dtype="auto"))
    assert engine.dtype == torch.float32 and next(engine.model.parameters()).dtype == torch.float32
    as_cpu(AVX512_BF16)
    engine = DiTEngine.from_pretrained(dit_dir, DiTEngineConfig(dtype="auto"))
    assert engine.dtype == torch.bfloat16 and next(engine.model.parameters()).dtype == torch.bfloat16
    assert DiTEngineConfig().dtype == "float32"


def test_dit_engine_warns_on_slow_dtype(as_cpu, dit_dir, caplog):
    from dit_worker.engine import DiTEngine, DiTEngineConfig

    as_cpu(AVX2)
    with caplog.at_level(logging.WARNING, logger="mammoth_common.cpu"):
        DiTEngine.from_pretrained(dit_dir, DiTEngineConfig(dtype="bfloat16"))
    assert "DiTEngineConfig.dtype: bfloat16 matmuls fall to reference kernels" in caplog.text


def test_vae_engine_warns_on_slow_dtype(as_cpu, tmp_path, caplog):
    from vae_worker.engine import ImageVAE
    from vae_worker.presets import write_random_checkpoint

    write_random_checkpoint("tiny-mammoth2", tmp_path, seed=0)
    as_cpu(AVX512_BF16)
    with caplog.at_level(logging.WARNING, logger="mammoth_common.cpu"):
        ImageVAE.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert caplog.text == ""
    as_cpu(AVX2)
    with caplog.at_level(logging.WARNING, logger="mammoth_common.cpu"):
        ImageVAE.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert "ImageVAE dtype: bfloat16 matmuls fall to reference kernels" in caplog.text
