"""The model-family registry: each family is declared once, in its own module, and asked by name.

A family ("mammoth2" = MammothModa2, "mammoth25" = MammothModa2.5) is what a model directory's
``model_index.json`` and a preset name. Everything services/ does differently per family (the
tasks it serves, the stage engines, its request defaults, how a public request becomes a job,
how the DiT reads its inputs, whether the DiT runs as a parallel group) is a field of its
``ModelFamily``; services look the record up and never compare family names.

Adding a family (e.g. MammothModa2-Preview, "mammoth2p"):

1. ``services/families/mammoth2p.py`` defines ``FAMILY = ModelFamily(...)``. A family that serves
   the image tasks like MammothModa2 and differs in its planner or defaults reuses the rest::

       from dataclasses import replace
       from . import mammoth2
       FAMILY = replace(mammoth2.FAMILY, name="mammoth2p", description="MammothModa2-Preview ...",
                        engines={**mammoth2.FAMILY.engines, "planner": "planner.engine:PlannerEngine"},
                        defaults={**mammoth2.DEFAULTS, "ar_cfg_scale": 5.0})

2. one line in ``BUILTIN`` below: ``"services.families.mammoth2p"``.

Presets of the family then name it (``services/presets.py``); nothing else in services/ changes.
Tests and plugins may also call ``register_family`` with a record of their own.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..config import Task

# The public tasks (``model_index.json`` "tasks", ``ingress.default_models`` keys): config.Task.
TASKS: tuple[str, ...] = get_args(Task)
Stage = Literal["planner", "dit", "vae"]

# One module per family; registering a family is one line here.
BUILTIN = (
    "services.families.mammoth2",
    "services.families.mammoth25",
    "services.families.mammoth2_preview",
)


@dataclass(frozen=True)
class ModelFamily:
    """What services/ needs to know about one model family."""

    name: str
    description: str
    tasks: tuple[str, ...]  # the public tasks it serves (``TASKS``)
    output: Literal["image", "video"]  # what its generation tasks produce (the ingress picks the flow by task)
    defaults: Mapping[str, Any]  # request defaults; presets and converted checkpoints start from these
    # (public request message, model defaults, RequestLimits, task) -> ImageJob | VideoJob
    build_job: Callable[..., Any]
    # DiT stage: (DenoiseRequest, model defaults, RequestLimits) -> the job its engine runs
    denoise_job: Callable[..., Any]
    # DiT gRPC service: DenoiseRequest -> (conditions, [EncodedMedia]) read from its tensor fields
    dit_inputs: Callable[[Any], tuple[Any, list[Any]]]
    # "module:Class" of each stage's engine (imported only by the stage that runs it)
    engines: Mapping[str, str] = field(default_factory=dict)
    parallel_dit: bool = False  # ``dit.engine.parallel`` (a multi-rank MoE DiT group) applies

    def serves(self, task: str) -> bool:
        return task in self.tasks

    def engine_class(self, stage: Stage) -> type:
        """The engine class ``stage`` builds for this family's models."""
        try:
            module, _, name = self.engines[stage].partition(":")
        except KeyError:
            raise LookupError(f"family {self.name!r} declares no {stage} engine") from None
        return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, ModelFamily] = {}
_LOCK = threading.RLock()  # re-entrant: a family module may look another one up
_loaded = False


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Add ``family`` to the registry; a second family of the same name is an error unless
    ``replace`` (a test swapping its own record)."""
    _load_builtin()
    unknown = sorted(set(family.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"family {family.name!r}: unknown tasks {unknown} (known: {list(TASKS)})")
    with _LOCK:
        if family.name in _REGISTRY and not replace and _REGISTRY[family.name] is not family:
            raise ValueError(f"family {family.name!r} is already registered")
        _REGISTRY[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Drop a family (tests registering a dummy one clean up with this)."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def get_family(name: str) -> ModelFamily:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LookupError(f"unknown model family {name!r}; known: {sorted(_REGISTRY)}") from None


def families() -> dict[str, ModelFamily]:
    """Every registered family by name, in registration order."""
    _load_builtin()
    return dict(_REGISTRY)


def _load_builtin() -> None:
    """Import the built-in family modules once (lazily: they import the job builders,
    which import this module)."""
    global _loaded
    if _loaded:
        return
    with _LOCK:
        if _loaded:
            return
        _loaded = True  # before the imports: a family module may call get_family
        try:
            for path in BUILTIN:
                family = importlib.import_module(path).FAMILY
                _REGISTRY.setdefault(family.name, family)
        except BaseException:
            _loaded = False
            raise
