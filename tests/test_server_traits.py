"""Trait needles on the compass and the server: the session, adaptive capping triggered by a
trait alert, the telemetry's ``traits`` object (plain and streamed), GET /v1/compass and
``serve --trait`` validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from tiny import calibrated_axis, make_pair

from persona_compass.alerts import AlertRules
from persona_compass.calibration import Calibration
from persona_compass.capping import CappingConfig
from persona_compass.compass import CompassSession, respond
from persona_compass.errors import PersonaCompassError
from persona_compass.generation import SamplingConfig

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from persona_compass.server.app import ServerConfig, create_app  # noqa: E402

URL = "/v1/chat/completions"
USER = [{"role": "user", "content": "Tell me about the sea and the stars tonight."}]
HISTORY = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant, here to help."},
    {"role": "user", "content": "Tell me about the sea."},
]
# Only a turn rule: fires below the 25th percentile (a trait: above the 75th).
TURN_ONLY = {"token_run": 0, "turn_percentile": 25, "turn_run": 1, "trend_turns": 0}


def floor_calibration(n_layers: int) -> Calibration:
    """A scale on which every real projection sits at the 100th percentile."""
    return Calibration.from_projections(
        torch.full((8, n_layers), -1e6) + torch.arange(8.0)[:, None]
    )


def as_trait(axis, name: str):
    return dataclasses.replace(axis, metadata={"kind": "trait", "trait": name})


@pytest.fixture(scope="module")
def tiny():
    model, tok = make_pair("llama")
    axis = calibrated_axis(model, seed=5, monitor_layer=2)
    n_layers = axis.n_layers
    # The axis never alerts (always the 100th percentile); "malice" always reads 100 (alerts).
    calm = dataclasses.replace(axis, calibration=floor_calibration(n_layers))
    malice = as_trait(
        dataclasses.replace(
            calibrated_axis(model, seed=7, monitor_layer=1), calibration=floor_calibration(n_layers)
        ),
        "malice",
    )
    sycophancy = as_trait(calibrated_axis(model, seed=9, monitor_layer=2), "sycophancy")
    cap = CappingConfig.calibrate(axis, axis.calibration, "1:3", 90)
    return model, tok, axis, calm, [malice, sycophancy], cap


def make_app(tiny, *, traits=True, **settings):
    model, tok, axis, _, needles, cap = tiny
    config = ServerConfig(model_name="tiny", allowed_hosts=("testserver",), **settings)
    return create_app(model, tok, axis, cap, config, traits=needles if traits else ())


def body(messages=USER, **extra):
    return {"model": "tiny", "messages": messages, "max_tokens": 12, "seed": 3, **extra}


def test_a_trait_alert_engages_adaptive_capping(tiny):
    model, tok, _, calm, needles, cap = tiny
    session = CompassSession(
        model,
        tok,
        calm,
        cap,
        mode="adaptive",
        rules=AlertRules.from_dict(TURN_ONLY),
        sampling=SamplingConfig(max_new_tokens=8, seed=1),
        traits=needles,
    )
    answer = session.reply("Hello there")
    reading = answer.reading
    assert reading.percentile == 100.0  # the axis itself is calm
    assert set(reading.traits) == {"malice", "sycophancy"}
    assert reading.traits["malice"].percentile == 100.0
    assert [a.needle for a in reading.alerts if a.kind == "turns"] == ["malice"]
    assert not reading.capped and session.cap_engaged  # the trait alert engaged the cap
    second = session.reply("Go on")
    assert second.reading.capped


def test_restore_replays_trait_alerts_and_measures_missing_traits(tiny):
    model, tok, _, calm, needles, cap = tiny
    rules = AlertRules.from_dict(TURN_ONLY)
    first = CompassSession(model, tok, calm, cap, rules=rules, traits=needles)
    first.reply("Hello there")
    stored = first.readings()
    restored = CompassSession(model, tok, calm, cap, mode="adaptive", rules=rules, traits=needles)
    kept, measured = restored.restore(first.messages, stored)
    assert (kept, measured) == (1, 0)
    assert [a.needle for a in restored.alerts] == [a.needle for a in first.alerts]
    assert restored.cap_engaged  # the replayed trait alert decides the next answer's cap
    again = CompassSession(model, tok, calm, cap, mode="adaptive", rules=rules, traits=needles)
    kept, measured = again.restore(first.messages)
    assert (kept, measured) == (0, 1)
    turn = again.turns[0]
    assert turn.traits["malice"].percentile == 100.0 and again.cap_engaged


def test_telemetry_carries_each_needle_like_respond(tiny):
    model, tok, axis, _, needles, cap = tiny
    with TestClient(make_app(tiny)) as client:
        out = client.post(URL, json=body(HISTORY, persona_compass={"cap": "on"})).json()
        info = client.get("/v1/compass").json()
    answer = respond(
        model,
        tok,
        axis,
        HISTORY,
        mode="on",
        capping_config=cap,
        sampling=SamplingConfig(max_new_tokens=12, seed=3),
        traits=needles,
    )
    pc = out["persona_compass"]
    assert out["choices"][0]["message"]["content"] == answer.text
    want = {name: t.to_dict() for name, t in answer.reading.traits.items()}
    assert pc["traits"] == want and set(want) == {"malice", "sycophancy"}
    assert pc["turn"]["traits"] == pc["traits"]
    assert all("traits" in h for h in pc["history"] if h["role"] == "assistant")
    assert [t["name"] for t in info["traits"]] == ["malice", "sycophancy"]
    syco = info["traits"][1]
    assert syco["layer"] == 2 and syco["calibrated"] is True
    bands = [syco["bands"][k] for k in ("p50", "p75", "p95")]
    assert bands == sorted(bands) and all(b is not None for b in bands)


def test_streamed_deltas_carry_running_trait_readings(tiny):
    with TestClient(make_app(tiny)) as client:
        text = client.post(URL, json=body(stream=True)).text
        plain = client.post(URL, json=body()).json()["persona_compass"]
    chunks = [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
    running = [c["persona_compass"] for c in chunks if "n_tokens" in c.get("persona_compass", {})]
    assert running and all(set(r["traits"]) == {"malice", "sycophancy"} for r in running)
    final = [c["persona_compass"] for c in chunks if "turn" in c.get("persona_compass", {})][-1]
    assert final["traits"] == plain["traits"]
    # the last running mean covers the tokens read so far, so it is a finite projection
    assert all(isinstance(r["traits"]["malice"]["projection"], float) for r in running)


def test_without_needles_the_telemetry_is_unchanged(tiny):
    with TestClient(make_app(tiny, traits=False)) as client:
        pc = client.post(URL, json=body()).json()["persona_compass"]
        info = client.get("/v1/compass").json()
    assert "traits" not in pc and "traits" not in pc["turn"]
    assert info["traits"] == []


def test_needles_must_be_traits_of_the_same_model(tiny):
    model, tok, axis, _, needles, cap = tiny
    config = ServerConfig(model_name="tiny")
    with pytest.raises(PersonaCompassError, match="is not a trait axis"):
        create_app(model, tok, axis, cap, config, traits=[axis])
    with pytest.raises(PersonaCompassError, match="given twice"):
        create_app(model, tok, axis, cap, config, traits=[needles[0], needles[0]])


def test_serve_refuses_wrong_trait_bundles_before_loading():
    from persona_compass.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["serve", "--axis", "smollm2-135m", "--trait", "smollm2-135m"])
    assert out.exit_code == 1 and "is not a trait bundle" in out.output
    out = runner.invoke(main, ["serve", "--axis", "smollm2-135m", "--trait", "no-such-bundle"])
    assert out.exit_code == 1 and "no-such-bundle" in out.output
