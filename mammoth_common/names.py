"""Strict official-name -> our-name mapping, shared by every stage's checkpoint conversion.

Each stage keeps its own table of what it expects (its module's state dict); this only walks an
official checkpoint's tensors under one prefix and insists that both sides match exactly, so a
renamed, missing or mis-shaped tensor is an error naming it instead of a silently random weight.
"""

from __future__ import annotations

from collections.abc import Iterable


def strict_prefix_mapping(official: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                          prefix: str, *, what: str, error: type[Exception],
                          ignored: Iterable[str] = ()) -> dict[str, str]:
    """Our name -> official name for every tensor in ``expected``.

    Official names outside ``prefix`` belong to other stages and are skipped, as are those whose
    un-prefixed name starts with one of ``ignored``. ``what`` names the stage in errors.
    """
    ignored = tuple(ignored)
    mapping: dict[str, str] = {}
    for name in sorted(official):
        if not name.startswith(prefix):
            continue
        ours = name[len(prefix):]
        if ignored and ours.startswith(ignored):
            continue
        if ours not in expected:
            raise error(f"official tensor '{name}' has no place in {what}")
        if tuple(official[name]) != tuple(expected[ours]):
            raise error(f"official tensor '{name}' has shape {tuple(official[name])}, "
                        f"the config expects {tuple(expected[ours])}")
        mapping[ours] = name
    missing = sorted(set(expected) - set(mapping))
    if missing:
        raise error(f"the official checkpoint lacks {what} tensor '{prefix}{missing[0]}'"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return mapping
