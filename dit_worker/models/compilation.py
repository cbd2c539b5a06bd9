"""``torch.compile`` of a DiT's repeated transformer blocks (the engine's ``compile`` option).

Compiling the blocks rather than the whole model keeps the per-request Python (condition
batching, caches, layout bookkeeping) eager and compiles one graph that every layer reuses, the
way diffusers' ``ModelMixin.compile_repeated_blocks`` does; models name their block classes in
``_repeated_blocks``. On accelerators the blocks are host-sync free (grouped MoE path, cached
masks), so they trace as single graphs; on CPU the MoE's capacity choice reads its expert counts
back and the block compiles with that one graph break.
"""

from __future__ import annotations

from torch import nn


def compile_repeated_blocks(model: nn.Module, *, mode: str | None = None, dynamic: bool | None = None,
                            fullgraph: bool = False, backend: str = "inductor") -> int:
    """Compile every submodule whose class is named in ``model._repeated_blocks`` in place;
    returns how many were compiled."""
    names = tuple(getattr(model, "_repeated_blocks", ()))
    if not names:
        raise ValueError(f"{type(model).__name__} names no _repeated_blocks to compile")
    count = 0
    for module in model.modules():
        if type(module).__name__ in names:
            module.compile(mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend)
            count += 1
    return count
