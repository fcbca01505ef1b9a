"""The evaluation report's charts: PNGs (matplotlib, optional) and the interactive HTML page."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..calibration import Calibration
from .conditions import BASELINE
from .scenarios import DOMAINS

CHARTS_DIR = "charts"


def _pyplot() -> Any:
    from ..plots import _pyplot as get

    return get()


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _counts(row: Mapping[str, Any], key: str) -> Mapping[str, int]:
    """A by-condition row's ``{"positive", "judged"}`` for one outcome (zeros when absent)."""
    return (row.get("outcome_counts") or {}).get(key) or {"positive": 0, "judged": 0}


def _rate_chart(
    plt: Any,
    by_cond: Sequence[Mapping[str, Any]],
    key: str,
    colour: Mapping[str, str],
    path: Path,
    *,
    ylabel: str,
    title: str,
) -> None:
    """A bar per condition: the pooled share of judged answers marked ``key``, with its
    Wilson 95% interval (no bar for a condition with nothing judged)."""
    from .capability import accuracy_with_ci

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(by_cond) + 2), 3.4), dpi=100)
    try:
        names, rates, los, his = [], [], [], []
        for r in by_cond:
            c = _counts(r, key)
            names.append(r["condition"])
            if c["judged"]:
                rate, lo, hi = accuracy_with_ci(
                    [True] * c["positive"] + [False] * (c["judged"] - c["positive"])
                )
            else:
                rate, lo, hi = math.nan, math.nan, math.nan
            rates.append(rate)
            los.append(rate - lo)
            his.append(hi - rate)
        ax.bar(names, rates, yerr=[los, his], capsize=4, color=[colour.get(n) for n in names])
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)


def write_charts(results: Mapping[str, Any], out: Path) -> dict[str, str]:
    """Write the PNG charts; returns {title: path relative to out}. Empty without matplotlib."""
    try:
        plt = _pyplot()
    except Exception:
        return {}
    from matplotlib.ticker import MaxNLocator

    from ..html_chart import PALETTE

    conds = [c["name"] for c in results["settings"]["conditions"]]
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(conds)}
    charts: dict[str, str] = {}
    folder = out / CHARTS_DIR
    calibrated = bool(results["settings"].get("calibrated"))
    key = "mean_percentile" if calibrated else "mean_projection"

    trajs = results["trajectories"]
    domains = [d for d in DOMAINS if any(t["domain"] == d for t in trajs)]
    if domains:
        cols = min(4, len(domains))
        rows = math.ceil(len(domains) / cols)
        fig, axes = plt.subplots(
            rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=calibrated
        )
        try:
            for ax, domain in zip(axes.flat, domains, strict=False):
                for t in trajs:
                    if t["domain"] != domain:
                        continue
                    xs = [p["turn"] for p in t["turns"]]
                    ys = [p[key] if p[key] is not None else math.nan for p in t["turns"]]
                    ax.plot(
                        xs,
                        ys,
                        marker="o",
                        ms=3,
                        label=t["condition"],
                        color=colour.get(t["condition"]),
                    )
                if calibrated:
                    ax.axhline(25, ls="--", lw=0.8, color="grey", alpha=0.7)
                    ax.set_ylim(-2, 102)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_title(domain, fontsize=10)
                ax.set_xlabel("assistant turn", fontsize=8)
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[len(domains) :]:
                ax.axis("off")
            axes.flat[0].set_ylabel(
                "mean percentile" if calibrated else "mean projection", fontsize=8
            )
            handles, labels = axes.flat[0].get_legend_handles_labels()
            if handles:
                fig.legend(
                    handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8
                )
            fig.suptitle(
                "Mean per-turn "
                + ("percentile" if calibrated else "projection")
                + " by domain"
                + (" (dashed: p25)" if calibrated else ""),
                fontsize=11,
            )
            fig.tight_layout(rect=(0, 0.06, 1, 0.95))
            _save(fig, folder / "trajectories.png")
            charts["Mean per-turn trajectories by domain"] = f"{CHARTS_DIR}/trajectories.png"
        finally:
            plt.close(fig)

    by_cond = results["by_condition"]
    if by_cond:
        _rate_chart(
            plt,
            by_cond,
            "harm",
            colour,
            folder / "harm_by_condition.png",
            ylabel="harmful answers (share)",
            title="Harm rate by condition (Wilson 95%, answers pooled)",
        )
        charts["Harm rate by condition"] = f"{CHARTS_DIR}/harm_by_condition.png"
    # results from before identity drift was judged have no counts for it: no chart
    if any(_counts(r, "identity_drift")["judged"] for r in by_cond):
        _rate_chart(
            plt,
            by_cond,
            "identity_drift",
            colour,
            folder / "identity_drift_by_condition.png",
            ylabel="identity-drift answers (share)",
            title="Identity drift rate by condition (Wilson 95%, answers pooled)",
        )
        charts["Identity drift rate by condition"] = f"{CHARTS_DIR}/identity_drift_by_condition.png"

    cap = results.get("capability")
    measured = [
        r
        for r in (cap or {}).get("conditions", [])
        if r.get("delta") is not None and not r.get("same_as")
    ]
    if measured:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(measured) + 2), 3.4), dpi=100)
        try:
            xs = list(range(len(measured)))
            ds = [r["delta"] for r in measured]
            err_lo = [r["delta"] - r["delta_low"] for r in measured]
            err_hi = [r["delta_high"] - r["delta"] for r in measured]
            ax.errorbar(xs, ds, yerr=[err_lo, err_hi], fmt="o", capsize=5, color="#1f77b4")
            ax.axhline(0, color="grey", lw=1)
            ax.set_xticks(xs)
            ax.set_xticklabels(
                [r["condition"] for r in measured], rotation=20, ha="right", fontsize=8
            )
            ax.set_ylabel(f"accuracy - {cap['baseline'] if cap else BASELINE}")
            ax.set_title("Capability difference vs baseline (paired 95% CI)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            _save(fig, folder / "capability_delta.png")
            charts["Capability difference vs baseline"] = f"{CHARTS_DIR}/capability_delta.png"
        finally:
            plt.close(fig)
    from .report_traits import write_trait_charts  # it imports this module's helpers

    charts.update(write_trait_charts(plt, results, folder, colour))
    return charts


def render_html(results: Mapping[str, Any]) -> str | None:
    """The interactive trajectory page, or None when the HTML chart cannot be imported."""
    try:
        from ..html_chart import Point, Series, calibration_bands, trajectory_html
    except ImportError:
        return None
    s = results["settings"]
    series = []
    for t in results["trajectories"]:
        points = [
            Point(
                p["turn"],
                p["mean_projection"] if p["mean_projection"] is not None else math.nan,
                p["mean_percentile"],
                note=f"mean over {p['n']} run(s)",
            )
            for p in t["turns"]
        ]
        series.append(Series(f"{t['domain']} / {t['condition']}", points))
    bands = None
    cal_file = Path(s["bundle"]) / "calibration.json"
    if cal_file.is_file():
        try:
            bands = calibration_bands(Calibration.load(cal_file), int(s["monitor_layer"]))
        except Exception:
            bands = None
    desc = (
        f"Model {s['model']}, bundle {Path(s['bundle']).name}, monitor layer {s['monitor_layer']}; "
        f"{results['n_runs']} runs; mean projection per assistant turn per domain and condition "
        "(tooltips: mean percentile, number of runs). Click a legend entry to hide its line."
    )
    return trajectory_html(
        series, bands, "Scenario evaluation: mean trajectories", description=desc
    )
