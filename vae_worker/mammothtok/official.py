"""Official MammothModa2 ``gen_tokenizer.*`` tensors -> the served MammothTok encoder.

The official tokenizer is ``gen_tokenizer.image_tokenizer`` (a ``VQVitModel2DPlus_AIMv2``); its
encoder sizes are hard-coded there (``aimv2_large_native``), so they are read back from the
tensor shapes here. Its pixel decoders are listed in ``IGNORED_PREFIXES`` with the reason.
"""

from __future__ import annotations

import re

import torch

from mammoth_common.names import strict_prefix_mapping

from .model import MammothTokConfig, MammothTokEncoder, MammothTokLoadError

OFFICIAL_PREFIX = "gen_tokenizer.image_tokenizer."
SUBFOLDER = "mammothtok"  # under the VAE stage's folder: the stage that owns media
# Below OFFICIAL_PREFIX: parts serving never runs (it only encodes reference images).
IGNORED_PREFIXES: dict[str, str] = {
    "s2ddecoder.": "MammothTok ViT decoder: serving only encodes reference images",
    "decoder.": "MammothTok pixel decoder: serving only encodes reference images",
    "post_quant_conv.": "MammothTok decoder input projection: serving only encodes reference images",
}


def tokenizer_config(shapes: dict[str, tuple[int, ...]], **fixed: int) -> MammothTokConfig:
    """Encoder sizes from the official tensors' shapes; ``fixed`` (image_size, num_heads) are
    what shapes cannot tell (official values by default)."""
    p = OFFICIAL_PREFIX
    try:
        proj = shapes[p + "encoder.preprocessor.patchifier.proj.weight"]
        fc1 = shapes[p + "encoder.trunk.blocks.0.mlp.fc1.weight"]
        codebook = shapes[p + "quantize.embedding.weight"]
    except KeyError as exc:
        raise MammothTokLoadError(f"the official checkpoint lacks MammothTok tensor {exc.args[0]!r}") from None
    blocks = {int(m.group(1)) for n in shapes if (m := re.match(re.escape(p) + r"encoder\.trunk\.blocks\.(\d+)\.", n))}
    return MammothTokConfig(patch_size=proj[2], embed_dim=proj[0], mlp_hidden_dim=fc1[0], num_blocks=len(blocks),
                            codebook_size=codebook[0], codebook_embed_dim=codebook[1], **fixed)


def map_names(config: MammothTokConfig, official: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Our name -> official name for every encoder tensor; strict about the official names under
    the prefix that are neither the encoder's nor ignored."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MammothTokEncoder(config).state_dict().items()}
    return strict_prefix_mapping(official, expected, OFFICIAL_PREFIX, what="MammothTok", error=MammothTokLoadError,
                                 ignored=IGNORED_PREFIXES)
