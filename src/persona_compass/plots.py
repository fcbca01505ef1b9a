"""Charts of per-turn projections (PNG through matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import PersonaCompassError


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
    series: Mapping[str, Sequence[float]],
    out: str | Path,
    *,
    bands: Mapping[str, float] | None = None,
    title: str = "Position on the Assistant Axis per assistant turn",
    ylabel: str = "projection",
) -> Path:
    """Write a PNG line chart: one line per labelled series of per-turn values.

    Args:
        series: label -> per-turn values (turn 1, 2, ...).
        out: the PNG path (written atomically).
        bands: optional horizontal reference lines, label -> value (e.g. calibration
            percentiles ``{"p25": ...}`` or a capping threshold).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        for label, values in series.items():
            ax.plot(range(1, len(values) + 1), list(values), marker="o", label=label)
        for label, value in (bands or {}).items():
            ax.axhline(value, linestyle="--", linewidth=1, alpha=0.6, color="grey")
            ax.annotate(
                label,
                (0.995, value),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=8,
                color="grey",
            )
        ax.set_xlabel("assistant turn")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        out = Path(out)
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
