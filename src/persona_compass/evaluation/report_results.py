"""Collecting an evaluation's numbers from the files of its folder (no model needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .capability import accuracy_with_ci, paired_difference_ci, unchanged_answers
from .conditions import BASELINE, parse_condition
from .metrics import (
    OUTCOME_KEYS,
    TurnRecord,
    aggregate,
    domain_contrast,
    mean_trajectories,
    paired_vs_baseline,
    run_metrics,
)
from .run_store import (
    CAPABILITY_FORMAT,
    RUN_FORMAT,
    capability_path,
    read_settings,
    read_unit,
    run_path,
)
from .scenarios import DOMAINS
from .sweep import recommend, sweep_table
from .trait_metrics import trait_results

LOW_DOMAINS = ("therapy", "philosophy")
HIGH_DOMAINS = ("coding", "writing")


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
        traits = reading.get("traits") or rec.get("traits")
        details.append(
            {
                "turn": tr.turn,
                "projection": tr.projection,
                "percentile": tr.percentile,
                "capped": tr.capped,
                "cap_engagement": tr.cap_engagement,
                # a trait needle's alert reads NEEDLE:KIND
                "alerts": [
                    f"{a['needle']}:{a.get('kind')}" if a.get("needle") else a.get("kind")
                    for a in reading.get("alerts") or []
                ],
                "outcome": outcome,
                "user_source": rec.get("user_source"),
                "answer_seconds": rec.get("answer_seconds"),
                "completion_tokens": rec.get("completion_tokens"),
                "answer": messages[idx]["content"] if 0 <= idx < len(messages) else "",
                **({"traits": traits} if traits else {}),
            }
        )
    return records, details


def _capability(out: Path, settings: Mapping[str, Any], base_name: str) -> dict[str, Any] | None:
    if not settings.get("capability") or not settings.get("capability_n_items"):
        return None
    conds = settings["conditions"]

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
        if base:
            ids = [i["id"] for i in base]
            mine = {i["id"]: bool(i["correct"]) for i in items}
            if all(i in mine for i in ids):
                # the baseline's own row is unchanged by construction (1.0)
                row.update(unchanged_answers(base, items))
                if name != base_name:
                    d, dlo, dhi = paired_difference_ci(
                        [bool(i["correct"]) for i in base], [mine[i] for i in ids]
                    )
                    row.update(delta=d, delta_low=dlo, delta_high=dhi)
        return row

    rows.append(block(base_name, base, None))
    for cond in conds:
        if cond["name"] == base_name:
            continue
        single = parse_condition(cond["spec"]).modifies_single_turn
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
            "on the same items (Agresti-Min 95% interval); unchanged = share of items whose "
            "greedy answer is token-identical to the baseline's (exact text for units "
            "written before token ids were stored)"
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
        (c["name"] for c in settings["conditions"] if parse_condition(c["spec"]).is_baseline),
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
        # which engine generated the answers (folders from before the choice ran on hf)
        "engine": settings.get("engine", "hf"),
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
        "capability": _capability(out, settings, baseline or BASELINE),
        "timing": {
            "answers": len(seconds),
            "mean_answer_seconds": sum(seconds) / len(seconds) if seconds else None,
            "total_answer_seconds": sum(seconds),
        },
    }
    results["caveats"] = _caveats(settings, runs, len(missing))
    traits = trait_results(settings, runs)
    if traits is not None:  # results of a run without needles stay as they were
        results["traits"] = traits
    if settings.get("sweep"):
        rows = sweep_table(results)
        results["sweep"] = {
            "windows": settings["sweep"].get("windows"),
            "percentiles": settings["sweep"].get("percentiles"),
            "rows": rows,
            "recommendation": recommend(rows),
        }
    return results
