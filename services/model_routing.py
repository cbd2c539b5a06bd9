"""Which served model a request goes to: its ``model`` field, else the task's default model.

Several models may be served side by side, of one family or several (``models:`` in the
config); each has its own planner / DiT / VAE applications. A request naming a model is sent
to that model if it serves the task; a request without one goes to
``ingress.default_models[task]``, else to the first configured model whose family serves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .families import ModelFamily, get_family
from .jobs import InvalidArgument

T = TypeVar("T")


class ModelNotFound(InvalidArgument):
    """A request naming a model this server does not serve (HTTP: 404 ``model_not_found``)."""

    http_status = 404
    code = "model_not_found"


@dataclass(frozen=True)
class ServedModel(Generic[T]):
    """One configured model as the ingress sees it; ``stages`` is its transport (Serve handles)."""

    name: str
    family: ModelFamily
    preset: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    stages: T | None = None

    def describe(self) -> dict[str, Any]:
        """Its ``/v1/models`` entry."""
        return {"id": self.name, "object": "model", "owned_by": "mammoth", "family": self.family.name,
                "preset": self.preset, "tasks": list(self.family.tasks)}


class ModelRouter(Generic[T]):
    def __init__(self, models: Iterable[ServedModel[T]], default_models: Mapping[str, str] | None = None):
        self.models: dict[str, ServedModel[T]] = {m.name: m for m in models}
        self.default_models = dict(default_models or {})
        for task, name in self.default_models.items():
            if name not in self.models:
                raise ValueError(f"ingress.default_models.{task}: {name!r} is not a served model")
            if not self.models[name].family.serves(task):
                raise ValueError(f"ingress.default_models.{task}: {name!r} ({self.models[name].family.name}) "
                                 f"does not serve {task}")

    @classmethod
    def from_indexes(cls, indexes: Mapping[str, Any], default_models: Mapping[str, str] | None = None,
                     stages: Mapping[str, T] | None = None) -> ModelRouter[T]:
        """``indexes``: served name -> its ``ModelIndex`` (config order); ``stages``: its transport."""
        stages = stages or {}
        return cls([ServedModel(name, get_family(index.family), index.preset, dict(index.defaults), stages.get(name))
                    for name, index in indexes.items()], default_models)

    def route(self, task: str, requested: str | None = None) -> ServedModel[T]:
        """The model serving ``task`` for a request whose ``model`` field is ``requested``."""
        if requested:
            model = self.models.get(requested)
            if model is None:
                raise ModelNotFound("model", f"the model {requested!r} does not exist; served: "
                                    f"{', '.join(self.models)}")
            if not model.family.serves(task):
                raise InvalidArgument("model", f"the model {requested!r} does not serve {task} "
                                      f"(it serves {', '.join(model.family.tasks)})")
            return model
        name = self.default_models.get(task)
        if name is not None:
            return self.models[name]
        for model in self.models.values():
            if model.family.serves(task):
                return model
        raise InvalidArgument("model", f"this server has no model for {task}")


def requested_model(msg: Any) -> str | None:
    """The ``model`` field of a public request (gRPC message or HTTP body); empty means none."""
    value = getattr(msg, "model", None)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument("model", f"must be a string, got {value!r}")
    return value or None
