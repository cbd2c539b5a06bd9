"""MammothModa2.5 glyph condition encoder: ByT5 (the official ``text_encoder_2``).

Glyph checkpoints (``enable_byt5``) read the prompt's quoted text byte by byte: the ByT5
tokenizer (bytes + 3, then ``</s>``; no vocabulary file), at most ``MAX_LENGTH`` tokens, through
transformers' ``T5EncoderModel``; the condition is its last hidden state at the real (unmasked)
positions, ``[Lg, d_model]``, which the DiT's ``byt5_in`` maps and appends to the prompt tokens.
The official pads every text to ``MAX_LENGTH`` and the transformer drops the padding again;
masked keys change nothing in T5 (relative positions, additive key mask), so a batch here is
padded only to its longest text.

The folder is ``<model>/dit/glyph_encoder/``: the official ``config.json`` (a ``T5Config``),
``model.safetensors`` in transformers' names (the input embedding only as ``shared.weight``),
and the official ByT5 tokenizer files when the checkpoint ships them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from dit_worker.checkpoint import CheckpointError, load_state_into, read_config_json

SUBFOLDER = "glyph_encoder"  # under the DiT stage's folder
WEIGHTS_STEM = "model"
MAX_LENGTH = 256  # official ``tokenizer_2_max_length`` (truncation, ``</s>`` kept)
# State-dict names that alias ``shared.weight`` (T5's encoder input embedding).
TIED = ("encoder.embed_tokens.weight",)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def t5_config(data: dict) -> T5Config:
    """The encoder config from the official ``text_encoder_2/config.json``; errors name the key."""
    for key in ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size"):
        if not isinstance(data.get(key), int) or data[key] <= 0:
            raise CheckpointError(f"glyph encoder config.json: '{key}' must be a positive integer, got {data.get(key)!r}")
    try:
        return T5Config.from_dict({k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version")})
    except Exception as exc:  # noqa: BLE001 - transformers' config validation raises its own error types
        raise CheckpointError(f"glyph encoder config.json: {exc}") from exc


def expected_state(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the encoder's files for ``config`` (tied aliases left out)."""
    with torch.device("meta"):
        model = T5EncoderModel(config)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in TIED}


class GlyphEncoder(nn.Module):
    """ByT5 tokenizer + T5 encoder: glyph texts -> unpadded ``[Lg, d_model]`` states."""

    def __init__(self, model: T5EncoderModel, tokenizer: ByT5Tokenizer, max_length: int = MAX_LENGTH):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None) -> GlyphEncoder:
        """Strict: every tensor of the config present with its shape, nothing else; errors name it."""
        directory = Path(directory)
        config = t5_config(read_config_json(directory))
        with torch.device("meta"):
            model = T5EncoderModel(config)
        if dtype != torch.float16:  # transformers keeps T5's ``wo`` in fp32 for fp16 only (bf16: cast)
            model._keep_in_fp32_modules = set()
        load_state_into(model, directory, device=device, dtype=dtype, stem=WEIGHTS_STEM, tied=TIED)
        model.set_input_embeddings(model.shared)  # re-tie the encoder's embedding to ``shared``
        has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = ByT5Tokenizer.from_pretrained(str(directory)) if has_tokenizer else ByT5Tokenizer()
        return cls(model.eval(), tokenizer)

    @torch.no_grad()
    def encode(self, texts: Sequence[str | None]) -> list[torch.Tensor | None]:
        """One ``[Lg, d_model]`` tensor per text (CPU, the encoder's dtype); None stays None
        (no glyph text: the official encodes nothing)."""
        todo = [i for i, t in enumerate(texts) if t]
        out: list[torch.Tensor | None] = [None] * len(texts)
        if not todo:
            return out
        device = self.model.shared.weight.device
        tokens = self.tokenizer([texts[i] for i in todo], padding="longest", max_length=self.max_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        states = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask.float()).last_hidden_state
        for row, i in enumerate(todo):
            out[i] = states[row, : int(mask[row].sum())].cpu()
        return out
