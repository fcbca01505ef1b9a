"""Alert rules: each rule fires exactly when its condition holds, and only then."""

from __future__ import annotations

import math

import pytest

from persona_compass.alerts import AlertRules, AlertRulesError, AlertTracker, longest_run_below


def test_longest_run_below_counts_consecutive_values_and_nan_breaks():
    assert longest_run_below([1, 1, 9, 1, 1, 1], 5) == 3
    assert longest_run_below([1, math.nan, 1], 5) == 1
    assert longest_run_below([], 5) == 0


def test_token_rule_needs_the_full_run():
    rules = AlertRules(token_percentile=5, token_run=4, turn_run=0, trend_turns=0)
    tracker = AlertTracker(rules)
    assert tracker.observe(1, 50.0, [1, 1, 1, 9, 1, 1, 1]) == []
    alerts = tracker.observe(3, 50.0, [9, 1, 1, 1, 1])
    assert [a.kind for a in alerts] == ["tokens"]
    assert alerts[0].turn == 3 and alerts[0].value == 4


def test_turn_rule_needs_consecutive_low_turns():
    rules = AlertRules(token_run=0, turn_percentile=25, turn_run=2, trend_turns=0)
    tracker = AlertTracker(rules)
    assert tracker.observe(1, 10.0) == []  # one low turn is not enough
    assert tracker.observe(3, 30.0) == []  # the run is broken
    assert tracker.observe(5, 24.9) == []
    alerts = tracker.observe(7, 3.0)
    assert [a.kind for a in alerts] == ["turns"] and alerts[0].value == 3.0


def test_missing_percentile_breaks_turn_runs():
    tracker = AlertTracker(AlertRules(token_run=0, turn_run=2, trend_turns=0))
    tracker.observe(1, 1.0)
    assert tracker.observe(3, None) == []
    assert tracker.observe(5, 1.0) == []


def test_trend_rule_needs_strict_falls_adding_up_to_the_drop():
    rules = AlertRules(token_run=0, turn_run=0, trend_turns=3, trend_drop=30)
    tracker = AlertTracker(rules)
    for turn, pct in enumerate([90.0, 80.0, 70.0]):
        assert tracker.observe(turn, pct) == []
    alerts = tracker.observe(3, 55.0)  # 90 -> 80 -> 70 -> 55: three falls, 35 points
    assert [a.kind for a in alerts] == ["trend"] and alerts[0].value == pytest.approx(35.0)
    flat = AlertTracker(rules)
    for turn, pct in enumerate([90.0, 80.0, 80.0, 50.0]):  # one step does not fall
        assert flat.observe(turn, pct) == []
    shallow = AlertTracker(rules)
    for turn, pct in enumerate([90.0, 85.0, 80.0, 75.0]):  # falls, but only 15 points
        assert shallow.observe(turn, pct) == []


def test_callbacks_receive_every_alert_and_history_is_kept():
    seen = []
    tracker = AlertTracker(AlertRules(turn_run=1, token_run=0, trend_turns=0), [seen.append])
    tracker.observe(1, 1.0)
    tracker.observe(3, 90.0)
    tracker.observe(5, 2.0)
    assert [a.turn for a in seen] == [1, 5]
    assert tracker.alerts == seen
    assert tracker.history == [1.0, 90.0, 2.0]


def test_rules_validation_and_from_dict():
    assert AlertRules.from_dict({"turn_run": 3}).turn_run == 3
    with pytest.raises(AlertRulesError, match="unknown alert rule.*turn_runs"):
        AlertRules.from_dict({"turn_runs": 3})
    with pytest.raises(AlertRulesError, match="token_percentile=120"):
        AlertRules(token_percentile=120)
    with pytest.raises(AlertRulesError, match="turn_run"):
        AlertRules(turn_run=-1)
    with pytest.raises(AlertRulesError, match="must be an object"):
        AlertRules.from_dict([1])  # type: ignore[arg-type]
    assert AlertRules().to_dict()["token_run"] == 16


def test_alert_rules_option_reads_json_text_or_a_file(tmp_path):
    from persona_compass.cli.common import parse_alert_rules

    assert parse_alert_rules(None) is None
    assert parse_alert_rules('{"turn_run": 3}') == AlertRules(turn_run=3)
    path = tmp_path / "rules.json"
    path.write_text('{"trend_turns": 0, "token_percentile": 2}')
    assert parse_alert_rules(str(path)) == AlertRules(trend_turns=0, token_percentile=2)
    with pytest.raises(AlertRulesError, match="not valid JSON"):
        parse_alert_rules("{turn_run: 3}")
    with pytest.raises(AlertRulesError, match="neither a JSON object nor a readable JSON file"):
        parse_alert_rules(str(tmp_path / "missing.json"))
    with pytest.raises(AlertRulesError, match="unknown alert rule"):
        parse_alert_rules('{"turn_runs": 3}')


def test_bad_alert_rules_are_one_line_errors_before_loading_a_model():
    from click.testing import CliRunner

    from persona_compass.cli import main

    for command in (["chat"], ["serve", "--axis", "smollm2-135m"]):
        result = CliRunner().invoke(main, [*command, "--alert-rules", '{"turn_run": -1}'])
        assert result.exit_code == 1, result.output
        assert "turn_run=-1" in result.output and "Traceback" not in result.output
