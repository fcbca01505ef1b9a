"""`persona-compass monitor` and `axis` commands, end to end on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny import make_pair

from persona_compass.axis import Axis, model_fingerprint
from persona_compass.calibration import Calibration
from persona_compass.cli import main
from persona_compass.models import load_model
from persona_compass.monitor import project_conversation

MSGS = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "Arr, a captain of the seas."},
    {"role": "user", "content": "And now?"},
    {"role": "assistant", "content": "Still a captain, matey."},
]


@pytest.fixture
def tiny_setup(tmp_path):
    model, tok = make_pair("qwen2")
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    directions = torch.randn(model.config.num_hidden_layers, model.config.hidden_size, generator=g)
    calibration = Calibration.from_projections(torch.randn(200, 4, generator=g))
    axis = Axis(
        directions=directions,
        model_id=str(model_dir),
        fingerprint=model_fingerprint(model),
        monitor_layer=2,
        calibration=calibration,
    )
    bundle = tmp_path / "bundle"
    axis.save(bundle)
    transcript = tmp_path / "t.json"
    transcript.write_text(json.dumps({"model": "tiny", "conversation": MSGS}))
    return model_dir, bundle, transcript


def test_monitor_json_matches_library(tiny_setup):
    model_dir, bundle, transcript = tiny_setup
    result = CliRunner().invoke(
        main, ["monitor", str(transcript), "--axis", str(bundle), "--json", "--dtype", "float32"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layer"] == 2 and data["model"] == str(model_dir)
    assert [t["index"] for t in data["turns"]] == [2, 4]
    assert set(data["turns"][0]) >= {"index", "role", "projection", "n_tokens", "percentile"}
    model, tok = load_model(str(model_dir), dtype=torch.float32)
    expected = project_conversation(model, tok, Axis.load(bundle), MSGS)
    for row, turn in zip(data["turns"], expected, strict=True):
        assert row["projection"] == pytest.approx(turn.projection, abs=1e-5)
        assert row["n_tokens"] == turn.n_tokens
        assert 0 <= row["percentile"] <= 100


def test_monitor_several_files_table_and_plot(tiny_setup, tmp_path):
    _, bundle, transcript = tiny_setup
    second = tmp_path / "second.jsonl"
    second.write_text("\n".join(json.dumps(m) for m in MSGS[1:3]))
    chart = tmp_path / "chart.png"
    result = CliRunner().invoke(
        main,
        [
            "monitor",
            str(transcript),
            str(second),
            "--axis",
            str(bundle),
            "--json",
            "--plot",
            str(chart),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["file"] for d in data] == [str(transcript), str(second)]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = CliRunner().invoke(main, ["monitor", str(transcript), "--axis", str(bundle)])
    assert table.exit_code == 0 and "projection" in table.stdout


def test_monitor_malformed_file_is_one_error_line(tiny_setup, tmp_path):
    _, bundle, _ = tiny_setup
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "wizard", "content": "x"}]')
    result = CliRunner().invoke(main, ["monitor", str(bad), "--axis", str(bundle)])
    assert result.exit_code == 1
    assert "role 'wizard'" in result.output
    assert "Traceback" not in result.output


def test_monitor_missing_bundle(tmp_path):
    transcript = tmp_path / "t.json"
    transcript.write_text(json.dumps(MSGS))
    result = CliRunner().invoke(main, ["monitor", str(transcript), "--axis", str(tmp_path / "x")])
    assert result.exit_code == 1 and "Error" in result.output


def test_axis_show_json(tiny_setup):
    _, bundle, _ = tiny_setup
    result = CliRunner().invoke(main, ["axis", "show", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_layers"] == 4 and data["d_model"] == 64 and data["monitor_layer"] == 2


def test_axis_import_reference_pt(tmp_path):
    raw = torch.randn(4, 64).to(torch.bfloat16)
    src = tmp_path / "assistant_axis.pt"
    torch.save({"axis": raw}, src)
    out = tmp_path / "imported"
    result = CliRunner().invoke(
        main,
        [
            "axis",
            "import",
            str(src),
            "--out",
            str(out),
            "--model-id",
            "tiny",
            "--monitor-layer",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    loaded = Axis.load(out)
    assert torch.equal(loaded.directions, raw.float()) and loaded.layer == 1
