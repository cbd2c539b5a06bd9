"""MammothModa2-Preview ("mammoth2-preview"): the image tasks of MammothModa2 on a Qwen2.5-VL
planner with generation experts.

Services treat it exactly as MammothModa2: the planner engine picks the Qwen2.5-VL architecture
from the checkpoint's ``config.json`` (``planner.model_qwen25``), and the DiT reads where its
QFormer sits from its own config. Only the record differs, so model directories say which model
they hold.
"""

from __future__ import annotations

from dataclasses import replace

from . import mammoth2

FAMILY = replace(
    mammoth2.FAMILY,
    name="mammoth2-preview",
    description="MammothModa2-Preview: Qwen2.5-VL planner with generation experts + single-stream image DiT",
)
