"""The evaluation report's markdown: tables of every number, the charts' links, the caveats."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .scenarios import DOMAINS


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


def render_markdown(results: Mapping[str, Any], charts: Mapping[str, str]) -> str:
    """report.md from :func:`~.report_results.collect_results` output and the chart paths."""
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
