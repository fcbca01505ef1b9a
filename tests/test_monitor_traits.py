"""Trait needles in DriftMonitor: stacked readings equal the hidden-state algebra, per-needle
percentiles and alerts (that fire when a trait goes high), readings in the transcript layout."""

from __future__ import annotations

import pytest
import torch

from persona_compass.alerts import AlertRules
from persona_compass.axis import Axis, model_fingerprint
from persona_compass.calibration import Calibration
from persona_compass.errors import PersonaCompassError
from persona_compass.monitor import DriftMonitor, TurnReading


def make_axis(model, seed, layer, trait=None, calibration=None) -> Axis:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return Axis(
        directions=torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=g),
        model_id="tiny",
        fingerprint=model_fingerprint(model),
        monitor_layer=layer,
        calibration=calibration,
        metadata={"kind": "trait", "trait": trait} if trait else {},
    )


def hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def projection(states, axis, layer):
    unit = axis.directions[layer] / axis.directions[layer].norm()
    return states[layer + 1].float() @ unit


def test_each_needle_reads_its_own_layer(llama_pair):
    model, _ = llama_pair
    axis = make_axis(model, 1, 2)
    same_layer = make_axis(model, 2, 2, "sycophancy")
    other_layer = make_axis(model, 3, 1, "malice")
    ids = torch.randint(10, 200, (2, 9))
    with DriftMonitor(model, axis, traits=[same_layer, other_layer]) as mon:
        with torch.no_grad():
            model(input_ids=ids)
    states = hidden_states(model, ids)
    assert mon.trait_names == ("sycophancy", "malice")
    assert mon.trait_layers == (2, 1)
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(mon.token_projections(), projection(states, axis, 2), **close)
    torch.testing.assert_close(
        mon.trait_token_projections("sycophancy"), projection(states, same_layer, 2), **close
    )
    torch.testing.assert_close(
        mon.trait_token_projections("malice"), projection(states, other_layer, 1), **close
    )
    with pytest.raises(PersonaCompassError, match="no trait needle named 'greed'"):
        mon.trait_token_projections("greed")


def test_hooks_leave_the_model_bit_identical(qwen_pair):
    model, _ = qwen_pair
    ids = torch.randint(10, 200, (1, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    traits = [make_axis(model, 2, 0, "a"), make_axis(model, 3, 1, "b")]
    with DriftMonitor(model, make_axis(model, 1, 1), traits=traits):
        with torch.no_grad():
            during = model(input_ids=ids).logits
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(not block._forward_hooks for block in model.model.layers)


def test_turn_readings_percentiles_and_high_trait_alerts(qwen_pair):
    model, _ = qwen_pair
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(10, 200, (1, 12))
    trait = make_axis(model, 2, 1, "malice")
    states = hidden_states(model, ids)
    values = projection(states, trait, 1)[0]
    # a calibration whose every reference sits far below these readings: the trait reads high
    low = (
        torch.full((50, n_layers), float(values.min()) - 100.0) + torch.linspace(0, 1, 50)[:, None]
    )
    trait = make_axis(model, 2, 1, "malice", Calibration.from_projections(low))
    rules = AlertRules(turn_percentile=25, turn_run=1, token_run=0, trend_turns=0)
    seen = []
    with DriftMonitor(
        model, make_axis(model, 1, 1), traits=[trait], rules=rules, on_alert=seen.append
    ) as mon:
        with torch.no_grad():
            model(input_ids=ids)
        reading = mon.end_turn(4, 12, index=3)
    got = reading.traits["malice"]
    assert got.projection == pytest.approx(float(values[4:12].mean()), abs=1e-5)
    assert got.percentile == pytest.approx(100.0)
    trait_alerts = [a for a in reading.alerts if a.needle == "malice"]
    assert [a.kind for a in trait_alerts] == ["turns"]
    assert "above the 75th percentile of malice" in trait_alerts[0].message
    assert trait_alerts[0].value == pytest.approx(100.0)
    assert trait_alerts[0] in seen and trait_alerts[0] in mon.alerts
    # the main axis has no calibration, so it raises nothing
    assert all(a.needle == "malice" for a in reading.alerts)


def test_a_low_trait_raises_nothing(qwen_pair):
    model, _ = qwen_pair
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(10, 200, (1, 10))
    values = projection(hidden_states(model, ids), make_axis(model, 2, 1), 1)[0]
    high = (
        torch.full((50, n_layers), float(values.max()) + 100.0) + torch.linspace(0, 1, 50)[:, None]
    )
    trait = make_axis(model, 2, 1, "malice", Calibration.from_projections(high))
    rules = AlertRules(turn_percentile=25, turn_run=1, token_run=3, trend_turns=0)
    with DriftMonitor(model, make_axis(model, 1, 1), traits=[trait], rules=rules) as mon:
        with torch.no_grad():
            model(input_ids=ids)
        reading = mon.end_turn(0, 10, index=1)
    assert reading.traits["malice"].percentile == pytest.approx(0.0)
    assert reading.alerts == ()


def test_reading_round_trips_with_traits(qwen_pair):
    model, _ = qwen_pair
    ids = torch.randint(10, 200, (1, 8))
    with DriftMonitor(model, make_axis(model, 1, 1), traits=[make_axis(model, 2, 0, "a")]) as mon:
        with torch.no_grad():
            model(input_ids=ids)
        reading = mon.end_turn(2, 8, index=1)
    data = reading.to_dict()
    assert set(data["traits"]) == {"a"} and data["traits"]["a"]["percentile"] is None
    assert TurnReading.from_dict(data) == reading
    # a monitor without traits keeps the old layout
    with DriftMonitor(model, make_axis(model, 1, 1)) as plain:
        with torch.no_grad():
            model(input_ids=ids)
        assert "traits" not in plain.end_turn(2, 8, index=1).to_dict()


def test_needles_must_be_distinct_trait_axes(qwen_pair):
    model, _ = qwen_pair
    axis = make_axis(model, 1, 1)
    with pytest.raises(PersonaCompassError, match=r"traits\[0\] is not a trait axis"):
        DriftMonitor(model, axis, traits=[make_axis(model, 2, 1)])
    twins = [make_axis(model, 2, 1, "a"), make_axis(model, 3, 0, "a")]
    with pytest.raises(PersonaCompassError, match="trait needle\\(s\\) a given twice"):
        DriftMonitor(model, axis, traits=twins)


def test_monitor_cli_reads_trait_needles_in_the_same_pass(tmp_path):
    import json
    from dataclasses import replace

    from click.testing import CliRunner
    from tiny import save_tiny_bundle

    from persona_compass.cli import main
    from persona_compass.models import load_model
    from persona_compass.monitor import project_conversation

    model_dir, bundle, axis = save_tiny_bundle(tmp_path, arch="qwen2", seed=3, monitor_layer=2)
    g = torch.Generator().manual_seed(9)
    trait = replace(
        axis,
        directions=torch.randn(axis.directions.shape, generator=g),
        monitor_layer=1,
        metadata={"kind": "trait", "trait": "malice"},
    )
    trait.save(tmp_path / "malice")
    msgs = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "A helpful assistant."},
    ]
    transcript = tmp_path / "t.json"
    transcript.write_text(json.dumps({"conversation": msgs}))
    args = ["monitor", str(transcript), "--axis", str(bundle), "--dtype", "float32"]
    out = CliRunner().invoke(main, [*args, "--trait", str(tmp_path / "malice"), "--json"])
    assert out.exit_code == 0, out.output
    turn = json.loads(out.stdout)["turns"][0]
    model, tok = load_model(str(model_dir), dtype=torch.float32)
    alone = project_conversation(model, tok, Axis.load(tmp_path / "malice"), msgs)[0]
    assert turn["traits"]["malice"]["projection"] == pytest.approx(alone.projection, abs=1e-5)
    expected_pct = float(trait.calibration.percentile_of(alone.projection, 1))
    assert turn["traits"]["malice"]["percentile"] == pytest.approx(expected_pct, abs=1e-3)
    table = CliRunner().invoke(main, [*args, "--trait", str(tmp_path / "malice")])
    assert table.exit_code == 0 and "malice pct" in table.output
    plain = CliRunner().invoke(main, [*args, "--json"])
    assert "traits" not in json.loads(plain.stdout)["turns"][0]


def test_a_ceiling_keeps_a_trait_at_or_below_its_threshold(qwen_pair):
    from persona_compass.capping import CappingConfig
    from persona_compass.interventions import capping

    model, _ = qwen_pair
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(10, 200, (1, 12))
    trait = make_axis(model, 2, 1, "malice")
    free = projection(hidden_states(model, ids), trait, 1)[0]
    # reference projections spread over the free readings, so the p50 ceiling bites
    refs = free.repeat(n_layers, 1).T.contiguous()
    cfg = CappingConfig.calibrate(trait, refs, [1], percentile=50, form="ceiling")
    tau = cfg.thresholds[0]
    assert cfg.form == "ceiling" and float(free.max()) > tau
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with capping(model, cfg), DriftMonitor(model, make_axis(model, 1, 1), traits=[trait]) as mon:
        with torch.no_grad():
            model(input_ids=ids)
    capped = mon.trait_token_projections("malice")[0]
    assert float(capped.max()) <= tau + 1e-4
    # tokens already under the ceiling are untouched
    under = free <= tau
    torch.testing.assert_close(capped[under], free[under], rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
