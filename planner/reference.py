"""Pure-PyTorch reference of the planner LLM (text path), with the official weight names.

Used to build random checkpoints, to count parameters on the meta device, to check vLLM's
outputs in tests, and as the baseline in ``bench.planner``. Text-only prompts: with equal
t/h/w positions M-RoPE (Qwen3-VL's interleaved one, Qwen2.5-VL's sectioned one) is plain 1-D
RoPE, which is what this uses. Both backbones: Qwen3-VL (q/k RMSNorm, no q/k/v bias) and
Qwen2.5-VL (MammothModa2-Preview: q/k/v bias, no q/k norm), chosen by the config's
``model_type``. The vision tower is transformers' (weights only; not run here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import (
    QWEN25_MODEL_TYPE,
    Mammothmoda2Qwen2_5_VLVisionConfig,
    Mammothmoda2Qwen3VLVisionConfig,
    moe_layer_enabled,
)


def is_qwen25(config: dict) -> bool:
    """Whether a planner config is the Qwen2.5-VL backbone (else Qwen3-VL)."""
    return config.get("model_type") == QWEN25_MODEL_TYPE


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: dict, qwen25: bool = False):
        super().__init__()
        d, hd = cfg["hidden_size"], head_dim(cfg)
        self.nh, self.nkv, self.hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], hd
        self.q_proj = nn.Linear(d, self.nh * hd, bias=qwen25)
        self.k_proj = nn.Linear(d, self.nkv * hd, bias=qwen25)
        self.v_proj = nn.Linear(d, self.nkv * hd, bias=qwen25)
        self.o_proj = nn.Linear(self.nh * hd, d, bias=False)
        self.q_norm = None if qwen25 else RMSNorm(hd, cfg["rms_norm_eps"])
        self.k_norm = None if qwen25 else RMSNorm(hd, cfg["rms_norm_eps"])

    def forward(self, x, cos, sin, cache: list | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        past = 0
        if cache is not None:
            if cache:
                past = cache[0].shape[2]
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        if t == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, idx: int, qwen25: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg, qwen25)
        self.mlp = MLP(cfg["hidden_size"], cfg["intermediate_size"])
        self.gen_mlp = (
            MLP(cfg["hidden_size"], cfg["intermediate_size"]) if moe_layer_enabled(cfg["moe_type"], idx) else None
        )
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, x, cos, sin, gen_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if self.gen_mlp is not None and bool(gen_mask.any()):
            out = torch.where(gen_mask.unsqueeze(-1), self.gen_mlp(h), out)
        return x + out


class TextModel(nn.Module):
    def __init__(self, cfg: dict, qwen25: bool = False):
        super().__init__()
        d = cfg["hidden_size"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], d)
        self.gen_embed_tokens = nn.Embedding(cfg["gen_vocab_size"], d)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, qwen25) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(d, cfg["rms_norm_eps"])


class Inner(nn.Module):
    def __init__(self, cfg: dict, vision: dict | None, qwen25: bool = False):
        super().__init__()
        if vision is not None and qwen25:
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
                Qwen2_5_VisionTransformerPretrainedModel,
            )

            self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(
                Mammothmoda2Qwen2_5_VLVisionConfig(**vision))
        elif vision is not None:
            from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

            self.visual = Qwen3VLVisionModel._from_config(Mammothmoda2Qwen3VLVisionConfig(**vision))
        self.language_model = TextModel(cfg, qwen25)


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [B, T, vocab + gen_vocab]
    hidden_states: list[torch.Tensor]  # HF convention: L+1 entries, last one normed


class ReferencePlanner(nn.Module):
    """Same parameters and math as the vLLM model (and the official HF model), text path."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = dict(config["text_config"])
        for k in ("gen_vocab_size", "gen_vocab_start_index", "moe_type"):
            cfg.setdefault(k, config.get(k))
        self.cfg = cfg
        self.start = int(cfg["gen_vocab_start_index"])
        qwen25 = is_qwen25(config)
        self.model = Inner(cfg, config.get("vision_config"), qwen25)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.gen_head = nn.Linear(cfg["hidden_size"], cfg["gen_vocab_size"], bias=False)
        rope = cfg.get("rope_scaling") or {}
        theta = float(cfg.get("rope_theta", rope.get("rope_theta", 1000000.0 if qwen25 else 5000000.0)))
        hd = head_dim(cfg)
        self.register_buffer(
            "inv_freq", 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd), persistent=False
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        lm = self.model.language_model
        gen = ids >= self.start
        x = lm.embed_tokens(ids.masked_fill(gen, 0))
        return torch.where(gen.unsqueeze(-1), lm.gen_embed_tokens((ids - self.start).clamp(min=0)), x)

    def forward(self, ids: torch.Tensor, cache: list | None = None, past: int = 0, heads: str = "full") -> ForwardOut:
        """ids [B, T]; ``cache`` a list of per-layer [k, v] lists for incremental decoding."""
        x = self.embed(ids)
        pos = torch.arange(past, past + ids.shape[1], dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None].to(x.dtype), emb.sin()[None, None].to(x.dtype)
        gen_mask = ids >= self.start
        hidden = [x]
        lm = self.model.language_model
        for i, layer in enumerate(lm.layers):
            x = layer(x, cos, sin, gen_mask, None if cache is None else cache[i])
            hidden.append(x)
        hidden[-1] = lm.norm(x)
        h = hidden[-1]
        if heads == "gen":
            logits = self.gen_head(h)
        else:
            logits = torch.cat([self.lm_head(h), self.gen_head(h)], dim=-1)
        return ForwardOut(logits, hidden)

    @torch.inference_mode()
    def condition(self, ids: torch.Tensor, layers) -> torch.Tensor:
        """Average of the given hidden-state indices over ``ids`` [T] -> [T, D] (official recipe)."""
        out = self.forward(ids[None])
        return torch.stack([out.hidden_states[k] for k in layers]).mean(0)[0]

    @torch.inference_mode()
    def generate_plan(
        self,
        prompt_ids: list[int],
        *,
        ar_height: int,
        ar_width: int,
        eol_id: int,
        visual_start: int,
        num_visual: int,
        cfg_scale: float = 1.0,
        uncond_len: int = 10,
        generator: torch.Generator | None = None,
        greedy: bool = True,
    ) -> list[int]:
        """The official planning loop: full logits each step, KV cache grown by concatenation,
        CFG as a batch of two (the unconditional row sees only the last ``uncond_len`` prompt
        tokens), EOL forced at each row end."""
        n_layers = len(self.model.language_model.layers)
        cfg_on = cfg_scale > 1.0
        rows = [prompt_ids] + ([prompt_ids[-uncond_len:]] if cfg_on else [])
        caches = [[[] for _ in range(n_layers)] for _ in rows]
        lasts = []
        for r, c in zip(rows, caches):
            lasts.append(self.forward(torch.tensor([r]), cache=c).logits[0, -1].float())
        pasts = [len(r) for r in rows]
        out: list[int] = []
        for _h in range(ar_height):
            for w in range(ar_width + 1):
                if w == ar_width:
                    tok = eol_id
                else:
                    logits = lasts[0]
                    if cfg_on:
                        logits = lasts[1] + (lasts[0] - lasts[1]) * cfg_scale
                    vis = logits[visual_start : visual_start + num_visual]
                    if greedy:
                        tok = visual_start + int(vis.argmax())
                    else:
                        tok = visual_start + int(torch.multinomial(vis.softmax(-1), 1, generator=generator))
                out.append(tok)
                for j, c in enumerate(caches):
                    lasts[j] = self.forward(torch.tensor([[tok]]), cache=c, past=pasts[j]).logits[0, -1].float()
                    pasts[j] += 1
        return out
