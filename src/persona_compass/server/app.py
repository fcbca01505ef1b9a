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
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..alerts import AlertRules, AlertRulesError
from ..axis import Axis
from ..capping import CAPPING_FILE, CappingConfig
from ..chat import render_chat
from ..compass import (
    CAP_MODES,
    AdaptivePolicy,
    Answer,
    CompassError,
    Delta,
    Steering,
    check_cap_mode,
    respond,
)
from ..errors import ChatTemplateError, PersonaCompassError
from ..generation import SamplingConfig
from ..layers import normalize_layers
from ..monitor import context_length
from .metrics import CONTENT_TYPE, Metrics
from .schemas import (
    CappingSpec,
    ChatRequest,
    RequestError,
    error_body,
    parse_chat_request,
)
from .worker import GenerationWorker, Job, QueueFull, WorkerStopped

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/")  # plus /static/...: no API key needed
BAND_PERCENTILES = (5, 25, 50)
CAP_CACHE_SIZE = 32
DISCONNECT_POLL_S = 0.25
DEFAULT_PERCENTILE = 25.0


class ServerConfigError(PersonaCompassError):
    """A server setting out of range."""


@dataclass
class ServerConfig:
    """The server's settings; requests may override cap mode, capping, steering and rules.

    Attributes:
        model_name: the id ``/v1/models`` lists and responses carry (``""``: the model spec).
        cap_mode: the default cap mode: ``off``, ``on`` or ``adaptive``.
        api_key: when set, every request but ``/health`` and the web page needs
            ``Authorization: Bearer <api_key>``.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for (400 above).
        default_max_tokens: ``max_tokens`` when a request gives none (at most the limit).
        queue_size: requests that may wait for the generation thread (429 beyond).
        max_body_bytes: the largest request body (413 beyond).
        rules: the default alert rules (a request's ``rules`` fields override them).
    """

    model_name: str
    cap_mode: str = "off"
    api_key: str | None = None
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    queue_size: int = 16
    max_body_bytes: int = 1_000_000
    rules: AlertRules | None = None

    def __post_init__(self) -> None:
        if self.cap_mode not in CAP_MODES:
            raise ServerConfigError(
                f"cap mode {self.cap_mode!r} is not one of {', '.join(CAP_MODES)}"
            )
        for name in ("max_tokens_limit", "default_max_tokens", "queue_size", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServerConfigError(f"{name}={value!r} must be a whole number >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ServerConfigError("api_key is empty; pass a real key or none")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_clean(data), status_code=status, headers=headers)


def _error_response(exc: RequestError) -> JSONResponse:
    return _json(exc.body(), exc.status, exc.headers or None)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(_clean(data), separators=(',', ':'))}\n\n"


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


def _classify(exc: BaseException) -> RequestError:
    """The error response for an exception raised while generating."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, WorkerStopped):
        return RequestError(str(exc), status=503, type="server_error", code="shutting_down")
    if isinstance(exc, PersonaCompassError):
        return RequestError(
            str(exc), param="messages" if isinstance(exc, ChatTemplateError) else None
        )
    logger.error("generation failed", exc_info=(type(exc), exc, exc.__traceback__))
    return RequestError(
        f"generation failed: {type(exc).__name__}: {exc}", status=500, type="server_error"
    )


# ---------------------------------------------------------------------------------------------
# what one request asks for, resolved against the axis
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A request's generation settings, resolved and checked before it is queued."""

    messages: tuple[dict[str, str], ...]
    mode: str
    cap_config: CappingConfig | None
    steer: Steering | None
    rules: AlertRules
    policy: AdaptivePolicy | None
    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int | None
    max_tokens: int
    explicit_max_tokens: bool
    stop: tuple[str, ...]

    def sampling(self, max_new_tokens: int) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


class CompassState:
    """The loaded model, axis and capping config, the worker, and the built-config cache."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        axis: Axis,
        capping_config: CappingConfig | None,
        config: ServerConfig,
    ) -> None:
        check_cap_mode(config.cap_mode, capping_config)
        self.model, self.tokenizer, self.axis = model, tokenizer, axis
        self.capping_config = capping_config
        self.config = config
        self.model_name = config.model_name or str(axis.model_id or "model")
        self.rules = config.rules or AlertRules()
        self.default_max_tokens = min(config.default_max_tokens, config.max_tokens_limit)
        self.worker = GenerationWorker(config.queue_size)
        self.created = int(time.time())
        self._caps: OrderedDict[tuple[tuple[int, ...], float], CappingConfig] = OrderedDict()
        self._caps_lock = threading.Lock()

    # -- settings ---------------------------------------------------------------------------
    def calibrated_cap(self, spec: CappingSpec) -> CappingConfig:
        """A capping config for a window and percentile, from the axis calibration (cached)."""
        param = "persona_compass.capping"
        base = self.capping_config
        layers_spec: Any = spec.layers
        if layers_spec is None:
            if base is None:
                raise RequestError(
                    f"{param}.layers is needed: the bundle has no capping config to take the "
                    "window from",
                    param=f"{param}.layers",
                )
            layers_spec = base.layers
        percentile = spec.percentile
        if percentile is None:
            meta = base.metadata.get("percentile") if base is not None else None
            percentile = float(meta) if isinstance(meta, (int, float)) else DEFAULT_PERCENTILE
        try:
            layers = tuple(normalize_layers(layers_spec, self.axis.n_layers))
        except (PersonaCompassError, ValueError) as exc:
            raise RequestError(str(exc), param=f"{param}.layers") from None
        if self.axis.calibration is None:
            raise RequestError(
                f"{param} needs the axis calibration, and this bundle has none",
                param=param,
            )
        key = (layers, float(percentile))
        with self._caps_lock:
            cached = self._caps.get(key)
            if cached is not None:
                self._caps.move_to_end(key)
                return cached
        try:
            cfg = CappingConfig.calibrate(
                self.axis, self.axis.calibration, list(layers), percentile=float(percentile)
            )
        except (PersonaCompassError, ValueError) as exc:
            raise RequestError(str(exc), param=param) from None
        with self._caps_lock:
            self._caps[key] = cfg
            while len(self._caps) > CAP_CACHE_SIZE:
                self._caps.popitem(last=False)
        return cfg

    def plan(self, req: ChatRequest) -> Plan:
        """Resolve a validated request against the axis and the server's defaults."""
        opts = req.compass
        default_mode = self.config.cap_mode
        cap_config = self.capping_config
        if opts.capping is not None:
            cap_config = self.calibrated_cap(opts.capping)
            if default_mode == "off":
                default_mode = "on"  # a window asked for alone means "cap with it"
        mode = opts.cap or default_mode
        try:
            check_cap_mode(mode, cap_config)
        except CompassError as exc:
            raise RequestError(str(exc), param="persona_compass.cap") from None
        steer = None
        if opts.steering is not None:
            sp = opts.steering
            param = "persona_compass.steering"
            layers = None
            if sp.layers is not None:
                try:
                    layers = tuple(normalize_layers(sp.layers, self.axis.n_layers))
                except (PersonaCompassError, ValueError) as exc:
                    raise RequestError(str(exc), param=f"{param}.layers") from None
            if sp.scale == "relative" and self.axis.residual_norms is None:
                raise RequestError(
                    "steering scale 'relative' needs the axis' residual norms, and this bundle "
                    "has none; use 'unit' or 'raw'",
                    param=f"{param}.scale",
                )
            try:
                steer = Steering(sp.coefficient, layers, sp.scale)  # type: ignore[arg-type]
            except CompassError as exc:
                raise RequestError(str(exc), param=param) from None
        rules = self.rules
        if opts.rules is not None:
            try:
                rules = AlertRules.from_dict({**rules.to_dict(), **opts.rules})
            except (AlertRulesError, TypeError) as exc:
                raise RequestError(str(exc), param="persona_compass.rules") from None
        policy = None
        if opts.policy is not None:
            try:
                policy = AdaptivePolicy(**opts.policy)
            except CompassError as exc:
                raise RequestError(str(exc), param="persona_compass.policy") from None
        defaults = SamplingConfig()
        return Plan(
            messages=req.messages,
            mode=mode,
            cap_config=cap_config,
            steer=steer,
            rules=rules,
            policy=policy,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            repetition_penalty=(
                defaults.repetition_penalty
                if req.repetition_penalty is None
                else req.repetition_penalty
            ),
            seed=req.seed,
            max_tokens=self.default_max_tokens if req.max_tokens is None else req.max_tokens,
            explicit_max_tokens=req.max_tokens is not None,
            stop=req.stop,
        )

    # -- generation (on the worker thread) --------------------------------------------------
    def generate(
        self,
        plan: Plan,
        cancel: threading.Event,
        *,
        on_start: Callable[[int], None] | None = None,
        on_delta: Callable[[Delta], None] | None = None,
    ) -> Answer:
        """Check the prompt against the context length, then :func:`respond`."""
        messages = [dict(m) for m in plan.messages]
        n_prompt = len(render_chat(self.tokenizer, messages, add_generation_prompt=True).input_ids)
        max_new = plan.max_tokens
        window = context_length(self.model)
        if window is not None:
            room = window - n_prompt
            if room < 1 or (plan.explicit_max_tokens and max_new > room):
                raise RequestError(
                    f"this model's context is {window} tokens; the messages take {n_prompt} and "
                    f"{max_new} more were asked for; shorten the conversation or max_tokens",
                    param="messages",
                    code="context_length_exceeded",
                )
            max_new = min(max_new, room)
        if on_start is not None:
            on_start(n_prompt)
        return respond(
            self.model,
            self.tokenizer,
            self.axis,
            messages,
            mode=plan.mode,
            capping_config=plan.cap_config,
            rules=plan.rules,
            policy=plan.policy,
            steer=plan.steer,
            sampling=plan.sampling(max_new),
            stop=plan.stop,
            on_delta=on_delta,
            cancel=cancel,
        )

    def telemetry(self, answer: Answer, plan: Plan) -> dict[str, Any]:
        """The ``persona_compass`` object of a response."""
        reading = answer.reading
        name = None
        if plan.mode != "off" and plan.cap_config is not None:
            name = plan.cap_config.name or None
        return _clean(
            {
                "turn": reading.to_dict(),
                "history": [t.to_dict() for t in answer.history],
                "alerts": [a.to_dict() for a in reading.alerts],
                "alert": bool(reading.alerts),
                "cap": {
                    "mode": plan.mode,
                    "capped": reading.capped,
                    "engagement": reading.cap_engagement,
                    "engaged_next": answer.cap_engaged_next,
                    "config": name,
                },
                "monitor_layer": self.axis.layer,
            }
        )

    def compass_info(self) -> dict[str, Any]:
        """``GET /v1/compass``: the monitor layer's calibration bands and the settings."""
        cal = self.axis.calibration
        layer = self.axis.layer
        bands: dict[str, float | None] = {}
        for p in BAND_PERCENTILES:
            value = None
            if cal is not None:
                try:
                    value = float(cal.threshold(layer, p))
                except (ValueError, PersonaCompassError):
                    value = None
            bands[f"p{p}"] = value
        cap = self.capping_config
        return _clean(
            {
                "model": self.model_name,
                "monitor_layer": layer,
                "n_layers": self.axis.n_layers,
                "calibrated": cal is not None,
                "bands": bands,
                "cap_mode": self.config.cap_mode,
                "capping": (cap.name or None) if cap is not None else None,
                "capping_layers": list(cap.layers) if cap is not None else None,
                "rules": self.rules.to_dict(),
                "max_tokens_limit": self.config.max_tokens_limit,
                "default_max_tokens": self.default_max_tokens,
            }
        )


# ---------------------------------------------------------------------------------------------
# the guard: API key, body size, request counting (pure ASGI, so streaming is untouched)
# ---------------------------------------------------------------------------------------------
class GuardMiddleware:
    """Checks ``Authorization`` and ``Content-Length`` and counts answers by status."""

    def __init__(
        self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, metrics: Metrics
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _check(self, scope: Scope) -> RequestError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not _is_open(scope.get("path", "")):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return RequestError(
                    "missing API key: send the header 'Authorization: Bearer <key>'",
                    status=401,
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return RequestError(
                    "incorrect API key",
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
                await _error_response(error)(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.inc(
                endpoint=_endpoint_label(scope.get("path", "")), status=str(status[0])
            )


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------
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
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


async def _next_event(
    events: asyncio.Queue[tuple[str, Any]], request: Request, job: Job
) -> tuple[str, Any] | None:
    """The worker's next event, or None when the client went away (the job is then dropped)."""
    getter = asyncio.ensure_future(events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                job.abandon()
                return None
    except asyncio.CancelledError:
        job.abandon()
        raise
    finally:
        if not getter.done():
            getter.cancel()


def _chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _finish(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def _usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def _build_app(
    config: ServerConfig, factory: Callable[[], CompassState], *, eager: bool
) -> FastAPI:
    holder: dict[str, CompassState | None] = {"state": factory() if eager else None}

    def current() -> CompassState | None:
        return holder["state"]

    def _depth() -> float:
        state = current()
        return float(state.worker.depth) if state is not None else 0.0

    def _busy() -> float:
        state = current()
        return 1.0 if state is not None and state.worker.busy else 0.0

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
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

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
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return _json(
            error_body(str(exc.detail), type=kind, code=code),
            exc.status_code,
            dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        return _json(
            error_body(str(first.get("msg", "invalid request")), param=".".join(loc) or None),
            422,
        )

    # -- small endpoints --------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        state = current()
        return _json(
            {
                "status": "ok" if state is not None else "loading",
                "model": state.model_name if state is not None else config.model_name,
                "queue_depth": state.worker.depth if state is not None else 0,
                "busy": bool(state is not None and state.worker.busy),
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
        return _json({"object": "list", "data": [model_card(ready())]})

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
        return _json(model_card(state))

    @app.get("/v1/compass")
    async def compass() -> JSONResponse:
        return _json(ready().compass_info())

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

        def on_delta(delta: Delta) -> None:
            emit("delta", delta)

        def work(cancel: threading.Event) -> Answer:
            try:
                answer = state.generate(
                    plan,
                    cancel,
                    on_start=lambda n: emit("start", n),
                    on_delta=on_delta if req.stream else None,
                )
            except BaseException as exc:
                metrics.completions.inc(finish_reason="error")
                emit("error", exc)
                raise
            record_answer(answer)
            emit("done", answer)
            return answer

        try:
            job = state.worker.submit(work)
        except QueueFull as exc:
            metrics.rejected.inc()
            raise RequestError(
                f"{exc}; the server generates one answer at a time",
                status=429,
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except WorkerStopped as exc:
            raise _classify(exc) from None

        metrics.in_progress.inc()
        released = [False]

        def release() -> None:  # once, from whichever of handler / stream / background ends
            if not released[0]:
                released[0] = True
                metrics.in_progress.dec()
            job.abandon()  # a no-op once the job has finished

        streaming = False
        try:
            first = await _next_event(events, request, job)
            if first is None:
                return Response(status_code=499)  # the client is gone; nobody reads this
            if first[0] == "error":
                return _error_response(_classify(first[1]))
            cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if req.stream:
                streaming = True
                return StreamingResponse(
                    stream(state, plan, req, events, cid, created, arrived, release),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    background=BackgroundTask(release),
                )
            event = await _next_event(events, request, job)
            while event is not None and event[0] not in ("done", "error"):
                event = await _next_event(events, request, job)
            if event is None:
                return Response(status_code=499)
            if event[0] == "error":
                return _error_response(_classify(event[1]))
            answer: Answer = event[1]
            metrics.latency.observe(time.perf_counter() - arrived)
            return _json(
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
                            "finish_reason": _finish(answer),
                        }
                    ],
                    "usage": _usage(answer),
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

    async def stream(
        state: CompassState,
        plan: Plan,
        req: ChatRequest,
        events: asyncio.Queue[tuple[str, Any]],
        cid: str,
        created: int,
        arrived: float,
        release: Callable[[], None],
    ) -> AsyncIterator[str]:
        name = state.model_name
        first_token = True
        held = ""  # trailing whitespace, sent only if more text follows (like .strip())
        try:
            yield _sse(_chunk(cid, created, name, {"role": "assistant", "content": ""}, None))
            while True:
                kind, payload = await events.get()
                if kind == "delta":
                    text = payload.text.lstrip() if first_token else payload.text
                    body = text.rstrip()
                    if not body:
                        held += text
                        continue
                    out, held = held + body, text[len(body) :]
                    if first_token:
                        first_token = False
                        metrics.ttft.observe(time.perf_counter() - arrived)
                    chunk = _chunk(cid, created, name, {"content": out}, None)
                    chunk["persona_compass"] = {
                        "n_tokens": payload.n_tokens,
                        "projection": payload.projection,
                        "percentile": payload.percentile,
                    }
                    yield _sse(chunk)
                elif kind == "done":
                    answer: Answer = payload
                    metrics.latency.observe(time.perf_counter() - arrived)
                    chunk = _chunk(cid, created, name, {}, _finish(answer))
                    chunk["persona_compass"] = state.telemetry(answer, plan)
                    yield _sse(chunk)
                    if req.include_usage:
                        last = _chunk(cid, created, name, {}, None)
                        last["choices"] = []
                        last["usage"] = _usage(answer)
                        yield _sse(last)
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "error":
                    yield _sse(_classify(payload).body())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            release()  # stops the generation if the client went away mid-stream

    from .web import router

    app.include_router(router)
    return app


def create_app(
    model: Any,
    tokenizer: Any,
    axis: Axis,
    capping_config: CappingConfig | None,
    config: ServerConfig,
) -> FastAPI:
    """The server around an already loaded model, tokenizer, axis and capping config.

    The worker thread starts with the app's lifespan (or with the first request).
    """
    state = CompassState(model, tokenizer, axis, capping_config, config)
    return _build_app(config, lambda: state, eager=True)


def create_app_from_specs(
    axis_spec: str,
    model_spec: str | None,
    config: ServerConfig,
    *,
    dtype: str | None = None,
) -> FastAPI:
    """The server for an axis bundle (folder or shipped alias) and a model spec.

    The bundle, its capping config (``capping.json``, if any) and the model (default: the
    bundle's model) load in the app's lifespan, before the server accepts connections.
    ``config.model_name`` left empty becomes the model spec.
    """

    def load() -> CompassState:
        from ..bundles import resolve_bundle
        from ..cli.common import load_axis_and_model

        axis, model, tokenizer, spec = load_axis_and_model(axis_spec, model_spec, dtype)
        bundle = resolve_bundle(axis_spec)
        cap = CappingConfig.load(bundle) if (bundle / CAPPING_FILE).is_file() else None
        cfg = config if config.model_name else replace(config, model_name=spec)
        return CompassState(model, tokenizer, axis, cap, cfg)

    return _build_app(config, load, eager=False)


class BackgroundServer:
    """Run an ASGI app with uvicorn on a loopback port in a daemon thread (tests, notebooks).

    Example:
        >>> with BackgroundServer(app) as server:
        ...     httpx.get(server.url + "/health")
    """

    def __init__(
        self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        import uvicorn

        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5
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
