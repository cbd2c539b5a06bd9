"""VAE stage of Mammoth Serve: latents <-> pixels for images and video, and all media I/O.

A plain library: importable and testable without Ray or vLLM.
"""
