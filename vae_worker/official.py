"""Official checkpoints -> this stage's VAE folder (config and tensor names, one table).

- MammothModa2: the VAE is ``gen_vae.*`` of the one official model, a diffusers
  ``AutoencoderKL`` configured by the top-level ``gen_vae_config``.
- MammothModa2.5: the official ``vae/`` folder is a diffusers ``AutoencoderKLWan`` as is.

Names below the prefix are diffusers' own. Mapping is strict: an official VAE tensor the
model does not have, a missing one or a shape mismatch is a ``VAELoadError`` naming it.
"""

from __future__ import annotations

from typing import Any

import torch

from mammoth_common.names import strict_prefix_mapping

from .loading import VAELoadError
from .presets import build_model

# family -> (official tensor prefix, diffusers class of the VAE)
OFFICIAL_VAES: dict[str, tuple[str, str]] = {
    "mammothmoda2": ("gen_vae.", "AutoencoderKL"),
    "mammothmoda25": ("", "AutoencoderKLWan"),
}


def vae_config(family: str, official: dict[str, Any]) -> dict[str, Any]:
    """The VAE ``config.json``: ``gen_vae_config`` of a MammothModa2 config, or the 2.5 ``vae/``
    config itself; ``_class_name`` set to the class the official code builds."""
    prefix, class_name = OFFICIAL_VAES[family]
    data = official.get("gen_vae_config") if prefix else official
    if not isinstance(data, dict):
        raise VAELoadError("official config.json: no gen_vae_config")
    config = {k: v for k, v in data.items() if k not in ("_name_or_path", "_diffusers_version")}
    if config.get("_class_name", class_name) != class_name:
        raise VAELoadError(f"official VAE config: _class_name {config['_class_name']!r}, expected {class_name!r}")
    config["_class_name"] = class_name
    return config


def map_names(family: str, config: dict[str, Any], official: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Our name -> official name for every VAE tensor (official names under the family's
    prefix; for 2.5 all names of the ``vae/`` folder)."""
    prefix, _ = OFFICIAL_VAES[family]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    return strict_prefix_mapping(official, expected, prefix, what=f"the {config['_class_name']}", error=VAELoadError)
