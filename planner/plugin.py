"""vLLM general plugin (entry point ``vllm.general_plugins: mammoth``): config + architecture."""

from __future__ import annotations

from .configuration import ARCHITECTURE, register_config


def register() -> None:
    """Runs in every vLLM process (driver, engine core, workers) before models are resolved."""
    register_config()
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "planner.model:Mammothmoda2Qwen3VLForConditionalGeneration")
