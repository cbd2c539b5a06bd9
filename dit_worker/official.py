"""Official checkpoints -> this stage's config and tensor names (one table per family).

- MammothModa2 (-Dev / -Preview): one model whose ``config.json`` holds ``gen_dit_config``;
  the DiT tensors are ``gen_transformer.<ours>`` (after the official caption / image embedder
  re-initialisation, which is what it saves).
- MammothModa2.5: a diffusers folder ``transformer/`` with the official
  ``WanTransformer3DModel`` config; tensor names are ours. What the official code hard-codes
  instead of configuring -- the MoE sizes (picked by head count), the refiner config, the
  prompt length -- comes from ``OFFICIAL_MOE_BY_HEADS`` / the refiner defaults here, or from
  explicit overrides for checkpoints of other sizes; ``enable_byt5`` follows the weights, as the
  official loader decides it.

Mapping is strict: ``map_names`` names the first official tensor that has no place here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mammoth_common.names import strict_prefix_mapping

from .checkpoint import CheckpointError
from .models.transformer_mammoth2 import OFFICIAL_PREFIX, Mammoth2DiTConfig, Mammoth2Transformer
from .models.transformer_mammoth25 import Mammoth25DiTConfig, Mammoth25MoEConfig, Mammoth25Transformer

# The official module constants, chosen by ``num_attention_heads`` (12 -> 6B-A1B, else 20B-A3B).
OFFICIAL_MOE_BY_HEADS: dict[int, Mammoth25MoEConfig] = {
    12: Mammoth25DiTConfig.a6b_a1b().moe,
}
OFFICIAL_MOE_OTHERWISE = Mammoth25DiTConfig.a20b_a3b().moe
# Official WanTransformer3DModel config keys that only record provenance.
_IGNORED_CONFIG_KEYS = ("_class_name", "_diffusers_version", "_name_or_path")
BYT5_PREFIX = "byt5_in."


def mammoth2_config(official_config: dict[str, Any]) -> Mammoth2DiTConfig:
    """From an official MammothModa2 top-level ``config.json`` (``gen_dit_config`` + the planner
    width + ``gen_image_condition_refiner_config``)."""
    try:
        return Mammoth2DiTConfig.from_official(official_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"official config.json: cannot build the DiT config ({exc})") from exc


def mammoth25_config(transformer_config: dict[str, Any], official_names: Iterable[str], *,
                     overrides: dict[str, Any] | None = None) -> Mammoth25DiTConfig:
    """From an official ``transformer/config.json``; ``overrides`` replace hard-coded parts
    (``moe``, ``refiner``, ``text_len``) for checkpoints the official constants do not fit."""
    data = {k: v for k, v in transformer_config.items() if k not in _IGNORED_CONFIG_KEYS}
    heads = int(data.get("num_attention_heads", 12))
    moe = OFFICIAL_MOE_BY_HEADS.get(heads, OFFICIAL_MOE_OTHERWISE).to_dict()
    data["moe"] = moe
    data["enable_byt5"] = any(n.startswith(BYT5_PREFIX) for n in official_names)
    for key, value in (overrides or {}).items():
        if key not in ("moe", "refiner", "text_len"):
            raise CheckpointError(f"dit overrides: unknown key {key!r} (moe, refiner, text_len)")
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    if isinstance(data["moe"], dict):
        data["moe"] = {k: v for k, v in data["moe"].items() if not k.startswith("_")}
    try:
        return Mammoth25DiTConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"official transformer/config.json: {exc}") from exc


def expected_state(config: Mammoth2DiTConfig | Mammoth25DiTConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape this stage needs for ``config`` (built on the meta device)."""
    cls = Mammoth2Transformer if isinstance(config, Mammoth2DiTConfig) else Mammoth25Transformer
    with torch.device("meta"):
        model = cls(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def map_names(config: Mammoth2DiTConfig | Mammoth25DiTConfig, official: dict[str, tuple[int, ...]]
              ) -> dict[str, str]:
    """Our name -> official name for every tensor the DiT needs; strict in both directions
    for the official names that belong to the DiT (all of them for 2.5, ``gen_transformer.*``
    for 2). Shapes are checked too."""
    prefix = OFFICIAL_PREFIX if isinstance(config, Mammoth2DiTConfig) else ""
    return strict_prefix_mapping(official, expected_state(config), prefix, what="the DiT", error=CheckpointError)


# ------------------------------------------------------------------- MammothModa2.5 glyph encoder
# The official ``text_encoder_2/`` is transformers' ``T5EncoderModel`` (ByT5): its names are ours,
# except that a checkpoint may store the tied input embedding as ``encoder.embed_tokens.weight``
# (beside or instead of ``shared.weight``).
GLYPH_TIED_ALIAS = {"encoder.embed_tokens.weight": "shared.weight"}


def glyph_encoder_names(config: Any, official: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Our name -> official name for the glyph encoder (a ``T5Config``); strict both ways,
    shapes checked. An alias of ``shared.weight`` stored beside it is left to the caller to
    ignore (it is the same tensor)."""
    from .models.glyph_encoder import expected_state

    view = dict(official)
    renamed: dict[str, str] = {}
    for alias, name in GLYPH_TIED_ALIAS.items():
        if alias in view and name not in view:
            view[name] = view.pop(alias)
            renamed[name] = alias
    mapping = strict_prefix_mapping(view, expected_state(config), "", what="the glyph encoder",
                                    error=CheckpointError, ignored=tuple(GLYPH_TIED_ALIAS))
    return {ours: renamed.get(name, name) for ours, name in mapping.items()}
