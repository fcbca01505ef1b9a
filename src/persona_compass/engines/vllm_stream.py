"""Requests that arrive one by one, answered in vLLM's continuous batches (the server's path).

vLLM's engine is not thread-safe, so one loop thread owns it. Callers (the server's request
handlers) :meth:`StreamLoop.submit` a :class:`~.base.CompassRequest` with an event callback
and get a :class:`Ticket`. The loop adds each request to vLLM as it comes, steps the engine
while any request runs (a new request joins the running batch at the next step), and after
every step hands each streaming request its new text with the running drift values (the
axis' and each trait needle's), and each finished request its
:class:`~persona_compass.compass.Answer`.

Events, called on the loop thread: ``("start", prompt_tokens)`` once the request is in the
engine, ``("delta", Delta)`` for new text (streaming requests), then ``("done", Answer)`` or
``("error", exception)``. A ticket abandoned by its caller is aborted in vLLM and gets no more
events.

The running values come from the readings the workers already copy to the host every step:
one worker call fetches the new readings of every streaming request at once, at most every
``peek_interval`` seconds (and whenever a request finishes).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..compass import Answer, Delta
from ..monitor import DriftMonitor, TraitReading
from .base import CompassRequest, EngineError
from .vllm_engine import EnginePlan, VLLMEngine

logger = logging.getLogger(__name__)

EventSink = Callable[[str, Any], None]
PEEK_INTERVAL = 0.2  # seconds between two fetches of streaming requests' running readings


class EngineBusy(EngineError):
    """The engine holds as many requests as it may (running and waiting)."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"the engine holds {limit} requests already; retry in {retry_after} s")
        self.retry_after = retry_after


class EngineStopped(EngineError):
    """The loop was stopped (or broke) before the request could finish."""


class Ticket:
    """One submitted request as the loop tracks it."""

    def __init__(self, loop: StreamLoop, request: CompassRequest, sink: EventSink, stream: bool):
        self._loop = loop
        self.request = request
        self.sink = sink
        self.stream = stream
        self.plan: EnginePlan | None = None
        self.rid = ""  # the vLLM request running for it now (the history probe or the answer)
        self.probing: Any = None  # the rendered history while an adaptive probe runs
        self.prompt_len = 0
        self.sent = ""  # text already handed out
        self.fed = 0  # answer tokens whose readings are summed in `total`
        self.total = 0.0
        self.trait_totals = [0.0] * len(loop.engine.traits)  # the same sums, per needle
        self.started = time.perf_counter()
        self.ended = False

    def abandon(self) -> None:
        """The caller is gone: abort the request (a no-op once it has finished)."""
        if not self.ended:
            self._loop._inbox.put(("abort", self))

    def _emit(self, kind: str, payload: Any) -> None:
        try:
            self.sink(kind, payload)
        except Exception:  # a broken listener must not stop the loop for everybody
            logger.exception("persona-compass: an event listener failed")


class StreamLoop:
    """The thread that steps one :class:`VLLMEngine` for every caller.

    Args:
        engine: a started engine with the compass on.
        max_requests: requests the loop holds at once (running in vLLM plus waiting in its
            scheduler); :meth:`submit` raises :class:`EngineBusy` beyond that.
        peek_interval: seconds between two fetches of the streaming requests' new readings
            (a chunk carries the running values fetched last; 0: after every step).
    """

    def __init__(
        self, engine: VLLMEngine, *, max_requests: int, peek_interval: float = PEEK_INTERVAL
    ) -> None:
        if not engine.compass:
            raise EngineError("the stream loop needs an engine started with compass=True")
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
            raise EngineError(f"max_requests={max_requests!r} must be a whole number >= 1")
        if not 0 <= peek_interval <= 10:
            raise EngineError(f"peek_interval={peek_interval!r} must be 0-10 seconds")
        self.engine = engine
        self.max_requests = max_requests
        self.peek_interval = float(peek_interval)
        self._last_peek = -math.inf
        self._core = engine.llm.llm_engine
        self._inbox: queue.Queue[tuple[str, Ticket | None]] = queue.Queue()
        self._running: dict[str, Ticket] = {}  # vLLM request id -> ticket
        self._held = 0  # tickets submitted and not ended (guarded by _lock)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._broken: BaseException | None = None
        self._durations: deque[float] = deque(maxlen=64)
        self.peak_running = 0  # the most requests one step has carried (batching at work)
        self._gauge = DriftMonitor.from_projections(
            engine.axis,
            torch.zeros(0),
            traits=engine.traits,
            trait_projections=torch.zeros(len(engine.traits), 0),
        )

    # -- the callers' side ------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="persona-compass-vllm", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort every request (their callers get an error event) and join the thread."""
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
        self._inbox.put(("stop", None))
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("the vLLM loop did not stop within %.0f s", timeout)

    def submit(self, request: CompassRequest, sink: EventSink, *, stream: bool) -> Ticket:
        """Queue a request; its events go to ``sink`` (on the loop thread)."""
        if self._broken is not None:
            raise EngineStopped(
                f"the vLLM engine failed and serves no more requests: {self._broken}"
            )
        if self._stopping:
            raise EngineStopped("the engine is shutting down")
        with self._lock:
            if self._held >= self.max_requests:
                raise EngineBusy(self.max_requests, self.retry_after())
            self._held += 1
        self.start()
        ticket = Ticket(self, request, sink, stream)
        self._inbox.put(("add", ticket))
        return ticket

    @property
    def held(self) -> int:
        """Requests submitted and not finished."""
        return self._held

    @property
    def running(self) -> int:
        """Requests inside vLLM now (generating or in its scheduler's queue)."""
        return len(self._running)

    def retry_after(self) -> int:
        """Seconds until a request likely finishes: the recent mean time per request divided
        by the requests held, at least 1."""
        if not self._durations:
            return 1
        mean = sum(self._durations) / len(self._durations)
        return int(min(60, max(1, math.ceil(mean / max(1, self._held)))))

    # -- the loop thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self._drain(block=not self._running):
                break
            if not self._running:
                continue
            self.peak_running = max(self.peak_running, len(self._running))
            try:
                outputs = self._core.step()
                self._dispatch(outputs)
            except Exception as exc:  # noqa: BLE001 - every waiting caller is told
                logger.exception("persona-compass: the vLLM engine step failed")
                self._broken = exc
                self._fail_all(EngineStopped(f"the vLLM engine failed: {exc}"))
        self._fail_all(EngineStopped("the engine is shutting down"))

    def _drain(self, *, block: bool) -> bool:
        """Take the callers' commands; False when the loop must stop."""
        while True:
            try:
                kind, ticket = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            assert ticket is not None
            if kind == "add":
                self._add(ticket)
            elif kind == "abort":
                self._abort(ticket)

    def _add(self, ticket: Ticket) -> None:
        try:
            plan = ticket.plan = self.engine.plan(ticket.request)
            ticket.prompt_len = len(plan.rendered.input_ids)
            if ticket.request.mode == "adaptive":
                chat, prompt, params = self.engine.probe_request(plan)
                ticket.probing = chat
            else:
                prompt, params = self.engine.answer_request(plan, stream=ticket.stream)
            self._send(ticket, prompt, params)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone
            self._end(ticket, "error", exc)
            return
        ticket._emit("start", ticket.prompt_len)

    def _send(self, ticket: Ticket, prompt: dict[str, Any], params: Any) -> None:
        rid = self.engine.request_id(params)
        self._core.add_request(rid, prompt, params)
        ticket.rid = rid
        self._running[rid] = ticket

    def _abort(self, ticket: Ticket) -> None:
        if ticket.ended:
            return
        if self._running.pop(ticket.rid, None) is not None:
            self._core.abort_request([ticket.rid])
            self.engine.take([ticket.rid])  # drop what the workers read for it
        ticket.ended = True
        self._release()

    def _dispatch(self, outputs: list[Any]) -> None:
        finished: list[tuple[Ticket, Any]] = []
        streaming: list[tuple[Ticket, Any]] = []
        for out in outputs:
            ticket = self._running.get(out.request_id)
            if ticket is None:
                continue
            if out.finished:
                del self._running[out.request_id]
                finished.append((ticket, out))
            elif ticket.stream and ticket.probing is None:
                streaming.append((ticket, out))
        # One call to the workers fetches new readings and finished requests' readings. It is
        # a round trip through vLLM's engine core between two steps, so streaming values are
        # refreshed at most every `peek_interval` seconds, not after every step (a call per
        # step slowed each step down by half under load); finished requests never wait.
        now = time.perf_counter()
        peek = bool(streaming) and now - self._last_peek >= self.peek_interval
        readings: dict[str, Any] = {}
        new: dict[str, Any] = {}
        if peek or finished:
            offsets = {t.rid: t.prompt_len + t.fed for t, _ in streaming} if peek else {}
            new, readings = self.engine.read(offsets, [t.rid for t, _ in finished])
            if peek:
                self._last_peek = now
        if streaming:
            self._stream(streaming, new)
        for ticket, out in finished:
            self._finished(ticket, out, readings.get(ticket.rid))

    def _stream(self, items: list[tuple[Ticket, Any]], new: dict[str, Any]) -> None:
        """New text of each streaming request, with the running means of its answer's
        readings fetched so far (``new``: per request, the axis' and each needle's readings
        fetched now, if any)."""
        gauge = self._gauge
        for ticket, out in items:
            completion = out.outputs[0]
            values, needles = new.get(ticket.rid, ([], [[] for _ in ticket.trait_totals]))
            # the last sampled token has no reading yet: it is read when it is fed back
            n_new = min(len(values), max(0, len(completion.token_ids) - 1 - ticket.fed))
            ticket.fed += n_new
            ticket.total += float(sum(values[:n_new]))
            for i, needle in enumerate(needles):
                ticket.trait_totals[i] += float(sum(needle[:n_new]))
            text = completion.text
            if len(text) <= len(ticket.sent):
                continue
            delta, ticket.sent = text[len(ticket.sent) :], text
            projection = ticket.total / ticket.fed if ticket.fed else None
            pct = gauge.percentile(projection) if projection is not None else None
            traits: dict[str, TraitReading] = {}
            if ticket.fed:
                for name, total in zip(gauge.trait_names, ticket.trait_totals, strict=True):
                    traits[name] = gauge.trait_reading(name, total / ticket.fed)
            n_tokens = len(completion.token_ids)
            ticket._emit("delta", Delta(delta, n_tokens, projection, pct, traits))

    def _finished(self, ticket: Ticket, out: Any, reading: Any) -> None:
        assert ticket.plan is not None
        try:
            if ticket.probing is not None:  # the history is read: decide the cap, then answer
                ticket.plan = self.engine.decide(ticket.plan, ticket.probing, reading)
                ticket.probing = None
                prompt, params = self.engine.answer_request(ticket.plan, stream=ticket.stream)
                self._send(ticket, prompt, params)
                return
            answer = self.engine.finish(ticket.plan, out, reading)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone
            self._end(ticket, "error", exc)
            return
        if ticket.stream:
            self._last_delta(ticket, out, answer)
        self._durations.append(time.perf_counter() - ticket.started)
        self._end(ticket, "done", answer)

    def _last_delta(self, ticket: Ticket, out: Any, answer: Answer) -> None:
        """Text vLLM held back until the end (a possible stop string), with the turn's values."""
        text = out.outputs[0].text
        if len(text) > len(ticket.sent):
            reading = answer.reading
            proj = None if math.isnan(reading.projection) else reading.projection
            delta = Delta(
                text[len(ticket.sent) :],
                answer.completion_tokens,
                proj,
                reading.percentile,
                dict(reading.traits),
            )
            ticket.sent = text
            ticket._emit("delta", delta)

    def _end(self, ticket: Ticket, kind: str, payload: Any) -> None:
        ticket.ended = True
        self._release()
        ticket._emit(kind, payload)

    def _release(self) -> None:
        with self._lock:
            self._held -= 1

    def _fail_all(self, exc: EngineError) -> None:
        """End every request the loop holds, waiting ones included, with ``exc``."""
        tickets = list(self._running.values())
        self._running.clear()
        while True:
            try:
                kind, ticket = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add" and ticket is not None:
                tickets.append(ticket)
        for ticket in tickets:
            if not ticket.ended:
                if ticket.rid:
                    try:
                        self._core.abort_request([ticket.rid])
                    except Exception:  # noqa: BLE001 - the engine may be gone already
                        pass
                self._end(ticket, "error", exc)
