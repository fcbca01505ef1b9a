"""An HTTP protocol for uvicorn that closes connections whose request headers never finish.

uvicorn's keep-alive timer only starts after a response, and any byte received cancels it,
so a client that opens a connection and sends its headers a byte at a time (or never ends
them) holds the connection open for as long as it likes. This protocol gives every
connection ``HEADER_TIMEOUT`` seconds to deliver its first request's headers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the first request's headers."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: Any = self.loop.call_later(self.header_timeout, self._too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None:  # the headers arrived: a request is being served
            self._cancel_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _cancel_deadline(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class with another header deadline (tests use a short one)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": seconds})
