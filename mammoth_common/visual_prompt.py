"""The visual-token prompt of one reference image, as the official processor builds it.

``<|image start|>H*W<|image token|>`` then the rows of visual codes, each row ended by
``<|endofline|>``, then ``<|endoffile|><|image end|>``: ``H * (W + 1) + 5 + digits(H) +
digits(W)`` tokens (Qwen's BPE writes a number digit by digit). Visual codes are ids
``visual_start_id + code`` (the checkpoint's generation config names ``visual_start_id``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

BOI, IMG, EOL, EOF, EOI = "<|image start|>", "<|image token|>", "<|endofline|>", "<|endoffile|>", "<|image end|>"


@dataclass(frozen=True)
class PromptIds:
    """The ids the prompt needs, read from the planner's tokenizer / generation config."""

    visual_start: int
    num_visual: int
    image_start: int
    image_token: int
    end_of_line: int
    end_of_file: int
    image_end: int

    @classmethod
    def from_tokenizer(cls, token_id: Callable[[str], int], visual_start: int, num_visual: int) -> PromptIds:
        return cls(visual_start, num_visual, token_id(BOI), token_id(IMG), token_id(EOL), token_id(EOF),
                   token_id(EOI))


def _grid(codes: Sequence[Sequence[int]]) -> list[list[int]]:
    rows = [[int(c) for c in row] for row in codes]
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("reference_images: a MammothTok grid must be a non-empty rectangle")
    return rows


def visual_prompt(codes: Sequence[Sequence[int]]) -> str:
    """``codes[row][col]`` -> the prompt as text (``<|visual token NNNNNN|>`` codes), for logs
    and for tokenizers that know every visual token (the official ``MammothUTokenizer``)."""
    rows = _grid(codes)
    body = "".join("".join(f"<|visual token {c:06d}|>" for c in row) + EOL for row in rows)
    return f"{BOI}{len(rows)}*{len(rows[0])}{IMG}{body}{EOF}{EOI}"


def visual_prompt_ids(codes: Sequence[Sequence[int]], ids: PromptIds,
                      encode_text: Callable[[str], list[int]]) -> list[int]:
    """The same prompt as token ids; ``encode_text`` tokenizes the ``H*W`` size text."""
    rows = _grid(codes)
    if any(not 0 <= c < ids.num_visual for row in rows for c in row):
        raise ValueError(f"reference_images: MammothTok code outside [0, {ids.num_visual})")
    out = [ids.image_start, *encode_text(f"{len(rows)}*{len(rows[0])}"), ids.image_token]
    for row in rows:
        out.extend(ids.visual_start + c for c in row)
        out.append(ids.end_of_line)
    return [*out, ids.end_of_file, ids.image_end]


def visual_prompt_length(rows: int, cols: int) -> int:
    """Tokens of the prompt for a ``rows x cols`` grid (the official count)."""
    return rows * (cols + 1) + 5 + len(str(rows)) + len(str(cols))
