"""The HF multimodal processor built from its parts around vLLM's own tokenizer.

vLLM builds the HF processor with ``ProcessorMixin.from_pretrained(path, tokenizer=...)``.
transformers 5 deep-copies those kwargs (the tokenizer with them) and loads the tokenizer from
disk again regardless, and vLLM does it for the warm-up and again for the first request's
kwargs. With MammothModa's 185k-token vocabulary that is ~25 s of each planner's start on 2
cores, for a processor whose tokenizer vLLM already holds. Here the image and video processors
are read from their own configs and joined with vLLM's tokenizer, once.

vLLM constructs the processor without its call-time ("dynamic") kwargs and passes those when
calling it (``cached_get_processor_without_dynamic_kwargs``); the same split applies here. Any
other processor kwargs, or a ``processor_config.json`` with processor-level settings, take
vLLM's path unchanged.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any


def chat_template(model_dir: str | Path) -> str | None:
    """The processor's chat template as transformers saves it (``chat_template.jinja``, else
    ``chat_template.json``), or None (then the tokenizer's own applies)."""
    root = Path(model_dir)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    if (root / "chat_template.json").is_file():
        return json.loads((root / "chat_template.json").read_text()).get("chat_template")
    return None


@functools.lru_cache(maxsize=8)
def processor_from_parts(processor_cls: type, model_dir: str, tokenizer: Any) -> Any:
    """``processor_cls`` (e.g. ``Qwen3VLProcessor``) from the directory's image and video
    processor configs and ``tokenizer``; built once per (class, directory, tokenizer object)."""
    from transformers import AutoImageProcessor, AutoVideoProcessor

    return processor_cls(image_processor=AutoImageProcessor.from_pretrained(model_dir),
                         tokenizer=tokenizer,
                         video_processor=AutoVideoProcessor.from_pretrained(model_dir),
                         chat_template=chat_template(model_dir))


@functools.lru_cache(maxsize=8)
def call_time_keys(processor: Any) -> frozenset[str]:
    """The kwargs ``processor`` takes when called (vLLM's own reading of its kwargs type)."""
    from vllm.transformers_utils.processor import get_processor_kwargs_keys, get_processor_kwargs_type

    return frozenset(get_processor_kwargs_keys(get_processor_kwargs_type(processor)))


@functools.lru_cache(maxsize=8)
def _joinable_dir(model_dir: str) -> bool:
    """A local checkpoint without processor-level settings of its own (checked once per start:
    ``get_hf_processor`` runs for every multimodal request)."""
    root = Path(model_dir)
    return root.is_dir() and not (root / "processor_config.json").exists()


def joined_processor(processor_cls: type, model_dir: str | Path, tokenizer: Any,
                     kwargs: dict[str, Any]) -> Any | None:
    """The processor vLLM would build for ``kwargs``, or None where only vLLM's path is exact
    (construction-time kwargs, a ``processor_config.json``, no local directory)."""
    if not _joinable_dir(str(model_dir)):
        return None
    processor = processor_from_parts(processor_cls, str(model_dir), tokenizer)
    if set(kwargs) - call_time_keys(processor):
        return None
    return processor


class JoinedProcessorInfo:
    """Mixin for a vLLM ``BaseProcessingInfo``: ``get_hf_processor`` returns the joined processor
    where it is exact, else vLLM's own. ``hf_processor_name`` names the transformers class."""

    hf_processor_name: str

    def get_hf_processor(self, **kwargs: object) -> Any:
        import transformers

        merged = self.ctx.get_merged_mm_kwargs(kwargs)
        merged.pop("tokenizer", None)
        joined = joined_processor(getattr(transformers, self.hf_processor_name), self.ctx.model_config.model,
                                  self.ctx.tokenizer, merged)
        return joined if joined is not None else super().get_hf_processor(**kwargs)
