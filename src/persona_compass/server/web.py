"""The web page (``GET /``) and its static assets, as a FastAPI router.

Everything is served from package data in ``server/static``; the page loads no
external URL. The server module mounts it with ``app.include_router(router)``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The only files the router serves, with their media types (no directory listing,
# no path traversal: names outside this table are 404).
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

_NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

# The page may load and call only its own origin (no CDN, no external URL of any kind).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_PAGE_HEADERS = {**_NO_CACHE, "Content-Security-Policy": CSP}

router = APIRouter(include_in_schema=False)


@cache
def _page() -> str:
    """The page's HTML, read once (package data does not change while the server runs)."""
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
def index() -> HTMLResponse:
    """The chat page with the live drift chart."""
    return HTMLResponse(_page(), headers=_PAGE_HEADERS)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
def static_asset(name: str) -> FileResponse:
    """One of the page's assets (script, stylesheet)."""
    media_type = ASSETS.get(name)
    path = STATIC_DIR / name
    if media_type is None or not path.is_file():
        raise HTTPException(status_code=404, detail="not found")
    return FileResponse(path, media_type=media_type, headers=_NO_CACHE)
