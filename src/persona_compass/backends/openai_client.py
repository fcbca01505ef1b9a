"""A small, thread-safe client for OpenAI-compatible chat-completion servers.

Every ``openai:URL[#model]`` backend talks to its server through this client: the remote
rollout generator (:mod:`persona_compass.persona_space.generators`), the extraction judge
(:mod:`persona_compass.persona_space.judges`), the simulated user
(:mod:`persona_compass.evaluation.users`) and the outcome judge
(:mod:`persona_compass.evaluation.outcome_llm`). They send many independent requests, so the
client runs them in parallel with a fixed bound, spaces them with an optional rate limit, and
retries the failures that are worth retrying:

* HTTP 429 (honouring ``Retry-After`` / ``retry-after-ms``), 408 and every 5xx;
* timeouts and connection errors.

Any other 4xx is the caller's mistake (bad model name, bad key, bad parameter) and raises
:class:`OpenAIError` at once, with the server's own error message.

The API key is read from an environment variable when the client is built. Without one no
``Authorization`` header is sent, which is what local servers (vLLM, llama.cpp, Ollama) expect.

Example::

    with OpenAIClient("http://127.0.0.1:8000/v1", "Qwen/Qwen3-8B", concurrency=16) as client:
        replies = client.chat_many(
            [[{"role": "user", "content": q}] for q in questions], temperature=0.7
        )
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypedDict
from urllib.parse import urlsplit

import httpx

from ..errors import PersonaCompassError

logger = logging.getLogger(__name__)

CHAT_PATH = "/chat/completions"
RETRY_STATUSES = frozenset({408, 429})
"""4xx statuses that are retried (besides every 5xx)."""
_RESERVED_PARAMS = frozenset({"messages", "stream"})
_ERROR_TEXT_LIMIT = 500

Messages = Sequence[Mapping[str, Any]]


class OpenAIError(PersonaCompassError):
    """An OpenAI-compatible server refused a request, or could not be reached after retries."""


class ClientOptions(TypedDict, total=False):
    """The connection options that wrappers (the OpenAI judges and user simulator) take as
    ``**client_options`` and pass on to :class:`OpenAIClient` unchanged; a missing one gets
    :class:`OpenAIClient`'s default."""

    api_key_env: str | None
    concurrency: int
    retries: int
    requests_per_second: float | None
    timeout: float
    backoff: float


def validate_base_url(base_url: str) -> str:
    """Check an API base URL and return it without a trailing slash.

    Args:
        base_url: for example ``"http://127.0.0.1:8000/v1"`` or ``"https://api.openai.com/v1"``.

    Raises:
        OpenAIError: the URL is not an absolute http(s) URL with a host.
    """
    if not isinstance(base_url, str) or not base_url.strip():
        raise OpenAIError(
            f"base_url={base_url!r} is empty; pass the server's API root, "
            "for example 'http://127.0.0.1:8000/v1'"
        )
    url = base_url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise OpenAIError(
            f"base_url={base_url!r} is not an http(s) URL with a host; "
            "pass something like 'http://127.0.0.1:8000/v1' or 'https://api.openai.com/v1'"
        )
    if parts.query or parts.fragment:
        raise OpenAIError(
            f"base_url={base_url!r} has a query or '#fragment'; pass only the API root "
            "(name the model separately)"
        )
    return url.rstrip("/")


def split_url_model(text: str) -> tuple[str, str | None]:
    """Split ``"URL[#model]"`` into a validated base URL and the model (``None`` if absent).

    Model names may contain ``/`` and ``:`` (``"Qwen/Qwen3-8B"``, ``"llama3:8b"``), so only the
    first ``#`` separates them.
    """
    url, sep, model = text.partition("#")
    model = model.strip()
    if sep and not model:
        raise OpenAIError(f"{text!r} ends with '#' but names no model; write URL#MODEL or URL")
    return validate_base_url(url), (model or None)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds a server asks the client to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be a number of seconds (fractions accepted) or an HTTP date. Returns
    ``None`` when neither header is present or readable.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(value, 0.0)
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        current = time.time() if now is None else now
        return max(when.timestamp() - current, 0.0)
    return max(value, 0.0) if math.isfinite(value) else None


class RateLimiter:
    """Spaces calls at least ``1 / per_second`` seconds apart, across threads.

    Each caller reserves the next free slot under a lock and then sleeps outside it, so
    waiting threads do not block each other while they sleep.

    Args:
        per_second: the largest sustained request rate; must be > 0.
        clock, sleep: injectable for tests.
    """

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not per_second > 0 or not math.isfinite(per_second):
            raise OpenAIError(
                f"requests_per_second={per_second!r} must be a positive number "
                "(or None for no limit)"
            )
        self.per_second = float(per_second)
        self._interval = 1.0 / self.per_second
        self._clock = clock
        self._sleep = sleep
        self._next = -math.inf
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Block until this caller's slot; return the seconds waited."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval
        delay = slot - now
        if delay > 0:
            self._sleep(delay)
        return delay


def _error_message(response: httpx.Response) -> str:
    """The server's own error text (OpenAI, vLLM/FastAPI or plain-text shapes)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            message = error.get("message") or error
        elif error:
            message = error
        else:
            message = body.get("detail") or body.get("message")
    if message is None:
        message = response.text.strip() or response.reason_phrase
    text = str(message)
    if len(text) > _ERROR_TEXT_LIMIT:
        text = text[:_ERROR_TEXT_LIMIT] + "..."
    return text


def _status_hint(status: int, has_key: bool, key_env: str | None) -> str:
    if status in (401, 403):
        if has_key:
            return f"; check the API key in ${key_env}"
        return (
            f"; the server wants an API key: set ${key_env or 'OPENAI_API_KEY'} "
            "(or pass api_key_env=)"
        )
    if status == 404:
        return "; check that base_url ends with the API root (often '/v1') and the model name"
    return ""


def _content(data: Any) -> str:
    """``choices[0].message.content`` of a chat-completion response."""
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise OpenAIError(
            f"the server's reply has no choices[0].message: {str(data)[:200]!r}; "
            "is this an OpenAI-compatible /chat/completions endpoint?"
        ) from exc
    if not isinstance(message, Mapping):
        raise OpenAIError(f"choices[0].message is {message!r}, not an object")
    content = message.get("content")
    if content is None:
        # A refusal field (OpenAI) or a tool call: no text to return.
        return str(message.get("refusal") or "")
    if isinstance(content, list):  # content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return str(content)


def _check_messages(messages: object, where: str = "messages") -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise OpenAIError(
            f"{where} must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
            f"got {messages!r:.80}"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise OpenAIError(
                f"{where}[{i}] is {message!r:.80}; each message needs 'role' and 'content'"
            )
        out.append(dict(message))
    return out


class OpenAIClient:
    """Chat completions from an OpenAI-compatible server, in parallel, with retries.

    Args:
        base_url: the API root, e.g. ``"http://127.0.0.1:8000/v1"``; ``/chat/completions`` is
            appended.
        model: the model name sent with each request; ``None`` sends no ``model`` field, which
            single-model local servers accept.
        api_key_env: environment variable holding the API key, read once here. Unset or empty:
            no ``Authorization`` header. ``None``: never send a key.
        concurrency: the most requests in flight at once (across all threads using the
            client).
        retries: retries after the first attempt for retryable failures (0 = no retry).
        requests_per_second: an optional rate limit over all requests, retries included.
        timeout: seconds for each HTTP attempt.
        backoff: base delay of the exponential backoff, in seconds (doubles per attempt; the
            actual wait is drawn uniformly between half and all of it).
        max_backoff: the longest single wait, also the cap on ``Retry-After``.
        transport: an ``httpx`` transport, for tests.

    Example:
        >>> client = OpenAIClient("http://127.0.0.1:8000/v1", "my-model")  # doctest: +SKIP
        >>> client.chat([{"role": "user", "content": "Hi"}], max_tokens=8)  # doctest: +SKIP
        'Hello! How can I help?'
    """

    def __init__(
        self,
        base_url: str,
        model: str | None,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        retries: int = 4,
        requests_per_second: float | None = None,
        timeout: float = 60.0,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = validate_base_url(base_url)
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise OpenAIError(f"model={model!r} must be a non-empty name or None")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise OpenAIError(f"concurrency={concurrency!r} must be an integer >= 1")
        if not isinstance(retries, int) or retries < 0:
            raise OpenAIError(f"retries={retries!r} must be an integer >= 0")
        if not timeout > 0:
            raise OpenAIError(f"timeout={timeout!r} must be a positive number of seconds")
        if backoff < 0 or max_backoff < 0:
            raise OpenAIError(
                f"backoff={backoff!r} and max_backoff={max_backoff!r} must be >= 0 seconds"
            )
        self.model = model.strip() if model else None
        self.url = self.base_url + CHAT_PATH
        self.concurrency = concurrency
        self.retries = retries
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env, "").strip() if api_key_env else ""
        self._has_key = bool(key)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._limiter = None if requests_per_second is None else RateLimiter(requests_per_second)
        self._slots = threading.BoundedSemaphore(concurrency)
        self._http = httpx.Client(
            headers=headers,
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
        )

    def __repr__(self) -> str:  # never shows the key
        return (
            f"OpenAIClient(base_url={self.base_url!r}, model={self.model!r}, "
            f"concurrency={self.concurrency}, retries={self.retries})"
        )

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def _body(self, messages: object, params: Mapping[str, Any]) -> dict[str, Any]:
        bad = _RESERVED_PARAMS.intersection(params)
        if bad:
            raise OpenAIError(
                f"parameter(s) {sorted(bad)} cannot be set here: messages are the first "
                "argument and streaming is not supported"
            )
        body: dict[str, Any] = {}
        if self.model is not None:
            body["model"] = self.model
        body["messages"] = _check_messages(messages)
        body.update({k: v for k, v in params.items() if v is not None})
        return body

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Wait before retry number ``attempt + 1``: exponential with jitter, at least the
        server's ``Retry-After``, never more than ``max_backoff``."""
        base = min(self.max_backoff, self.backoff * (2.0**attempt))
        wait = random.uniform(base / 2, base)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_backoff)

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        with self._slots:
            if self._limiter is not None:
                self._limiter.wait()
            return self._http.post(self.url, json=body)

    def chat(self, messages: Messages, **params: Any) -> str:
        """One chat completion; returns the reply text (``choices[0].message.content``).

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            **params: request fields passed through to the server (``temperature``,
                ``top_p``, ``max_tokens``, ``seed``, ...); ``None`` values are left out.

        Raises:
            OpenAIError: a non-retryable HTTP error (with the server's message), a malformed
                reply, or a failure that persisted through every retry.
        """
        body = self._body(messages, params)
        attempts = self.retries + 1
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                response = self._post(body)
            except httpx.TimeoutException as exc:
                problem = f"timed out after {self.timeout:g}s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if status < 400:
                    try:
                        data = response.json()
                    except ValueError as exc:
                        raise OpenAIError(
                            f"{self.url} answered HTTP {status} with a body that is not JSON: "
                            f"{response.text[:200]!r}"
                        ) from exc
                    return _content(data)
                message = _error_message(response)
                if status not in RETRY_STATUSES and status < 500:
                    raise OpenAIError(
                        f"{self.url} refused the request with HTTP {status}: {message}"
                        + _status_hint(status, self._has_key, self.api_key_env)
                    )
                retry_after = parse_retry_after(response.headers)
                problem = f"HTTP {status}: {message}"
            if attempt + 1 >= attempts:
                raise OpenAIError(
                    f"{self.url} failed {attempts} time(s); last error: {problem}. "
                    "Check that the server is up, or raise retries= / timeout="
                )
            wait = self._delay(attempt, retry_after)
            logger.warning(
                "%s: %s; retry %d/%d in %.2fs", self.url, problem, attempt + 1, self.retries, wait
            )
            time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def chat_many(self, conversations: Sequence[Messages], **params: Any) -> list[str]:
        """Chat completions for many conversations, in parallel; replies in input order.

        At most ``concurrency`` requests are in flight. The first failure (in input order)
        is raised after the requests not yet started are cancelled.

        Args:
            conversations: one message list per request.
            **params: request fields shared by every request (see :meth:`chat`).
        """
        conversations = list(conversations)
        if not conversations:
            return []
        for i, messages in enumerate(conversations):
            _check_messages(messages, f"conversations[{i}]")
        self._body(conversations[0], params)  # reject bad params before any request
        if len(conversations) == 1:
            return [self.chat(conversations[0], **params)]
        pool = ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(conversations)),
            thread_name_prefix="persona-compass-openai",
        )
        try:
            futures: list[Future[str]] = [
                pool.submit(self.chat, messages, **params) for messages in conversations
            ]
            results = []
            for done, future in enumerate(futures):
                results.append(future.result())
                if (done + 1) % 100 == 0:
                    logger.info("%s: %d/%d replies", self.url, done + 1, len(futures))
            return results
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
