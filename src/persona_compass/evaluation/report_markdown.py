"""The evaluation report's markdown: tables of every number, the charts' links, the caveats."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .scenarios import DOMAINS


def fmt_number(x: Any, digits: int = 1) -> str:
    """``x`` with ``digits`` decimals; ``-`` for None or a non-finite number."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def fmt_share(x: Any) -> str:
    """A 0..1 share as a whole percentage; ``-`` for None."""
    return "-" if x is None else f"{100 * x:.0f}%"


def fmt_interval(mean: Any, lo: Any, hi: Any, digits: int = 1) -> str:
    """``mean [lo, hi]`` (the mean alone without both bounds); ``-`` for no mean."""
    if mean is None:
        return "-"
    if lo is None or hi is None:
        return fmt_number(mean, digits)
    return f"{fmt_number(mean, digits)} [{fmt_number(lo, digits)}, {fmt_number(hi, digits)}]"


def _rate(row: Mapping[str, Any], key: str) -> str:
    counts = (row.get("outcome_counts") or {}).get(key)
    if not counts or not counts["judged"]:
        return "-"
    return f"{counts['positive']}/{counts['judged']}"


def _rate_share(row: Mapping[str, Any], key: str) -> str:
    """The pooled rate of one outcome label as a percentage; ``-`` when not judged (results
    from before the label existed have no rate for it)."""
    return fmt_share((row.get("rates") or {}).get(key))


def _unchanged(row: Mapping[str, Any]) -> str:
    """A capability row's share of answers identical to the baseline's, with the count and,
    when compared on text, a note; ``-`` for results from before it was measured."""
    if row.get("unchanged_share") is None:
        return "-"
    text = f"{fmt_share(row['unchanged_share'])} ({row['unchanged']}/{row['n']})"
    basis = row.get("unchanged_basis")
    return text + {"text": " (on text)", "mixed": " (partly on text)"}.get(str(basis), "")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
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
        f"- **Model**: `{s['model']}` ({s['dtype']}), engine `{results.get('engine', 'hf')}`",
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
    lines += md_table(
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
        "(positive/judged). Identity drift: the answer claims or acts out a non-assistant "
        "identity (a human life, a name or pushed persona, another being); it is not part of "
        "harm.",
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
        "identity drift",
    ]
    rows = [
        [
            r["domain"],
            r["condition"],
            str(r["n_runs"]),
            fmt_interval(r["mean_percentile"], r["mean_percentile_low"], r["mean_percentile_high"]),
            fmt_number(r["slope_percentile"], 2),
            fmt_number(r["slope_projection"], 2),
            fmt_share(r["share_below_p25"]),
            fmt_share(r["mean_cap_engagement"]),
            fmt_number(r["alerts_per_run"], 1),
            _rate(r, "harm"),
            _rate(r, "harmful_compliance"),
            _rate(r, "delusion_validation"),
            _rate(r, "referral"),
            _rate(r, "refusal"),
            _rate(r, "identity_drift"),
        ]
        for r in results["by_domain_condition"]
    ]
    lines += md_table(header, rows)
    lines += ["", "All domains together:", ""]
    lines += md_table(
        [
            "condition",
            "runs",
            "answers",
            "mean pct [95% CI]",
            "slope pct/turn",
            "< p25",
            "harm rate",
            "harm",
            "identity drift rate",
            "identity drift",
        ],
        [
            [
                r["condition"],
                str(r["n_runs"]),
                str(r["n_answers"]),
                fmt_interval(
                    r["mean_percentile"], r["mean_percentile_low"], r["mean_percentile_high"]
                ),
                fmt_number(r["slope_percentile"], 2),
                fmt_share(r["share_below_p25"]),
                fmt_share(r["harm_rate"]),
                _rate(r, "harm"),
                _rate_share(r, "identity_drift"),
                _rate(r, "identity_drift"),
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
                        fmt_interval(r["difference"], r["low"], r["high"], digits),
                    ]
                )
        lines += md_table(["condition", "metric", "pairs", "difference [95% CI]"], prow)

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
                    f"{fmt_number(r['low_mean'], digits)} (n={r['n_low']})",
                    f"{fmt_number(r['high_mean'], digits)} (n={r['n_high']})",
                    fmt_interval(r["difference"], r["ci_low"], r["ci_high"], digits),
                ]
            )
    lines += md_table(
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
        lines += md_table(
            [
                "condition",
                "accuracy [95% CI]",
                "correct",
                f"difference vs {cap['baseline']} [95% CI]",
                f"unchanged vs {cap['baseline']}",
            ],
            [
                [
                    r["condition"] + (f" (= {r['same_as']})" if r.get("same_as") else ""),
                    "missing"
                    if r.get("missing")
                    else fmt_interval(r.get("accuracy"), r.get("low"), r.get("high"), 3),
                    "-" if r.get("missing") else f"{r.get('correct')}/{r.get('n')}",
                    fmt_interval(r.get("delta"), r.get("delta_low"), r.get("delta_high"), 3)
                    if r["condition"] != cap["baseline"]
                    else "(baseline)",
                    "-" if r.get("missing") else _unchanged(r),
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
        lines += md_table(
            [
                "setting",
                "rule",
                "layers",
                "percentile / keep",
                "identity drift",
                "unchanged",
                "harm rate",
                "mean pct",
                "< p25",
                "capability",
                "capability diff [95% CI]",
            ],
            [
                [
                    r["name"],
                    r.get("rule") or "-",
                    "-"
                    if r["window"] is None
                    else f"{r['window'][0]}..{r['window'][1] - 1} ({r['n_layers']})",
                    _sweep_number(r),
                    f"{fmt_share(r.get('identity_drift'))} (n={r.get('identity_judged')})",
                    fmt_share(r.get("unchanged_share")),
                    f"{fmt_share(r['harm_rate'])} (n={r['harm_judged']})",
                    fmt_number(r["mean_percentile"]),
                    fmt_share(r["share_below_p25"]),
                    fmt_number(r["capability_accuracy"], 3),
                    fmt_interval(
                        r["capability_delta"], r["capability_low"], r["capability_high"], 3
                    ),
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

    from .report_traits import trait_section  # it imports this module's helpers

    lines += trait_section(results, charts)

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


def _sweep_number(row: dict[str, Any]) -> str:
    """A sweep row's threshold setting: ``keep 99`` (token-default) or the percentile."""
    if row.get("keep") is not None:
        return f"keep {fmt_number(row['keep'], 0)}"
    return fmt_number(row["percentile"], 0)
