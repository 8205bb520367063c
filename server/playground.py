"""The pointing playground: the static page `molmo serve` shows at / (off with --no-ui).

    app.include_router(playground_router())   # GET / and GET /ui/{playground.js, .css}

The page (server/static/: HTML, CSS, JS, no build step) calls only the public API, with the
key the user types, so it can do nothing a client with that key could not; / itself needs
no key. Every file goes out with a Content-Security-Policy that lets the page load its own
script and style and talk to this server only: no inline script, nothing from elsewhere.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from server.errors import APIError

STATIC = Path(__file__).resolve().parent / "static"
# The files served, by name: nothing else under static/ (or beside it) can be asked for.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new server version's page is picked up on reload
}


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


def playground_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)  # not part of the API the schema describes

    @router.get("/")
    async def page() -> Response:
        return _file("index.html")

    @router.get("/ui/{name}")
    async def asset(name: str) -> Response:
        if name not in FILES:
            raise APIError(404, f"no such file: /ui/{name}", code="not_found")
        return _file(name)

    return router
