"""The generation queue: one worker thread runs every generation, one at a time.

The model's hooks (capping, steering, the drift monitor) are attached to the model itself, so
two generations at once would see each other's hooks. Every request therefore runs on a single
thread, in arrival order, and waits in a bounded queue; a full queue refuses new work at once
(the server answers 429 with ``Retry-After``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting requests already."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the generation queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class WorkerStopped(Exception):
    """The worker was stopped before the job could run."""


class Job:
    """One unit of work: ``fn(cancel)`` on the worker thread; its result in ``future``."""

    def __init__(self, fn: Callable[[threading.Event], Any]) -> None:
        self.fn = fn
        self.cancel = threading.Event()
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def abandon(self) -> None:
        """The caller is gone: skip the job if it is still waiting, stop it if it runs."""
        self.cancel.set()
        self.future.cancel()


class GenerationWorker:
    """A single daemon thread that runs jobs in order from a bounded queue.

    Args:
        queue_size: how many jobs may wait (not counting the one running); at least 1.
        name: the thread's name.
    """

    def __init__(self, queue_size: int = 16, name: str = "persona-compass-generate") -> None:
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size={queue_size!r} must be a whole number >= 1")
        self.queue_size = queue_size
        self.name = name
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._stopping = False
        self._durations: deque[float] = deque(maxlen=32)

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, drop the waiting ones, cancel the running one, join the thread."""
        with self._lock:
            self._stopping = True
            thread = self._thread
            self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(WorkerStopped("the server is shutting down"))
        current = self._current
        if current is not None:
            current.cancel.set()
        if thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("the generation thread did not stop within %.0f s", timeout)

    # -- submitting ------------------------------------------------------------------------
    def submit(self, fn: Callable[[threading.Event], Any]) -> Job:
        """Queue ``fn(cancel_event)``; raise :class:`QueueFull` when no slot is free."""
        if self._stopping:
            raise WorkerStopped("the server is shutting down")
        self.start()
        job = Job(fn)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.retry_after()) from None
        return job

    # -- state -----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        """Whether a job is running now."""
        return self._current is not None

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the recent mean job time, at least 1."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return int(min(60, max(1, math.ceil(mean))))

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # abandoned while waiting
            self._current = job
            started = time.perf_counter()
            try:
                result = job.fn(job.cancel)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            finally:
                self._durations.append(time.perf_counter() - started)
                self._current = None
