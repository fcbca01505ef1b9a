"""The guard middleware: API key, request body size, and request counting.

Pure ASGI rather than a Starlette ``BaseHTTPMiddleware``, so streaming answers pass through
untouched.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics
from .responses import error_response
from .schemas import RequestError

OPEN_PATHS = ("/health", "/")  # plus /static/...: no API key needed


def _endpoint_label(path: str) -> str:
    """A bounded label for the request counter."""
    if path.startswith("/static/") or path == "/":
        return "web"
    if path.startswith("/v1/models"):
        return "/v1/models"
    if path in ("/v1/chat/completions", "/v1/compass", "/metrics", "/health"):
        return path
    return "other"


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def host_name(value: str) -> str:
    """The host part of a ``Host`` header or origin authority (no port, no brackets)."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _browser_check(
    scope: Scope, headers: dict[str, str], allowed: tuple[str, ...]
) -> RequestError | None:
    """What stops a web page on another site from driving this server."""
    host = headers.get("host", "")
    if "*" not in allowed and host_name(host) not in allowed:
        return RequestError(
            f"the Host header {host!r} is not a name of this server (it answers to "
            f"{', '.join(allowed)}); start it with --allow-host NAME to add one",
            status=403,
            type="permission_error",
            code="host_not_allowed",
        )
    origin = headers.get("origin")
    if origin is not None:
        scheme = scope.get("scheme", "http")
        if origin.lower().rstrip("/") != f"{scheme}://{host}".lower():
            return RequestError(
                f"cross-origin request from {origin!r} refused: only this server's own page "
                "may call it from a browser",
                status=403,
                type="permission_error",
                code="cross_origin",
            )
    if scope.get("method") == "POST":
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            return RequestError(
                f"Content-Type {kind or '(none)'!r} is not accepted; send the body as JSON "
                "with 'Content-Type: application/json'",
                status=415,
                code="unsupported_media_type",
            )
    return None


class GuardMiddleware:
    """Checks ``Host``, ``Origin``, ``Content-Type``, ``Authorization`` and
    ``Content-Length``, and counts answers by status."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        metrics: Metrics,
        allowed_hosts: tuple[str, ...] = ("*",),
    ) -> None:
        self.app = app
        self._key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.allowed_hosts = allowed_hosts

    def _check(self, scope: Scope) -> RequestError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = _browser_check(scope, headers, self.allowed_hosts)
        if refused is not None:
            return refused
        if self._key is not None and not _is_open(scope.get("path", "")):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            token = token.strip()
            problem = None
            if scheme.lower() != "bearer" or not token:
                problem = "missing API key: send the header 'Authorization: Bearer <key>'"
            elif not hmac.compare_digest(token.encode(), self._key):
                problem = "incorrect API key"
            if problem is not None:
                return RequestError(
                    problem,
                    status=401,
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return RequestError("Content-Length is not a number")
            if size > self.max_body_bytes:
                return RequestError(
                    f"the request body is {size} bytes; this server takes at most "
                    f"{self.max_body_bytes}",
                    status=413,
                    code="request_too_large",
                )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            error = self._check(scope)
            if error is not None:
                await error_response(error)(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.inc(
                endpoint=_endpoint_label(scope.get("path", "")), status=str(status[0])
            )
