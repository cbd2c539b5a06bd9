"""Diffusion stage of Mammoth Serve: condition encoders, DiTs, samplers and the batched engine.

A plain library: importable and testable without Ray or vLLM. It talks to other stages only
through tensors described by the protos' messages.
"""
