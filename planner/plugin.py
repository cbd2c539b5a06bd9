"""vLLM general plugin (entry point ``vllm.general_plugins: mammoth``): configs + architectures."""

from __future__ import annotations

from .configuration import ARCHITECTURES, register_config


def register() -> None:
    """Runs in every vLLM process (driver, engine core, workers) before models are resolved."""
    register_config()
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, target in ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, target)
