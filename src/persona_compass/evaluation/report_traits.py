"""The report's "Trait needles" part: a trajectory chart per trait (one line per condition)
and the table of each trait's correlation with the judged outcomes (``results["traits"]``,
:mod:`.trait_metrics`). A run without needles has neither."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .conditions import condition_slug
from .report_markdown import fmt_interval, fmt_number
from .report_markdown import md_table as table


def trait_chart_file(name: str) -> str:
    """The chart's file name in ``charts/`` for the trait ``name``."""
    return f"trait-{condition_slug(name)}.png"


def write_trait_charts(
    plt: Any, results: Mapping[str, Any], folder: Path, colour: Mapping[str, str]
) -> dict[str, str]:
    """One PNG per trait: its mean per-turn percentile (projection when uncalibrated), one
    line per condition. Returns {title: path relative to the evaluation folder}."""
    from matplotlib.ticker import MaxNLocator

    from .report_charts import CHARTS_DIR
    from .report_charts import _save as save_chart

    traits = results.get("traits")
    if not traits:
        return {}
    charts: dict[str, str] = {}
    for name in traits["names"]:
        lines = [t for t in traits["trajectories"] if t["trait"] == name]
        if not lines:
            continue
        calibrated = lines[0]["scale"] == "percentile"
        key = "mean_percentile" if calibrated else "mean_projection"
        fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
        try:
            for t in lines:
                xs = [p["turn"] for p in t["turns"]]
                ys = [math.nan if p[key] is None else p[key] for p in t["turns"]]
                ax.plot(
                    xs, ys, marker="o", ms=3, label=t["condition"], color=colour.get(t["condition"])
                )
            if calibrated:
                ax.set_ylim(-2, 102)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("assistant turn", fontsize=8)
            ax.set_ylabel(f"mean {name} {'percentile' if calibrated else 'projection'}", fontsize=8)
            ax.set_title(f"Trait needle {name}: mean per-turn reading by condition", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            rel = f"{CHARTS_DIR}/{trait_chart_file(name)}"
            save_chart(fig, folder / trait_chart_file(name))
            charts[f"Trait needle {name}: trajectories by condition"] = rel
        finally:
            plt.close(fig)
    return charts


def trait_section(results: Mapping[str, Any], charts: Mapping[str, str]) -> list[str]:
    """The markdown lines of the "Trait needles" section (none without needles)."""
    traits = results.get("traits")
    if not traits:
        return []
    lines = [
        "",
        "## Trait needles",
        "",
        "Trait axes read beside the Assistant Axis on every answer, each at its own monitor "
        "layer; a high percentile means more of the trait.",
        "",
    ]
    lines += [
        f"- **{b['name']}**: `{b['bundle']}` (monitor layer {b['monitor_layer']}, "
        + ("calibrated" if b.get("calibrated") else "no calibration: projections")
        + ")"
        for b in traits["bundles"]
    ]
    shown = [
        f"[{name}]({charts[title]})"
        for name in traits["names"]
        if (title := f"Trait needle {name}: trajectories by condition") in charts
    ]
    if shown:
        lines += ["", "Mean per-turn trajectories by condition: " + ", ".join(shown) + "."]
    lines += [
        "",
        "Does a trait's reading go with a judged outcome? r: " + traits["method"] + ".",
        "",
    ]
    rows = [
        [
            c["trait"],
            c["outcome"].replace("_", " "),
            "-" if c["r"] is None else fmt_interval(c["r"], c["low"], c["high"], 2),
            f"{c['n']} ({c['n_positive']} with, {c['n_negative']} without)",
            fmt_number(c["mean_with"]),
            fmt_number(c["mean_without"]),
            c["note"] or "",
        ]
        for c in traits["correlations"]
    ]
    lines += table(
        ["trait", "outcome", "r [95% CI]", "answers", "mean with", "mean without", "note"], rows
    )
    return lines
