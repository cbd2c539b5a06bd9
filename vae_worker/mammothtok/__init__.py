"""MammothTok: the discrete visual tokenizer MammothModa2 edit prompts are written in.

Only its encoder side is served (AIMv2 ViT -> 1x1 projection -> l2-normalised nearest-code
lookup): a reference image becomes a grid of codebook indices that the planner reads as
``<|visual token N|>`` tokens. The pixel decoders of the official tokenizer are not needed.
"""

from .encode import encode_reference, tokenizer_input, tokenizer_size
from .model import MammothTokConfig, MammothTokEncoder, load_mammothtok
from .prompt import PromptIds, visual_prompt, visual_prompt_ids, visual_prompt_length

__all__ = ["MammothTokConfig", "MammothTokEncoder", "PromptIds", "encode_reference", "load_mammothtok", "tokenizer_input",
           "tokenizer_size", "visual_prompt", "visual_prompt_ids", "visual_prompt_length"]
