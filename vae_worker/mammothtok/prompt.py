"""The visual-token prompt builder lives in ``mammoth_common.visual_prompt``: the VAE stage
makes the codes and the planner writes them into its prompt, and stages share only that package."""

from mammoth_common.visual_prompt import (  # noqa: F401 - re-exported
    BOI,
    EOF,
    EOI,
    EOL,
    IMG,
    PromptIds,
    visual_prompt,
    visual_prompt_ids,
    visual_prompt_length,
)
