"""`persona-compass monitor` and `axis` commands, end to end on a tiny local model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from tiny import save_tiny_bundle

from persona_compass.axis import Axis
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
    model_dir, bundle, _ = save_tiny_bundle(tmp_path, arch="qwen2", seed=3, monitor_layer=2)
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


# --------------------------------------------------------------------------- several inputs

WIDE = {"COLUMNS": "220"}
PAIR = {
    "model": "tiny",
    "unsteered": {"conversation": MSGS},
    "capped": {"conversation": MSGS, "steering_config": {"experiment_id": "layers_1:3-p0.25"}},
}


def run_monitor(bundle, *args):
    return CliRunner().invoke(
        main, ["monitor", *map(str, args), "--axis", str(bundle), "--dtype", "float32"], env=WIDE
    )


def test_monitor_folder_sorted_and_recursive(tiny_setup, tmp_path):
    _, bundle, _ = tiny_setup
    folder = tmp_path / "chats"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.json").write_text(json.dumps({"conversation": MSGS}))
    (folder / "a.jsonl").write_text("\n".join(json.dumps(m) for m in MSGS[1:3]))
    (folder / "notes.txt").write_text("not a transcript")
    (folder / "sub" / "c.json").write_text(json.dumps(MSGS))
    result = run_monitor(bundle, folder, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["file"] for d in data] == [str(folder / "a.jsonl"), str(folder / "b.json")]
    assert [len(d["turns"]) for d in data] == [1, 2]
    deep = run_monitor(bundle, folder, "--json", "--recursive")
    assert deep.exit_code == 0, deep.output
    assert [d["file"] for d in json.loads(deep.stdout)][-1] == str(folder / "sub" / "c.json")


def test_monitor_case_study_pair_is_a_labelled_list(tiny_setup, tmp_path):
    _, bundle, _ = tiny_setup
    pair = tmp_path / "pair.json"
    pair.write_text(json.dumps(PAIR))
    result = run_monitor(bundle, pair, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["label"] for d in data] == ["unsteered", "capped"]  # the key names the condition
    assert all(d["file"] == str(pair) for d in data)
    assert [d["source"] for d in data] == [f"{pair}#unsteered", f"{pair}#capped"]
    # the same conversation under both labels: same projections
    assert data[0]["turns"] == data[1]["turns"]
    table = run_monitor(bundle, pair)
    assert table.exit_code == 0, table.output
    assert "#unsteered" in table.stdout and "#capped" in table.stdout


def test_monitor_json_list_shape_for_several_files(tiny_setup, tmp_path):
    model_dir, bundle, transcript = tiny_setup
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"messages": MSGS[1:3]}))
    result = run_monitor(bundle, transcript, other, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, list) and len(data) == 2
    for item in data:
        assert set(item) == {"file", "source", "label", "model", "layer", "turns"}
        assert item["layer"] == 2 and item["model"] == str(model_dir) and item["label"] is None
        for turn in item["turns"]:
            assert set(turn) == {"index", "role", "projection", "n_tokens", "percentile"}
    single = json.loads(run_monitor(bundle, transcript, "--json").stdout)
    assert set(single) == {"model", "layer", "turns"}  # one file: the original shape
    assert single["turns"] == data[0]["turns"]


def test_monitor_keeps_going_past_bad_files(tiny_setup, tmp_path):
    _, bundle, transcript = tiny_setup
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversation": [{"role": "wizard", "content": "x"}]}')
    missing = tmp_path / "missing.json"
    result = run_monitor(bundle, bad, transcript, missing, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)  # the good file is still processed
    assert [d["file"] for d in data] == [str(transcript)]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 3, result.stderr
    assert str(bad) in errors[0] and "role 'wizard'" in errors[0]
    assert str(missing) in errors[1] and "no such file" in errors[1]
    assert "2 input(s) failed" in errors[2] and "1 file(s) were processed" in errors[2]
    assert "Traceback" not in result.output


def test_monitor_fail_fast_and_all_bad(tiny_setup, tmp_path):
    _, bundle, transcript = tiny_setup
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    fast = run_monitor(bundle, transcript, bad, "--fail-fast", "--json")
    assert fast.exit_code == 1 and fast.stdout == ""
    assert str(bad) in fast.stderr and len(fast.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    both = run_monitor(bundle, bad, empty)
    assert both.exit_code == 1 and both.stdout == ""
    lines = both.stderr.strip().splitlines()
    assert len(lines) == 2 and str(bad) in lines[0]
    assert str(empty) in lines[1] and "no .json or .jsonl files" in lines[1]


def test_monitor_shows_live_readings(tiny_setup, tmp_path):
    _, bundle, _ = tiny_setup
    from persona_compass.transcripts import save_transcript

    alert = {"kind": "drift", "turn": 2, "message": "fell below p25", "value": -1.5}
    readings = [
        {
            "index": 2,
            "role": "assistant",
            "projection": 1.25,
            "percentile": 60.0,
            "n_tokens": 7,
            "capped": False,
            "cap_engagement": None,
            "alerts": [],
        },
        {
            "index": 4,
            "role": "assistant",
            "projection": -1.5,
            "percentile": 20.0,
            "n_tokens": 6,
            "capped": True,
            "cap_engagement": 0.5,
            "alerts": [alert],
        },
    ]
    path = save_transcript(tmp_path / "live.json", MSGS, model="tiny", readings=readings)
    result = run_monitor(bundle, path, "--json")
    assert result.exit_code == 0, result.output
    turns = json.loads(result.stdout)["turns"]
    assert [t["live"] for t in turns] == readings
    table = run_monitor(bundle, path)
    assert table.exit_code == 0, table.output
    for text in ("live", "capped", "yes (50%)", "1.25", "drift: fell below p25"):
        assert text in table.stdout, table.stdout


def test_monitor_html_and_png_charts(tiny_setup, tmp_path):
    _, bundle, transcript = tiny_setup
    evil = "</script><img src=x onerror=alert(1)>"
    pair = tmp_path / "pair.json"
    msgs = [dict(m) for m in MSGS]
    msgs[2]["content"] = evil + " arr"
    pair.write_text(json.dumps({"unsteered": {"conversation": msgs}, "capped": MSGS}))
    html, png = tmp_path / "out" / "chart.html", tmp_path / "out" / "chart.png"
    result = run_monitor(bundle, pair, transcript, "--html", html, "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<[^<>]*\b(src|href)\s*=", page, re.I)
    assert "<img" not in page and "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count('class="series"') == 3
    for label in ("pair.json · unsteered", "pair.json · capped", "t.json", "p25 role-play"):
        assert label in page
    assert "chart written" in result.stderr and "HTML chart written" in result.stderr


def test_monitor_uncalibrated_bundle_has_no_percentiles_or_bands(tiny_setup, tmp_path):
    _, bundle, transcript = tiny_setup
    axis = Axis.load(bundle)
    bare = tmp_path / "bare"
    Axis(
        directions=axis.directions,
        model_id=axis.model_id,
        fingerprint=axis.fingerprint,
        monitor_layer=1,
    ).save(bare)
    html = tmp_path / "c.html"
    result = run_monitor(bare, transcript, "--json", "--html", html)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layer"] == 1 and all(t["percentile"] is None for t in data["turns"])
    page = html.read_text(encoding="utf-8")
    assert 'class="band"' not in page and "no calibration" in page


def test_a_conversation_over_max_tokens_is_refused_and_the_others_are_read(tiny_setup, tmp_path):
    _, bundle, transcript = tiny_setup
    long = tmp_path / "long.json"
    chatter = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    long.write_text(json.dumps({"conversation": chatter}))
    result = run_monitor(bundle, long, transcript, "--max-tokens", "300")
    assert result.exit_code == 1
    assert "tokens, over the limit of 300" in result.output and "--max-tokens" in result.output
    ok = run_monitor(bundle, transcript, "--max-tokens", "300")
    assert ok.exit_code == 0, ok.output


def test_long_sequences_cost_linear_time():
    """Half-overlapping windows: each token is read at most twice, whatever the length."""
    from persona_compass.monitor import _windows

    window = 512
    for n in (window, 3 * window + 7, 40 * window, 400 * window + 1):
        spans = _windows(n, window)
        work = sum(end - start for start, end, _, _ in spans)
        assert work <= 2 * n
        assert all(end - start <= window for start, end, _, _ in spans)
        kept = [k for _, _, a, b in spans for k in range(a, b)] if n < 10_000 else None
        if kept is not None:
            assert kept == list(range(n))  # every token once, in order
