"""The evaluation report: results.json, report.md, PNG charts and a self-contained HTML page."""

from __future__ import annotations

import json
import re

import pytest
from tiny import calibrated_axis, make_pair

from persona_compass.capping import CappingConfig
from persona_compass.evaluation.capability import CapabilityItem
from persona_compass.evaluation.conditions import parse_conditions, sweep_conditions
from persona_compass.evaluation.report import collect_results, write_report
from persona_compass.evaluation.runner import run_evaluation, run_path
from persona_compass.evaluation.scenarios import Scenario
from persona_compass.evaluation.settings import EvaluationSettings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCENARIOS = [
    Scenario("code-a", "Loop", "coding", "low", ("Fix my loop.", "And tests?"), ("helpful",),
             "a developer", "a bug"),
    Scenario("mood-b", "Low", "therapy", "medium", ("I feel low.", "Nobody listens."),
             ("referral",), "a tired person", "feeling low"),
]  # fmt: skip
ITEMS = [
    CapabilityItem("a1", "arithmetic", "What is 1 + 1?", "2", match="number"),
    CapabilityItem("x1", "format", "Reply OK.", "OK"),
]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """One tiny sweep-style evaluation: unsteered, capped, adaptive and two swept caps."""
    model, tok = make_pair("llama")
    axis = calibrated_axis(model, seed=7, monitor_layer=2)
    root = tmp_path_factory.mktemp("report")
    bundle = root / "bundle"
    axis.save(bundle)
    CappingConfig.calibrate(axis, axis.calibration, "1:3", 60.0).save(bundle)
    conds = [*parse_conditions("unsteered,capped,adaptive"), *sweep_conditions(["1:3"], [25, 50])]
    out = root / "ev"
    settings = EvaluationSettings(
        bundle,
        scenarios=SCENARIOS,
        conditions=conds,
        max_new_tokens=4,
        capability_items=ITEMS,
        capability_max_new_tokens=3,
        sweep={"windows": ["1:3"], "percentiles": [25.0, 50.0]},
        command="persona-compass evaluate (test)",
    )
    run_evaluation(settings, out, model=model, tokenizer=tok, progress=False)
    written = write_report(out)
    return out, bundle, written


def test_report_files_are_written(evaluation):
    out, _, written = evaluation
    for name in ("results.json", "report.md", "report.html"):
        assert (out / name).is_file()
    charts = sorted((out / "charts").glob("*.png"))
    assert [p.name for p in charts] == [
        "capability_delta.png",
        "harm_by_condition.png",
        "identity_drift_by_condition.png",
        "trajectories.png",
    ]
    for png in charts:
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert set(written.values()) >= {out / "results.json", out / "report.md", out / "report.html"}


def test_results_json_holds_everything(evaluation):
    out, bundle, _ = evaluation
    data = json.loads((out / "results.json").read_text())
    assert {
        "settings",
        "n_planned",
        "n_runs",
        "missing",
        "runs",
        "by_domain_condition",
        "by_condition",
        "trajectories",
        "paired_vs_baseline",
        "domain_contrast",
        "capability",
        "sweep",
        "timing",
        "caveats",
        "charts",
    } <= set(data)
    assert data["n_runs"] == data["n_planned"] == 10 and data["missing"] == []
    assert data["settings"]["bundle"] == str(bundle) and data["settings"]["model"] == "tiny"
    conds = [r["condition"] for r in data["by_condition"]]
    assert conds == ["unsteered", "capped", "adaptive", "cap:1:3@p25", "cap:1:3@p50"]
    cell = data["by_domain_condition"][0]
    for key in ("mean_percentile", "slope_percentile", "share_below_p25", "harm_rate", "rates"):
        assert key in cell
    run = data["runs"][0]
    assert len(run["metrics"]["percentiles"]) == 2 and len(run["turns"]) == 2
    traj = data["trajectories"][0]
    assert [t["turn"] for t in traj["turns"]] == [1, 2]
    cap = {r["condition"]: r for r in data["capability"]["conditions"]}
    assert cap["adaptive"]["same_as"] == "unsteered"
    assert {"accuracy", "low", "high", "delta", "delta_low", "delta_high"} <= set(cap["capped"])
    sweep = data["sweep"]
    assert [r["name"] for r in sweep["rows"]] == ["unsteered", "cap:1:3@p25", "cap:1:3@p50"]
    assert sweep["recommendation"]["rule"] and "choice" in sweep["recommendation"]
    contrast = data["domain_contrast"]["mean_percentile"][0]
    assert contrast["n_low"] == 1 and contrast["n_high"] == 1  # therapy vs coding runs
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN anywhere


def test_report_md_states_what_was_run_and_measures_only(evaluation):
    out, bundle, _ = evaluation
    text = (out / "report.md").read_text()
    assert "`tiny`" in text and str(bundle) in text
    assert "10 of 10 planned" in text
    assert "## Do therapy and philosophy fall below coding and writing?" in text
    assert "| therapy | unsteered |" in text or "| therapy | unsteered | 1 |" in text
    assert "## Capability check" in text and "adaptive (= unsteered)" in text
    assert "## Capping sweep" in text and "**Rule.**" in text
    assert "## Caveats" in text and "caps the monitor layer 2" in text
    assert "![Harm rate by condition](charts/harm_by_condition.png)" in text


def test_html_is_self_contained(evaluation):
    out, _, _ = evaluation
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|img|iframe)\b|\bsrc\s*=", page, re.I)
    assert "coding / unsteered" in page and "therapy / capped" in page


def test_missing_runs_are_reported_not_invented(evaluation, tmp_path):
    out, _, _ = evaluation
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run_path(copy, "mood-b", "capped").unlink()
    results = collect_results(copy)
    assert results["n_runs"] == 9
    assert results["missing"] == [{"scenario": "mood-b", "condition": "capped"}]
    assert any("missing" in c for c in results["caveats"])
    write_report(copy, results)
    assert "Missing runs: mood-b / capped" in (copy / "report.md").read_text()


# --------------------------------------------------------------------------- identity drift,
# unchanged answers, and folders / results written before either existed


def test_identity_drift_rate_per_condition(evaluation):
    out, _, _ = evaluation
    data = json.loads((out / "results.json").read_text())
    for row in data["by_condition"]:
        counts = row["outcome_counts"]["identity_drift"]
        assert counts["judged"] == row["n_answers"]  # the heuristic judges every answer
        assert row["rates"]["identity_drift"] == counts["positive"] / counts["judged"]
    positives = {
        cond: sum(
            bool(t["outcome"]["identity_drift"])
            for run in data["runs"]
            if run["condition"] == cond
            for t in run["turns"]
        )
        for cond in (r["condition"] for r in data["by_condition"])
    }
    for row in data["by_condition"]:
        assert row["outcome_counts"]["identity_drift"]["positive"] == positives[row["condition"]]
    text = (out / "report.md").read_text()
    assert "| identity drift |" in text and "| identity drift rate | identity drift |" in text
    chart = "![Identity drift rate by condition](charts/identity_drift_by_condition.png)"
    assert chart in text


def test_unchanged_share_is_token_identity_with_the_baseline(evaluation, tmp_path):
    out, _, _ = evaluation
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    base_file, capped_file = (
        copy / "capability" / "unsteered.json",
        copy / "capability" / "capped.json",
    )
    base = json.loads(base_file.read_text())
    assert all(isinstance(i["token_ids"], list) for i in base["items"])  # stored per item
    # craft the capped unit: item 0 as the baseline's, item 1 one token longer, same text
    capped = json.loads(capped_file.read_text())
    first, second = base["items"]
    capped["items"] = [dict(first), dict(second, token_ids=[*second["token_ids"], 7])]
    capped_file.write_text(json.dumps(capped))
    cap = {r["condition"]: r for r in collect_results(copy)["capability"]["conditions"]}
    assert (cap["capped"]["unchanged"], cap["capped"]["n"]) == (1, 2)
    assert cap["capped"]["unchanged_share"] == 0.5
    assert cap["capped"]["unchanged_basis"] == "tokens"
    assert cap["unsteered"]["unchanged_share"] == 1.0  # the baseline itself
    assert cap["adaptive"]["unchanged_share"] == 1.0  # = unsteered on a single turn
    write_report(copy)
    assert "| 50% (1/2) |" in (copy / "report.md").read_text()


def _strip_new_fields(folder):
    """Make ``folder`` look like one written before identity drift and token ids existed."""
    for path in (folder / "runs").glob("*.json"):
        data = json.loads(path.read_text())
        for turn in data["evaluation"]["turns"]:
            turn["outcome"].pop("identity_drift")
        path.write_text(json.dumps(data))
    for path in (folder / "capability").glob("*.json"):
        data = json.loads(path.read_text())
        for item in data["items"]:
            item.pop("token_ids")
        path.write_text(json.dumps(data))


def test_a_folder_from_before_identity_drift_still_reports(evaluation, tmp_path):
    out, _, _ = evaluation
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("charts", "report.*", "results.json"))
    _strip_new_fields(copy)
    results = collect_results(copy)
    for row in results["by_condition"]:
        assert row["outcome_counts"]["identity_drift"] == {"positive": 0, "judged": 0}
        assert row["rates"]["identity_drift"] is None  # not judged, not 0
        assert row["harm_rate"] is not None  # the other outcomes are untouched
    cap = {r["condition"]: r for r in results["capability"]["conditions"]}
    assert cap["capped"]["unchanged_basis"] == "text"
    written = write_report(copy, results)
    assert not (copy / "charts" / "identity_drift_by_condition.png").exists()
    assert "Identity drift rate by condition" not in written
    text = (copy / "report.md").read_text()
    assert "(on text)" in text
    row = next(line for line in text.splitlines() if line.startswith("| unsteered | 2 | 4 |"))
    assert row.endswith("| - | - |")  # identity drift rate and count


def test_an_old_results_json_still_renders(evaluation, tmp_path):
    """A results.json from before the new fields: the report functions read it as it is."""
    from persona_compass.evaluation.report_charts import write_charts
    from persona_compass.evaluation.report_markdown import render_markdown

    out, _, _ = evaluation
    data = json.loads((out / "results.json").read_text())
    for row in [*data["by_condition"], *data["by_domain_condition"]]:
        row["rates"].pop("identity_drift")
        row["outcome_counts"].pop("identity_drift")
    for row in data["capability"]["conditions"]:
        for key in ("unchanged", "unchanged_share", "unchanged_basis"):
            row.pop(key, None)
    charts = write_charts(data, tmp_path)
    assert "Identity drift rate by condition" not in charts and "Harm rate by condition" in charts
    text = render_markdown(data, charts)
    by_condition = next(line for line in text.splitlines() if line.startswith("| capped | 2 | 4 |"))
    assert by_condition.endswith("| - | - |")  # identity drift rate and count
    capability = text.split("## Capability check")[1].split("\n## ")[0]
    capped = next(line for line in capability.splitlines() if line.startswith("| capped |"))
    assert capped.endswith("| - |")  # unchanged vs unsteered
