"""The compass engine: live readings equal the algebra, caps hold, adaptive capping switches."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny import calibrated_axis, cap_at, make_pair

from persona_compass.alerts import AlertRules
from persona_compass.capping import CappingConfig
from persona_compass.chat import render_chat
from persona_compass.compass import (
    AdaptiveCap,
    AdaptivePolicy,
    CompassError,
    CompassSession,
    Steering,
    check_cap_mode,
    generate_answer,
    respond,
)
from persona_compass.generation import SamplingConfig
from persona_compass.interventions import CapEngagement, capping
from persona_compass.monitor import TurnReading, project_conversation, token_projections

USER = [{"role": "user", "content": "Tell me about the sea and the stars tonight."}]
HISTORY = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant, here to help."},
    {"role": "user", "content": "Tell me about the sea."},
]
NEVER = AlertRules(token_run=0, turn_run=0, trend_turns=0)
ALWAYS = AlertRules(token_run=0, turn_percentile=100, turn_run=1, trend_turns=0)
SAMPLING = SamplingConfig(max_new_tokens=12, temperature=0.0, seed=0)


@pytest.fixture(scope="module")
def setup():
    model, tok = make_pair("llama")
    return model, tok, calibrated_axis(model, seed=5, monitor_layer=2)


def test_cap_mode_validation():
    assert check_cap_mode("off", None) == "off"
    with pytest.raises(CompassError, match="not one of off, on, adaptive"):
        check_cap_mode("sometimes", None)
    with pytest.raises(CompassError, match="needs a capping config"):
        check_cap_mode("adaptive", None)
    with pytest.raises(CompassError, match="steering coefficient"):
        Steering(float("nan"))


def test_live_reading_equals_teacher_forced_projection(setup):
    model, tok, axis = setup
    answer = generate_answer(model, tok, axis, USER, sampling=SAMPLING)
    assert answer.token_ids and answer.finish_reason in ("stop", "length")
    n_fed = len(answer.tokens.projections)
    assert n_fed == answer.reading.n_tokens
    assert n_fed == len(answer.token_ids) - (answer.finish_reason == "length")
    prompt = render_chat(tok, USER, add_generation_prompt=True).input_ids
    assert answer.prompt_tokens == len(prompt)
    forced = token_projections(model, axis, prompt + answer.token_ids)
    expected = forced[len(prompt) : len(prompt) + n_fed]
    torch.testing.assert_close(torch.tensor(answer.tokens.projections), expected, atol=1e-4, rtol=0)
    assert answer.reading.projection == pytest.approx(float(expected.mean()), abs=1e-4)
    assert answer.reading.percentile == pytest.approx(
        axis.calibration.percentile_of(answer.reading.projection, 2), abs=1e-4
    )


def test_stream_deltas_add_up_to_the_answer_with_running_values(setup):
    model, tok, axis = setup
    deltas = []
    answer = generate_answer(model, tok, axis, USER, sampling=SAMPLING, on_delta=deltas.append)
    assert "".join(d.text for d in deltas).strip() == answer.text
    assert [d.n_tokens for d in deltas] == sorted(d.n_tokens for d in deltas)
    for delta in deltas[:-1]:  # each running value: the mean over every token fed back so far
        fed = answer.tokens.projections[: delta.n_tokens - 1]
        if fed:
            assert delta.projection == pytest.approx(sum(fed) / len(fed), abs=1e-5)
    last = deltas[-1]
    fed = answer.tokens.projections[: last.n_tokens]
    assert last.projection == pytest.approx(sum(fed) / len(fed), abs=1e-5)


def test_stop_string_cuts_the_answer(setup):
    model, tok, axis = setup
    full = generate_answer(model, tok, axis, USER, sampling=SAMPLING)
    assert len(full.text) > 6
    stop = full.text[4:6]
    cut = generate_answer(model, tok, axis, USER, sampling=SAMPLING, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)


def test_cancel_stops_generation(setup):
    model, tok, axis = setup
    cancel = threading.Event()

    def on_delta(delta):
        if delta.n_tokens >= 2:
            cancel.set()

    sampling = SamplingConfig(max_new_tokens=40, temperature=0.0, seed=0)
    answer = generate_answer(
        model, tok, axis, USER, sampling=sampling, on_delta=on_delta, cancel=cancel
    )
    assert answer.finish_reason == "cancelled"
    assert len(answer.token_ids) <= 6  # a held-back partial character can delay a delta


def test_capped_answer_stays_above_the_floor_and_reports_engagement(setup):
    model, tok, axis = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    high = cap_at(axis, 90)
    answer = generate_answer(model, tok, axis, USER, cap=high, sampling=SAMPLING)
    floor = high.thresholds[1]  # the monitor layer (2) is the window's second layer
    assert min(answer.tokens.projections) >= floor - 1e-3
    assert answer.reading.capped
    assert answer.reading.cap_engagement is not None and answer.reading.cap_engagement > 0.5
    low = CappingConfig.from_axis(axis, "1:3", -1e6)
    relaxed = generate_answer(model, tok, axis, USER, cap=low, sampling=SAMPLING)
    assert relaxed.reading.cap_engagement == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    plain = generate_answer(model, tok, axis, USER, sampling=SAMPLING)
    assert plain.token_ids == relaxed.token_ids  # a cap that never engages changes nothing
    assert plain.reading.cap_engagement is None and not plain.reading.capped


def test_cap_engagement_counts_positions_per_layer(setup):
    model, _, axis = setup
    engagement = CapEngagement()
    ids = torch.randint(3, 200, (1, 10))
    with torch.no_grad(), capping(model, cap_at(axis, 50), engagement=engagement):
        model(input_ids=ids)
    whole = engagement.fraction(0, 10)
    assert whole is not None and 0 < whole < 1
    halves = [engagement.fraction(0, 5), engagement.fraction(5, 10)]
    assert (halves[0] + halves[1]) / 2 == pytest.approx(whole)
    assert engagement.fraction(10, 20) is None
    engagement.reset()
    assert engagement.fraction(0, 10) is None


def test_steering_shifts_readings_by_the_exact_amount(setup):
    model, tok, axis = setup
    plain = generate_answer(model, tok, axis, HISTORY, sampling=SAMPLING, read_history=True)
    steered = generate_answer(
        model,
        tok,
        axis,
        HISTORY,
        sampling=SAMPLING,
        steer=Steering(2.0, (2,)),
        read_history=True,
    )
    shift = 2.0 * float(axis.directions[2].norm())
    for a, b in zip(plain.history, steered.history, strict=True):
        assert b.projection - a.projection == pytest.approx(shift, rel=1e-4)


def test_adaptive_state_machine_engages_on_alert_and_releases_after_recovery():
    def reading(pct, engagement=None, alert=False):
        from persona_compass.alerts import Alert

        alerts = (Alert("turns", 1, "low", pct),) if alert else ()
        return TurnReading(1, "assistant", 0.0, pct, 5, engagement is not None, engagement, alerts)

    cap = AdaptiveCap(
        AdaptivePolicy(release_percentile=50, release_turns=2, release_engagement=0.1)
    )
    assert not cap.update(reading(60.0))
    assert cap.update(reading(5.0, alert=True))
    assert cap.update(reading(70.0, engagement=0.5))  # recovered only because it was pushed
    assert cap.update(reading(70.0, engagement=0.0))  # one calm turn of two
    assert cap.update(reading(20.0, engagement=0.0))  # not recovered: the count restarts
    assert cap.update(reading(70.0, engagement=0.0))
    assert not cap.update(reading(70.0, engagement=0.0))
    assert cap.state() == {"engaged": False, "calm_turns": 0}


def test_session_adaptive_caps_after_an_alert(setup):
    model, tok, axis = setup
    alerts = []
    session = CompassSession(
        model,
        tok,
        axis,
        cap_at(axis, 90),
        mode="adaptive",
        rules=ALWAYS,
        sampling=SAMPLING,
        on_alert=alerts.append,
    )
    first = session.reply("Hello there.")
    assert not first.reading.capped and first.reading.alerts
    assert first.cap_engaged_next and session.cap_engaged
    second = session.reply("Tell me more.")
    assert second.reading.capped and second.reading.cap_engagement is not None
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert [t.index for t in session.turns] == [1, 3]
    assert alerts == session.alerts and len(alerts) == 2
    assert session.readings()[1]["capped"] is True
    session.set_mode("off")
    assert not session.cap_engaged
    with pytest.raises(CompassError, match="empty"):
        session.reply("  ")


def test_session_system_prompt_and_watch_only(setup):
    model, tok, axis = setup
    session = CompassSession(model, tok, axis, None, rules=NEVER, sampling=SAMPLING)
    session.set_system_prompt("You are terse.")
    answer = session.reply("Hi")
    assert session.messages[0] == {"role": "system", "content": "You are terse."}
    assert not answer.reading.capped and answer.reading.alerts == ()
    session.set_system_prompt(None)
    assert session.messages[0]["role"] == "user"
    with pytest.raises(CompassError, match="needs a capping config"):
        session.set_mode("on")


def test_respond_adaptive_reads_the_history_to_decide(setup):
    model, tok, axis = setup
    cap = cap_at(axis, 90)
    drifting = respond(
        model, tok, axis, HISTORY, mode="adaptive", capping_config=cap, rules=ALWAYS,
        sampling=SAMPLING,
    )  # fmt: skip
    assert drifting.reading.capped
    assert [t.role for t in drifting.history] == ["user", "assistant", "user"]
    assert drifting.history[1].alerts
    calm = respond(
        model, tok, axis, HISTORY, mode="adaptive", capping_config=cap, rules=NEVER,
        sampling=SAMPLING,
    )  # fmt: skip
    assert not calm.reading.capped and calm.cap_engaged_next is False
    off = respond(model, tok, axis, HISTORY, sampling=SAMPLING)
    assert off.token_ids == calm.token_ids  # same seed, no cap: the same answer
    assert [t.index for t in off.history] == [0, 1, 2]


def test_system_prompt_changes_keep_readings_on_their_messages(setup):
    model, tok, axis = setup
    session = CompassSession(model, tok, axis, None, rules=ALWAYS, sampling=SAMPLING)
    session.reply("Hi")
    assert session.turns[0].index == 1 and session.alerts[0].turn == 1
    session.set_system_prompt("Be brief.")
    assert session.messages[session.turns[0].index]["role"] == "assistant"
    assert session.turns[0].index == 2 and session.alerts[0].turn == 2
    session.set_system_prompt("Be very brief.")  # replaced, not added: nothing moves
    assert session.turns[0].index == 2
    session.set_system_prompt(None)
    assert session.turns[0].index == 1 and session.turns[0].alerts[0].turn == 1


def test_restore_keeps_stored_readings_and_measures_the_rest(setup):
    model, tok, axis = setup
    first = CompassSession(model, tok, axis, cap_at(axis, 90), mode="adaptive", rules=ALWAYS,
                           sampling=SAMPLING)  # fmt: skip
    first.reply("Hello there.")
    first.reply("Tell me more.")
    saved = first.readings()
    restored = CompassSession(model, tok, axis, cap_at(axis, 90), mode="adaptive", rules=ALWAYS,
                              sampling=SAMPLING)  # fmt: skip
    assert restored.restore(first.messages, saved) == (2, 0)
    assert restored.readings() == saved
    assert restored.cap_engaged == first.cap_engaged
    assert restored.monitor.tracker.history == first.monitor.tracker.history
    fresh = CompassSession(model, tok, axis, None, rules=NEVER, sampling=SAMPLING)
    assert fresh.restore(first.messages, saved[:1]) == (1, 1)
    measured = fresh.turns[1]
    direct = project_conversation(model, tok, axis, first.messages)[1]
    assert measured.index == 3 and measured.projection == pytest.approx(direct.projection)
