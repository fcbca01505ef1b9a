"""The quick contrast axis and the demo conversation, on a tiny model and end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from tiny import make_pair

from persona_compass.alerts import AlertRules
from persona_compass.calibration import Calibration
from persona_compass.cli import main
from persona_compass.demo import DRIFT_SCRIPT, demo_bundle_dir, play
from persona_compass.generation import SamplingConfig
from persona_compass.persona_space.quick import build_quick_axis, capping_window
from persona_compass.transcripts import load_transcripts

ROLES = {"pirate": "You are a pirate.", "ghost": "You are a ghost."}
QUESTIONS = ("Who are you?", "Where do you live?")


@pytest.fixture(scope="module")
def quick():
    model, tok = make_pair("llama")
    result = build_quick_axis(
        model,
        tok,
        model_id="tiny",
        model_name="Tiny",
        roles=ROLES,
        questions=QUESTIONS,
        sampling=SamplingConfig(max_new_tokens=6),
        progress=False,
    )
    return model, tok, result


def test_quick_axis_is_default_minus_roles_and_calibrated(quick):
    model, _, result = quick
    axis = result.axis
    assert axis.directions.shape == (4, 64)
    role_mean = torch.stack([axis.vectors["role/pirate"], axis.vectors["role/ghost"]]).mean(0)
    torch.testing.assert_close(axis.directions, axis.vectors["default"] - role_mean)
    # 5 default prompts x 2 questions, 2 roles x 2 questions
    assert result.default_projections.shape == (10, 4)
    assert result.role_projections.shape == (4, 4)
    sep = torch.tensor(axis.metadata["separation"])
    assert axis.layer == int(sep.argmax())
    assert axis.calibration is not None and axis.calibration.n_samples == 4
    cap = result.capping
    lo, hi = capping_window(4)
    assert cap.layers == tuple(range(lo, hi))
    for layer, tau in zip(cap.layers, cap.thresholds, strict=True):
        expected = torch.quantile(result.role_projections[:, layer].double(), 0.25)
        assert tau == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("n,expected", [(30, (16, 23)), (4, (2, 3)), (64, (35, 43)), (1, (0, 1))])
def test_capping_window_is_upper_middle(n, expected):
    assert capping_window(n) == expected


def test_play_capped_and_uncapped(quick):
    model, tok, result = quick
    sampling = SamplingConfig(max_new_tokens=5, temperature=0)
    plain = play(
        model, tok, result.axis, DRIFT_SCRIPT[:3], condition="uncapped", cap=None, sampling=sampling
    )
    capped = play(
        model,
        tok,
        result.axis,
        DRIFT_SCRIPT[:3],
        condition="capped",
        cap=result.capping,
        sampling=sampling,
    )
    assert [t.turn for t in plain.turns] == [1, 2, 3]
    for t in plain.turns + capped.turns:
        assert t.percentile is not None and 0 <= t.percentile <= 100
    # the same prompt, greedy, no cap: the first answer is reproducible
    again = play(
        model, tok, result.axis, DRIFT_SCRIPT[:1], condition="u", cap=None, sampling=sampling
    )
    assert again.turns[0].answer == plain.turns[0].answer
    assert again.turns[0].projection == pytest.approx(plain.turns[0].projection, abs=1e-5)


def test_play_adaptive_caps_only_after_an_alert(quick):
    model, tok, result = quick
    sampling = SamplingConfig(max_new_tokens=5, temperature=0)
    always = AlertRules(token_run=0, turn_percentile=50, turn_run=1, trend_turns=0)
    # A calibration far above every answer: each turn is at the 0th percentile.
    high = Calibration.from_projections(torch.arange(20.0).repeat(4, 1).T + 1e6)
    run = play(
        model,
        tok,
        dataclasses.replace(result.axis, calibration=high),
        DRIFT_SCRIPT[:3],
        condition="adaptive",
        cap=result.capping,
        mode="adaptive",
        rules=always,
        sampling=sampling,
    )
    assert [t.reading.capped for t in run.turns] == [False, True, True]
    assert all(t.reading.alerts for t in run.turns)
    assert [m["role"] for m in run.messages] == ["user", "assistant"] * 3
    assert run.readings()[1]["capped"] is True


def test_demo_command_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONA_COMPASS_DTYPE", "float32")  # bf16 on a tiny model is slow
    model, tok = make_pair("qwen2")
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = ["demo", "--model", str(model_dir), "--out", str(out), "--max-new-tokens", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "demo.html").read_text()
    assert "adaptive" in page and "https://" not in page
    for condition in ("uncapped", "capped", "adaptive"):
        data = json.loads((out / f"{condition}.json").read_text())
        assert len(data["conversation"]) == 2 * len(DRIFT_SCRIPT)
        assert len(data["projections"]) == len(DRIFT_SCRIPT)
        turns = data["persona_compass"]["turns"]
        assert [t["index"] for t in turns] == list(range(1, 2 * len(DRIFT_SCRIPT), 2))
        if condition == "capped":
            assert all(t["capped"] for t in turns)
        if condition == "uncapped":
            assert not any(t["capped"] for t in turns)
    (transcript,) = load_transcripts(out / "capped.json")
    assert transcript.readings is not None and len(transcript.readings) == len(DRIFT_SCRIPT)
    assert demo_bundle_dir(str(model_dir)).exists()  # cached for the next run
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
