"""Server metrics in the Prometheus text exposition format (version 0.0.4), no dependency.

Counters, gauges and histograms with fixed label sets, safe to update from the event loop and
the generation thread alike. :meth:`Metrics.render` writes the text that ``GET /metrics``
serves: ``# HELP`` / ``# TYPE`` comments, then one ``name{labels} value`` line per sample.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

from ..alerts import ALERT_KINDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

LabelKey = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: Sequence[tuple[str, str]] = ()) -> str:
    pairs = [*key, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Family:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelKey:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple((name, str(labels[name])) for name in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Family):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        initial: Iterable[dict[str, str]] = (),
    ) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[LabelKey, float] = {}
        for labels in initial:
            self._values[self._key(labels)] = 0.0
        if not self.label_names:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(key)} {_number(value)}" for key, value in items]


class Gauge(_Family):
    """A value that goes up and down; read from a callback at render time when given one."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self._value = 0.0
        self._read = read

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    def value(self) -> float:
        if self._read is not None:
            return float(self._read())
        with self._lock:
            return self._value

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self.value())}"]


class Histogram(_Family):
    """Cumulative buckets, sum and count (no labels)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
            self._sum += value
            self._count += 1

    def samples(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines = [
            f"{self.name}_bucket{_labels((), [('le', _number(bound))])} {c}"
            for bound, c in zip(self.buckets, counts, strict=True)
        ]
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {count}')
        lines.append(f"{self.name}_sum {_number(total)}")
        lines.append(f"{self.name}_count {count}")
        return lines


class Summary(_Family):
    """A sum and a count (no quantiles): the mean is ``sum / count``."""

    kind = "summary"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._count += 1

    def samples(self) -> list[str]:
        with self._lock:
            total, count = self._sum, self._count
        return [f"{self.name}_sum {_number(total)}", f"{self.name}_count {count}"]


class Metrics:
    """Every metric the server exports.

    Args:
        queue_depth: returns the number of requests waiting for the generation thread.
        busy: returns 1 while the generation thread is working on a request, else 0.
    """

    def __init__(
        self,
        queue_depth: Callable[[], float] = lambda: 0.0,
        busy: Callable[[], float] = lambda: 0.0,
    ) -> None:
        p = "persona_compass_"
        self.requests = Counter(
            p + "http_requests_total",
            "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"),
        )
        self.completion_tokens = Counter(
            p + "completion_tokens_total", "Tokens generated in chat completions."
        )
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens read.")
        self.completions = Counter(
            p + "completions_total",
            "Chat completions finished, by finish reason (stop, length, cancelled, error).",
            ("finish_reason",),
        )
        self.latency = Histogram(
            p + "request_duration_seconds",
            "Chat completion latency from arrival to the last byte of the answer.",
            LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Streaming chat completions: arrival to the first content chunk.",
            TTFT_BUCKETS,
        )
        self.alerts = Counter(
            p + "drift_alerts_total",
            "Drift alerts raised on generated answers, by rule.",
            ("kind",),
            initial=[{"kind": kind} for kind in ALERT_KINDS],
        )
        self.cap_engagement = Summary(
            p + "cap_engagement",
            "Fraction of capped activations the floor raised, per capped answer (sum, count).",
        )
        self.capped_answers = Counter(
            p + "capped_answers_total", "Answers generated with the cap engaged."
        )
        self.rejected = Counter(
            p + "queue_rejections_total", "Requests refused with 429 because the queue was full."
        )
        self.queue_depth = Gauge(
            p + "queue_depth", "Requests waiting for the generation thread.", queue_depth
        )
        self.busy = Gauge(p + "generation_busy", "1 while a generation runs, else 0.", busy)
        self.in_progress = Gauge(
            p + "http_requests_in_progress", "Chat completion requests being handled."
        )
        self.families: list[_Family] = [
            self.requests,
            self.completions,
            self.completion_tokens,
            self.prompt_tokens,
            self.latency,
            self.ttft,
            self.alerts,
            self.cap_engagement,
            self.capped_answers,
            self.rejected,
            self.queue_depth,
            self.busy,
            self.in_progress,
        ]

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines: list[str] = []
        for family in self.families:
            lines.extend(family.header())
            lines.extend(family.samples())
        return "\n".join(lines) + "\n"
