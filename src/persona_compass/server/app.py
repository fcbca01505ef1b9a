"""The OpenAI-compatible server: chat completions with activation capping and drift telemetry.

``create_app(model, tokenizer, axis, capping_config, config)`` builds the FastAPI app around
objects already loaded (tests, notebooks); :func:`create_app_from_specs` loads the axis bundle
and the model inside the app's lifespan (the ``persona-compass serve`` command).

Endpoints: ``POST /v1/chat/completions`` (streaming or not), ``GET /v1/models``,
``GET /v1/compass`` (calibration bands and settings for the web page), ``GET /metrics``
(Prometheus text), ``GET /health`` and the web page (``GET /``, ``/static/...``). Every
generation runs on one worker thread (the model's hooks are global to the model), in arrival
order, from a bounded queue. Every error is an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from ..axis import Axis
from ..bundle import Bundle, open_trait_bundles
from ..capping import CappingConfig
from ..compass import Answer
from ..errors import PersonaCompassError
from ..jsonio import JSONInputError, parse_json
from .config import ServerConfig, ServerConfigError
from .guard import GuardMiddleware
from .metrics import CONTENT_TYPE, Metrics
from .protocol import HEADER_TIMEOUT, with_header_timeout
from .responses import classify, error_response, json_response
from .schemas import RequestError, error_body, parse_chat_request
from .state import CompassState
from .streaming import finish_reason, next_event, stream_answer, usage
from .worker import QueueFull, WorkerStopped

__all__ = [
    "BackgroundServer",
    "ServerConfig",
    "ServerConfigError",
    "create_app",
    "create_app_from_specs",
    "create_vllm_app",
]


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than ``limit`` bytes as they arrive."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                f"the request body is over this server's limit of {limit} bytes",
                status=413,
                code="request_too_large",
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise RequestError("the request body is empty; send a JSON object")
    try:
        return parse_json(raw, "the request body")
    except JSONInputError as exc:
        raise RequestError(str(exc)) from None


def _build_app(
    config: ServerConfig, factory: Callable[[], CompassState], *, eager: bool
) -> FastAPI:
    holder: dict[str, CompassState | None] = {"state": factory() if eager else None}

    def current() -> CompassState | None:
        return holder["state"]

    def _depth() -> float:
        state = current()
        return float(state.depth) if state is not None else 0.0

    def _busy() -> float:
        state = current()
        return 1.0 if state is not None and state.busy else 0.0

    metrics = Metrics(queue_depth=_depth, busy=_busy)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if holder["state"] is None:
            try:
                holder["state"] = await asyncio.to_thread(factory)
            except PersonaCompassError as exc:
                app.state.startup_error = exc  # the CLI reports it as one line
                raise
        state = holder["state"]
        assert state is not None
        app.state.compass = state
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="persona-compass",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.compass = holder["state"]
    app.state.metrics = metrics
    app.state.startup_error = None
    app.add_middleware(
        GuardMiddleware,
        api_key=config.api_key,
        max_body_bytes=config.max_body_bytes,
        metrics=metrics,
        allowed_hosts=config.allowed_hosts,
    )

    def ready() -> CompassState:
        state = current()
        if state is None:
            raise RequestError(
                "the model is still loading", status=503, type="server_error", code="not_ready"
            )
        return state

    # -- errors -----------------------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return json_response(
            error_body(str(exc.detail), type=kind, code=code),
            exc.status_code,
            dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        return json_response(
            error_body(str(first.get("msg", "invalid request")), param=".".join(loc) or None),
            422,
        )

    # -- small endpoints --------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        state = current()
        return json_response(
            {
                "status": "ok" if state is not None else "loading",
                "model": state.model_name if state is not None else config.model_name,
                "queue_depth": state.depth if state is not None else 0,
                "busy": bool(state is not None and state.busy),
                "engine": state.engine_name if state is not None else None,
                "auth_required": config.api_key is not None,
            }
        )

    def model_card(state: CompassState) -> dict[str, Any]:
        return {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "persona-compass",
        }

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return json_response({"object": "list", "data": [model_card(ready())]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        state = ready()
        if model_id != state.model_name:
            raise RequestError(
                f"the model {model_id!r} does not exist here; this server serves "
                f"{state.model_name!r}",
                param="model",
                status=404,
                code="model_not_found",
            )
        return json_response(model_card(state))

    @app.get("/v1/compass")
    async def compass() -> JSONResponse:
        return json_response(ready().compass_info())

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # -- chat completions -------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state = ready()
        arrived = time.perf_counter()
        body = await _read_json(request, config.max_body_bytes)
        req = parse_chat_request(body, max_tokens_limit=config.max_tokens_limit)
        plan = state.plan(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, payload: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        def sink(kind: str, payload: Any) -> None:  # on the generation thread
            if kind == "done":
                record_answer(payload)
            elif kind == "error" and not isinstance(payload, RequestError):
                metrics.completions.inc(finish_reason="error")  # a refused request is none
            emit(kind, payload)

        try:
            job = state.submit(plan, stream=req.stream, sink=sink)
        except QueueFull as exc:
            metrics.rejected.inc()
            many = (
                "one answer at a time"
                if state.engine_name == "hf"
                else (f"{config.max_concurrency} answers at a time")
            )
            raise RequestError(
                f"{exc}; the server generates {many}",
                status=429,
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except WorkerStopped as exc:
            raise classify(exc) from None

        metrics.in_progress.inc()
        released = [False]

        def release() -> None:  # once, from whichever of handler / stream / background ends
            if not released[0]:
                released[0] = True
                metrics.in_progress.dec()
            job.abandon()  # a no-op once the job has finished

        streaming = False
        try:
            first = await next_event(events, request, job)
            if first is None:
                return Response(status_code=499)  # the client is gone; nobody reads this
            if first[0] == "error":
                return error_response(classify(first[1]))
            cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if req.stream:
                streaming = True
                return StreamingResponse(
                    stream_answer(
                        state, plan, req, events, cid, created, arrived, release, metrics
                    ),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    background=BackgroundTask(release),
                )
            event = await next_event(events, request, job)
            while event is not None and event[0] not in ("done", "error"):
                event = await next_event(events, request, job)
            if event is None:
                return Response(status_code=499)
            if event[0] == "error":
                return error_response(classify(event[1]))
            answer: Answer = event[1]
            metrics.latency.observe(time.perf_counter() - arrived)
            return json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": state.model_name,
                    "system_fingerprint": None,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer.text},
                            "logprobs": None,
                            "finish_reason": finish_reason(answer),
                        }
                    ],
                    "usage": usage(answer),
                    "persona_compass": state.telemetry(answer, plan),
                }
            )
        finally:
            if not streaming:
                release()

    def record_answer(answer: Answer) -> None:
        reading = answer.reading
        metrics.completions.inc(finish_reason=answer.finish_reason)
        metrics.completion_tokens.inc(answer.completion_tokens)
        metrics.prompt_tokens.inc(answer.prompt_tokens)
        for alert in reading.alerts:
            metrics.alerts.inc(kind=alert.kind)
        if reading.capped:
            metrics.capped_answers.inc()
            if reading.cap_engagement is not None and math.isfinite(reading.cap_engagement):
                metrics.cap_engagement.observe(reading.cap_engagement)

    from .web import router

    app.include_router(router)
    return app


def create_app(
    model: Any,
    tokenizer: Any,
    axis: Axis,
    capping_config: CappingConfig | None,
    config: ServerConfig,
    *,
    traits: Sequence[Axis] = (),
) -> FastAPI:
    """The server around an already loaded model, tokenizer, axis and capping config.

    ``traits`` are trait axes read beside the axis (the telemetry's ``traits`` object). The
    worker thread starts with the app's lifespan (or with the first request).
    """
    state = CompassState(model, tokenizer, axis, capping_config, config, traits)
    return _build_app(config, lambda: state, eager=True)


def create_vllm_app(engine: Any, config: ServerConfig) -> FastAPI:
    """The server around an already started
    :class:`~persona_compass.engines.vllm_engine.VLLMEngine` (closed when the app stops)."""
    from .vllm_state import VLLMCompassState

    state = VLLMCompassState(engine, config)
    return _build_app(config, lambda: state, eager=True)


def create_app_from_specs(
    axis_spec: str | Bundle,
    model_spec: str | None,
    config: ServerConfig,
    *,
    dtype: str | None = None,
    engine: str = "hf",
    engine_options: dict[str, Any] | None = None,
    traits: Sequence[str | Bundle] = (),
) -> FastAPI:
    """The server for an axis bundle (folder, shipped alias or an opened
    :class:`~persona_compass.Bundle`) and a model spec.

    The bundle (unless already opened), its capping config (``capping.json``, if any) and the
    model (default: the bundle's model) load in the app's lifespan, before the server accepts
    connections.
    ``config.model_name`` left empty becomes the model spec.

    ``engine``: ``hf`` generates one answer at a time in this process; ``vllm`` starts a
    :class:`~persona_compass.engines.vllm_engine.VLLMEngine` (``engine_options`` go to it)
    that batches up to ``config.max_concurrency`` answers.

    ``traits``: trait axis bundles (folders, aliases or opened bundles) read beside the axis
    on either engine; each must come from the same model.
    """
    from ..engines import check_engine_name

    check_engine_name(engine)
    if engine == "hf" and engine_options:
        raise ServerConfigError(f"engine options {sorted(engine_options)} are for `engine='vllm'`")

    def load() -> CompassState:
        bundle = axis_spec if isinstance(axis_spec, Bundle) else Bundle.open(axis_spec)
        needles = open_trait_bundles(traits, bundle.axis)  # before any model loads
        spec = bundle.model_spec(model_spec)
        cfg = config if config.model_name else replace(config, model_name=spec)
        if engine == "vllm":
            from ..engines.vllm_engine import VLLMEngine
            from .vllm_state import VLLMCompassState

            # vLLM's engine core in its own process: the model computes while this process
            # streams and serves HTTP (in one process they would take turns on the GIL).
            options = {
                "max_num_seqs": config.max_concurrency,
                "multiprocessing": True,
                **(engine_options or {}),
            }
            started = VLLMEngine(spec, bundle, dtype=dtype or "auto", traits=needles, **options)
            return VLLMCompassState(started, cfg)
        model, tokenizer = bundle.load_model(spec, dtype=dtype)
        axes = [needle.axis for needle in needles]
        return CompassState(model, tokenizer, bundle.axis, bundle.capping, cfg, axes)

    return _build_app(config, load, eager=False)


class BackgroundServer:
    """Run an ASGI app with uvicorn on a loopback port in a daemon thread (tests, notebooks).

    Example:
        >>> with BackgroundServer(app) as server:
        ...     httpx.get(server.url + "/health")
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        import uvicorn

        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=5,
            http=with_header_timeout(header_timeout),
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server stopped during startup (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
