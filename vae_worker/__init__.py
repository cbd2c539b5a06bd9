"""VAE stage of Mammoth Serve: latents <-> pixels for images and video, and all media I/O.

A plain library: importable and testable without Ray or vLLM.

- ``vae_worker.engine``: ``ImageVAE`` (diffusers ``AutoencoderKL``, MammothModa2) and ``VideoVAE``
  (diffusers ``AutoencoderKLWan``, MammothModa2.5): encode uint8 pixels to DiT-normalised latents
  (posterior mode), decode latents to uint8, batched ``decode_many``, linear-map ``preview``;
  slicing/tiling picked per call from ``memory_budget_mb`` (``vae_worker.memory``).
- ``vae_worker.loading``: strict diffusers-folder loading (``VAELoadError`` names the tensor).
- ``vae_worker.presets``: tiny and real configs, parameter counts, random checkpoints.
- ``vae_worker.media``: bounded decoding of untrusted image/video bytes (typed ``MediaError``s),
  grid fitting, deterministic PNG/JPEG/WebP/MP4/GIF encoding.
"""
