"""The chat's renderables: drift meter, answer summary, alert lines, chart table, live view.

Plain functions (and one rich renderable, :class:`LiveAnswer`) so they can be used and
tested apart from the chat loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import groupby
from typing import Any

from rich.console import Console, ConsoleOptions, JustifyMethod, RenderResult
from rich.table import Table
from rich.text import Text

from ..alerts import Alert
from ..compass import Delta, Steering
from ..monitor import TraitReading, TurnReading

#: Meter colours, as (position 0..1, RGB) stops: drifted (red) -> amber -> Assistant (green).
COLOUR_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (215, 48, 39)),
    (0.5, (240, 180, 30)),
    (1.0, (40, 170, 80)),
)
METER_WIDTH = 24
FILLED, EMPTY, MARK = "█", "░", "┃"


def percentile_colour(percentile: float | None) -> str:
    """The meter colour of a percentile, ``#rrggbb``: red at 0, amber at 50, green at 100."""
    if percentile is None or not math.isfinite(percentile):
        return "#808080"
    x = min(max(percentile / 100.0, 0.0), 1.0)
    for (x0, c0), (x1, c1) in zip(COLOUR_STOPS, COLOUR_STOPS[1:], strict=False):
        if x <= x1:
            t = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
            r, g, b = (round(a + (z - a) * t) for a, z in zip(c0, c1, strict=True))
            return f"#{r:02x}{g:02x}{b:02x}"
    r, g, b = COLOUR_STOPS[-1][1]
    return f"#{r:02x}{g:02x}{b:02x}"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def drift_meter(
    percentile: float | None,
    *,
    threshold: float | None = 25.0,
    width: int = METER_WIDTH,
    label: bool = True,
    rising: bool = False,
) -> Text:
    """A horizontal bar for a percentile 0..100, coloured red (drifted) to green.

    The ``threshold`` percentile (the alert line, p25 by default) is marked with ``┃``;
    with ``label`` the bar is followed by ``p<percentile>``. An unknown percentile (no
    calibration, or no token measured yet) draws an empty bar and ``p--``. ``rising``: a
    trait needle, whose drift is upward, so high percentiles are the red ones.
    """
    width = max(4, int(width))
    known = percentile is not None and math.isfinite(percentile)
    pct = min(max(float(percentile), 0.0), 100.0) if percentile is not None and known else 0.0
    colour = percentile_colour(100.0 - pct if rising else pct) if known else "#808080"
    filled = round(pct / 100.0 * width) if known else 0
    mark = -1
    if threshold is not None and math.isfinite(threshold):
        mark = min(width - 1, max(0, int(threshold / 100.0 * width)))
    cells = [
        (MARK, "bold") if i == mark else (FILLED, colour) if i < filled else (EMPTY, "dim")
        for i in range(width)
    ]
    text = Text()
    text.append("▕", style="dim")
    for style, run in groupby(cells, key=lambda cell: cell[1]):
        text.append("".join(char for char, _ in run), style=style)
    text.append("▏", style="dim")
    if label:
        text.append(f" p{pct:.0f}" if known else " p--", style=f"bold {colour}")
    return text


def trait_meters(
    traits: Mapping[str, TraitReading],
    *,
    threshold: float | None = 25.0,
    width: int = METER_WIDTH,
    indent: str = "",
) -> list[Text]:
    """One meter line per trait needle; the alert line is the mirrored ``threshold``
    (p25 for the axis is p75 for a trait)."""
    mark = None if threshold is None else 100.0 - threshold
    pad = max((len(name) for name in traits), default=0)
    lines = []
    for name, reading in traits.items():
        line = Text(indent)
        line.append(f"{name:>{pad}} ", style="bold")
        line.append_text(drift_meter(reading.percentile, threshold=mark, width=width, rising=True))
        lines.append(line)
    return lines


def turn_number(messages: Sequence[dict[str, str]], index: int) -> int:
    """The 1-based number of the assistant answer at message ``index``."""
    return sum(1 for m in messages[: index + 1] if m["role"] == "assistant")


def _capped_text(reading: TurnReading) -> tuple[str, str]:
    if not reading.capped:
        return "uncapped", "dim"
    eng = reading.cap_engagement
    if eng is None or not math.isfinite(eng):
        return "capped", "cyan"
    return f"capped, {eng:.0%} raised", "cyan"


def summary_text(
    reading: TurnReading,
    *,
    turn: int | None = None,
    threshold: float | None = 25.0,
    finish_reason: str | None = None,
    cap_next: str | None = None,
    steer: Steering | None = None,
    width: int = 16,
) -> Text:
    """The one-line summary of an answer: meter, projection, capping and tokens.

    ``cap_next`` (adaptive mode) says whether the next answer will be capped;
    ``finish_reason`` ``"cancelled"`` or ``"length"`` is noted.
    """
    text = Text("  ")
    if turn is not None:
        text.append(f"turn {turn} ", style="bold")
    text.append_text(drift_meter(reading.percentile, threshold=threshold, width=width))
    proj = f"{reading.projection:+.2f}" if math.isfinite(reading.projection) else "n/a"
    text.append(f" · projection {proj}")
    if reading.percentile is None and reading.n_tokens:
        text.append(" (uncalibrated: no percentile)", style="dim")
    label, style = _capped_text(reading)
    text.append(" · ")
    text.append(label, style=style)
    if steer is not None:
        text.append(f" · steered {steer.coefficient:+g}", style="magenta")
    text.append(f" · {reading.n_tokens} tokens", style="dim")
    if finish_reason == "cancelled":
        text.append(" · cancelled", style="yellow")
    elif finish_reason == "length":
        text.append(" · hit the token limit", style="dim")
    if cap_next is not None:
        text.append(f" · cap next: {cap_next}", style="cyan" if cap_next == "on" else "dim")
    return text


def alert_lines(alerts: Sequence[Alert]) -> list[Text]:
    """One highlighted line per alert."""
    return [Text(f"  ⚠ alert ({a.kind}): {a.message}", style="bold red") for a in alerts]


def chart_table(
    readings: Sequence[TurnReading],
    messages: Sequence[dict[str, str]],
    *,
    threshold: float | None = 25.0,
    width: int = METER_WIDTH,
) -> Table:
    """The trajectory so far: one row per assistant answer with a percentile bar."""
    mark = f"; {MARK} = p{threshold:g} alert line" if _finite(threshold) else ""
    table = Table(
        title=f"Drift per answer (percentile among role-play answers{mark})",
        title_justify="left",
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("turn", "right"),
        ("msg", "right"),
        ("projection", "right"),
        ("percentile", "left"),
        ("capping", "left"),
        ("alerts", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name in ("percentile", "capping"))
    for r in sorted((r for r in readings if r.role == "assistant"), key=lambda r: r.index):
        proj = f"{r.projection:+.2f}" if math.isfinite(r.projection) else "n/a"
        label, style = _capped_text(r)
        alerts = Text("; ".join(f"{a.kind}: {a.message}" for a in r.alerts), style="bold red")
        table.add_row(
            str(turn_number(messages, r.index)) if r.index < len(messages) else "?",
            str(r.index),
            proj,
            drift_meter(r.percentile, threshold=threshold, width=width),
            Text(label, style=style),
            alerts,
        )
    return table


def trajectory_series(
    readings: Sequence[TurnReading], messages: Sequence[dict[str, str]], label: str
) -> list[Any]:
    """The answers' readings as one :class:`~persona_compass.html_chart.Series` (for charts)."""
    from ..html_chart import Point, Series, snippet

    points = []
    for r in sorted((r for r in readings if r.role == "assistant"), key=lambda r: r.index):
        notes = [f"message {r.index}, {r.n_tokens} tokens", _capped_text(r)[0]]
        notes += [f"alert {a.kind}: {a.message}" for a in r.alerts]
        text = messages[r.index]["content"] if r.index < len(messages) else ""
        points.append(
            Point(
                turn=turn_number(messages, r.index),
                projection=r.projection,
                percentile=r.percentile,
                text=snippet(text),
                alert=bool(r.alerts),
                note="\n".join(notes),
            )
        )
    return [Series(label, points)]


class LiveAnswer:
    """The live view of an answer being written: the tail of its text and the drift meter.

    :meth:`update` takes each streamed :class:`~persona_compass.compass.Delta`; rich renders
    the view whenever the live display refreshes, showing as many of the last lines as fit.
    """

    def __init__(self, threshold: float | None, capped: bool) -> None:
        self.traits: Mapping[str, TraitReading] = {}
        self.text = ""
        self.percentile: float | None = None
        self.projection: float | None = None
        self.n_tokens = 0
        self.threshold = threshold
        self.capped = capped

    def update(self, delta: Delta) -> None:
        self.text += delta.text
        self.n_tokens = delta.n_tokens
        if delta.percentile is not None:
            self.percentile = delta.percentile
        if delta.projection is not None:
            self.projection = delta.projection
        if delta.traits:
            self.traits = delta.traits

    def meter_line(self, width: int = METER_WIDTH) -> Text:
        line = Text()
        line.append("drift ", style="bold")
        line.append_text(drift_meter(self.percentile, threshold=self.threshold, width=width))
        if self.projection is not None:
            line.append(f"  projection {self.projection:+.2f}")
        line.append(f"  {self.n_tokens} tokens", style="dim")
        if self.capped:
            line.append("  capped", style="cyan")
        line.append("  (Ctrl-C stops)", style="dim")
        return line

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        body = Text(self.text.lstrip())
        lines = body.wrap(console, max(options.max_width, 1))
        needles = trait_meters(self.traits, threshold=self.threshold, indent="  ")
        room = max(1, (options.height or console.height) - 3 - len(needles))
        yield Text("assistant", style="bold magenta")
        yield from lines[-room:]
        yield self.meter_line()
        yield from needles
