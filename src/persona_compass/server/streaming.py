"""Chat completion pieces and the server-sent event (SSE) stream of a streaming answer.

Chunk and usage objects in the OpenAI format, the finish reason, waiting on the worker's
events while watching for a client that went away, and :func:`stream_answer`, which turns
those events into ``data: ...`` lines.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request

from ..compass import Answer
from .metrics import Metrics
from .responses import classify, clean
from .schemas import ChatRequest
from .state import CompassState, Plan
from .worker import Job

DISCONNECT_POLL_S = 0.25


def sse(data: Any) -> str:
    return f"data: {json.dumps(clean(data), separators=(',', ':'))}\n\n"


async def next_event(
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


def completion_chunk(
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


def finish_reason(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


async def stream_answer(
    state: CompassState,
    plan: Plan,
    req: ChatRequest,
    events: asyncio.Queue[tuple[str, Any]],
    cid: str,
    created: int,
    arrived: float,
    release: Callable[[], None],
    metrics: Metrics,
) -> AsyncIterator[str]:
    """The SSE lines of a streaming answer, from the worker's ``delta``/``done``/``error``."""
    name = state.model_name
    first_token = True
    held = ""  # trailing whitespace, sent only if more text follows (like .strip())
    try:
        yield sse(completion_chunk(cid, created, name, {"role": "assistant", "content": ""}, None))
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
                chunk = completion_chunk(cid, created, name, {"content": out}, None)
                chunk["persona_compass"] = {
                    "n_tokens": payload.n_tokens,
                    "projection": payload.projection,
                    "percentile": payload.percentile,
                }
                if payload.traits:  # running readings of the server's trait needles
                    chunk["persona_compass"]["traits"] = {
                        name: t.to_dict() for name, t in payload.traits.items()
                    }
                yield sse(chunk)
            elif kind == "done":
                answer: Answer = payload
                metrics.latency.observe(time.perf_counter() - arrived)
                chunk = completion_chunk(cid, created, name, {}, finish_reason(answer))
                chunk["persona_compass"] = state.telemetry(answer, plan)
                yield sse(chunk)
                if req.include_usage:
                    last = completion_chunk(cid, created, name, {}, None)
                    last["choices"] = []
                    last["usage"] = usage(answer)
                    yield sse(last)
                yield "data: [DONE]\n\n"
                return
            elif kind == "error":
                yield sse(classify(payload).body())
                yield "data: [DONE]\n\n"
                return
    finally:
        release()  # stops the generation if the client went away mid-stream
