"""A local, programmable OpenAI-compatible chat server for tests (loopback only).

``stub_server()`` starts a threaded HTTP server on ``127.0.0.1`` (a free port), serves
``POST /v1/chat/completions`` and ``GET /v1/models``, and stops it on exit::

    from openai_stub import Failure, stub_server

    with stub_server(reply="Score: 2", failures=[Failure(429, retry_after=0.1)]) as server:
        client = OpenAIClient(server.url, "stub-model", backoff=0.01)
        assert client.chat([{"role": "user", "content": "hi"}]) == "Score: 2"
        assert server.requests[-1].body["model"] == "stub-model"
        assert server.statuses == [429, 200]

Behaviour:

* ``reply``: ``None`` (default) echoes the last message's content; a string is always
  returned; a list of strings is used in arrival order (the last one repeats); a callable gets
  the request body (a dict) and returns the reply text, or a whole response dict that is sent
  as it is (to test malformed replies).
* ``failures``: a queue consumed one per chat request before any reply. Each item is a
  :class:`Failure` or a bare status code. ``Failure(close=True)`` drops the connection with no
  answer; ``Failure(delay=...)`` waits first (to trigger client timeouts).
* ``delay``: seconds every request waits before it is answered (to observe concurrency).
* ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get HTTP 401.
* ``server.requests``: every chat request received (:class:`StubRequest`, arrival order);
  ``server.max_concurrency``: the most chat requests handled at the same time;
  ``server.statuses``: the status sent for each chat request (``0`` = connection dropped).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

Reply = str | Sequence[str] | Callable[[dict[str, Any]], "str | dict[str, Any]"] | None


@dataclass(frozen=True)
class Failure:
    """One programmed failure.

    Attributes:
        status: HTTP status to answer with (ignored when ``close`` is true).
        message: the error message, sent as ``{"error": {"message": ...}}``.
        retry_after: value of the ``Retry-After`` header (seconds), if any.
        retry_after_ms: value of the ``retry-after-ms`` header, if any.
        delay: seconds to wait before answering (or dropping the connection).
        close: drop the connection without any answer.
    """

    status: int = 500
    message: str = "stub failure"
    retry_after: float | str | None = None
    retry_after_ms: float | None = None
    delay: float = 0.0
    close: bool = False


@dataclass(frozen=True)
class StubRequest:
    """A chat request as the stub received it."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]
    time: float  # time.monotonic() at arrival

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))


@dataclass
class StubServer:
    """State of a running stub; see the module docstring."""

    reply: Reply = None
    delay: float = 0.0
    api_key: str | None = None
    model: str = "stub-model"
    url: str = ""
    requests: list[StubRequest] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    max_concurrency: int = 0
    _failures: deque[Failure] = field(default_factory=deque)
    _active: int = 0
    _replies_used: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, *failures: Failure | int) -> None:
        """Queue failures for the next chat requests."""
        with self._lock:
            self._failures.extend(_as_failure(f) for f in failures)

    @property
    def pending_failures(self) -> int:
        with self._lock:
            return len(self._failures)

    # -- used by the handler ------------------------------------------------------------

    def _enter(self, request: StubRequest) -> tuple[Failure | None, int]:
        with self._lock:
            self.requests.append(request)
            self._active += 1
            self.max_concurrency = max(self.max_concurrency, self._active)
            failure = self._failures.popleft() if self._failures else None
            index = self._replies_used
            if failure is None:
                self._replies_used += 1
            return failure, index

    def _record(self, status: int) -> None:
        with self._lock:
            self.statuses.append(status)

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    def _make_reply(self, body: dict[str, Any], index: int) -> dict[str, Any]:
        reply = self.reply
        if reply is None:
            messages = body.get("messages") or [{}]
            text: str | dict[str, Any] = str(messages[-1].get("content", ""))
        elif isinstance(reply, str):
            text = reply
        elif callable(reply):
            text = reply(body)
        else:
            text = reply[min(index, len(reply) - 1)]
        if isinstance(text, dict):
            return text
        return {
            "id": f"chatcmpl-stub-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }


def _as_failure(item: Failure | int) -> Failure:
    return item if isinstance(item, Failure) else Failure(status=int(item))


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "stub_error", "code": status}}


def _handler(state: StubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers at exit

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # keep test output quiet

        recorded = False  # whether this chat request's status is in state.statuses

        def _record(self, status: int) -> None:
            if not self.recorded:
                self.recorded = True
                state._record(status)

        entered = False  # whether this chat request counts in state's active requests

        def _leave(self) -> None:
            if self.entered:
                self.entered = False
                state._leave()

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            if self.path.rstrip("/") == CHAT_PATH:
                # recorded, and no longer counted as active, before the client can read the
                # answer and send its next request: no race in the tests
                self._record(status)
                self._leave()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == MODELS_PATH:
                models = [{"id": state.model, "object": "model", "owned_by": "stub"}]
                self._send(200, {"object": "list", "data": models}, {})
            else:
                self._send(404, _error_body(404, f"no route GET {self.path}"), {})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path.rstrip("/") != CHAT_PATH:
                self._send(404, _error_body(404, f"no route POST {self.path}"), {})
                return
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = None
            if not isinstance(body, dict):
                self._send(400, _error_body(400, "request body is not a JSON object"), {})
                return
            request = StubRequest(
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                time=time.monotonic(),
            )
            failure, index = state._enter(request)
            self.entered = True
            status = 0
            try:
                status = self._answer(request, failure, index)
            except (BrokenPipeError, ConnectionResetError):
                status = 0  # the client gave up (timeout): nothing to answer
            finally:
                self._record(status)
                self._leave()

        def _answer(self, request: StubRequest, failure: Failure | None, index: int) -> int:
            wait = state.delay + (failure.delay if failure else 0.0)
            if wait > 0:
                time.sleep(wait)
            if failure is not None and failure.close:
                self._record(0)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # no answer at all
                return 0
            expected = f"Bearer {state.api_key}" if state.api_key else None
            if expected and request.headers.get("authorization") != expected:
                self._send(401, _error_body(401, "Incorrect API key provided."), {})
                return 401
            if failure is not None:
                headers: dict[str, str] = {}
                if failure.retry_after is not None:
                    headers["Retry-After"] = str(failure.retry_after)
                if failure.retry_after_ms is not None:
                    headers["retry-after-ms"] = str(failure.retry_after_ms)
                self._send(failure.status, _error_body(failure.status, failure.message), headers)
                return failure.status
            if "messages" not in request.body:
                self._send(400, _error_body(400, "'messages' is a required property"), {})
                return 400
            self._send(200, state._make_reply(request.body, index), {})
            return 200

    return Handler


@contextmanager
def stub_server(
    reply: Reply = None,
    *,
    failures: Iterable[Failure | int] = (),
    delay: float = 0.0,
    api_key: str | None = None,
    model: str = "stub-model",
) -> Iterator[StubServer]:
    """Run a stub OpenAI-compatible server on 127.0.0.1 for the duration of the block.

    Yields a :class:`StubServer` whose ``url`` is the API root (``http://127.0.0.1:PORT/v1``).
    """
    state = StubServer(reply=reply, delay=delay, api_key=api_key, model=model)
    state.fail(*failures)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    state.url = f"http://127.0.0.1:{port}/v1"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
