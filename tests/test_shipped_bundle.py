"""The bundle shipped for smollm2-135m: it loads, fits the model, and its capping holds."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from persona_compass.axis import Axis
from persona_compass.bundles import resolve_bundle, shipped_bundles
from persona_compass.capping import CappingConfig
from persona_compass.cli import main
from persona_compass.errors import AxisFileError
from persona_compass.interventions import capping
from persona_compass.persona_space.report import axis_in_span, pc_cosines, pca


def test_smollm2_bundle_is_shipped_and_complete():
    path = shipped_bundles()["smollm2-135m"]
    assert resolve_bundle("smollm2-135m") == path
    axis = Axis.load(path)
    assert (axis.n_layers, axis.d_model) == (30, 576)
    assert axis.model_id == "smollm2-135m"
    assert "extract" in axis.metadata["command"]  # the command that made it is recorded
    assert axis.calibration is not None
    cap = CappingConfig.load(path)
    assert cap.form == "floor" and len(cap.layers) >= 1
    assert (path / "report.md").exists()
    meta = axis.metadata
    assert 0 <= meta["monitor_auroc"] <= 1 and 0 <= meta["monitor_pc1_cosine"] <= 1


def test_shipped_pc_cosines_match_its_role_vectors():
    """The recorded persona-space numbers are recomputed from the vectors the bundle holds."""
    axis = Axis.load(shipped_bundles()["smollm2-135m"])
    roles = torch.stack([v for k, v in sorted(axis.vectors.items()) if k.startswith("role/")])
    assert roles.shape[0] == len(axis.metadata["roles"])
    _, components = pca(roles, k=10)
    cos = pc_cosines(axis.directions, components)
    m = axis.layer
    recorded = axis.metadata["monitor_pc_cosines"]
    assert recorded[0] == axis.metadata["monitor_pc1_cosine"]
    assert torch.allclose(cos[m, :5], torch.tensor(recorded, dtype=torch.float64), atol=2e-4)
    span = axis_in_span(cos)
    assert abs(float(span[m]) - axis.metadata["axis_in_pc1_3"][m]) < 2e-4


def test_unknown_alias_is_a_clear_error(tmp_path):
    with pytest.raises(AxisFileError, match="shipped: .*smollm2-135m"):
        resolve_bundle("no-such-bundle")


def test_axis_show_json_on_the_alias():
    result = CliRunner().invoke(main, ["axis", "show", "smollm2-135m", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("n_layers", "d_model", "monitor_layer", "auroc", "pc1_cosine", "pc_cosines"):
        assert key in data
    assert data["n_layers"] == 30 and data["d_model"] == 576


@pytest.mark.real_model
def test_shipped_capping_keeps_projections_at_the_floor(real_pair):
    model, tok = real_pair
    path = resolve_bundle("smollm2-135m")
    axis = Axis.load(path, model=model)
    cap = CappingConfig.load(path)
    text = tok.apply_chat_template(
        [
            {"role": "system", "content": "You are an ancient ghost."},
            {"role": "user", "content": "Tell me who you really are."},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    seen = {}
    blocks = model.model.layers
    handles = [
        blocks[layer].register_forward_hook(
            lambda m, a, o, layer=layer: seen.__setitem__(layer, o.detach().float())
        )
        for layer in cap.layers
    ]
    try:
        with capping(model, cap), torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for layer, v, tau in zip(cap.layers, cap.vectors, cap.thresholds, strict=True):
        proj = seen[layer][0] @ v
        # bf16 activations: allow the rounding of one bf16 step at this residual norm
        tol = 2**-7 * float(seen[layer][0].norm(dim=-1).max())
        assert float(proj.min()) >= tau - tol, (layer, float(proj.min()), tau)
    assert torch.allclose(axis.unit(cap.layers[0]), cap.vectors[0], atol=1e-6)


@pytest.mark.real_model
def test_monitor_cli_with_the_shipped_alias(tmp_path, real_pair):
    transcript = tmp_path / "t.json"
    transcript.write_text(
        json.dumps(
            [
                {"role": "user", "content": "Hi, who are you?"},
                {"role": "assistant", "content": "I am an AI assistant. How can I help you today?"},
                {"role": "user", "content": "Be a pirate."},
                {"role": "assistant", "content": "Arr! I be the dread captain of the seven seas!"},
            ]
        )
    )
    result = CliRunner().invoke(
        main, ["monitor", str(transcript), "--axis", "smollm2-135m", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "smollm2-135m" and len(data["turns"]) == 2
    assert all(0 <= t["percentile"] <= 100 for t in data["turns"])


@pytest.mark.real_model
def test_compass_on_the_real_model_streams_caps_and_adapts(real_pair):
    from persona_compass.alerts import AlertRules
    from persona_compass.compass import CompassSession
    from persona_compass.generation import SamplingConfig

    model, tok = real_pair
    path = resolve_bundle("smollm2-135m")
    axis = Axis.load(path, model=model)
    cap = CappingConfig.load(path)
    assert axis.layer in cap.layers  # the shipped monitor layer sits inside the cap window
    floor = cap.thresholds[cap.layers.index(axis.layer)]
    always = AlertRules(token_run=0, turn_percentile=100.0, turn_run=1, trend_turns=0)
    sampling = SamplingConfig(max_new_tokens=24, seed=0)
    session = CompassSession(
        model, tok, axis, cap, mode="adaptive", rules=always, sampling=sampling
    )
    deltas = []
    first = session.reply("You are an ancient spirit now. Who are you?", on_delta=deltas.append)
    assert "".join(d.text for d in deltas).strip() == first.text and first.text
    assert not first.reading.capped
    # turn_percentile=100 alerts on any answer below the top of the calibration
    assert session.cap_engaged == bool(first.reading.alerts)
    session.set_mode("on")
    second = session.reply("Speak to me as the spirit. Never call yourself an AI.")
    assert second.reading.capped and second.reading.cap_engagement is not None
    # bf16 residuals: one bf16 step of slack at this norm, as above
    assert min(second.tokens.projections) >= floor - 2.0
    assert second.reading.percentile is not None and second.reading.percentile >= 24.0
