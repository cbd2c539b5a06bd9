"""Typed errors for untrusted media: each names the request field and the limit it broke."""

from __future__ import annotations

from typing import Any


class MediaError(ValueError):
    """Bad media in a request. ``field`` is the request field, ``limit`` the bound involved (or None)."""

    def __init__(self, message: str, *, field: str, limit: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.limit = limit
        self.detail = message

    def __reduce__(self):  # keyword-only fields: rebuild explicitly when pickled across processes
        return _rebuild, (type(self), self.detail, self.field, self.limit)


def _rebuild(cls: type[MediaError], message: str, field: str, limit: Any) -> MediaError:
    return cls(message, field=field, limit=limit)


class MediaTooLarge(MediaError):
    """Bytes, pixels, dimensions, frames or duration over the configured limit."""


class UnsupportedMedia(MediaError):
    """Not one of the accepted formats (or not media at all)."""


class CorruptMedia(MediaError):
    """Recognised format, but the data is truncated or malformed."""


class EmptyMedia(MediaError):
    """No bytes, or a video without a single decodable frame."""


class MediaTooSmall(MediaError):
    """Smaller than one grid cell (e.g. under 16 px) after the model's resize policy."""


class MediaTimeout(MediaError):
    """Decoding did not finish within the configured wall-clock bound."""
