"""DiT model files, one per model family, each with its weight-name mapping beside the module."""
