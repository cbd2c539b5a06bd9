"""Edit references as MammothTok visual tokens in the planner prompt (the official processor).

The official chat template writes one ``<|gen_placeholder|>`` per reference (``image_gen``
item); the processor widens each to the reference's visual-prompt length and the model
scatters the ids of ``<|image start|>H*W<|image token|>`` + rows of codes (each ended by
``<|endofline|>``) + ``<|endoffile|><|image end|>`` into those positions. Those references
never reach the ViT, so the prompt is plain token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mammoth_common.visual_prompt import PromptIds, visual_prompt_ids

from .tokens import TokenLayout

PLACEHOLDER = "<|gen_placeholder|>"


def prompt_ids(layout: TokenLayout) -> PromptIds:
    """The ids a visual prompt is written with, from the checkpoint's token layout."""
    return PromptIds(visual_start=layout.visual_start_id, num_visual=layout.num_visual_codes,
                     image_start=layout.image_start_id, image_token=layout.image_token_id,
                     end_of_line=layout.eol_id, end_of_file=layout.eof_id, image_end=layout.image_end_id)


def check_codes(codes: Sequence[np.ndarray], num_visual: int) -> list[np.ndarray]:
    """Each grid 2-D, non-empty, integer and inside the visual range; errors name the field."""
    out = []
    for i, grid in enumerate(codes):
        grid = np.asarray(grid)
        if grid.ndim != 2 or 0 in grid.shape or not np.issubdtype(grid.dtype, np.integer):
            raise ValueError(f"reference_codes[{i}]: expected a non-empty integer [rows, cols] grid, "
                             f"got {grid.dtype} {tuple(grid.shape)}")
        if grid.min() < 0 or grid.max() >= num_visual:
            raise ValueError(f"reference_codes[{i}]: codes must lie in [0, {num_visual})")
        out.append(grid)
    return out


def splice_references(ids: Sequence[int], codes: Sequence[np.ndarray], layout: TokenLayout,
                      encode_text: Callable[[str], list[int]]) -> list[int]:
    """``ids`` with its k-th ``<|gen_placeholder|>`` replaced by the visual prompt of ``codes[k]``."""
    placeholder = layout.gen_placeholder_id
    positions = [i for i, t in enumerate(ids) if t == placeholder]
    if len(positions) != len(codes):
        raise ValueError(f"reference_codes: {len(codes)} grids for {len(positions)} reference placeholders")
    pids = prompt_ids(layout)
    out: list[int] = []
    last = 0
    for pos, grid in zip(positions, check_codes(codes, layout.num_visual_codes)):
        out.extend(ids[last:pos])
        out.extend(visual_prompt_ids(grid.tolist(), pids, encode_text))
        last = pos + 1
    out.extend(ids[last:])
    return out
