"""The one attention function of both DiTs, on diffusers' ``dispatch_attention_fn``.

Every DiT self-attention goes through :func:`attention` (layout ``[B, S, heads, head_dim]``,
diffusers' convention), so the kernel is one config value (``dit.engine.attention_backend``)
and sequence parallelism is diffusers' own machinery: a processor's ``_parallel_config``
(``ContextParallelConfig``, Ulysses / ring) is handed to the dispatcher unchanged.

Why the arguments are rewritten before dispatch: PyTorch's fused SDPA kernels on CUDA each
refuse something. Flash attention refuses any mask; memory-efficient attention refuses
``enable_gqa``. A padded batch (every CFG batch: the branches' prompts differ in length) with
grouped KV heads would therefore only qualify for the math kernel, which materialises
``B x heads x S x S`` scores. The rules here:

* no padding -> no mask, grouped KV heads kept (``enable_gqa``): flash qualifies;
* padding + a varlen backend (``flash_varlen``, ``sage_varlen``...) -> the boolean key mask
  ``[B, S]`` goes to the backend, which packs the real tokens of every row (no GQA flag: the
  kernels take fewer KV heads as they are);
* padding + ``native_varlen`` (this module's, not a diffusers name) -> PyTorch's own flash varlen
  kernel (``torch.nn.attention.varlen.varlen_attn``) on the padded layout: every row is one
  sequence of ``S`` queries whose first ``seqused_k`` keys are real -- flash attention with GQA,
  no packing copy and no host sync (needs CUDA and a torch whose ``varlen_attn`` takes
  ``seqused_k`` and ``enable_gqa``);
* padding + any other backend -> KV heads expanded to the query heads and a ``[B, 1, 1, S]``
  key mask without ``enable_gqa``: memory-efficient attention qualifies. Backends that take no
  mask at all (``flash``, ``_native_flash``, ``sage``) run padded calls on ``native``.

:func:`plan_attention` makes that decision from shapes alone (no host sync) and
:func:`sdpa_kernels` states which SDPA kernels a call's actual tensors qualify for, so a CPU
test and the GPU benchmark can check the rule on real inputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)

DEFAULT_BACKEND = "native"

# Backends that pack variable-length rows themselves from a boolean ``[B, S]`` key mask.
VARLEN_BACKENDS = frozenset({"flash_varlen", "flash_varlen_hub", "_flash_varlen_3", "_flash_3_varlen_hub",
                             "sage_varlen"})
# Backends that take no mask: padded calls fall back to ``native`` (expanded KV heads + mask).
MASKLESS_BACKENDS = frozenset({"flash", "flash_hub", "flash_4_hub", "_flash_3", "_flash_3_hub", "_native_flash",
                               "sage", "sage_hub", "sage_blackwell_hub", "aiter_fa2_hub"})
# Backends whose kernels need equal query and KV heads (memory-efficient / cuDNN SDPA refuse
# ``enable_gqa``; the others take no such flag). Flash / sage kernels accept fewer KV heads.
NO_GQA_BACKENDS = frozenset({"_native_efficient", "_native_cudnn", "_native_npu", "_native_xla", "xformers",
                             "flex"})

_BACKENDS: dict[str, AttentionBackendName] = {b.value: b for b in AttentionBackendName}
NATIVE_VARLEN = "native_varlen"
BACKEND_NAMES: tuple[str, ...] = (*_BACKENDS, NATIVE_VARLEN)


def check_backend(name: str) -> str:
    """``name`` if diffusers knows it, else a ValueError listing the known names."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(sorted(BACKEND_NAMES))}")
    return name


@dataclass(frozen=True)
class AttentionPlan:
    """What :func:`attention` dispatches for one call."""

    backend: str  # the diffusers backend name that runs
    mask: str  # "none" | "key_mask_2d" (varlen packing) | "key_mask_4d" | "additive" | "seqused_k"
    expand_kv: bool  # KV heads repeated to the query heads before dispatch
    enable_gqa: bool  # grouped KV heads handed to the kernel


def plan_attention(num_heads: int, num_kv_heads: int, key_mask: torch.Tensor | None,
                   backend: str | None = None, *, parallel: bool = False) -> AttentionPlan:
    """The dispatch decision for a call (see the module docstring); shapes and dtypes only.
    ``parallel``: a context-parallel config is active -- diffusers' Ulysses / ring attention
    takes no ``enable_gqa``, so grouped KV heads are expanded there."""
    plan = _plan(num_heads, num_kv_heads, key_mask, backend, parallel)
    if parallel and plan.enable_gqa:
        return AttentionPlan(plan.backend, plan.mask, expand_kv=True, enable_gqa=False)
    return plan


def _plan(num_heads: int, num_kv_heads: int, key_mask: torch.Tensor | None, backend: str | None,
          parallel: bool) -> AttentionPlan:
    name = check_backend(backend or DEFAULT_BACKEND)
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    grouped = num_heads != num_kv_heads
    if name == NATIVE_VARLEN:
        if key_mask is not None and key_mask.dtype == torch.bool and not parallel:
            return AttentionPlan(name, "seqused_k", expand_kv=False, enable_gqa=grouped)
        name = DEFAULT_BACKEND
    if key_mask is None:
        no_gqa = name in NO_GQA_BACKENDS
        return AttentionPlan(name, "none", expand_kv=grouped and no_gqa, enable_gqa=grouped and not no_gqa)
    if key_mask.dtype == torch.bool and name in VARLEN_BACKENDS:
        return AttentionPlan(name, "key_mask_2d", expand_kv=False, enable_gqa=False)
    if name in MASKLESS_BACKENDS or name in VARLEN_BACKENDS:
        name = DEFAULT_BACKEND
    mask = "key_mask_4d" if key_mask.dtype == torch.bool else "additive"
    return AttentionPlan(name, mask, expand_kv=grouped, enable_gqa=False)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None = None,
              *, backend: str | None = None, parallel_config: Any = None) -> torch.Tensor:
    """Softmax attention of ``query [B, S, H, D]`` over ``key/value [B, Sk, Hkv, D]``.

    ``key_mask``: ``[B, Sk]`` bool (True = real token) or an additive float bias broadcastable
    to ``[B, 1, 1, Sk]``; ``None`` when nothing is padded. Returns ``[B, S, H, D]``.
    ``parallel_config``: a diffusers ``ContextParallelConfig`` (or None), passed through.
    """
    plan = plan_attention(query.shape[2], key.shape[2], key_mask, backend, parallel=parallel_config is not None)
    if plan.mask == "seqused_k":
        if not query.is_cuda:
            raise ValueError(f"attention backend {NATIVE_VARLEN!r}: {native_varlen_problem(query.device)}")
        return _padded_varlen(query, key, value, key_mask, plan.enable_gqa)
    if plan.expand_kv:
        key, value = _expand_heads(key, query.shape[2]), _expand_heads(value, query.shape[2])
    mask = key_mask
    if plan.mask in ("key_mask_4d", "additive") and mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    return dispatch_attention_fn(query, key, value, attn_mask=mask, enable_gqa=plan.enable_gqa,
                                 backend=_BACKENDS[plan.backend], parallel_config=parallel_config)


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, Hkv, D]`` -> ``[B, S, heads, D]``, query head ``h`` reading KV head
    ``h // (heads / Hkv)`` (GQA's grouping); one copy (``repeat_interleave`` is ~10x slower on CPU)."""
    b, s, kv, d = x.shape
    return x.unsqueeze(3).expand(b, s, kv, heads // kv, d).reshape(b, s, heads, d)


def native_varlen_problem(device: torch.device | str | None = None) -> str | None:
    """Why ``native_varlen`` cannot run here (None: it can)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    params = inspect.signature(varlen_attn).parameters
    if not {"seqused_k", "enable_gqa"} <= params.keys():
        return f"torch {torch.__version__}: varlen_attn lacks seqused_k / enable_gqa"
    if device is not None and torch.device(device).type != "cuda":
        return "it runs PyTorch's CUDA flash kernel; the device is not cuda"
    return None


def _padded_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
                   enable_gqa: bool) -> torch.Tensor:
    """Rows of a padded batch as varlen sequences of ``S`` queries over their first
    ``seqused_k`` keys (padding is at each row's end, as every caller lays it out)."""
    from torch.nn.attention.varlen import varlen_attn

    b, s, sk = query.shape[0], query.shape[1], key.shape[1]
    steps = torch.arange(b + 1, device=query.device, dtype=torch.int32)
    out = varlen_attn(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1), steps * s, steps * sk, s, sk,
                      enable_gqa=enable_gqa, seqused_k=key_mask.sum(1, dtype=torch.int32))
    return out.view(b, s, *out.shape[1:])


def _processors(model: torch.nn.Module) -> list[Any]:
    return [m.processor for m in model.modules()
            if hasattr(getattr(m, "processor", None), "_parallel_config")]


def set_attention_backend(model: torch.nn.Module, backend: str | None, device: torch.device | str | None = None) -> int:
    """Route every DiT attention of ``model`` to ``backend`` (None = default); returns how many
    processors were set. Mirrors diffusers' ``ModelMixin.set_attention_backend``; ``device``
    (where the model runs) lets backends that need CUDA refuse early."""
    name = None if backend is None else check_backend(backend)
    if name == NATIVE_VARLEN:
        problem = native_varlen_problem(device)
        if problem:
            raise ValueError(f"attention backend {name!r} is not usable here: {problem}")
    elif name is not None:
        try:  # the package a backend needs (flash-attn, sageattention...) must be importable now
            _check_attention_backend_requirements(_BACKENDS[name])
        except RuntimeError as error:
            raise ValueError(f"attention backend {name!r} is not usable here: {error}") from error
    processors = _processors(model)
    for processor in processors:
        processor._attention_backend = name
    return len(processors)


def set_parallel_config(model: torch.nn.Module, parallel_config: Any) -> int:
    """Hand a diffusers ``ParallelConfig`` (context parallel: Ulysses / ring) to every DiT
    attention, as diffusers' ``enable_parallelism`` does; None turns it off."""
    processors = _processors(model)
    for processor in processors:
        processor._parallel_config = parallel_config
    return len(processors)


# ------------------------------------------------------------------------- kernel eligibility


def sdpa_kernels(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                 enable_gqa: bool) -> list[str]:
    """SDPA kernels a CUDA call with these tensors (``[B, H, S, D]``, SDPA's layout) qualifies for.

    On CUDA this asks PyTorch itself (``can_use_flash_attention`` / ``can_use_efficient_attention``);
    elsewhere it applies the same published constraints the CUDA checks enforce: flash takes no
    mask and half precision only; memory-efficient takes masks but not ``enable_gqa``; both need
    a head dim that is a multiple of 8 (4 for fp32 memory-efficient) and equal q/k/v dtypes.
    ``"math"`` always qualifies and is listed last.
    """
    kernels: list[str] = []
    if query.is_cuda:
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

        try:
            params = SDPAParams(query, key, value, attn_mask, 0.0, False, enable_gqa)
        except TypeError:  # a torch whose SDPAParams differs: the published rules below
            params = None
        if params is not None:
            if can_use_flash_attention(params, False):
                kernels.append("flash")
            if can_use_efficient_attention(params, False):
                kernels.append("efficient")
            return [*kernels, "math"]
    head_dim = query.shape[-1]
    same_dtype = query.dtype == key.dtype == value.dtype
    heads_ok = query.shape[1] == key.shape[1] or (enable_gqa and query.shape[1] % key.shape[1] == 0)
    half = query.dtype in (torch.float16, torch.bfloat16)
    if same_dtype and heads_ok and attn_mask is None and half and head_dim % 8 == 0 and head_dim <= 256:
        kernels.append("flash")
    align = 8 if half else 4
    if (same_dtype and not enable_gqa and query.shape[1] == key.shape[1] and head_dim % align == 0
            and query.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        kernels.append("efficient")
    return [*kernels, "math"]
