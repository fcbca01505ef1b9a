"""Self-contained HTML charts of per-turn positions on the Assistant Axis.

The data model (:class:`Point`, :class:`Series`) is shared with the PNG charts in
:mod:`persona_compass.plots`, so every caller (``monitor --html/--plot``, the evaluation
report, the demo) builds its trajectories once and can write either format.

:func:`trajectory_html` returns one HTML document holding an inline SVG chart, an inline style
sheet and a short inline script: no external file, CDN, font or network reference of any
kind, so the file opens offline and can be mailed or attached as it is. What it draws:

- one line per :class:`Series` (several on one chart for comparison, e.g. ``unsteered`` vs
  ``capped``), x = turn number, y = projection; a non-finite projection leaves a gap;
- reference bands, ``{label: value}`` (typically the calibration percentiles p5/p25/p50 of
  the monitor layer, see :func:`calibration_bands`): a dashed line per value, labelled on
  the right, and shading that deepens toward the drifted (low) end;
- alert markers (a red ring) on points whose ``alert`` flag is set;
- a tooltip per point (turn, projection, percentile, the text snippet, the note); with
  scripts off the browser's own tooltip shows the same text;
- a legend (click an entry to hide or show its series) and, under a ``<details>``, a table
  of every value (readable without the chart).

Every piece of user text (labels, snippets, notes, the title) is HTML-escaped, and the page's
Content-Security-Policy allows only its own script (by hash) and inline styles: even text that
slipped through could neither run code nor load anything.

Example:
    >>> s = Series("capped", [Point(1, 12.0, 80.0, "Hello!"), Point(2, -3.5, 40.0, "Hmm")])
    >>> page = trajectory_html([s], {"p25": -10.0, "p50": 0.0}, "Demo conversation")
    >>> page.startswith("<!DOCTYPE html>")
    True
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

__all__ = [
    "BAND_FILLS",
    "BAND_PERCENTILES",
    "PALETTE",
    "Point",
    "Series",
    "as_series",
    "calibration_bands",
    "snippet",
    "tooltip_text",
    "trajectory_html",
    "write_trajectory_html",
]

#: Line colours, in series order (repeats after ten series).
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
    "#d62728",
)
#: Shading of the band regions, lowest first: (colour, opacity). The region below the lowest
#: band value gets the first entry, the region between the lowest and the next the second...
BAND_FILLS = (("#d62728", 0.10), ("#ff7f0e", 0.08), ("#bcbd22", 0.06), ("#7f7f7f", 0.04))
#: The calibration percentiles drawn as reference bands by default (see calibration_bands).
BAND_PERCENTILES = (5, 25, 50)
ALERT_COLOUR = "#d62728"
DEFAULT_TITLE = "Position on the Assistant Axis per assistant turn"


@dataclass(frozen=True)
class Point:
    """One turn of a trajectory.

    Attributes:
        turn: the x value, usually the 1-based assistant-turn number.
        projection: the y value (NaN or inf: not drawn, the line has a gap).
        percentile: the turn's percentile among the calibration projections, or None.
        text: a snippet of the turn's text for the tooltip (see :func:`snippet`).
        alert: draw an alert marker on this point.
        note: any extra tooltip line(s): the alert messages, a live reading, ...
    """

    turn: int
    projection: float
    percentile: float | None = None
    text: str = ""
    alert: bool = False
    note: str = ""


@dataclass(frozen=True)
class Series:
    """A labelled trajectory: the legend label and its points (in turn order)."""

    label: str
    points: Sequence[Point] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", tuple(self.points))

    @classmethod
    def from_values(cls, label: str, values: Iterable[float]) -> Series:
        """A series of bare projections for turns 1, 2, ... (no percentiles or text)."""
        return cls(label, tuple(Point(i, float(v)) for i, v in enumerate(values, 1)))


def as_series(series: Mapping[str, Sequence[float]] | Sequence[Series]) -> list[Series]:
    """Accept either ``{label: [values]}`` (the older chart API) or a sequence of Series."""
    if isinstance(series, Mapping):
        return [Series.from_values(str(k), v) for k, v in series.items()]
    out = list(series)
    for s in out:
        if not isinstance(s, Series):
            raise TypeError(f"expected Series objects or a {{label: values}} mapping, got {s!r}")
    return out


def snippet(text: str, limit: int = 160) -> str:
    """``text`` with runs of whitespace collapsed, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: max(limit - 1, 0)].rstrip() + "…"


def calibration_bands(
    calibration: Any,
    layer: int,
    percentiles: Sequence[float] = BAND_PERCENTILES,
    *,
    suffix: str = "",
) -> dict[str, float] | None:
    """``{"p5": value, "p25": ..., "p50": ...}`` from a calibration at ``layer``, or None.

    Args:
        calibration: a :class:`~persona_compass.calibration.Calibration` (or None: returns
            None, so ``calibration_bands(axis.calibration, axis.layer)`` just works).
        layer: the layer whose table to read (the monitor layer).
        percentiles: which percentiles to draw.
        suffix: appended to each label, e.g. ``" role-play"``.
    """
    if calibration is None:
        return None
    return {f"p{p:g}{suffix}": float(calibration.threshold(layer, p)) for p in percentiles}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def _num(v: float) -> str:
    """A coordinate for SVG (short, locale-free)."""
    return f"{v:.1f}"


def tooltip_text(series: Series, point: Point) -> str:
    """The plain-text tooltip of a point (lines joined by newlines; not escaped)."""
    lines = [f"{series.label} — turn {point.turn}"]
    proj = _fmt(point.projection) if _finite(point.projection) else "n/a"
    pct = "" if point.percentile is None else f" (percentile {point.percentile:.0f})"
    lines.append(f"projection {proj}{pct}")
    if point.note:
        lines.append(point.note)
    if point.text:
        lines.append(f"“{point.text}”")
    return "\n".join(lines)


_SCRIPT = """(function () {
  var tip = document.getElementById('pc-tip');
  var box = document.getElementById('pc-chart');
  document.querySelectorAll('#pc-chart .pt').forEach(function (g) {
    var t = g.querySelector('title');
    if (!t) { return; }
    g.setAttribute('data-tip', t.textContent);
    t.parentNode.removeChild(t);
    function show(ev) {
      tip.textContent = g.getAttribute('data-tip');
      tip.style.display = 'block';
      var r = box.getBoundingClientRect();
      var x = (ev.clientX === undefined ? r.left + 40 : ev.clientX) - r.left + 14;
      var y = (ev.clientY === undefined ? r.top + 40 : ev.clientY) - r.top + 14;
      if (x + tip.offsetWidth > r.width) { x = Math.max(0, x - tip.offsetWidth - 28); }
      tip.style.left = x + 'px';
      tip.style.top = y + 'px';
    }
    g.addEventListener('mousemove', show);
    g.addEventListener('focus', show);
    g.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
    g.addEventListener('blur', function () { tip.style.display = 'none'; });
  });
  document.querySelectorAll('.pc-legend button').forEach(function (b) {
    b.addEventListener('click', function () {
      var g = document.getElementById(b.getAttribute('data-target'));
      var hidden = g.style.display === 'none';
      g.style.display = hidden ? '' : 'none';
      b.setAttribute('aria-pressed', hidden ? 'true' : 'false');
    });
  });
})();
"""

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem;
       color: #222; background: #fff; }
h1 { font-size: 1.2rem; margin: 0 0 .3rem 0; }
p.pc-desc { margin: 0 0 .6rem 0; color: #555; font-size: .9rem; }
#pc-chart { position: relative; max-width: 960px; }
#pc-chart svg { width: 100%; height: auto; display: block; }
#pc-tip { position: absolute; display: none; max-width: 360px; padding: .45rem .6rem;
          background: #fffffe; border: 1px solid #999; border-radius: 4px;
          box-shadow: 0 2px 6px rgba(0,0,0,.18); font-size: .8rem; white-space: pre-line;
          pointer-events: none; z-index: 2; }
.pc-legend { display: flex; flex-wrap: wrap; gap: .4rem .9rem; margin: .3rem 0 .5rem 0;
             font-size: .85rem; }
.pc-legend button { border: 0; background: none; cursor: pointer; font: inherit;
                    padding: 0; color: inherit; }
.pc-legend button[aria-pressed="false"] { opacity: .4; text-decoration: line-through; }
.pc-swatch { display: inline-block; width: 1.4em; height: .25em; vertical-align: middle;
             margin-right: .35em; }
.pt { cursor: pointer; outline: none; }
.pt:hover circle.dot, .pt:focus circle.dot { r: 6.5; }
table.pc-data { border-collapse: collapse; font-size: .8rem; margin-top: .5rem; }
table.pc-data th, table.pc-data td { border-bottom: 1px solid #ddd; padding: .2rem .5rem;
                                     text-align: left; vertical-align: top; }
table.pc-data td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _svg(
    series: Sequence[Series],
    bands: Mapping[str, float],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> str:
    width, height = 880, 440
    left, right, top, bottom = 64, 150, 16, 48
    pw, ph = width - left - right, height - top - bottom

    turns = [p.turn for s in series for p in s.points]
    ys = [p.projection for s in series for p in s.points if _finite(p.projection)]
    ys += [v for v in bands.values() if _finite(v)]
    x0, x1 = (min(turns), max(turns)) if turns else (1, 1)
    y0, y1 = (min(ys), max(ys)) if ys else (-1.0, 1.0)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 1.0, y1 + 1.0
    pad = (y1 - y0) * 0.08
    y0, y1 = y0 - pad, y1 + pad
    xlo, xhi = x0 - 0.5, x1 + 0.5

    def sx(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * pw

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * ph

    out: list[str] = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#bbb"/>',
    ]
    # bands: shading from the bottom of the plot up to each value, then dashed lines
    finite_bands = sorted(
        ((label, v) for label, v in bands.items() if _finite(v)), key=lambda kv: kv[1]
    )
    lower = y0
    for i, (_label, value) in enumerate(finite_bands):
        colour, opacity = BAND_FILLS[min(i, len(BAND_FILLS) - 1)]
        ya, yb = sy(value), sy(lower)
        out.append(
            f'<rect class="band" x="{left}" y="{_num(ya)}" width="{pw}" '
            f'height="{_num(max(yb - ya, 0))}" fill="{colour}" fill-opacity="{opacity}"/>'
        )
        lower = value
    for label, value in finite_bands:
        y = _num(sy(value))
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y}" y2="{y}" stroke="#666" '
            f'stroke-dasharray="5 4" stroke-width="1"/>'
            f'<text x="{left + pw + 6}" y="{y}" dy="0.35em" font-size="11" fill="#444">'
            f"{escape(label)} ({_fmt(value)})</text>"
        )
    # axes, ticks, grid
    for t in _nice_ticks(y0, y1):
        y = _num(sy(t))
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y}" y2="{y}" stroke="#000" '
            f'stroke-opacity="0.07"/><text x="{left - 6}" y="{y}" dy="0.35em" '
            f'text-anchor="end" font-size="11" fill="#444">{t:g}</text>'
        )
    n_turns = x1 - x0 + 1
    step = max(1, math.ceil(n_turns / 20))
    for t in range(x0, x1 + 1, step):
        x = _num(sx(t))
        out.append(
            f'<line x1="{x}" x2="{x}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#666"/>'
            f'<text x="{x}" y="{top + ph + 16}" text-anchor="middle" font-size="11" '
            f'fill="#444">{t}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle" font-size="12" '
        f'fill="#222">{escape(xlabel)}</text>'
        f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle" '
        f'font-size="12" fill="#222">{escape(ylabel)}</text>'
    )
    if not turns:
        out.append(
            f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" '
            f'font-size="13" fill="#666">no turns to show</text>'
        )
    # series
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        out.append(f'<g id="pc-series-{i}" class="series">')
        segments: list[list[str]] = [[]]
        for p in s.points:
            if _finite(p.projection):
                segments[-1].append(f"{_num(sx(p.turn))},{_num(sy(p.projection))}")
            elif segments[-1]:
                segments.append([])
        for seg in segments:
            if len(seg) > 1:
                out.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                    f'points="{" ".join(seg)}"/>'
                )
        for p in s.points:
            if not _finite(p.projection):
                continue
            cx, cy = _num(sx(p.turn)), _num(sy(p.projection))
            ring = (
                f'<circle cx="{cx}" cy="{cy}" r="9" fill="none" stroke="{ALERT_COLOUR}" '
                f'stroke-width="2"/>'
                if p.alert
                else ""
            )
            out.append(
                f'<g class="pt{" alert" if p.alert else ""}" tabindex="0">'
                f"<title>{escape(tooltip_text(s, p))}</title>{ring}"
                f'<circle class="dot" cx="{cx}" cy="{cy}" r="4.5" fill="{colour}" '
                f'stroke="#fff" stroke-width="1"/></g>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def _legend(series: Sequence[Series]) -> str:
    items = []
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        items.append(
            f'<button type="button" data-target="pc-series-{i}" aria-pressed="true">'
            f'<span class="pc-swatch" style="background:{colour}"></span>{escape(s.label)}'
            "</button>"
        )
    if any(p.alert for s in series for p in s.points):
        items.append(
            f'<span><span class="pc-swatch" style="background:none;border:2px solid '
            f'{ALERT_COLOUR};border-radius:50%;width:.6em;height:.6em"></span>alert</span>'
        )
    return '<div class="pc-legend">' + "".join(items) + "</div>"


def _table(series: Sequence[Series]) -> str:
    rows = []
    for s in series:
        for p in s.points:
            proj = _fmt(p.projection) if _finite(p.projection) else "n/a"
            pct = "" if p.percentile is None else f"{p.percentile:.0f}"
            rows.append(
                f"<tr><td>{escape(s.label)}</td><td class='num'>{p.turn}</td>"
                f"<td class='num'>{proj}</td><td class='num'>{pct}</td>"
                f"<td>{'yes' if p.alert else ''}</td><td>{escape(p.note)}</td>"
                f"<td>{escape(p.text)}</td></tr>"
            )
    return (
        "<details><summary>Values</summary><table class='pc-data'><thead><tr>"
        "<th>series</th><th>turn</th><th>projection</th><th>percentile</th><th>alert</th>"
        "<th>note</th><th>text</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></details>"
    )


def trajectory_html(
    series: Sequence[Series] | Mapping[str, Sequence[float]],
    bands: Mapping[str, float] | None = None,
    title: str = DEFAULT_TITLE,
    *,
    description: str | None = None,
    xlabel: str = "assistant turn",
    ylabel: str = "projection on the Assistant Axis",
) -> str:
    """A self-contained HTML page charting per-turn trajectories (see the module docstring).

    Args:
        series: the trajectories (:class:`Series`; a ``{label: [values]}`` mapping also works).
        bands: reference lines ``{label: value}``, e.g. :func:`calibration_bands`; None: none.
        title: the page and chart title.
        description: an optional paragraph under the title (plain text, escaped).
        xlabel: the x axis title.
        ylabel: the y axis title.

    Returns:
        the HTML document as a string (UTF-8 when written, see :func:`write_trajectory_html`).
    """
    items = as_series(series)
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    desc = f'<p class="pc-desc">{escape(description)}</p>' if description else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        desc,
        _legend(items),
        '<div id="pc-chart">',
        _svg(items, dict(bands or {}), xlabel=xlabel, ylabel=ylabel, title=title),
        '<div id="pc-tip" role="tooltip"></div></div>',
        _table(items),
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def write_trajectory_html(
    series: Sequence[Series] | Mapping[str, Sequence[float]],
    out: str | os.PathLike[str],
    bands: Mapping[str, float] | None = None,
    title: str = DEFAULT_TITLE,
    **kwargs: Any,
) -> Path:
    """Write :func:`trajectory_html` to ``out`` atomically (UTF-8); returns the path."""
    from .atomic import write_text

    out = Path(out)
    write_text(out, trajectory_html(series, bands, title, **kwargs))
    return out
