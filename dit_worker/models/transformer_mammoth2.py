"""MammothModa2 image DiT with its condition encoders, split for batched serving.

The official ``Transformer2DModel`` recomputes every condition encoder on every step and CFG
branch and runs one condition at a time. Here the work is split along what depends on the
diffusion time:

* ``prepare(conditions)`` -- once per request and CFG branch, batched with padding: caption
  projection, QFormer over the planner's visual-token states, context refiner (it has no time
  modulation), patch embedding of reference latents, all RoPE positions and padding masks;
* ``forward(latents, timestep, prepared)`` -- per step: time embedding, noise refiner,
  reference-image refiner (it *is* time-modulated), the joint blocks and the output head.

Per sample the joint sequence is ``[context | reference images | generated image]`` with the
official position ids (context: ``(k, k, k)``; image ``j``: ``(shift_j, row, col)`` with
``shift`` advancing by ``max(h, w)`` tokens per reference image). Batched rows are laid out as
``[context_i, refs_i, padding | image]`` and padding is masked out of attention, so a padded
batch computes what each condition computes alone.

State-dict keys equal the official ones (the ``gen_transformer.`` part of a MammothModa2
checkpoint, after its caption/image embedder re-initialisation), so ``load_state_into`` loads
official weights strictly. Config field names are the official constructor arguments plus
``llm_hidden_size`` and ``gen_image_condition_refiner_config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from dit_worker.checkpoint import DataclassConfig
from dit_worker.models.mammoth2_conditioning import QFormerImageEmbedder, TimeCaptionEmbed
from dit_worker.models.mammoth2_layers import Mammoth2Block, OutputNorm, ffn_inner_dim, rope_cos_sin
from dit_worker.step_cache import ForwardCache, select_rows

MAX_REF_IMAGES = 5  # rows of ``image_index_embedding``
OFFICIAL_PREFIX = "gen_transformer."  # where these weights sit in an official checkpoint


def official_dit_names(names: list[str]) -> dict[str, str]:
    """Map our tensor names to an official MammothModa2 checkpoint's (``gen_transformer.`` + name)
    for the checkpoint's names that belong to the DiT; everything else is ignored."""
    return {n[len(OFFICIAL_PREFIX) :]: n for n in names if n.startswith(OFFICIAL_PREFIX)}


# ------------------------------------------------------------------------------------------ Config


@dataclass
class Mammoth2ImageEmbedderConfig(DataclassConfig):
    """Keys of the official ``gen_image_condition_refiner_config`` (QFormer over visual tokens)."""

    num_queries: int = 128
    num_layers: int = 2
    dropout: float = 0.0
    norm_eps: float = 1e-5


@dataclass
class Mammoth2DiTConfig(DataclassConfig):
    """The official ``gen_dit_config`` keys, plus the two things the official model takes from
    elsewhere: the planner's hidden size (input of the caption projection and QFormer) and the
    QFormer config. ``text_feat_dim`` / ``is_image_embedder`` only shaped modules the official
    model replaces at load; they are kept so a ``gen_dit_config`` round-trips unchanged."""

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    hidden_size: int = 2304
    num_layers: int = 26
    num_refiner_layers: int = 2
    num_attention_heads: int = 24
    num_kv_heads: int = 8
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    axes_dim_rope: tuple[int, int, int] = (32, 32, 32)
    axes_lens: tuple[int, int, int] = (300, 512, 512)
    text_feat_dim: int = 1024
    timestep_scale: float = 1.0
    is_image_embedder: bool = False
    llm_hidden_size: int = 4096
    gen_image_condition_refiner_config: Mammoth2ImageEmbedderConfig = field(
        default_factory=Mammoth2ImageEmbedderConfig
    )
    # MammothModa2-Preview: its QFormer (official ``gen_image_condition_refiner``) works at the
    # planner width and its queries then take the caption projection, like the text tokens.
    image_refiner_at_llm_width: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.gen_image_condition_refiner_config, dict):
            self.gen_image_condition_refiner_config = Mammoth2ImageEmbedderConfig.from_dict(
                self.gen_image_condition_refiner_config
            )
        self.axes_dim_rope = tuple(self.axes_dim_rope)
        self.axes_lens = tuple(self.axes_lens)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.head_dim != sum(self.axes_dim_rope):
            raise ValueError(f"head dim {self.head_dim} must equal sum(axes_dim_rope) {sum(self.axes_dim_rope)}")
        if any(d % 2 for d in self.axes_dim_rope):
            raise ValueError("every axes_dim_rope entry must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def latent_channels_out(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_official(cls, mammothmoda2_config: dict) -> Mammoth2DiTConfig:
        """Build from an official MammothModa2 top-level ``config.json`` (as a dict): its
        ``gen_dit_config``, the planner width from ``llm_config`` and the QFormer config."""
        dit = {k: v for k, v in mammothmoda2_config["gen_dit_config"].items() if not k.startswith("_")}
        llm = mammothmoda2_config.get("llm_config") or {}
        hidden = (llm.get("text_config") or {}).get("hidden_size") or llm.get("hidden_size")
        if not hidden:
            raise ValueError("official config: no llm_config.text_config.hidden_size")
        refiner = mammothmoda2_config.get("gen_image_condition_refiner_config") or {}
        return cls.from_dict({**dit, "llm_hidden_size": hidden, "gen_image_condition_refiner_config": refiner})

    @classmethod
    def dev(cls) -> Mammoth2DiTConfig:
        """MammothModa2-Dev: the official code defaults, Qwen3-VL-8B planner (hidden 4096)."""
        return cls()

    @classmethod
    def tiny(cls) -> Mammoth2DiTConfig:
        """CPU-sized config for tests and the tiny end-to-end stack (planner hidden 128)."""
        return cls(
            hidden_size=128,
            num_layers=2,
            num_refiner_layers=1,
            num_attention_heads=4,
            num_kv_heads=2,
            axes_dim_rope=(8, 12, 12),
            axes_lens=(1024, 256, 256),
            text_feat_dim=128,
            llm_hidden_size=128,
            gen_image_condition_refiner_config=Mammoth2ImageEmbedderConfig(num_queries=8, num_layers=2),
        )


# ------------------------------------------------------------------------------- Engine contract


@dataclass
class Mammoth2Condition:
    """One CFG branch of one request, as the planner hands it over.

    ``text``: ``[Lt, llm_hidden]`` averaged planner hidden states of the prompt tokens (or of the
    negative prompt); ``text_mask`` (``[Lt]``, True = keep) drops padding if given.
    ``image``: ``[Li, llm_hidden]`` averaged states of the generated visual tokens, or ``None``
    (unconditional / reference-only branches). ``ref_latents``: normalised VAE latents
    ``[C, h, w]`` of the reference images (editing), empty for text-to-image.
    """

    text: torch.Tensor
    text_mask: torch.Tensor | None = None
    image: torch.Tensor | None = None
    ref_latents: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Mammoth2Prepared:
    """Timestep-independent state of a batch of conditions (row ``i`` = condition ``i``).

    Row ``i`` of ``prefix`` holds the refined context in ``[0, ctx_len_i)`` followed by
    reference-image slots (zeros here, filled per step after the time-modulated ref refiner) and
    padding; ``prefix_mask`` marks the real tokens. Reference images are also kept as a flat batch
    (``ref_*``, one row per image) with the row they belong to and where they start in it.
    """

    prefix: torch.Tensor  # [B, P, D]
    prefix_mask: torch.Tensor  # [B, P] bool
    prefix_cos: torch.Tensor  # [B, P, head_dim / 2] fp32
    prefix_sin: torch.Tensor  # [B, P, head_dim / 2] fp32
    pe_shift: torch.Tensor  # [B] long: axis-0 RoPE position of the generated image
    ref_tokens: torch.Tensor  # [R, Lr, D] patch-embedded reference latents (+ image index embedding)
    ref_mask: torch.Tensor  # [R, Lr] bool
    ref_cos: torch.Tensor  # [R, Lr, head_dim / 2] fp32
    ref_sin: torch.Tensor  # [R, Lr, head_dim / 2] fp32
    ref_owner: torch.Tensor  # [R] long: batch row of each reference image
    ref_start: torch.Tensor  # [R] long: first prefix position of each reference image
    _scatter: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.prefix.shape[0]

    @property
    def num_ref_images(self) -> int:
        return self.ref_tokens.shape[0]

    def scatter_index(self) -> tuple[torch.Tensor, ...]:
        """(ref row, ref pos, batch row, prefix pos) of every real reference token (cached)."""
        if self._scatter is None:
            r, pos = self.ref_mask.nonzero(as_tuple=True)
            self._scatter = (r, pos, self.ref_owner[r], self.ref_start[r] + pos)
        return self._scatter

    def joint_key_mask(self, num_image_tokens: int) -> torch.Tensor | None:
        """Key mask of ``[prefix | image]`` rows (None: unpadded), cached per image size, so
        only a batch's first step reads the mask back from the device."""
        key = ("joint", num_image_tokens)
        if key not in self._masks:
            ones = self.prefix_mask.new_ones(self.batch_size, num_image_tokens)
            self._masks[key] = _attention_mask(torch.cat([self.prefix_mask, ones], 1))
        return self._masks[key]

    def ref_key_mask(self) -> torch.Tensor | None:
        """Key mask of the reference-image rows (cached like ``joint_key_mask``)."""
        if "ref" not in self._masks:
            self._masks["ref"] = _attention_mask(self.ref_mask)
        return self._masks["ref"]

    def select(self, indices: list[int]) -> Mammoth2Prepared:
        """Rows ``indices`` (in that order, repeats allowed), padding trimmed to the new maximum."""
        device = self.prefix.device
        idx = torch.as_tensor(indices, dtype=torch.long, device=device)
        prefix_mask = self.prefix_mask[idx]
        p = int(prefix_mask.sum(1).max()) if len(indices) else 0
        owners = self.ref_owner.tolist()
        rows, new_owner = [], []
        for new_i, old_i in enumerate(indices):
            for r, owner in enumerate(owners):
                if owner == old_i:
                    rows.append(r)
                    new_owner.append(new_i)
        ridx = torch.as_tensor(rows, dtype=torch.long, device=device)
        ref_mask = self.ref_mask[ridx]
        lr = int(ref_mask.sum(1).max()) if rows else 0
        return Mammoth2Prepared(
            prefix=self.prefix[idx, :p],
            prefix_mask=prefix_mask[:, :p],
            prefix_cos=self.prefix_cos[idx, :p],
            prefix_sin=self.prefix_sin[idx, :p],
            pe_shift=self.pe_shift[idx],
            ref_tokens=self.ref_tokens[ridx, :lr],
            ref_mask=ref_mask[:, :lr],
            ref_cos=self.ref_cos[ridx, :lr],
            ref_sin=self.ref_sin[ridx, :lr],
            ref_owner=torch.as_tensor(new_owner, dtype=torch.long, device=device),
            ref_start=self.ref_start[ridx],
        )

    @classmethod
    def cat(cls, items: list[Mammoth2Prepared]) -> Mammoth2Prepared:
        """One batch from several (e.g. different requests), re-padded to the longest row."""
        if not items:
            raise ValueError("nothing to concatenate")
        p = max(it.prefix.shape[1] for it in items)
        lr = max(it.ref_tokens.shape[1] for it in items)
        offsets, total = [], 0
        for it in items:
            offsets.append(total)
            total += it.batch_size
        return cls(
            prefix=torch.cat([_pad_dim1(it.prefix, p) for it in items]),
            prefix_mask=torch.cat([_pad_dim1(it.prefix_mask, p) for it in items]),
            prefix_cos=torch.cat([_pad_dim1(it.prefix_cos, p) for it in items]),
            prefix_sin=torch.cat([_pad_dim1(it.prefix_sin, p) for it in items]),
            pe_shift=torch.cat([it.pe_shift for it in items]),
            ref_tokens=torch.cat([_pad_dim1(it.ref_tokens, lr) for it in items]),
            ref_mask=torch.cat([_pad_dim1(it.ref_mask, lr) for it in items]),
            ref_cos=torch.cat([_pad_dim1(it.ref_cos, lr) for it in items]),
            ref_sin=torch.cat([_pad_dim1(it.ref_sin, lr) for it in items]),
            ref_owner=torch.cat([it.ref_owner + off for it, off in zip(items, offsets)]),
            ref_start=torch.cat([it.ref_start for it in items]),
        )

    def to(self, device: torch.device | str) -> Mammoth2Prepared:
        moved = {
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if not f.name.startswith("_")
        }
        return Mammoth2Prepared(**moved)


def _pad_dim1(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def _attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """Key mask for SDPA, or ``None`` when nothing is padded (lets fused kernels run).

    A row with no real token would give NaN softmax rows that can leak through ``0 * NaN``;
    such rows (only ever padding) attend to everything instead.
    """
    if bool(mask.all()):
        return None
    return mask | ~mask.any(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------ Model


class Mammoth2Transformer(nn.Module):
    """MammothModa2 single-stream DiT (Lumina2 / OmniGen2 style) with its condition encoders."""

    _repeated_blocks = ("Mammoth2Block",)  # what ``compile_repeated_blocks`` compiles
    supports_packing = True  # forward takes a list of differently sized latents
    supports_step_cache = True

    def __init__(self, config: Mammoth2DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        d = c.hidden_size
        patch_dim = c.patch_size * c.patch_size * c.in_channels
        ffn = ffn_inner_dim(d, c.multiple_of, c.ffn_dim_multiplier)
        qcfg = c.gen_image_condition_refiner_config
        qd = c.llm_hidden_size if c.image_refiner_at_llm_width else d

        def blocks(n: int, modulation: bool) -> nn.ModuleList:
            return nn.ModuleList(
                Mammoth2Block(d, c.num_attention_heads, c.num_kv_heads, ffn, c.norm_eps, modulation)
                for _ in range(n)
            )

        self.x_embedder = nn.Linear(patch_dim, d)
        self.ref_image_patch_embedder = nn.Linear(patch_dim, d)
        self.time_caption_embed = TimeCaptionEmbed(
            hidden_size=d,
            llm_hidden_size=c.llm_hidden_size,
            timestep_scale=c.timestep_scale,
            image_embedder=QFormerImageEmbedder(
                input_dim=c.llm_hidden_size,
                hidden_size=qd,
                num_queries=qcfg.num_queries,
                num_layers=qcfg.num_layers,
                num_heads=max(1, qd // 128),
                dropout=qcfg.dropout,
                norm_eps=qcfg.norm_eps,
            ),
        )
        self.noise_refiner = blocks(c.num_refiner_layers, modulation=True)
        self.ref_image_refiner = blocks(c.num_refiner_layers, modulation=True)
        self.context_refiner = blocks(c.num_refiner_layers, modulation=False)
        self.layers = blocks(c.num_layers, modulation=True)
        self.norm_out = OutputNorm(d, min(d, 1024), c.patch_size * c.patch_size * c.latent_channels_out)
        self.image_index_embedding = nn.Parameter(torch.randn(MAX_REF_IMAGES, d) * 0.02)
        self._grid_rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---------------------------------------------------------------------------------- helpers

    @property
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.x_embedder.weight
        return w.device, w.dtype

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., C, H, W] -> [..., (H/p)(W/p), p*p*C]`` in the official (h w)(p1 p2 c) order."""
        p = self.config.patch_size
        *lead, ch, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        x = x.reshape(*lead, ch, h // p, p, w // p, p)
        n = len(lead)
        x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)
        return x.reshape(*lead, (h // p) * (w // p), p * p * ch)

    def _unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p = self.config.patch_size
        ch = self.config.latent_channels_out
        b = x.shape[0]
        x = x.reshape(b, h // p, w // p, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, ch, h, w)

    def _grid_rope(self, hp: int, wp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row/column part of the image RoPE, cached per grid and device (no buffers: meta-safe)."""
        key = (hp, wp, str(device))
        if key not in self._grid_rope_cache:
            if len(self._grid_rope_cache) > 16:
                self._grid_rope_cache.clear()
            rows = torch.arange(hp, device=device).repeat_interleave(wp)
            cols = torch.arange(wp, device=device).repeat(hp)
            self._grid_rope_cache[key] = rope_cos_sin(torch.stack([rows, cols], -1), self.config.axes_dim_rope[1:])
        return self._grid_rope_cache[key]

    def _image_rope(self, pe_shift: torch.Tensor, hp: int, wp: int) -> tuple[torch.Tensor, torch.Tensor]:
        grid_cos, grid_sin = self._grid_rope(hp, wp, pe_shift.device)
        n = grid_cos.shape[0]
        shift_cos, shift_sin = rope_cos_sin(pe_shift[:, None], self.config.axes_dim_rope[:1])
        b = pe_shift.shape[0]
        cos = torch.cat([shift_cos[:, None].expand(b, n, -1), grid_cos.expand(b, -1, -1)], -1)
        sin = torch.cat([shift_sin[:, None].expand(b, n, -1), grid_sin.expand(b, -1, -1)], -1)
        return cos, sin

    # ---------------------------------------------------------------------------------- prepare

    def prepare(self, conditions: list[Mammoth2Condition]) -> Mammoth2Prepared:
        """All timestep-independent work for a batch of conditions (see the module docstring)."""
        if not conditions:
            raise ValueError("prepare() needs at least one condition")
        cfg = self.config
        device, dtype = self._device_dtype
        embed = self.time_caption_embed
        b = len(conditions)

        # Caption projection is per token: run it once over all real tokens, unpadded.
        texts = []
        for i, cond in enumerate(conditions):
            text = cond.text
            if text.ndim != 2 or text.shape[1] != cfg.llm_hidden_size:
                raise ValueError(f"condition {i}: text must be [L, {cfg.llm_hidden_size}], got {tuple(text.shape)}")
            if cond.text_mask is not None:
                text = text[cond.text_mask.to(device=text.device, dtype=torch.bool)]
            texts.append(text.to(device=device, dtype=dtype))
        text_lens = [t.shape[0] for t in texts]
        captions = list(embed.caption_embedder(torch.cat(texts)).split(text_lens))

        # QFormer over the generated visual tokens, batched over the conditions that have them.
        with_image = [i for i, cond in enumerate(conditions) if cond.image is not None]
        queries: dict[int, torch.Tensor] = {}
        if with_image:
            images = []
            for i in with_image:
                image = conditions[i].image
                if image.ndim != 2 or image.shape[1] != cfg.llm_hidden_size or image.shape[0] == 0:
                    raise ValueError(
                        f"condition {i}: image must be [L>0, {cfg.llm_hidden_size}] or None, got {tuple(image.shape)}"
                    )
                images.append(image.to(device=device, dtype=dtype))
            li = max(x.shape[0] for x in images)
            padded = torch.stack([_pad_dim1(x[None], li)[0] for x in images])
            mask = torch.stack([torch.arange(li, device=device) < x.shape[0] for x in images])
            out = embed.image_embedder(padded, mask)
            if cfg.image_refiner_at_llm_width:
                out = embed.caption_embedder(out)
            queries = {i: out[k] for k, i in enumerate(with_image)}

        # Context = [caption tokens, query tokens], compacted per condition and padded.
        contexts = [torch.cat([captions[i], queries[i]]) if i in queries else captions[i] for i in range(b)]
        ctx_lens = [x.shape[0] for x in contexts]

        # Reference images: patch tokens, image index embedding, positions.
        ref_tokens, ref_pos, ref_owner, ref_index, ref_start, ref_lens = [], [], [], [], [], []
        pe_shift, totals = [], []
        p = cfg.patch_size
        for i, cond in enumerate(conditions):
            if len(cond.ref_latents) > MAX_REF_IMAGES:
                raise ValueError(f"condition {i}: at most {MAX_REF_IMAGES} reference images")
            shift, offset = ctx_lens[i], ctx_lens[i]
            for j, lat in enumerate(cond.ref_latents):
                if lat.ndim != 3 or lat.shape[0] != cfg.in_channels:
                    raise ValueError(f"condition {i}: reference latent {j} must be [{cfg.in_channels}, h, w]")
                hp, wp = lat.shape[1] // p, lat.shape[2] // p
                ref_tokens.append(self._patchify(lat.to(device=device, dtype=dtype)))
                rows = torch.arange(hp, device=device).repeat_interleave(wp)
                cols = torch.arange(wp, device=device).repeat(hp)
                ref_pos.append(torch.stack([torch.full_like(rows, shift), rows, cols], -1))
                ref_owner.append(i)
                ref_index.append(j)
                ref_start.append(offset)
                ref_lens.append(hp * wp)
                shift += max(hp, wp)
                offset += hp * wp
            pe_shift.append(shift)
            totals.append(offset)

        d = cfg.hidden_size
        half = cfg.head_dim // 2
        lc = max(ctx_lens)
        ctx = torch.zeros(b, lc, d, device=device, dtype=dtype)
        ctx_mask = torch.zeros(b, lc, dtype=torch.bool, device=device)
        for i, x in enumerate(contexts):
            ctx[i, : x.shape[0]] = x
            ctx_mask[i, : x.shape[0]] = True
        ctx_pos = torch.arange(lc, device=device)[None, :, None].expand(b, lc, 3)
        ctx_rope = rope_cos_sin(ctx_pos, cfg.axes_dim_rope)
        if lc:
            attn_mask = _attention_mask(ctx_mask)
            for layer in self.context_refiner:
                ctx = layer(ctx, ctx_rope, attn_mask)

        # Prefix rows: [refined context | reference slots | padding].
        plen = max(totals)
        prefix = torch.zeros(b, plen, d, device=device, dtype=dtype)
        prefix_mask = torch.zeros(b, plen, dtype=torch.bool, device=device)
        prefix_cos = torch.zeros(b, plen, half, device=device)
        prefix_sin = torch.zeros(b, plen, half, device=device)
        for i in range(b):
            n = ctx_lens[i]
            prefix[i, :n] = ctx[i, :n]
            prefix_mask[i, : totals[i]] = True
            prefix_cos[i, :n] = ctx_rope[0][i, :n]
            prefix_sin[i, :n] = ctx_rope[1][i, :n]

        r = len(ref_tokens)
        lr = max(ref_lens, default=0)
        refs = torch.zeros(r, lr, d, device=device, dtype=dtype)
        ref_mask = torch.zeros(r, lr, dtype=torch.bool, device=device)
        ref_cos = torch.zeros(r, lr, half, device=device)
        ref_sin = torch.zeros(r, lr, half, device=device)
        if r:
            embedded = self.ref_image_patch_embedder(torch.cat(ref_tokens)).split(ref_lens)
            for k in range(r):
                n, i, s = ref_lens[k], ref_owner[k], ref_start[k]
                cos, sin = rope_cos_sin(ref_pos[k], cfg.axes_dim_rope)
                # the image's index within its own condition selects its learned embedding
                refs[k, :n] = embedded[k] + self.image_index_embedding[ref_index[k]]
                ref_mask[k, :n] = True
                ref_cos[k, :n], ref_sin[k, :n] = cos, sin
                prefix_cos[i, s : s + n], prefix_sin[i, s : s + n] = cos, sin

        return Mammoth2Prepared(
            prefix=prefix,
            prefix_mask=prefix_mask,
            prefix_cos=prefix_cos,
            prefix_sin=prefix_sin,
            pe_shift=torch.as_tensor(pe_shift, dtype=torch.long, device=device),
            ref_tokens=refs,
            ref_mask=ref_mask,
            ref_cos=ref_cos,
            ref_sin=ref_sin,
            ref_owner=torch.as_tensor(ref_owner, dtype=torch.long, device=device),
            ref_start=torch.as_tensor(ref_start, dtype=torch.long, device=device),
        )

    # ---------------------------------------------------------------------------------- forward

    def forward(self, latents: torch.Tensor | list[torch.Tensor], timestep: torch.Tensor,
                prepared: Mammoth2Prepared, step_cache: ForwardCache | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Velocity ``[B, C, H, W]`` for ``latents[B, C, H, W]`` at flow time ``timestep[B]``.

        Time runs from 0 (pure noise) to 1 (clean image), as in the official sampler
        (``x += (t_next - t) * v``). Like the official pipeline, ``timestep`` is rounded to the
        compute dtype before embedding. The output has the dtype of ``latents``.

        Mixed sizes: ``latents`` may be a list of ``[C, H_i, W_i]`` (one per row); the image
        tokens are then padded to the longest row, masked out of attention, given per-row RoPE,
        and a list of per-row velocities comes back. ``step_cache`` (``dit_worker.step_cache``)
        lets rows skip blocks 1.. when their step is cached.
        """
        device, dtype = self._device_dtype
        p = self.config.patch_size
        if isinstance(latents, list | tuple):
            sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in latents]
            out_dtype = latents[0].dtype
            tokens = [self._patchify(x.to(device=device, dtype=dtype)) for x in latents]
        else:
            b_, _, h_, w_ = latents.shape
            sizes = [(h_, w_)] * b_
            out_dtype = latents.dtype
            tokens = None
        b = len(sizes)
        if b != prepared.batch_size:
            raise ValueError(f"latents batch {b} != prepared batch {prepared.batch_size}")
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(b).to(dtype)
        temb = self.time_caption_embed.time_embedding(timestep, dtype)

        lens = [(h // p) * (w // p) for h, w in sizes]
        uniform = len(set(sizes)) == 1
        if tokens is None:
            img = self.x_embedder(self._patchify(latents.to(device=device, dtype=dtype)))
        elif uniform:
            img = self.x_embedder(torch.stack(tokens))
        else:
            n = max(lens)
            img = self.x_embedder(torch.stack([_pad_dim1(t[None], n)[0] for t in tokens]))
        if uniform:
            h, w = sizes[0]
            img_rope = self._image_rope(prepared.pe_shift, h // p, w // p)
            img_valid, img_mask = None, None
        else:
            img_rope, img_valid = self._packed_image_rope(prepared.pe_shift, sizes, img.shape[1])
            img_mask = _attention_mask(img_valid)
        for layer in self.noise_refiner:
            img = layer(img, img_rope, img_mask, temb)

        prefix = prepared.prefix
        if prepared.num_ref_images:
            refs = prepared.ref_tokens
            ref_rope = (prepared.ref_cos, prepared.ref_sin)
            ref_mask = prepared.ref_key_mask()
            ref_temb = temb[prepared.ref_owner]
            for layer in self.ref_image_refiner:
                refs = layer(refs, ref_rope, ref_mask, ref_temb)
            src_r, src_pos, dst_b, dst_pos = prepared.scatter_index()
            prefix = prefix.index_put((dst_b, dst_pos), refs[src_r, src_pos])

        n_prefix = prefix.shape[1]
        x = torch.cat([prefix, img], dim=1)
        rope = (
            torch.cat([prepared.prefix_cos, img_rope[0]], dim=1),
            torch.cat([prepared.prefix_sin, img_rope[1]], dim=1),
        )
        if img_valid is None:
            mask = prepared.joint_key_mask(img.shape[1])
        else:
            mask = _attention_mask(torch.cat([prepared.prefix_mask, img_valid], 1))
        if step_cache is None or len(self.layers) < 2:
            for layer in self.layers:
                x = layer(x, rope, mask, temb)
        else:
            block_in = x
            x = self.layers[0](x, rope, mask, temb)
            first = x

            def rest(rows: torch.Tensor | None) -> torch.Tensor:
                hidden = first if rows is None else first.index_select(0, rows)
                sub_rope = (select_rows(rope[0], rows), select_rows(rope[1], rows))
                sub_mask, sub_temb = select_rows(mask, rows), select_rows(temb, rows)
                for layer in self.layers[1:]:
                    hidden = layer(hidden, sub_rope, sub_mask, sub_temb)
                return hidden

            x = step_cache.apply(block_in, first, n_prefix, lens, rest)
        out = self.norm_out(x[:, n_prefix:], temb)
        if tokens is None:
            h, w = sizes[0]
            return self._unpatchify(out, h, w).to(out_dtype)
        return [self._unpatchify(out[i : i + 1, : lens[i]], h, w)[0].to(out_dtype)
                for i, (h, w) in enumerate(sizes)]

    def _packed_image_rope(self, pe_shift: torch.Tensor, sizes: list[tuple[int, int]],
                           n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per-row image RoPE padded to ``n`` tokens, and the ``[B, n]`` mask of real tokens."""
        p = self.config.patch_size
        cos_rows, sin_rows, valid = [], [], []
        for i, (h, w) in enumerate(sizes):
            cos, sin = self._image_rope(pe_shift[i : i + 1], h // p, w // p)
            cos_rows.append(_pad_dim1(cos, n))
            sin_rows.append(_pad_dim1(sin, n))
            valid.append(torch.arange(n, device=pe_shift.device) < cos.shape[1])
        return (torch.cat(cos_rows), torch.cat(sin_rows)), torch.stack(valid)


def count_parameters(config: Mammoth2DiTConfig) -> dict[str, int]:
    """Parameter count of the DiT with its condition encoders, built on the meta device."""
    with torch.device("meta"):
        model = Mammoth2Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "active": total}
