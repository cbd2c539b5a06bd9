"""Which low-precision dtypes this CPU multiplies natively, and what to run when it does not.

Machines of one kind are not all the same CPU: with AVX-512 BF16 a bf16 matmul is ~2x float32,
with AVX2 alone torch falls back to reference kernels ~100x slower than float32. Everything that
picks a CPU dtype (stage defaults, the serving config's check, the benchmarks) asks this module
instead of assuming.

Signals: ``torch.backends.cpu.get_cpu_capability()`` (the ATen kernel level), the CPU flags
(``torch.cpu.get_capabilities()`` joined with ``/proc/cpuinfo``) and ``ONEDNN_MAX_CPU_ISA``
(oneDNN runs torch's low-precision matmuls and honours that cap). ``MAMMOTH_CPU_CAPABILITY``
replaces the detection, e.g. ``AVX2`` or ``AVX512+avx512_bf16``, so both paths can be exercised
on any machine; unset, the real CPU is read.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

OVERRIDE_ENV = "MAMMOTH_CPU_CAPABILITY"
ONEDNN_ENVS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")

MatmulPath = Literal["native", "emulated", "reference"]
LOW_PRECISION = ("bfloat16", "float16")
SHORT_NAME = {"bfloat16": "bf16", "float16": "fp16"}

# Values torch.backends.cpu.get_cpu_capability() documents (override names are checked against it).
KNOWN_ISAS = ("DEFAULT", "NO AVX", "AVX2", "AVX512", "VSX", "Z VECTOR", "SVE128", "SVE256", "SVE512")

# dtype -> CPU flags (torch.cpu.get_capabilities() names) any one of which gives native matmuls.
NATIVE_FLAGS: dict[str, tuple[str, ...]] = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"),
    "float16": ("avx512_fp16", "amx_fp16", "fp16_arith"),
}
# The AVX-512 core set: oneDNN emulates bf16 matmuls through float32 with it (about float32 speed).
AVX512_CORE_FLAGS = frozenset({"avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"})
# /proc/cpuinfo spellings -> torch's; flags not listed are not needed to decide anything.
CPUINFO_FLAGS = {
    "avx2": "avx2", "avx512f": "avx512_f", "avx512bw": "avx512_bw", "avx512vl": "avx512_vl",
    "avx512dq": "avx512_dq", "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16",
    "amx_bf16": "amx_bf16", "amx_fp16": "amx_fp16", "amx_tile": "amx_tile",
    "bf16": "bf16", "svebf16": "sve_bf16", "asimdhp": "fp16_arith",
}
KNOWN_FLAGS = frozenset(CPUINFO_FLAGS.values())

# ONEDNN_MAX_CPU_ISA values in increasing order; a value caps the kernels oneDNN may dispatch.
ONEDNN_ISA_ORDER = (
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
)
# The least oneDNN ISA each x86 path needs.
ONEDNN_NEEDS = {("bfloat16", "native"): "AVX512_CORE_BF16", ("float16", "native"): "AVX512_CORE_FP16",
                ("bfloat16", "emulated"): "AVX512_CORE"}


def _onednn_allows(limit: str | None, needed: str) -> bool:
    if limit is None or limit.upper() in ("ALL", "DEFAULT") or limit.upper() not in ONEDNN_ISA_ORDER:
        return True
    return ONEDNN_ISA_ORDER.index(limit.upper()) >= ONEDNN_ISA_ORDER.index(needed)


@dataclass(frozen=True)
class CpuCapability:
    """One CPU as the dtype decisions see it."""

    isa: str  # torch.backends.cpu.get_cpu_capability(), e.g. "AVX2", "AVX512"
    flags: frozenset[str]  # relevant CPU flags in torch.cpu.get_capabilities() spelling
    onednn_max_isa: str | None = None
    source: str = "detected"  # or "MAMMOTH_CPU_CAPABILITY"

    def matmul_path(self, dtype: str | torch.dtype) -> MatmulPath:
        """How torch multiplies ``dtype`` here: native kernels, emulated via fp32, or reference loops."""
        name = dtype_name(dtype)
        if name not in LOW_PRECISION:
            return "native"
        x86 = self.isa in ("AVX2", "AVX512", "NO AVX") or bool(self.flags & {"avx2", "avx512_f"})
        if self.flags & set(NATIVE_FLAGS[name]) and (
                not x86 or _onednn_allows(self.onednn_max_isa, ONEDNN_NEEDS[(name, "native")])):
            return "native"
        avx512_core = self.isa == "AVX512" or AVX512_CORE_FLAGS <= self.flags
        if name == "bfloat16" and avx512_core and _onednn_allows(self.onednn_max_isa, "AVX512_CORE"):
            return "emulated"
        return "reference"

    def is_native(self, dtype: str | torch.dtype) -> bool:
        return self.matmul_path(dtype) == "native"

    def why_not_native(self, dtype: str | torch.dtype) -> str | None:
        """A short note (``"no native bf16 on AVX2"``), or None when ``dtype`` is native."""
        name = dtype_name(dtype)
        if self.is_native(name):
            return None
        short = SHORT_NAME[name]
        if self.flags & set(NATIVE_FLAGS[name]):  # the CPU has it; the oneDNN cap hides it
            return f"no native {short}: ONEDNN_MAX_CPU_ISA={self.onednn_max_isa}"
        return f"no native {short} on {self.isa}"

    def native_dtypes(self) -> tuple[str, ...]:
        return ("float32",) + tuple(d for d in LOW_PRECISION if self.is_native(d))

    def describe(self) -> dict[str, object]:
        """JSON-ready summary (benchmarks record it next to their figures)."""
        return {"isa": self.isa, "source": self.source, "native_dtypes": list(self.native_dtypes()),
                "flags": sorted(self.flags & {f for fs in NATIVE_FLAGS.values() for f in fs}),
                **({"onednn_max_isa": self.onednn_max_isa} if self.onednn_max_isa else {})}


def dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM; the first core speaks for all
            return frozenset(CPUINFO_FLAGS[f] for f in value.split() if f in CPUINFO_FLAGS)
    return frozenset()


def _torch_flags() -> frozenset[str]:
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10
    if get is None:
        return frozenset()
    return frozenset(k for k, v in get().items() if v is True and k in KNOWN_FLAGS)


def parse_override(value: str, onednn_max_isa: str | None = None) -> CpuCapability:
    """``ISA[+flag...]``: ``AVX2``, ``AVX512`` (core AVX-512 implied), ``AVX512+avx512_bf16``."""
    isa, *flags = (part.strip() for part in value.split("+"))
    isa = isa.upper()
    if isa not in KNOWN_ISAS:
        raise ValueError(f"{OVERRIDE_ENV}: unknown ISA {isa!r}; choose one of {list(KNOWN_ISAS)}")
    unknown = sorted(set(f.lower() for f in flags) - KNOWN_FLAGS)
    if unknown:
        raise ValueError(f"{OVERRIDE_ENV}: unknown flag(s) {unknown}; known: {sorted(KNOWN_FLAGS)}")
    implied = AVX512_CORE_FLAGS | {"avx2"} if isa == "AVX512" else {"avx2"} if isa == "AVX2" else set()
    return CpuCapability(isa, frozenset(f.lower() for f in flags) | implied, onednn_max_isa, OVERRIDE_ENV)


@functools.lru_cache(maxsize=8)
def _capability(override: str | None, onednn_max_isa: str | None) -> CpuCapability:
    if override:
        return parse_override(override, onednn_max_isa)
    return CpuCapability(torch.backends.cpu.get_cpu_capability(), _torch_flags() | _cpuinfo_flags(),
                         onednn_max_isa)


def cpu_capability() -> CpuCapability:
    """The running CPU (or ``MAMMOTH_CPU_CAPABILITY``); cached per environment value."""
    onednn = next((os.environ[k] for k in ONEDNN_ENVS if os.environ.get(k)), None)
    return _capability(os.environ.get(OVERRIDE_ENV) or None, onednn)


def resolve_dtype(dtype: str | None, device: str, cap: CpuCapability | None = None) -> str:
    """A concrete dtype name. ``None``: bfloat16 on cuda, float32 on cpu (exact, native on every
    CPU). ``"auto"``: bfloat16 on cuda and on CPUs that multiply it natively, else float32."""
    if dtype is None:
        return "bfloat16" if device == "cuda" else "float32"
    if dtype == "auto":
        if device == "cuda":
            return "bfloat16"
        return "bfloat16" if (cap or cpu_capability()).is_native("bfloat16") else "float32"
    return dtype


def slow_dtype_problem(dtype: str | torch.dtype, device: str, cap: CpuCapability | None = None) -> str | None:
    """Why running ``dtype`` on this ``device`` is a bad idea, or None. Only CPUs have such cases."""
    if str(device).split(":")[0] != "cpu":
        return None
    cap = cap or cpu_capability()
    name = dtype_name(dtype)
    path = cap.matmul_path(name)
    if path == "native":
        return None
    needs = " or ".join(NATIVE_FLAGS[name])
    if path == "emulated":
        return (f"{name} matmuls are emulated through float32 kernels on this CPU ({cap.why_not_native(name)}; "
                f"native needs {needs}): no faster than float32 and less precise")
    return (f"{name} matmuls fall to reference kernels on this CPU ({cap.why_not_native(name)}; native needs "
            f"{needs}): ~50-100x slower than float32")


def is_refused(dtype: str | torch.dtype, device: str, cap: CpuCapability | None = None) -> bool:
    """True where the dtype would fall to the ~100x slower reference kernels (not merely emulated)."""
    return str(device).split(":")[0] == "cpu" and (cap or cpu_capability()).matmul_path(dtype) == "reference"


def warn_if_slow(dtype: str | torch.dtype, device: str | torch.device, what: str) -> str | None:
    """Log (once per what/dtype) and return the problem with ``dtype`` on ``device``, if any."""
    problem = slow_dtype_problem(dtype, str(device))
    if problem is not None:
        _warn_once(f"{what}: {problem}; use float32 (or 'auto')")
    return problem


def engine_dtype(dtype: str | None, device: str | torch.device, what: str) -> str:
    """What a stage engine runs for a configured ``dtype`` (None/auto resolved), warning once where
    this CPU has no native kernels for it. Engines warn; the serving config refuses."""
    name = resolve_dtype(dtype, str(device).split(":")[0])
    warn_if_slow(name, device, what)
    return name


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    logger.warning(message)


def split_native(dtypes: list[str], cap: CpuCapability | None = None,
                 allow_slow: bool = False) -> tuple[list[str], dict[str, str]]:
    """The dtypes to run and, for those skipped, why (``{"bfloat16": "no native bf16 on AVX2"}``)."""
    cap = cap or cpu_capability()
    run, skipped = [], {}
    for name in dtypes:
        note = cap.why_not_native(name)
        if note is None or allow_slow:
            run.append(name)
        else:
            skipped[name] = note
    return run, skipped


@functools.lru_cache(maxsize=4)
def matmul_time_vs_float32(dtype: str, n: int = 256, repeats: int = 5) -> float:
    """Measured: best ``n``^3 matmul process-CPU time in ``dtype`` over float32 (~0.2 s even on
    reference kernels), on one thread: CPU time so a busy box descheduling the call does not
    count, one thread so no barrier spin does. A check on the flags, not a decision input."""
    def best(dt: torch.dtype) -> float:
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.process_time()
            a @ b
            times.append(time.process_time() - start)
        return max(min(times), 1e-6)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return round(best(getattr(torch, dtype)) / best(torch.float32), 3)
    finally:
        torch.set_num_threads(threads)


def report_fields(skipped: dict[str, str] | None = None, measure: bool = True) -> dict[str, object]:
    """What every benchmark's JSON records about the CPU it ran on (and what it skipped)."""
    cap = cpu_capability()
    cpu = cap.describe()
    if measure:
        cpu["matmul_time_vs_float32"] = {name: matmul_time_vs_float32(name) for name in LOW_PRECISION}
    return {"cpu_capability": cap.isa, "cpu": cpu, "skipped": dict(skipped or {})}
