"""The web playground: three static files the HTTP ingress serves at ``/``.

The page talks to the public HTTP API only, so it needs nothing server-side but these routes.
The shell itself is open (it holds no data and asks for the key); every API call it makes
carries the key as ``Authorization: Bearer`` and passes the same check as any client's.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response

_DIR = Path(__file__).parent

# URL path -> (file in this package, media type). One table: the routes and the open paths.
FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/playground/style.css": ("style.css", "text/css; charset=utf-8"),
}

# The page loads nothing from elsewhere; media arrive as data: and blob: URLs.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def open_paths(enabled: bool) -> frozenset[str]:
    """Paths that need no API key: the static shell, when the playground is on."""
    return frozenset(FILES) if enabled else frozenset()


def mount_playground(app: FastAPI, enabled: bool) -> None:
    """Adds the playground's routes to the ingress app (nothing when ``enabled`` is false)."""
    if not enabled:
        return
    for path, (name, media_type) in FILES.items():
        body = (_DIR / name).read_bytes()  # read at start: a missing file fails the ingress, not a request
        app.add_api_route(path, _file_route(body, media_type), methods=["GET"], include_in_schema=False)


def _file_route(body: bytes, media_type: str):
    async def serve_file() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)
    return serve_file
