"""Stage configs as dataclasses that round-trip through ``config.json``.

Every stage (the planner's engine settings, the DiT's architectures) keeps its config this
way, so the base lives here rather than in one stage that the others would have to import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Self


class UnknownConfigKeys(ValueError):
    """A config dict with keys the dataclass does not have (a typo must not pass silently)."""


@dataclasses.dataclass
class DataclassConfig:
    """Base for stage configs: a dataclass that round-trips through ``config.json``.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``...) are metadata and are
    ignored on load; any other unknown key raises ``error`` (a stage may set its own error type,
    e.g. the DiT's ``CheckpointError``), so a typo never goes unnoticed.
    """

    error: ClassVar[type[Exception]] = UnknownConfigKeys

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": type(self).__name__, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(k for k in data if not k.startswith("_") and k not in fields)
        if unknown:
            raise cls.error(f"{cls.__name__}: unknown config keys {unknown}")
        kwargs = {}
        for key, value in data.items():
            if key.startswith("_"):
                continue
            kwargs[key] = _coerce(hints[key], value)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def _coerce(hint: Any, value: Any) -> Any:
    """JSON gives lists where configs hold tuples, and dicts where they hold nested configs."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return value if value is None or len(args) != 1 else _coerce(args[0], value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if isinstance(hint, type) and issubclass(hint, DataclassConfig) and isinstance(value, dict):
        return hint.from_dict(value)
    return value
