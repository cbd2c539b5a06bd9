"""Both DiTs at real sizes on a GPU: step time, memory, GEMM efficiency, attention kernel, MoE cost.

    python -m bench.dit_gpu --json          # cuda if present (bf16, real sizes), else CPU (small)
    python -m bench.dit_gpu --json --attention-backend native_varlen   # torch's flash varlen kernel

On a bare GPU box with PyTorch: ``pip install diffusers safetensors``, then run it from the
repository root (it imports ``dit_worker``, ``mammoth_common`` and ``bench`` from there);
``pytest tests/dit/test_cuda.py`` checks what only a GPU can (kernels taken, no CUDA syncs).

Needs only torch + diffusers + safetensors (no vLLM, no Ray): it builds the models from their
configs with random weights on the device. Per config it times the engine's real per-step
forward (``model(latents, t, prepared)``, CFG rows batched, conditions prepared once) of two
copies of the model that differ only in depth (``L1`` and ``L2`` blocks; both resident, their
runs interleaved so machine load hits them alike) and extrapolates to the real depth: ``step(N) = t(L1) + (N - L1) * (t(L2) - t(L1)) / (L2 - L1)``.

Reported per config: ``step_s`` (full model, extrapolated), ``per_layer_ms``, peak memory of
the ``L2`` run and its full-depth estimate (plus the weights the ``L2`` model lacks),
``fraction_of_gemm`` = useful FLOPs / step time / this device's measured bf16 GEMM rate (FLOPs
counted analytically: every GEMM, attention over real tokens only, routed experts at top-k),
the attention each call took (the dispatch plan, which SDPA kernels its actual tensors qualify
for, and on CUDA the attention kernels the profiler saw), and for the MoE DiTs the MoE layer
against a dense GELU FFN with the same active FLOPs on the same tokens.

Real sizes (cuda): the MammothModa2 DiT at 1024x1024 with 16 CFG rows (8 prompts with their
visual-token condition + 8 negative prompts), and the 6B-A1B / 20B-A3B MoE DiTs at
480x832 x 81 frames (2 CFG rows). On CPU the same configs run at small sizes within a couple
of minutes, in bf16 only where the CPU multiplies it natively (else float32). JSON last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_worker.models import attention as attention_mod
from dit_worker.models.compilation import compile_repeated_blocks
from dit_worker.models.moe import MoELayer
from dit_worker.models.transformer_mammoth2 import (
    Mammoth2Condition,
    Mammoth2DiTConfig,
    Mammoth2ImageEmbedderConfig,
    Mammoth2Transformer,
    ffn_inner_dim,
)
from dit_worker.models.transformer_mammoth25 import (
    Mammoth25Condition,
    Mammoth25DiTConfig,
    Mammoth25MoEConfig,
    Mammoth25Transformer,
)
from mammoth_common.cpu import split_native

GIB = 1024 ** 3


# ------------------------------------------------------------------------------------ configs


@dataclass
class Case:
    name: str
    family: str  # "image" | "video"
    config: Mammoth2DiTConfig | Mammoth25DiTConfig
    latent_shape: tuple[int, ...]  # per row, without the batch dim
    prompt_lens: list[int]  # per CFG row: planner prompt tokens
    image_lens: list[int | None]  # image family: visual-token condition length per row (None: uncond)


def real_cases() -> list[Case]:
    image = Mammoth2DiTConfig.dev()
    rows = 16  # 8 prompts + their 8 negative prompts
    return [
        Case("mammoth2-dev 1024x1024 x16 CFG rows", "image", image, (16, 128, 128),
             [120, 20] * (rows // 2), [1056, None] * (rows // 2)),
        Case("mammoth25-6b-a1b 480x832x81 x2 CFG rows", "video", Mammoth25DiTConfig.a6b_a1b(),
             (48, 21, 30, 52), [200, 40], []),
        Case("mammoth25-20b-a3b 480x832x81 x2 CFG rows", "video", Mammoth25DiTConfig.a20b_a3b(),
             (48, 21, 30, 52), [200, 40], []),
    ]


def small_cases() -> list[Case]:
    """CPU sizes: the same structure (GQA, MoE with/without a shared expert), head dim 128."""
    image = Mammoth2DiTConfig(hidden_size=512, num_layers=26, num_refiner_layers=1, num_attention_heads=4,
                              num_kv_heads=2, axes_dim_rope=(32, 48, 48), llm_hidden_size=256,
                              gen_image_condition_refiner_config=Mammoth2ImageEmbedderConfig(num_queries=16,
                                                                                            num_layers=1))

    def video(layers: int, experts: int, top_k: int, shared: int) -> Mammoth25DiTConfig:
        base = Mammoth25DiTConfig.tiny()
        return dataclasses.replace(
            base, num_attention_heads=2, attention_head_dim=128, num_layers=layers,
            moe=Mammoth25MoEConfig(num_layers=layers, hidden_size=256, num_attention_heads=2, ffn_hidden_size=256,
                                   num_moe_experts=experts, moe_router_topk=top_k, num_shared_experts=shared,
                                   shared_expert_intermediate_size=256))

    return [
        Case("mammoth2 small 256x256 x4 CFG rows", "image", image, (16, 32, 32), [24, 6, 24, 6],
             [32, None, 32, None]),
        Case("mammoth25 small (6B-A1B-like MoE) x2 CFG rows", "video", video(32, 16, 4, 0), (16, 3, 16, 16),
             [20, 6], []),
        Case("mammoth25 small (20B-A3B-like MoE) x2 CFG rows", "video", video(30, 24, 5, 1), (16, 3, 16, 16),
             [20, 6], []),
    ]


# ------------------------------------------------------------------------------------ helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """This device's dense GEMM rate (FLOP/s) in ``dtype``: a square matmul large enough to
    saturate it (8192 on CUDA, 1024 on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, repeats * 3, device)
    return 2 * n ** 3 / seconds


def with_layers(config, layers: int):
    if isinstance(config, Mammoth25DiTConfig):
        return dataclasses.replace(config, num_layers=layers, moe=dataclasses.replace(config.moe, num_layers=layers))
    return dataclasses.replace(config, num_layers=layers)


def build(case: Case, layers: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = Mammoth2Transformer if case.family == "image" else Mammoth25Transformer
    with torch.device(device):
        model = cls(with_layers(case.config, layers))
    return model.to(dtype).eval()


def conditions(case: Case, device: torch.device, dtype: torch.dtype) -> list:
    g = torch.Generator().manual_seed(1)
    if case.family == "image":
        d = case.config.llm_hidden_size
        return [Mammoth2Condition(text=torch.randn(n, d, generator=g).to(device, dtype),
                                  image=None if li is None else torch.randn(li, d, generator=g).to(device, dtype))
                for n, li in zip(case.prompt_lens, case.image_lens)]
    d = case.config.refiner.vlm_dim
    return [Mammoth25Condition(prompt=torch.randn(n, d, generator=g).to(device, dtype)) for n in case.prompt_lens]


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------- FLOP model


def row_lengths(case: Case, model: torch.nn.Module, prepared) -> tuple[int, list[int]]:
    """(image/video tokens per row, joint sequence length of each row without padding)."""
    if case.family == "image":
        p = case.config.patch_size
        n = (case.latent_shape[1] // p) * (case.latent_shape[2] // p)
        return n, [n + int(k) for k in prepared.prefix_mask.sum(1).tolist()]
    pt, ph, pw = case.config.patch_size
    _, f, h, w = case.latent_shape
    n = (f // pt) * (h // ph) * (w // pw)
    return n, [n + e for e in prepared.extra_lens]


def block_flops(case: Case, seq_lens: list[int]) -> float:
    """Useful FLOPs of one transformer block over rows of these (unpadded) lengths."""
    c = case.config
    tokens = sum(seq_lens)
    if case.family == "image":
        d, kv = c.hidden_size, c.num_kv_heads * c.head_dim
        ffn = ffn_inner_dim(d, c.multiple_of, c.ffn_dim_multiplier)
        linear = 2 * tokens * (2 * d * d + 2 * d * kv + 3 * d * ffn)
    else:
        d, moe = c.inner_dim, c.moe
        experts = 2 * 2 * d * moe.ffn_hidden_size * moe.moe_router_topk
        shared = 2 * 2 * d * moe.shared_expert_intermediate_size * moe.num_shared_experts
        linear = 2 * tokens * 4 * d * d + tokens * (experts + shared + 2 * d * moe.num_moe_experts)
    attention = sum(4 * s * s * d for s in seq_lens)
    return float(linear + attention)


def step_flops(case: Case, layers: int, n_latent: int, seq_lens: list[int]) -> float:
    """The blocks dominate; the image DiT's noise refiner runs its blocks over image tokens."""
    rows = len(seq_lens)
    flops = layers * block_flops(case, seq_lens)
    if case.family == "image":
        flops += case.config.num_refiner_layers * block_flops(case, [n_latent] * rows)
    return flops


# ------------------------------------------------------------------------------ attention seen


def attention_report(model: torch.nn.Module, forward: Callable[[], object], device: torch.device) -> dict:
    """Dispatch plans, SDPA eligibility of the actual tensors, and (CUDA) the kernels run."""
    plans: Counter = Counter()
    eligible: Counter = Counter()
    original_plan = attention_mod.plan_attention
    original_sdpa = F.scaled_dot_product_attention

    def plan_spy(*args, **kwargs):
        plan = original_plan(*args, **kwargs)
        plans[f"{plan.backend}/{plan.mask}{'/expanded_kv' if plan.expand_kv else ''}"
              f"{'/gqa' if plan.enable_gqa else ''}"] += 1
        return plan

    def sdpa_spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        eligible[attention_mod.sdpa_kernels(query, key, value, attn_mask, enable_gqa)[0]] += 1
        return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)

    attention_mod.plan_attention = plan_spy
    torch.nn.functional.scaled_dot_product_attention = sdpa_spy
    try:
        forward()
    finally:
        attention_mod.plan_attention = original_plan
        torch.nn.functional.scaled_dot_product_attention = original_sdpa
    report = {"plans": dict(plans), "best_sdpa_kernel_eligible": dict(eligible)}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward()
            _sync(device)
        words = ("flash", "fmha", "attention", "efficient", "softmax")
        kernels = {e.key: round(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3, 3)
                   for e in prof.key_averages() if any(w in e.key.lower() for w in words)}
        report["cuda_attention_kernels_ms"] = kernels
    return report


def attention_timings(case: Case, seq_lens: list[int], device: torch.device, dtype: torch.dtype,
                      repeats: int) -> dict:
    """One padded joint-sequence attention of this batch, timed per way of running it: ``before``
    is the old call (boolean mask + ``enable_gqa`` straight into SDPA), then the seam's backends
    that can run here."""
    c = case.config
    if case.family == "image":
        heads, kv_heads, head_dim = c.num_attention_heads, c.num_kv_heads, c.head_dim
    else:
        heads = kv_heads = c.num_attention_heads
        head_dim = c.attention_head_dim
    rows, seq = len(seq_lens), max(seq_lens)
    q = torch.randn(rows, seq, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(rows, seq, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.arange(seq, device=device) < torch.tensor(seq_lens, device=device)[:, None]
    runs: dict[str, Callable[[], object]] = {
        "before": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
            enable_gqa=heads != kv_heads),
        "native": lambda: attention_mod.attention(q, k, v, mask),
    }
    if attention_mod.native_varlen_problem(device) is None:
        runs["native_varlen"] = lambda: attention_mod.attention(q, k, v, mask, backend="native_varlen")
    out = {}
    with torch.inference_mode():
        for name, fn in runs.items():
            try:
                out[name] = round(median_seconds(fn, repeats, device) * 1e3, 3)
            except (RuntimeError, ValueError) as error:  # e.g. out of memory for the math kernel
                out[name] = f"failed: {str(error).splitlines()[0][:120]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------- measuring


def moe_vs_dense(layer: MoELayer, tokens: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """The MoE layer against a dense GELU FFN of width ``top_k * ffn + shared`` (same active FLOPs)."""
    from bench.moe_layer import balance_router

    layer = copy.deepcopy(layer)
    d = layer.experts.hidden_size
    width = layer.top_k * layer.experts.ffn_hidden_size
    if layer.shared_experts is not None:
        width += layer.shared_experts.weight1.shape[0]
    balance_router(layer, torch.randn(min(tokens, 8192), d, device=device, dtype=dtype), steps=200)
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    w1 = torch.randn(width, d, device=device, dtype=dtype) * d ** -0.5
    w2 = torch.randn(d, width, device=device, dtype=dtype) * width ** -0.5
    with torch.inference_mode():
        moe_s = median_seconds(lambda: layer(x), repeats, device)
        dense_s = median_seconds(lambda: F.linear(F.gelu(F.linear(x, w1), approximate="tanh"), w2), repeats, device)
        path = layer.resolved_path(x)
    return {"tokens": tokens, "path": path, "moe_ms": round(moe_s * 1e3, 3), "dense_ms": round(dense_s * 1e3, 3),
            "moe_over_dense": round(moe_s / dense_s, 3)}


def measure(case: Case, device: torch.device, dtype: torch.dtype, layers: tuple[int, int], repeats: int,
            gemm: float, backend: str, compile_blocks: bool) -> dict:
    full_layers = case.config.num_layers
    weights, forwards, models = {}, {}, {}
    report: dict = {}
    with torch.inference_mode():
        for n in layers:  # both depths resident, so their runs interleave (load drift hits both)
            model = build(case, n, device, dtype)
            attention_mod.set_attention_backend(model, backend, device)
            if compile_blocks:
                compile_repeated_blocks(model)
            weights[n] = param_bytes(model)
            prepared = model.prepare(conditions(case, device, dtype))
            rows = len(case.prompt_lens)
            latents = torch.randn(rows, *case.latent_shape, device=device, dtype=dtype)
            t = torch.full((rows,), 0.5 if case.family == "image" else 500.0, device=device)
            forwards[n] = lambda model=model, prepared=prepared, latents=latents, t=t: model(latents, t, prepared)
            models[n] = (model, prepared)
        samples: dict[int, list[float]] = {n: [] for n in layers}
        for fn in forwards.values():
            fn()
        for _ in range(repeats):
            for n, fn in forwards.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                samples[n].append(time.perf_counter() - start)
        timings = {n: statistics.median(v) for n, v in samples.items()}
        l1, l2 = layers
        if device.type == "cuda":  # one deep forward alone; the shallow model's weights are resident
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            forwards[l2]()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - weights[l1]
        model, prepared = models[l1]
        n_latent, seq_lens = row_lengths(case, model, prepared)
        report["attention"] = attention_report(model, forwards[l1], device)
        report["attention"]["one_call_ms"] = attention_timings(case, seq_lens, device, dtype, repeats)
        if case.family == "video":
            report["moe_layer"] = moe_vs_dense(model.blocks[0].ffn, sum(seq_lens), device, dtype, repeats)
    del models, forwards, model, prepared
    if device.type == "cuda":
        torch.cuda.empty_cache()
    per_layer = max(0.0, (timings[l2] - timings[l1]) / (l2 - l1))
    step_s = timings[l1] + (full_layers - l1) * per_layer
    flops = step_flops(case, full_layers, n_latent, seq_lens)
    full_weights = weights[l1] + (full_layers - l1) * (weights[l2] - weights[l1]) / (l2 - l1)
    result = {
        "name": case.name,
        "rows": len(case.prompt_lens),
        "latent_tokens_per_row": n_latent,
        "seq_lens": seq_lens,
        "layers_full": full_layers,
        "layers_timed": list(layers),
        "timed_s": {str(k): round(v, 5) for k, v in timings.items()},
        "per_layer_ms": round(per_layer * 1e3, 3),
        "step_s": round(step_s, 4),
        "step_tflop": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / step_s / 1e12, 2) if step_s else None,
        "fraction_of_gemm": round(flops / step_s / gemm, 3) if step_s else None,
        **report,
    }
    if device.type == "cuda":
        result["peak_mem_gib_timed"] = round(peak / GIB, 2)
        result["peak_mem_gib_full_est"] = round((peak + full_weights - weights[l2]) / GIB, 2)
    result["weights_gib_full"] = round(full_weights / GIB, 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--layers", default="1,3", help="the two depths timed (L1,L2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 5 cuda, 2 cpu)")
    parser.add_argument("--sizes", default="auto", help="auto (real on cuda, small on cpu) | real | small")
    parser.add_argument("--only", default="", help="comma-separated case-name substrings")
    parser.add_argument("--attention-backend", default="native", help="diffusers attention backend name")
    parser.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    layers = tuple(int(x) for x in args.layers.split(","))
    if len(layers) != 2 or not 0 < layers[0] < layers[1]:
        parser.error("--layers: two increasing depths, e.g. 1,3")
    attention_mod.check_backend(args.attention_backend)
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    skipped: dict[str, str] = {}
    if device.type == "cuda":
        dtype = torch.bfloat16
    else:
        native, skipped = split_native(["bfloat16"])
        dtype = torch.bfloat16 if native else torch.float32
    sizes = args.sizes if args.sizes != "auto" else ("real" if device.type == "cuda" else "small")
    cases = real_cases() if sizes == "real" else small_cases()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    if device.type == "cpu":
        layers = (layers[0], min(layers[1], layers[0] + 1)) if sizes == "small" else layers
    gemm = gemm_rate(device, dtype, repeats)
    results = [measure(c, device, dtype, layers, repeats, gemm, args.attention_backend, args.compile)
               for c in cases]
    video = [r for r in results if "moe_layer" in r]
    result = {
        "bench": "dit_gpu",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "sizes": sizes,
        "attention_backend": args.attention_backend,
        "compile": args.compile,
        "gemm_tflops": round(gemm / 1e12, 3),
        "skipped": skipped,
        "cases": results,
        "goals": {
            "moe_step_fraction_of_gemm_ge_0.5": all((r["fraction_of_gemm"] or 0) >= 0.5 for r in video) if video else None,
            "moe_layer_over_dense_le_1.3": all(r["moe_layer"]["moe_over_dense"] <= 1.3 for r in video) if video else None,
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
