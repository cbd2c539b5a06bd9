"""MammothModa2.5 video DiT: Wan-style 3D transformer whose every FFN is a mixture of experts.

Matches the official ``WanTransformer3DModel`` subclass (state-dict keys, config keys, math):
patchify ``(1, 2, 2)`` with a Conv3d, 3D RoPE on video tokens, self-attention only, the prompt
prepended in context (refiner -> ``in_context_proj`` -> learned ``vlm_pos_embed``, identity
RoPE), per-sample timestep modulation, MoE FFNs, and for video editing the source-video
latents appended as extra tokens that share the noisy video's RoPE positions.

The work is split by what depends on the diffusion time:

* ``prepare(conditions)`` -- once per request and CFG branch, batched: refiner, context
  projection + position embedding, patch embedding of the source video;
* ``forward(latents, timestep, prepared)`` -- per step.

Per row the sequence is ``[video | source | context | padding]``. The official model pads the
prompt to 512 tokens and runs the padding through every layer (masked only as attention keys);
here padding is dropped: it is masked out of attention (a ``[B, 1, 1, S]`` key mask, never
``S x S``) and skipped by the MoE layers, so a padded batch equals each row run alone. The
refiner keeps the official 512-padding semantics exactly but cheaply (see
``mammoth25_refiner``).

Conventions: ``timestep`` is the flow-matching scheduler's ``sigma * 1000`` (1000 = pure
noise); the output is the velocity ``noise - data`` that diffusers'
``FlowMatchEulerDiscreteScheduler.step`` integrates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, get_1d_rotary_pos_embed
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention
from torch import nn

from dit_worker.checkpoint import DataclassConfig
from dit_worker.models.attention import attention
from dit_worker.models.mammoth25_refiner import (
    Mammoth25RefinerConfig,
    Mammoth25RefinerLayerConfig,
    RefinerInputs,
    VLMTokenRefiner,
)
from dit_worker.models.moe import MoELayer, expert_counts
from dit_worker.step_cache import ForwardCache, select_rows

BYT5_DIM = 1472  # ByT5 glyph encoder width (hard-coded in the official ``ByT5Mapper``)
BYT5_MAPPED_DIM = 4096

# ------------------------------------------------------------------------------------------ Config


@dataclass
class Mammoth25MoEConfig(DataclassConfig):
    """Official ``MoELayerConfig`` keys (the official code picks one of two module constants by
    head count; here it is part of the config). ``params_dtype`` is a dtype name."""

    num_layers: int = 32
    hidden_size: int = 1536
    num_attention_heads: int = 12
    ffn_hidden_size: int = 2048
    num_moe_experts: int = 32
    moe_router_score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    moe_grouped_gemm: bool = False
    moe_router_topk: int = 4
    moe_router_dtype: str = "fp32"
    add_bias_linear: bool = False
    use_cpu_initialization: bool = True
    gated_linear_unit: bool = False
    params_dtype: str = "bfloat16"
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 2048

    def __post_init__(self) -> None:
        if self.moe_router_score_function != "sigmoid":
            raise ValueError("moe.moe_router_score_function: only 'sigmoid' is used by MammothModa2.5")
        if self.gated_linear_unit or self.add_bias_linear:
            raise ValueError("moe: gated or biased experts do not exist in MammothModa2.5")


@dataclass
class Mammoth25DiTConfig(DataclassConfig):
    """The official ``WanTransformer3DModel`` constructor keys, plus what the official code
    hard-codes: ``text_len`` (prompt pad length = rows of ``vlm_pos_embed``), the MoE config and
    the refiner config. ``ffn_dim``, ``cross_attn_norm``, ``qk_norm``, ``image_dim``,
    ``added_kv_proj_dim`` and ``pos_embed_seq_len`` shape nothing in MammothModa2.5 (MoE FFNs,
    no cross-attention) and are kept so an official config round-trips."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 48
    out_channels: int = 48
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 32
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    enable_byt5: bool = False
    text_len: int = 512
    moe: Mammoth25MoEConfig = field(default_factory=Mammoth25MoEConfig)
    refiner: Mammoth25RefinerConfig = field(default_factory=Mammoth25RefinerConfig)

    def __post_init__(self) -> None:
        if self.moe.hidden_size != self.inner_dim:
            raise ValueError(f"moe.hidden_size {self.moe.hidden_size} != heads x head_dim {self.inner_dim}")
        if self.image_dim is not None or self.added_kv_proj_dim is not None:
            raise ValueError("image_dim / added_kv_proj_dim: image cross-attention does not exist here")
        if self.enable_byt5 and self.text_dim != BYT5_MAPPED_DIM:
            raise ValueError(f"enable_byt5 needs text_dim == {BYT5_MAPPED_DIM}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def tiny(cls) -> Mammoth25DiTConfig:
        """CPU-sized: every code path (shared expert included), real head-dim split of RoPE.
        ``text_len`` stays the official 512 (hard-coded there): padding costs nothing here."""
        return cls(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
                   text_dim=128, ffn_dim=256, num_layers=2, rope_max_seq_len=256,
                   moe=Mammoth25MoEConfig(num_layers=2, hidden_size=128, num_attention_heads=2,
                                          ffn_hidden_size=96, num_moe_experts=8, moe_router_topk=2,
                                          num_shared_experts=1, shared_expert_intermediate_size=64),
                   refiner=Mammoth25RefinerConfig(vlm_dim=128, transformer_config=Mammoth25RefinerLayerConfig(
                       hidden_size=128, num_heads=8, ffn_dim=128)))

    @classmethod
    def a6b_a1b(cls) -> Mammoth25DiTConfig:
        return cls(num_attention_heads=12, num_layers=32, moe=Mammoth25MoEConfig(
            num_layers=32, hidden_size=1536, num_attention_heads=12, ffn_hidden_size=2048,
            num_moe_experts=32, moe_router_topk=4, num_shared_experts=0))

    @classmethod
    def a20b_a3b(cls) -> Mammoth25DiTConfig:
        return cls(num_attention_heads=24, num_layers=30, moe=Mammoth25MoEConfig(
            num_layers=30, hidden_size=3072, num_attention_heads=24, ffn_hidden_size=1920,
            num_moe_experts=48, moe_router_topk=5, num_shared_experts=1,
            shared_expert_intermediate_size=2048))


# -------------------------------------------------------------------------------- Engine contract


@dataclass
class Mammoth25Condition:
    """One CFG branch of one request.

    ``prompt``: planner last hidden states of the prompt, unpadded ``[L, vlm_dim]`` (longer
    prompts are cut to ``text_len`` like the reference tokenizer does); ``prompt_mask``: optional
    ``[L]`` keep-mask; ``source_latents``: ``[C, F, h, w]`` source video (editing) or None;
    ``glyph``: ByT5 states ``[Lg, 1472]`` of quoted text, only for ``enable_byt5`` checkpoints.
    """

    prompt: torch.Tensor
    prompt_mask: torch.Tensor | None = None
    source_latents: torch.Tensor | None = None
    glyph: torch.Tensor | None = None


@dataclass
class Mammoth25Prepared:
    """Timestep-independent per-row tokens: ``extra[i] = [source_i | context_i | padding]``."""

    extra: torch.Tensor  # [B, V, D]
    extra_lens: list[int]
    source_lens: list[int]
    source_grids: list[tuple[int, int, int] | None]

    @property
    def batch_size(self) -> int:
        return self.extra.shape[0]

    def select(self, indices: list[int]) -> Mammoth25Prepared:
        width = max((self.extra_lens[i] for i in indices), default=0)
        index = torch.tensor(indices, dtype=torch.long, device=self.extra.device)
        return Mammoth25Prepared(self.extra.index_select(0, index)[:, :width],
                                 [self.extra_lens[i] for i in indices],
                                 [self.source_lens[i] for i in indices],
                                 [self.source_grids[i] for i in indices])


# ----------------------------------------------------------------------------------------- Modules


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's ``[cos, sin]`` embedding, computed in float64 like the reference."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device).div(half))
    angles = torch.outer(timestep.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


class TimeEmbedding(nn.Module):
    """``condition_embedder``: sinusoid -> MLP (``temb``) -> six modulation vectors per block."""

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, dim * 6)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = timestep_sinusoid(timestep, 256)  # the reference hard-codes 256 here
        temb = self.time_embedder(freqs.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        return temb, self.time_proj(self.act_fn(temb)).unflatten(1, (6, -1))


class ByT5Mapper(nn.Module):
    """Glyph-text (ByT5) states -> the refiner's output width (official ``byt5_in``)."""

    def __init__(self, in_dim: int = BYT5_DIM, hidden_dim: int = BYT5_MAPPED_DIM, out_dim: int = BYT5_MAPPED_DIM):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.fc3 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc2(F.gelu(self.fc1(self.layernorm(x)))))
        return self.fc3(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved channel pairs; ``cos/sin [.., S, 1, head_dim]`` repeat each
    angle twice, so the even (cos) / odd (sin) entries are the per-pair values."""
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class Mammoth25AttnProcessor:
    """Self-attention of a ``WanAttention`` (its weights and norms) through the DiT attention
    seam, so the video DiT shares the image DiT's kernel rules and backend switch.

    ``_attention_backend`` / ``_parallel_config`` as on diffusers' processors (see
    ``models.attention.set_attention_backend`` / ``set_parallel_config``).
    """

    _attention_backend: str | None = None
    _parallel_config = None

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("the MammothModa2.5 DiT has self-attention only")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        out = attention(q, k, v, attention_mask, backend=self._attention_backend,
                        parallel_config=self._parallel_config)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class Mammoth25Block(nn.Module):
    """Modulated self-attention + modulated MoE FFN (names of the official block)."""

    def __init__(self, config: Mammoth25DiTConfig):
        super().__init__()
        dim, moe = config.inner_dim, config.moe
        self.norm1 = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim=dim, heads=config.num_attention_heads, dim_head=config.attention_head_dim,
                                  eps=config.eps, processor=Mammoth25AttnProcessor())
        self.ffn = MoELayer(dim, moe.num_moe_experts, moe.moe_router_topk, moe.ffn_hidden_size,
                            num_shared_experts=moe.num_shared_experts,
                            shared_ffn_hidden_size=moe.shared_expert_intermediate_size,
                            enable_expert_bias=moe.moe_router_enable_expert_bias,
                            router_dtype=moe.moe_router_dtype)
        self.norm3 = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + modulation.float()).chunk(6, dim=1)
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, None, key_mask, rope) * gate).type_as(x)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        if valid is None:
            ff = self.ffn(h)
        else:  # padding never reaches the experts (nor their load counts)
            flat = h.reshape(-1, h.shape[-1])
            ff = torch.zeros_like(flat).index_copy_(0, valid, self.ffn(flat.index_select(0, valid))).view_as(h)
        return (x.float() + ff.float() * c_gate).type_as(x)


class Mammoth25Transformer(nn.Module):
    """The MammothModa2.5 DiT with a batched ``prepare`` / ``forward`` split."""

    _repeated_blocks = ("Mammoth25Block",)  # what ``compile_repeated_blocks`` compiles
    supports_packing = False  # one latent shape per forward (the engine groups rows by shape)
    supports_step_cache = True
    # Kept in fp32 by ``.to(dtype)`` as the reference's ``_keep_in_fp32_modules`` does.
    _keep_in_fp32_modules = ("time_embedder", "scale_shift_table")

    def __init__(self, config: Mammoth25DiTConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.condition_embedder = TimeEmbedding(dim, config.freq_dim)
        self.blocks = nn.ModuleList(Mammoth25Block(config) for _ in range(config.num_layers))
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)
        self.converter_mlp = VLMTokenRefiner(config.refiner, config.text_dim)
        self.in_context_proj = nn.Linear(config.text_dim, dim)
        self.vlm_pos_embed = nn.Parameter(torch.randn(1, config.text_len, dim) * 0.02)
        if config.enable_byt5:
            self.byt5_in = ByT5Mapper()
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layout_cache: dict[tuple, tuple] = {}

    # -- dtype handling ----------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        kept = {name: p.data for name, p in self.named_parameters()
                if p.dtype == torch.float32 and any(k in name for k in self._keep_in_fp32_modules)}
        result = super()._apply(fn, recurse)
        for name, old in kept.items():
            param = self.get_parameter(name)
            if param.dtype != torch.float32:
                on_meta = old.device.type == "meta" or param.device.type == "meta"
                param.data = param.data.float() if on_meta else old.to(param.device)
        self._rope_cache = {}
        self._layout_cache = {}
        return result

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def expert_counts(self) -> dict[str, list[int]]:
        """Per-layer tokens per expert of the last forward (real tokens only)."""
        return expert_counts(self)

    # -- RoPE ----------------------------------------------------------------------------------
    def _video_rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Wan 3D RoPE tables ``[N, head_dim]`` (interleaved real form, fp32), cached per grid."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            hd = self.config.attention_head_dim
            h_dim = w_dim = 2 * (hd // 6)
            dims = (hd - h_dim - w_dim, h_dim, w_dim)
            cos_parts, sin_parts = [], []
            for axis, (dim, n) in enumerate(zip(dims, grid)):
                cos, sin = get_1d_rotary_pos_embed(dim, self.config.rope_max_seq_len, 10000.0, use_real=True,
                                                   repeat_interleave_real=True, freqs_dtype=torch.float64)
                shape = [1, 1, 1, dim]
                shape[axis] = n
                cos_parts.append(cos[:n].view(shape).expand(*grid, dim))
                sin_parts.append(sin[:n].view(shape).expand(*grid, dim))
            cos = torch.cat(cos_parts, dim=-1).reshape(-1, hd).float().to(device)
            sin = torch.cat(sin_parts, dim=-1).reshape(-1, hd).float().to(device)
            self._rope_cache[key] = (cos, sin)
        return self._rope_cache[key]

    # -- prepare ---------------------------------------------------------------------------------
    def _prompt_tokens(self, condition: Mammoth25Condition) -> torch.Tensor:
        prompt = condition.prompt
        if prompt.ndim != 2 or prompt.shape[1] != self.config.refiner.vlm_dim:
            raise ValueError(f"prompt: expected [L, {self.config.refiner.vlm_dim}], got {tuple(prompt.shape)}")
        if condition.prompt_mask is not None:
            prompt = prompt[condition.prompt_mask.to(torch.bool).to(prompt.device)]
        return prompt[: self.config.text_len]

    @torch.no_grad()
    def prepare(self, conditions: list[Mammoth25Condition]) -> Mammoth25Prepared:
        """Refiner, context projection + positions and source patch embedding, batched."""
        if not conditions:
            raise ValueError("prepare: no conditions")
        device, dtype, text_len = self.device, self.dtype, self.config.text_len
        inputs = RefinerInputs.build([self._prompt_tokens(c) for c in conditions], text_len,
                                     device=device, dtype=dtype)
        refined = self.converter_mlp(inputs.states, inputs.key_bias)
        rows: list[torch.Tensor] = []
        for i, condition in enumerate(conditions):
            tokens = refined[i, : inputs.lengths[i]]
            if condition.glyph is not None and self.config.enable_byt5:
                tokens = torch.cat([tokens, self.byt5_in(condition.glyph.to(device, dtype))])[:text_len]
            rows.append(tokens)
        width = max(r.shape[0] for r in rows)
        context = refined.new_zeros(len(rows), width, self.config.text_dim)
        for i, r in enumerate(rows):
            context[i, : r.shape[0]] = r
        context = self.in_context_proj(context) + self.vlm_pos_embed[:, :width].to(dtype)
        context_lens = [r.shape[0] for r in rows]

        sources: list[torch.Tensor | None] = []
        grids: list[tuple[int, int, int] | None] = []
        for condition in conditions:
            if condition.source_latents is None:
                sources.append(None)
                grids.append(None)
                continue
            emb = self.patch_embedding(condition.source_latents.to(device, dtype).unsqueeze(0))
            grids.append(tuple(emb.shape[2:]))
            sources.append(emb.flatten(2).transpose(1, 2)[0])
        source_lens = [0 if s is None else s.shape[0] for s in sources]
        extra_lens = [s + c for s, c in zip(source_lens, context_lens)]
        extra = context.new_zeros(len(rows), max(extra_lens), context.shape[-1])
        for i, (src, s, c) in enumerate(zip(sources, source_lens, context_lens)):
            if src is not None:
                extra[i, :s] = src
            extra[i, s: s + c] = context[i, :c]
        return Mammoth25Prepared(extra, extra_lens, source_lens, grids)

    # -- forward ----------------------------------------------------------------------------------
    def _patchify(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        emb = self.patch_embedding(latents)
        return emb.flatten(2).transpose(1, 2), tuple(emb.shape[2:])

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        (pt, ph, pw), (f, h, w) = self.config.patch_size, grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _row_rope(self, prepared: Mammoth25Prepared, grid: tuple[int, int, int],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B or 1, S, 1, hd]``: video positions; source = same positions; context = identity."""
        cos, sin = self._video_rope(grid, device)
        n, width = cos.shape[0], prepared.extra.shape[1]
        if width == 0:
            return cos[None, :, None], sin[None, :, None]
        # Row n of the extended tables is the identity rotation (cos 1, sin 0).
        cos_ext = torch.cat([cos, torch.ones_like(cos[:1])])
        sin_ext = torch.cat([sin, torch.zeros_like(sin[:1])])
        j = torch.arange(width, device=device)
        # One table broadcast over the batch when every row has the same source length (always
        # for T2V); per-row tables otherwise (editing with an uncond branch without source).
        lens = sorted(set(prepared.source_lens))
        src = torch.tensor(lens if len(lens) == 1 else prepared.source_lens, device=device).unsqueeze(1)
        index = torch.where(j < src, j, n)  # [1 or B, V]
        rows = index.shape[0]
        cos_rows = torch.cat([cos.expand(rows, -1, -1), cos_ext[index]], dim=1)
        sin_rows = torch.cat([sin.expand(rows, -1, -1), sin_ext[index]], dim=1)
        return cos_rows.unsqueeze(2), sin_rows.unsqueeze(2)

    def _row_layout(self, prepared: Mammoth25Prepared, grid: tuple[int, int, int], n_video: int,
                    device: torch.device) -> tuple:
        """(RoPE, key mask ``[B, S]`` or None, flat indices of real tokens or None) of a batch
        layout, built from the host-side lengths and cached: the per-step forward reads no value
        back from the device (no host sync)."""
        width = prepared.extra.shape[1]
        key = (grid, tuple(prepared.source_lens), tuple(prepared.extra_lens), width, str(device))
        if key not in self._layout_cache:
            if len(self._layout_cache) > 32:
                self._layout_cache.clear()
            lens = [n_video + e for e in prepared.extra_lens]
            key_mask = valid = None
            if min(lens) < n_video + width:
                mask = torch.arange(n_video + width) < torch.tensor(lens).unsqueeze(1)  # [B, S], on the host
                key_mask = mask.to(device)
                valid = mask.reshape(-1).nonzero().squeeze(1).to(device)
            self._layout_cache[key] = (self._row_rope(prepared, grid, device), key_mask, valid)
        return self._layout_cache[key]

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, prepared: Mammoth25Prepared,
                step_cache: ForwardCache | None = None) -> torch.Tensor:
        """``latents [B, C, F, H, W]``, ``timestep [B]`` (sigma x 1000) -> velocity, same shape.
        ``step_cache`` (``dit_worker.step_cache``) lets rows skip blocks 1.. on cached steps."""
        batch = latents.shape[0]
        if prepared.batch_size != batch or timestep.shape != (batch,):
            raise ValueError(f"batch mismatch: latents {batch}, timestep {tuple(timestep.shape)}, "
                             f"prepared {prepared.batch_size}")
        if any(n % p for n, p in zip(latents.shape[2:], self.config.patch_size)):
            raise ValueError(f"latents {tuple(latents.shape[2:])} do not tile into patches {self.config.patch_size}")
        dtype, device = self.dtype, latents.device
        video, grid = self._patchify(latents.to(dtype))
        for g in prepared.source_grids:
            if g is not None and g != grid:
                raise ValueError(f"source video grid {g} differs from the latents' grid {grid}")
        n_video = video.shape[1]
        x = torch.cat([video, prepared.extra.to(dtype)], dim=1) if prepared.extra.shape[1] else video
        rope, key_mask, valid = self._row_layout(prepared, grid, n_video, device)
        temb, modulation = self.condition_embedder(timestep, dtype)
        if step_cache is None or len(self.blocks) < 2:
            for block in self.blocks:
                x = block(x, modulation, rope, key_mask, valid)
        else:
            block_in = x
            first = self.blocks[0](x, modulation, rope, key_mask, valid)

            def rest(rows: torch.Tensor | None) -> torch.Tensor:
                hidden, mod, sub_rope, sub_mask, sub_valid = first, modulation, rope, key_mask, valid
                if rows is not None:
                    hidden, mod = first.index_select(0, rows), modulation.index_select(0, rows)
                    sub_rope = (select_rows(rope[0], rows), select_rows(rope[1], rows))
                    sub_mask = select_rows(key_mask, rows)
                    sub_valid = None if sub_mask is None else sub_mask.reshape(-1).nonzero().squeeze(1)
                for block in self.blocks[1:]:
                    hidden = block(hidden, mod, sub_rope, sub_mask, sub_valid)
                return hidden

            x = step_cache.apply(block_in, first, 0, [n_video] * batch, rest)
        x = x[:, :n_video]
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self._unpatchify(self.proj_out(x), grid)


def count_parameters(config: Mammoth25DiTConfig) -> dict[str, int]:
    """Total and per-token active parameters (only ``top_k`` routed experts count as active).

    ``total``/``active`` include the refiner (~0.24B at vlm_dim 4096, run once per request);
    ``backbone_*`` leave it out -- the preset names (6B-A1B, 20B-A3B) match those."""
    with torch.device("meta"):
        model = Mammoth25Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    moe = config.moe
    per_expert = 2 * config.inner_dim * moe.ffn_hidden_size
    idle = config.num_layers * per_expert * (moe.num_moe_experts - moe.moe_router_topk)
    refiner = sum(p.numel() for p in model.converter_mlp.parameters())
    return {"total": total, "active": total - idle, "refiner": refiner,
            "backbone_total": total - refiner, "backbone_active": total - idle - refiner}
