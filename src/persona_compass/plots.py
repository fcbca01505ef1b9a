"""Charts of per-turn projections (PNG through matplotlib, an optional extra).

The PNG chart takes the same data model as the HTML chart (:class:`~.html_chart.Series` of
:class:`~.html_chart.Point`), or the older ``{label: [values]}`` mapping; see
:mod:`persona_compass.html_chart` for the self-contained HTML version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import PersonaCompassError
from .html_chart import (
    ALERT_COLOUR,
    BAND_FILLS,
    DEFAULT_TITLE,
    PALETTE,
    Point,
    Series,
    as_series,
)

__all__ = ["Point", "Series", "plot_trajectories"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the install
        raise PersonaCompassError(
            "charts need matplotlib: pip install 'persona-compass[plot]'"
        ) from None
    return plt


def plot_trajectories(
    series: Mapping[str, Sequence[float]] | Sequence[Series],
    out: str | Path,
    *,
    bands: Mapping[str, float] | None = None,
    title: str = DEFAULT_TITLE,
    ylabel: str = "projection",
    xlabel: str = "assistant turn",
    shade_bands: bool = True,
) -> Path:
    """Write a PNG line chart: one line per labelled series of per-turn values.

    Args:
        series: a sequence of :class:`Series` (x = each point's ``turn``; points with
            ``alert`` get a red ring; a non-finite projection leaves a gap), or
            ``{label: per-turn values}`` for turns 1, 2, ...
        out: the PNG path (written atomically).
        bands: optional horizontal reference lines, label -> value (e.g. calibration
            percentiles ``{"p5": ..., "p25": ..., "p50": ...}`` from
            :func:`~.html_chart.calibration_bands`, or a capping threshold). Each is a dashed,
            labelled line.
        shade_bands: also shade the regions under the band values, deepest below the lowest
            one (the drifted end), as the HTML chart does.
    """
    plt = _pyplot()
    items = as_series(series)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        any_alert = False
        for i, s in enumerate(items):
            colour = PALETTE[i % len(PALETTE)]
            xs = [p.turn for p in s.points]
            ys = [p.projection if math.isfinite(p.projection) else math.nan for p in s.points]
            ax.plot(xs, ys, marker="o", label=s.label, color=colour)
            alerts = [p for p in s.points if p.alert and math.isfinite(p.projection)]
            if alerts:
                any_alert = True
                ax.scatter(
                    [p.turn for p in alerts],
                    [p.projection for p in alerts],
                    s=140,
                    facecolors="none",
                    edgecolors=ALERT_COLOUR,
                    linewidths=1.8,
                    zorder=3,
                )
        finite = sorted(
            ((label, v) for label, v in (bands or {}).items() if math.isfinite(v)),
            key=lambda kv: kv[1],
        )
        if finite:
            ax.autoscale(enable=False, axis="y")  # shading must not stretch the y range
            lo, hi = ax.get_ylim()
            lo = min(lo, finite[0][1])
            hi = max(hi, finite[-1][1])
            pad = (hi - lo) * 0.05 or 1.0
            lo, hi = lo - pad, hi + pad
            ax.set_ylim(lo, hi)
            lower = lo
            for i, (_label, value) in enumerate(finite):
                if shade_bands:
                    colour, alpha = BAND_FILLS[min(i, len(BAND_FILLS) - 1)]
                    ax.axhspan(lower, value, color=colour, alpha=alpha, linewidth=0, zorder=0)
                lower = value
            for label, value in finite:
                ax.axhline(value, linestyle="--", linewidth=1, alpha=0.6, color="grey")
                ax.annotate(
                    f"{label} ({value:.1f})",
                    (0.995, value),
                    xycoords=("axes fraction", "data"),
                    ha="right",
                    va="bottom",
                    fontsize=8,
                    color="dimgrey",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
                )
        if any_alert:
            ax.scatter([], [], s=140, facecolors="none", edgecolors=ALERT_COLOUR, label="alert")
        turns = [p.turn for s in items for p in s.points]
        if turns and max(turns) - min(turns) <= 30:
            ax.set_xticks(range(min(turns), max(turns) + 1))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if items:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        out = Path(out)
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
