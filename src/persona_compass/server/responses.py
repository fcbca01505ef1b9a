"""JSON responses and OpenAI error objects: non-finite floats to null, exceptions to errors."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import ChatTemplateError, PersonaCompassError
from .schemas import RequestError
from .worker import WorkerStopped

logger = logging.getLogger(__name__)


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(clean(data), status_code=status, headers=headers)


def error_response(exc: RequestError) -> JSONResponse:
    return json_response(exc.body(), exc.status, exc.headers or None)


def classify(exc: BaseException) -> RequestError:
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
