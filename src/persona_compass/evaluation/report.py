"""The evaluation report: tables, charts and every number, from the files of a run folder.

:func:`collect_results` reads ``DIR/settings.json`` and the unit files and computes
everything (no model needed); :func:`write_report` writes

* ``DIR/results.json`` - settings, per-run metrics, aggregates, contrasts, capability,
  sweep, caveats: everything, machine-readable;
* ``DIR/report.md`` - the tables, the charts and the caveats, stating the model, the bundle,
  the settings and every n;
* ``DIR/charts/*.png`` - mean per-turn percentile per domain (one line per condition), harm
  rate by condition, capability difference by condition;
* ``DIR/report.html`` - an interactive chart of the mean trajectories (self-contained).

The report states measurements: means, differences and their intervals. It does not
conclude beyond them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_json, write_text
from ..calibration import Calibration
from .capability import accuracy_with_ci, paired_difference_ci
from .conditions import BASELINE
from .metrics import (
    OUTCOME_KEYS,
    TurnRecord,
    aggregate,
    domain_contrast,
    mean_trajectories,
    paired_vs_baseline,
    run_metrics,
)
from .runner import (
    CAPABILITY_FORMAT,
    RUN_FORMAT,
    capability_path,
    read_settings,
    read_unit,
    run_path,
)
from .scenarios import DOMAINS
from .sweep import recommend, sweep_table

CHARTS_DIR = "charts"
LOW_DOMAINS = ("therapy", "philosophy")
HIGH_DOMAINS = ("coding", "writing")


# --------------------------------------------------------------------------- collecting


def _turn_records(data: Mapping[str, Any]) -> tuple[list[TurnRecord], list[dict[str, Any]]]:
    readings = {r["index"]: r for r in (data.get("persona_compass") or {}).get("turns", [])}
    records, details = [], []
    messages = data["conversation"]
    for rec in data["evaluation"]["turns"]:
        reading = readings.get(rec["message_index"], {})
        outcome = rec.get("outcome")
        tr = TurnRecord(
            turn=rec["turn"],
            projection=reading.get("projection"),
            percentile=reading.get("percentile"),
            capped=bool(reading.get("capped")),
            cap_engagement=reading.get("cap_engagement"),
            n_alerts=len(reading.get("alerts") or []),
            outcome={k: outcome.get(k) for k in OUTCOME_KEYS} if outcome else None,
        )
        records.append(tr)
        idx = rec["message_index"]
        details.append(
            {
                "turn": tr.turn,
                "projection": tr.projection,
                "percentile": tr.percentile,
                "capped": tr.capped,
                "cap_engagement": tr.cap_engagement,
                "alerts": [a.get("kind") for a in reading.get("alerts") or []],
                "outcome": outcome,
                "user_source": rec.get("user_source"),
                "answer_seconds": rec.get("answer_seconds"),
                "completion_tokens": rec.get("completion_tokens"),
                "answer": messages[idx]["content"] if 0 <= idx < len(messages) else "",
            }
        )
    return records, details


def _capability(out: Path, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    if not settings.get("capability") or not settings.get("capability_n_items"):
        return None
    conds = settings["conditions"]
    base_cond = next(
        (c for c in conds if c["mode"] == "off" and not c["steering"]), {"name": BASELINE}
    )
    base_name = base_cond["name"]

    def load(name: str) -> list[dict[str, Any]] | None:
        data = read_unit(capability_path(out, name), CAPABILITY_FORMAT)
        if data is None or data["evaluation"].get("settings_digest") != settings["settings_digest"]:
            return None
        items: list[dict[str, Any]] = data["items"]
        return items

    base = load(base_name)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def block(name: str, items: list[dict[str, Any]] | None, same_as: str | None) -> dict[str, Any]:
        row: dict[str, Any] = {"condition": name, "same_as": same_as, "n": 0}
        if items is None:
            row["missing"] = True
            return row
        flags = [bool(i["correct"]) for i in items]
        acc, lo, hi = accuracy_with_ci(flags)
        row.update(n=len(flags), correct=sum(flags), accuracy=acc, low=lo, high=hi)
        cats: dict[str, list[bool]] = {}
        for i in items:
            cats.setdefault(i["category"], []).append(bool(i["correct"]))
        row["categories"] = {
            k: dict(zip(("accuracy", "low", "high"), accuracy_with_ci(v), strict=True))
            | {"n": len(v)}
            for k, v in cats.items()
        }
        if name != base_name and base is not None:
            ids = [i["id"] for i in base]
            mine = {i["id"]: bool(i["correct"]) for i in items}
            if all(i in mine for i in ids):
                d, dlo, dhi = paired_difference_ci(
                    [bool(i["correct"]) for i in base], [mine[i] for i in ids]
                )
                row.update(delta=d, delta_low=dlo, delta_high=dhi)
        return row

    rows.append(block(base_name, base, None))
    for cond in conds:
        if cond["name"] == base_name:
            continue
        single = cond["mode"] == "on" or bool(cond["steering"])
        if not single:
            row = dict(rows[0])
            row.update(condition=cond["name"], same_as=base_name)
            if base is not None:
                row.update(delta=0.0, delta_low=None, delta_high=None)
            rows.append(row)
            notes.append(
                f"{cond['name']}: adaptive capping starts disengaged and engages only after an "
                f"alert on an earlier answer, so on a single-turn prompt it is {base_name}; its "
                f"row repeats {base_name}'s (not measured separately)"
            )
            continue
        rows.append(block(cond["name"], load(cond["name"]), None))
    return {
        "baseline": base_name,
        "n_items": settings.get("capability_n_items"),
        "max_new_tokens": settings.get("capability_max_new_tokens"),
        "conditions": rows,
        "notes": notes,
        "method": (
            "single-turn, greedy decoding (repetition penalty 1.0), exact-match scoring; "
            "accuracy with a Wilson 95% interval; the difference to the baseline is paired "
            "on the same items (Agresti-Min 95% interval)"
        ),
    }


def _caveats(settings: Mapping[str, Any], runs: Sequence[Any], missing: int) -> list[str]:
    out = [
        "Outcome labels come from the '"
        + str(settings.get("judge"))
        + "' judge; a heuristic judge matches phrases and misses paraphrases. Harm rates "
        "are only as good as the judge.",
        "Answers within one conversation are not independent; intervals over runs (t) treat "
        "each scenario run as one observation, the Wilson intervals on pooled answers in the "
        "harm chart do not and are too narrow.",
        "Each scenario was run once per condition (seeded; n per cell is the number of "
        "scenarios). Small n gives wide intervals; a difference whose interval covers 0 is "
        "not distinguishable from none on these runs.",
        "Percentiles are positions among the bundle's calibration projections (role-play "
        "answers of the extraction run) at the monitor layer; they depend on that bundle.",
    ]
    layer = settings.get("monitor_layer")
    for name, cfg in (settings.get("capping_configs") or {}).items():
        if cfg and layer in cfg.get("layers", []):
            out.append(
                f"Condition {name} caps the monitor layer {layer} itself: its readings there "
                "are floored by construction, so its percentiles cannot fall far below the "
                "cap's percentile. Compare its outcomes, not only its readings."
            )
    if settings.get("user") != "scripted":
        out.append(
            f"The user was simulated ({settings.get('user')}): user messages differ between "
            "conditions once the answers differ, so the pairing is looser than with a script."
        )
    if missing:
        out.append(
            f"{missing} planned run(s) are missing or stale and are left out of every number."
        )
    return out


def collect_results(out_dir: str | Path) -> dict[str, Any]:
    """Every number of the evaluation in ``out_dir`` (see the module docstring)."""
    out = Path(out_dir)
    settings = read_settings(out)
    conds = [c["name"] for c in settings["conditions"]]
    baseline = next(
        (c["name"] for c in settings["conditions"] if c["mode"] == "off" and not c["steering"]),
        None,
    )
    runs: list[dict[str, Any]] = []
    missing: list[dict[str, str]] = []
    seconds: list[float] = []
    for scen in settings["scenarios"]:
        for cond in conds:
            path = run_path(out, scen["id"], cond)
            data = read_unit(path, RUN_FORMAT)
            if (
                data is None
                or data["evaluation"].get("settings_digest") != settings["settings_digest"]
            ):
                missing.append({"scenario": scen["id"], "condition": cond})
                continue
            records, details = _turn_records(data)
            seconds.extend(
                t["answer_seconds"]
                for t in details
                if isinstance(t["answer_seconds"], (int, float))
            )
            runs.append(
                {
                    "scenario": scen["id"],
                    "domain": scen["domain"],
                    "risk": scen["risk"],
                    "condition": cond,
                    "seed": data["evaluation"].get("seed"),
                    "judge": data["evaluation"].get("judge"),
                    "file": str(path.relative_to(out)),
                    "metrics": run_metrics(records),
                    "turns": details,
                }
            )
    order = {name: i for i, name in enumerate(conds)}
    dom_order = {d: i for i, d in enumerate(DOMAINS)}
    by_dc = sorted(
        aggregate(runs, ("domain", "condition")),
        key=lambda r: (dom_order.get(r["domain"], 99), order.get(r["condition"], 99)),
    )
    results: dict[str, Any] = {
        "settings": settings,
        "n_planned": len(settings["scenarios"]) * len(conds),
        "n_runs": len(runs),
        "missing": missing,
        "runs": runs,
        "by_domain_condition": by_dc,
        "by_condition": sorted(
            aggregate(runs, ("condition",)), key=lambda r: order.get(r["condition"], 99)
        ),
        "trajectories": mean_trajectories(runs, ("domain", "condition")),
        "trajectories_by_condition": mean_trajectories(runs, ("condition",)),
        "paired_vs_baseline": {
            metric: paired_vs_baseline(runs, baseline, metric)
            for metric in ("mean_percentile", "slope_percentile", "share_below_p25", "harm_rate")
        }
        if baseline
        else {},
        "domain_contrast": {
            metric: domain_contrast(runs, LOW_DOMAINS, HIGH_DOMAINS, metric)
            for metric in ("mean_percentile", "slope_percentile")
        },
        "capability": _capability(out, settings),
        "timing": {
            "answers": len(seconds),
            "mean_answer_seconds": sum(seconds) / len(seconds) if seconds else None,
            "total_answer_seconds": sum(seconds),
        },
    }
    results["caveats"] = _caveats(settings, runs, len(missing))
    if settings.get("sweep"):
        rows = sweep_table(results)
        results["sweep"] = {
            "windows": settings["sweep"].get("windows"),
            "percentiles": settings["sweep"].get("percentiles"),
            "rows": rows,
            "recommendation": recommend(rows),
        }
    return results


# --------------------------------------------------------------------------- formatting


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ci(mean: Any, lo: Any, hi: Any, digits: int = 1) -> str:
    if mean is None:
        return "-"
    if lo is None or hi is None:
        return _f(mean, digits)
    return f"{_f(mean, digits)} [{_f(lo, digits)}, {_f(hi, digits)}]"


def _rate(row: Mapping[str, Any], key: str) -> str:
    counts = (row.get("outcome_counts") or {}).get(key)
    if not counts or not counts["judged"]:
        return "-"
    return f"{counts['positive']}/{counts['judged']}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _markdown(results: Mapping[str, Any], charts: Mapping[str, str]) -> str:
    s = results["settings"]
    conds = s["conditions"]
    lines = ["# Scenario evaluation", ""]
    lines += [
        "## What was run",
        "",
        f"- **Model**: `{s['model']}` ({s['dtype']})",
        f"- **Bundle**: `{s['bundle']}` (monitor layer {s['monitor_layer']}, "
        + ("calibrated" if s.get("calibrated") else "no calibration")
        + (f", capping config `{s['bundle_capping']}`" if s.get("bundle_capping") else "")
        + ")",
        f"- **Scenarios**: {len(s['scenarios'])} ({s['scenario_source']}): "
        + ", ".join(
            f"{d} {sum(1 for x in s['scenarios'] if x['domain'] == d)}"
            for d in DOMAINS
            if any(x["domain"] == d for x in s["scenarios"])
        ),
        f"- **Turns**: {s['turns'] or 'the whole script'} per conversation; user: `{s['user']}`; "
        f"judge: `{s['judge']}`",
        f"- **Sampling**: {s['max_new_tokens']} new tokens, temperature {s['temperature']}, "
        f"top-p {s['top_p']}, repetition penalty {s['repetition_penalty']}, seed {s['seed']} "
        "(one seed per scenario shared by all conditions, plus the turn number)",
        f"- **Runs**: {results['n_runs']} of {results['n_planned']} planned "
        f"(scenarios x conditions)",
    ]
    timing = results.get("timing") or {}
    if timing.get("mean_answer_seconds") is not None:
        lines.append(
            f"- **Time**: {timing['answers']} answers, {timing['mean_answer_seconds']:.2f} s per "
            "answer on average"
        )
    if s.get("command"):
        lines.append(f"- **Command**: `{s['command']}`")
    lines += ["", "Conditions:", ""]
    lines += _table(
        ["condition", "what it does"], [[f"`{c['name']}`", c["description"]] for c in conds]
    )

    lines += [
        "",
        "## Drift and outcomes by domain and condition",
        "",
        "Per run: mean of the per-turn percentiles (position among the calibration's "
        "role-play projections; low = drifted), least-squares slope of the per-turn "
        "percentile and projection over turns (per turn), share of turns below the 25th "
        "percentile, mean cap engagement over capped turns, alerts. Cells average the runs "
        "(95% t interval for the mean percentile); outcome columns count judged answers "
        "(positive/judged).",
        "",
    ]
    header = [
        "domain",
        "condition",
        "runs",
        "mean pct [95% CI]",
        "slope pct/turn",
        "slope proj/turn",
        "< p25",
        "cap eng.",
        "alerts/run",
        "harm",
        "harmful compl.",
        "delusion valid.",
        "referral",
        "refusal",
    ]
    rows = [
        [
            r["domain"],
            r["condition"],
            str(r["n_runs"]),
            _ci(r["mean_percentile"], r["mean_percentile_low"], r["mean_percentile_high"]),
            _f(r["slope_percentile"], 2),
            _f(r["slope_projection"], 2),
            _pct(r["share_below_p25"]),
            _pct(r["mean_cap_engagement"]),
            _f(r["alerts_per_run"], 1),
            _rate(r, "harm"),
            _rate(r, "harmful_compliance"),
            _rate(r, "delusion_validation"),
            _rate(r, "referral"),
            _rate(r, "refusal"),
        ]
        for r in results["by_domain_condition"]
    ]
    lines += _table(header, rows)
    lines += ["", "All domains together:", ""]
    lines += _table(
        [
            "condition",
            "runs",
            "answers",
            "mean pct [95% CI]",
            "slope pct/turn",
            "< p25",
            "harm rate",
            "harm",
        ],
        [
            [
                r["condition"],
                str(r["n_runs"]),
                str(r["n_answers"]),
                _ci(r["mean_percentile"], r["mean_percentile_low"], r["mean_percentile_high"]),
                _f(r["slope_percentile"], 2),
                _pct(r["share_below_p25"]),
                _pct(r["harm_rate"]),
                _rate(r, "harm"),
            ]
            for r in results["by_condition"]
        ],
    )

    paired = results.get("paired_vs_baseline") or {}
    if any(paired.values()):
        lines += [
            "",
            "## Paired differences against the baseline",
            "",
            "Per scenario, condition minus baseline; mean over scenarios with a 95% t interval.",
            "",
        ]
        prow = []
        for metric, label, digits in (
            ("mean_percentile", "mean percentile", 1),
            ("slope_percentile", "percentile slope", 2),
            ("share_below_p25", "share < p25", 2),
            ("harm_rate", "harm rate", 2),
        ):
            for r in paired.get(metric, []):
                prow.append(
                    [
                        r["condition"],
                        label,
                        str(r["n_pairs"]),
                        _ci(r["difference"], r["low"], r["high"], digits),
                    ]
                )
        lines += _table(["condition", "metric", "pairs", "difference [95% CI]"], prow)

    lines += [
        "",
        "## Do therapy and philosophy fall below coding and writing?",
        "",
        "A measured comparison, per condition: the mean of the per-run mean percentile over "
        "therapy and philosophy runs, over coding and writing runs, and their difference "
        "(therapy+philosophy minus coding+writing, Welch 95% interval). The research saw the "
        "first pair drift lower; these rows are what these runs measured.",
        "",
    ]
    crow = []
    for metric, digits in (("mean_percentile", 1), ("slope_percentile", 2)):
        for r in results["domain_contrast"].get(metric, []):
            crow.append(
                [
                    r["condition"],
                    metric.replace("_", " "),
                    f"{_f(r['low_mean'], digits)} (n={r['n_low']})",
                    f"{_f(r['high_mean'], digits)} (n={r['n_high']})",
                    _ci(r["difference"], r["ci_low"], r["ci_high"], digits),
                ]
            )
    lines += _table(
        ["condition", "metric", "therapy + philosophy", "coding + writing", "difference [95% CI]"],
        crow,
    )

    cap = results.get("capability")
    if cap:
        lines += [
            "",
            "## Capability check",
            "",
            cap["method"] + f"; {cap['n_items']} items, {cap['max_new_tokens']} new tokens.",
            "",
        ]
        lines += _table(
            [
                "condition",
                "accuracy [95% CI]",
                "correct",
                f"difference vs {cap['baseline']} [95% CI]",
            ],
            [
                [
                    r["condition"] + (f" (= {r['same_as']})" if r.get("same_as") else ""),
                    "missing"
                    if r.get("missing")
                    else _ci(r.get("accuracy"), r.get("low"), r.get("high"), 3),
                    "-" if r.get("missing") else f"{r.get('correct')}/{r.get('n')}",
                    _ci(r.get("delta"), r.get("delta_low"), r.get("delta_high"), 3)
                    if r["condition"] != cap["baseline"]
                    else "(baseline)",
                ]
                for r in cap["conditions"]
            ],
        )
        for note in cap["notes"]:
            lines += ["", f"- {note}"]

    sweep = results.get("sweep")
    if sweep:
        rec = sweep["recommendation"]
        lines += ["", "## Capping sweep", ""]
        lines += _table(
            [
                "setting",
                "layers",
                "percentile",
                "harm rate",
                "mean pct",
                "< p25",
                "capability",
                "capability diff [95% CI]",
            ],
            [
                [
                    r["name"],
                    "-"
                    if r["window"] is None
                    else f"{r['window'][0]}..{r['window'][1] - 1} ({r['n_layers']})",
                    _f(r["percentile"], 0),
                    f"{_pct(r['harm_rate'])} (n={r['harm_judged']})",
                    _f(r["mean_percentile"]),
                    _pct(r["share_below_p25"]),
                    _f(r["capability_accuracy"], 3),
                    _ci(r["capability_delta"], r["capability_low"], r["capability_high"], 3),
                ]
                for r in sweep["rows"]
            ],
        )
        lines += [
            "",
            f"**Rule.** {rec['rule']}",
            "",
            f"**Recommended**: `{rec['choice']}`" if rec["choice"] else "**Recommended**: none",
            "",
            rec["reason"] + ".",
        ]

    if charts:
        lines += ["", "## Charts", ""]
        for title, rel in charts.items():
            lines += [f"![{title}]({rel})", ""]
        lines += ["Interactive chart of the mean trajectories: [report.html](report.html)", ""]

    lines += ["", "## Caveats", ""]
    lines += [f"- {c}" for c in results["caveats"]]
    if results["missing"]:
        lines += [
            "",
            "Missing runs: "
            + ", ".join(f"{m['scenario']} / {m['condition']}" for m in results["missing"]),
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- charts


def _pyplot() -> Any:
    from ..plots import _pyplot as get

    return get()


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _charts(results: Mapping[str, Any], out: Path) -> dict[str, str]:
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
        from .capability import accuracy_with_ci

        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(by_cond) + 2), 3.4), dpi=100)
        try:
            names, rates, los, his = [], [], [], []
            for r in by_cond:
                c = (r.get("outcome_counts") or {}).get("harm", {"positive": 0, "judged": 0})
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
            ax.set_ylabel("harmful answers (share)")
            ax.set_ylim(0, 1)
            ax.set_title("Harm rate by condition (Wilson 95%, answers pooled)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
            fig.tight_layout()
            _save(fig, folder / "harm_by_condition.png")
            charts["Harm rate by condition"] = f"{CHARTS_DIR}/harm_by_condition.png"
        finally:
            plt.close(fig)

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
    return charts


def _html(results: Mapping[str, Any]) -> str | None:
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


def write_report(out_dir: str | Path, results: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write results.json, report.md, report.html and the charts into ``out_dir``.

    Args:
        out_dir: the evaluation folder.
        results: precomputed :func:`collect_results` output (computed when None).

    Returns:
        ``{"results", "report", "html", <chart titles>...}`` -> paths written.
    """
    out = Path(out_dir)
    data = dict(results) if results is not None else collect_results(out)
    charts = _charts(data, out)
    written: dict[str, Path] = {}
    data["charts"] = dict(charts)
    write_json(out / "results.json", _clean(data))
    written["results"] = out / "results.json"
    write_text(out / "report.md", _markdown(data, charts))
    written["report"] = out / "report.md"
    page = _html(data)
    if page is not None:
        write_text(out / "report.html", page)
        written["html"] = out / "report.html"
    for title, rel in charts.items():
        written[title] = out / rel
    return written


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
