"""`persona-compass chat`: piped conversations through the CLI, the UI pieces, a real terminal."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from rich.control import strip_control_codes
from tiny import make_pair

from persona_compass.alerts import AlertRules
from persona_compass.axis import Axis, model_fingerprint
from persona_compass.calibration import Calibration
from persona_compass.capping import CappingConfig
from persona_compass.chat_ui import (
    ChatUI,
    LiveAnswer,
    chart_table,
    drift_meter,
    percentile_colour,
    summary_text,
)
from persona_compass.cli import main
from persona_compass.compass import CompassSession, Delta
from persona_compass.generation import SamplingConfig
from persona_compass.monitor import TurnReading
from persona_compass.transcripts import load_transcripts, save_transcript

GREEDY = ["--max-new-tokens", "8", "--temperature", "0", "--seed", "0"]
ALWAYS = AlertRules(token_run=0, turn_percentile=100, turn_run=1, trend_turns=0)


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    """A tiny chat model saved to a folder and a calibrated bundle with a capping config."""
    root = tmp_path_factory.mktemp("chat")
    model, tok = make_pair("qwen2")
    model_dir = root / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    directions = torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=g)
    # calibrate on the model's own token projections, so percentiles are spread out
    ids = torch.randint(3, 200, (4, 40), generator=g)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    units = directions / directions.norm(dim=1, keepdim=True)
    samples = torch.stack(
        [hidden[i + 1].float().reshape(-1, cfg.hidden_size) @ units[i] for i in range(4)], dim=1
    )
    axis = Axis(
        directions=directions,
        model_id=str(model_dir),
        fingerprint=model_fingerprint(model),
        monitor_layer=2,
        calibration=Calibration.from_projections(samples),
    )
    bundle = root / "bundle"
    axis.save(bundle)
    assert axis.calibration is not None
    taus = [axis.calibration.threshold(layer, 90) for layer in (1, 2)]  # a cap that bites
    cap = CappingConfig.from_axis(axis, "1:3", taus)
    cap.save(bundle)
    bare = root / "bare-bundle"  # no capping config
    axis.save(bare)
    return {"model_dir": model_dir, "bundle": bundle, "bare": bare, "pair": (model, tok)}


def run_chat(setup, lines, *args):
    result = CliRunner().invoke(
        main,
        ["chat", "--axis", str(setup["bundle"]), *GREEDY, *args],
        input="".join(f"{line}\n" for line in lines),
    )
    assert "Traceback" not in result.output, result.output
    return result


def plain(text: str) -> str:
    return strip_control_codes(text)


def make_ui(setup, *, mode="off", rules=None, live=False, width=120, cls=ChatUI, **console_kw):
    model, tok = setup["pair"]
    axis = Axis.load(setup["bundle"])
    session = CompassSession(
        model,
        tok,
        axis,
        CappingConfig.load(setup["bundle"]),
        mode=mode,
        rules=rules,
        sampling=SamplingConfig(max_new_tokens=8, temperature=0.0, seed=0),
    )
    console = Console(record=True, width=width, **console_kw)
    ui = cls(session, console=console, model_name="tiny", live=live, echo_input=True)
    return ui, console


# --------------------------------------------------------------------------- the CLI, piped


def test_chat_piped_answers_summaries_cap_toggle_and_save(chat_setup, tmp_path):
    auto = tmp_path / "auto.json"
    saved = tmp_path / "saved.json"
    result = run_chat(
        chat_setup,
        [
            "Hello there, who are you?",
            "/cap on",
            "How are you today?",
            "/cap off",
            "Tell me more.",
            f"/save {saved}",
            "/quit",
            "this line is never read",
        ],
        "--cap",
        "off",
        "--save",
        str(auto),
    )
    assert result.exit_code == 0, result.output
    out = result.output
    [transcript] = load_transcripts(auto)
    assert [m["role"] for m in transcript.messages] == ["user", "assistant"] * 3
    assert transcript.model == str(chat_setup["model_dir"])
    assert transcript.metadata["chat"]["cap_mode"] == "off"
    readings = transcript.readings
    assert readings is not None
    assert [r["index"] for r in readings] == [1, 3, 5]
    assert [r["capped"] for r in readings] == [False, True, False]
    assert readings[0]["cap_engagement"] is None and readings[2]["cap_engagement"] is None
    assert 0 < readings[1]["cap_engagement"] <= 1  # the p90 floor raised some activations
    # every answer was printed, followed by its one-line summary
    for m in transcript.messages[1::2]:
        if m["content"] != "...":
            assert plain(m["content"]) in plain(out)
    summaries = [line for line in out.splitlines() if line.lstrip().startswith("turn ")]
    assert len(summaries) == 3
    for line, r in zip(summaries, readings, strict=True):
        assert f"p{r['percentile']:.0f}" in line
        assert f"projection {r['projection']:+.2f}" in line
        assert ("capped, " in line) == r["capped"] and ("uncapped" in line) != r["capped"]
    assert "you> /cap on" in out and "capping: on" in out and "capping: off" in out
    assert "this line is never read" not in out
    # /save wrote the same conversation and readings as the autosave
    [again] = load_transcripts(saved)
    assert again.messages == transcript.messages
    assert json.dumps(again.readings) == json.dumps(readings)


def test_chat_bad_commands_print_one_line_with_usage(chat_setup):
    result = run_chat(
        chat_setup,
        [
            "/cap bogus",
            "/frob",
            "/steer",
            "/steer x",
            "/steer 1 99",
            "/steer 2 1:3 extra",
            "/steer 1e308",
            "/save no/such/folder/t.json",
            "/save",
            "/load",
            f"/load {chat_setup['bundle'] / 'nothing.json'}",
            "/chart a.txt",
            "/chart",
            "/save x.json",
            '/save "unclosed',
            "/reset now",
        ],
    )
    assert result.exit_code == 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 14, result.output
    assert "error: unknown capping mode 'bogus'; usage: /cap [on|off|adaptive]" in errors
    assert any(e.startswith("error: unknown command /frob; commands: /cap") for e in errors)
    assert any("C must be a number, got 'x'; usage: /steer C [LAYERS]" in e for e in errors)
    assert any("99" in e and "usage: /steer" in e for e in errors)
    assert any("too many arguments; usage: /steer" in e for e in errors)
    assert any("1e+308 must be a finite number within ±1e+06" in e for e in errors)  # one bound
    assert any("folder no/such/folder does not exist; create it first" in e for e in errors)
    assert any(e.endswith("usage: /save FILE") for e in errors)
    assert any(e.endswith("usage: /load FILE [N|LABEL]") for e in errors)
    assert any("nothing.json: no such file" in e for e in errors)
    assert any("write a .png or .html file; usage: /chart" in e for e in errors)
    assert any("nothing to save yet" in e for e in errors)
    assert any("cannot read the arguments" in e for e in errors)
    assert "steering: off" in result.output  # /steer alone shows the state
    assert "no answers yet" in result.output


def test_chat_cap_on_needs_a_capping_config(chat_setup, tmp_path):
    result = CliRunner().invoke(
        main, ["chat", "--axis", str(chat_setup["bare"]), "--cap", "on"], input=""
    )
    assert result.exit_code == 1
    assert "needs a capping config" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["chat", "--axis", str(tmp_path / "nope")], input="")
    assert missing.exit_code == 1 and "no such bundle folder" in missing.output
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "wizard", "content": "x"}]')
    broken = CliRunner().invoke(
        main, ["chat", "--axis", str(chat_setup["bundle"]), "--load", str(bad)], input=""
    )
    assert broken.exit_code == 1 and "role 'wizard'" in broken.output
    # without capping, /cap on is refused in the chat, which goes on
    result = CliRunner().invoke(
        main, ["chat", "--axis", str(chat_setup["bare"]), *GREEDY], input="/cap on\nHi\n"
    )
    assert result.exit_code == 0 and "capping off [none in the bundle]" in result.output
    assert "needs a capping config" in result.output and "turn 1" in result.output


def test_chat_load_continues_from_a_saved_transcript(chat_setup, tmp_path):
    first = tmp_path / "first.json"
    run_chat(chat_setup, ["/cap on", "Hello!", f"/save {first}"], "--cap", "off")
    second = tmp_path / "second.json"
    result = run_chat(chat_setup, ["And then?", f"/save {second}"], "--load", str(first))
    assert result.exit_code == 0, result.output
    assert "1 stored readings" in result.output
    [a] = load_transcripts(first)
    [b] = load_transcripts(second)
    assert b.messages[:2] == a.messages and len(b.messages) == 4
    assert b.readings is not None and a.readings is not None
    assert b.readings[0] == a.readings[0]  # the loaded reading is kept as it was
    assert b.readings[0]["capped"] is True
    assert [r["index"] for r in b.readings] == [1, 3]
    assert "turn 2" in result.output  # numbering continues


def test_chat_load_plain_transcript_measures_and_answers_last_user_turn(chat_setup, tmp_path):
    plain_file = tmp_path / "plain.json"
    plain_file.write_text(
        json.dumps(
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "What is the sea?"},
            ]
        )
    )
    out = tmp_path / "out.json"
    result = run_chat(chat_setup, [f"/load {plain_file}", f"/save {out}"], "--cap", "off")
    assert result.exit_code == 0, result.output
    assert "1 measured now" in result.output and "answering" in result.output
    [t] = load_transcripts(out)
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert t.messages[3]["content"] == "What is the sea?"
    assert t.readings is not None
    measured, live = t.readings
    assert measured["index"] == 2 and measured["n_tokens"] > 0 and not measured["capped"]
    assert 0 <= measured["percentile"] <= 100
    assert live["index"] == 4


def test_chat_system_prompt_changes_keep_readings_aligned(chat_setup, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    result = run_chat(
        chat_setup,
        ["Hi", "/system You are a pirate.", "Ahoy?", f"/save {a}", "/system", f"/save {b}"],
    )
    assert result.exit_code == 0, result.output
    [ta] = load_transcripts(a)
    assert ta.messages[0] == {"role": "system", "content": "You are a pirate."}
    assert ta.readings is not None
    assert [r["index"] for r in ta.readings] == [2, 4]
    [tb] = load_transcripts(b)
    assert tb.messages[0]["role"] == "user"
    assert tb.readings is not None
    assert [r["index"] for r in tb.readings] == [1, 3]


def test_chat_steer_reset_and_message_starting_with_slash(chat_setup, tmp_path):
    out = tmp_path / "t.json"
    result = run_chat(
        chat_setup,
        ["/steer 4 1:3", "Hi", "/steer off", "//not a command", "/reset", "Fresh", f"/save {out}"],
    )
    assert result.exit_code == 0, result.output
    assert "steering: +4 × axis on layers 1:3" in result.output
    assert "steered +4" in result.output
    [t] = load_transcripts(out)
    assert [m["content"] for m in t.messages if m["role"] == "user"] == ["Fresh"]
    assert "you> //not a command" in result.output


def test_chat_chart_table_and_files(chat_setup, tmp_path):
    html, png = tmp_path / "c.html", tmp_path / "c.png"
    result = run_chat(
        chat_setup,
        ["Hi", "/cap on", "More please", "/chart", f"/chart {html}", f"/chart {png}"],
        "--cap",
        "off",
    )
    assert result.exit_code == 0, result.output
    assert "Drift per answer" in result.output and "p25 alert line" in result.output
    assert "capped, " in result.output and "uncapped" in result.output
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "p25 role-play" in page
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the UI pieces


def test_drift_meter_renders_percentile_colour_and_threshold():
    console = Console(record=True, width=60)
    console.print(drift_meter(60, threshold=25, width=20))
    console.print(drift_meter(None, threshold=25, width=20))
    console.print(drift_meter(2.4, threshold=None, width=10))
    lines = console.export_text().splitlines()
    assert lines[0] == "▕█████┃██████░░░░░░░░▏ p60"
    assert lines[1] == "▕░░░░░┃░░░░░░░░░░░░░░▏ p--"
    assert lines[2] == "▕░░░░░░░░░░▏ p2"
    meter = drift_meter(60, threshold=25, width=20)
    assert {span.style for span in meter.spans} >= {percentile_colour(60), "bold"}

    def rgb(pct):
        c = percentile_colour(pct)
        return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)

    red, green = rgb(0), rgb(100)
    assert red[0] > red[1] and green[1] > green[0]
    reds = [rgb(p)[0] - rgb(p)[1] for p in range(0, 101, 10)]
    assert reds == sorted(reds, reverse=True)  # redder the lower


def test_live_view_shows_the_running_percentile_per_delta():
    view = LiveAnswer(threshold=25.0, capped=True)
    console = Console(record=True, width=80, height=10)
    for delta in [
        Delta("Hello", 1, None, None),
        Delta(" there", 3, -1.5, 12.0),
        Delta(" friend", 5, 2.25, 71.6),
    ]:
        view.update(delta)
        console.print(view)
        frame = console.export_text(clear=True)
        pct = "p--" if delta.percentile is None else f"p{delta.percentile:.0f}"
        assert "drift ▕" in frame and pct in frame and f"{delta.n_tokens} tokens" in frame
        assert view.text.strip() in frame and "capped" in frame
    long = LiveAnswer(threshold=25.0, capped=False)
    long.update(Delta("\n".join(f"line {i}" for i in range(50)), 50, 0.0, 50.0))
    console.print(long)
    frame = console.export_text()
    assert "line 49" in frame and "line 0\n" not in frame  # only the tail fits
    assert len(frame.splitlines()) <= 10


def test_summary_and_chart_renderables():
    reading = TurnReading(3, "assistant", -2.5, 18.0, 12, True, 0.25)
    console = Console(record=True, width=200)
    console.print(summary_text(reading, turn=2, finish_reason="cancelled", cap_next="on"))
    text = console.export_text()
    assert "turn 2" in text and "p18" in text and "projection -2.50" in text
    assert "capped, 25% raised" in text and "cancelled" in text and "cap next: on" in text
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    readings = [TurnReading(1, "assistant", 1.0, 80.0, 3), reading]
    console.print(chart_table(readings, msgs, width=10))
    table = console.export_text()
    assert "p80" in table and "p18" in table and "┃" in table


def test_ui_live_mode_alerts_and_adaptive_capping(chat_setup):
    ui, console = make_ui(
        chat_setup, mode="adaptive", rules=ALWAYS, live=True, force_terminal=True, height=20
    )
    assert not ui.session.cap_engaged
    first = ui.ask("Hello there")
    assert first is not None and first.reading.alerts and not first.reading.capped
    assert ui.session.cap_engaged  # the alert engaged the adaptive cap
    second = ui.ask("And now?")
    assert second is not None and second.reading.capped
    text = console.export_text()
    assert "drift ▕" in text  # the live meter was drawn
    assert "⚠ alert (turns)" in text and "cap next: on" in text
    assert text.count("turn 1 ") == 1 and "turn 2 " in text


def test_ctrl_c_cancels_the_answer_and_the_chat_goes_on(chat_setup):
    class Interrupting(ChatUI):
        def _on_delta(self, view, plain_stream):
            inner = super()._on_delta(view, plain_stream)

            def hook(delta):
                inner(delta)
                if delta.n_tokens >= 3 and not sent:
                    sent.append(True)
                    os.kill(os.getpid(), signal.SIGINT)

            return hook

    sent: list[bool] = []
    ui, console = make_ui(chat_setup, cls=Interrupting)
    ui.session.sampling = dataclasses.replace(ui.session.sampling, max_new_tokens=60)
    before = signal.getsignal(signal.SIGINT)
    answer = ui.ask("Tell me a long story")
    assert sent and answer is not None
    assert answer.finish_reason == "cancelled" and answer.completion_tokens < 60
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back
    assert "cancelled" in console.export_text()
    ui.session.sampling = dataclasses.replace(ui.session.sampling, max_new_tokens=8)
    lines = iter(["Another question", "/quit"])

    def read():
        return next(lines)

    ui.run(read, banner=False)
    assert [m["role"] for m in ui.session.messages] == ["user", "assistant"] * 2


def test_ui_load_keeps_alert_history_and_adaptive_state(chat_setup, tmp_path):
    ui, _ = make_ui(chat_setup, mode="adaptive", rules=ALWAYS)
    ui.ask("Hi")
    path = ui.save(tmp_path / "t.json")
    fresh, console = make_ui(chat_setup, mode="adaptive", rules=ALWAYS)
    fresh.load(path)
    assert fresh.session.cap_engaged  # replayed from the loaded alert
    assert len(fresh.session.alerts) == 1 and len(fresh.session.turns) == 1
    assert "adaptive capping is engaged" in console.export_text()


def test_save_transcript_round_trip_matches_session(chat_setup, tmp_path):
    ui, _ = make_ui(chat_setup, mode="on")
    ui.ask("Hi")
    path = ui.save(tmp_path / "t.json")
    [t] = load_transcripts(path)
    assert t.readings == ui.session.readings()
    # the file is also what save_transcript writes directly
    direct = save_transcript(
        tmp_path / "d.json",
        ui.session.messages,
        model="tiny",
        readings=ui.session.readings(),
        metadata={"chat": ui.settings()},
    )
    assert json.loads(direct.read_text()) == json.loads(path.read_text())


# --------------------------------------------------------------------------- a real terminal


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pseudo-terminal")
def test_chat_in_a_pseudo_terminal(chat_setup):
    """Live meter frames on a real tty, Ctrl-C through the line discipline, then /quit."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))

    def become_session_leader():  # so ^C on the pty sends SIGINT to the chat
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="30")
    cmd = [sys.executable, "-m", "persona_compass.cli", "chat", "--axis", str(chat_setup["bundle"])]
    cmd += ["--max-new-tokens", "400", "--temperature", "0", "--seed", "0", "--cap", "off"]
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=slave, env=env, preexec_fn=become_session_leader
    )
    os.close(slave)
    seen = bytearray()
    pos = 0

    def expect(pattern: bytes, timeout: float = 60.0) -> re.Match[bytes]:
        nonlocal pos
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(seen, pos)
            if found:
                pos = found.end()
                return found
            if (
                time.monotonic() > deadline
                or proc.poll() is not None
                and not select.select([master], [], [], 0)[0]
            ):
                raise AssertionError(f"no {pattern!r} in {bytes(seen[-2000:])!r}")
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen.extend(os.read(master, 65536))
                except OSError:
                    pass

    try:
        expect(rb"you>")
        os.write(master, b"Tell me a long story\r")
        expect(rb"drift \S*\x1b\[[0-9;]*m\xe2\x96\x95")  # the meter, drawn with colours
        expect(rb" ([3-9]|\d\d+) tokens")  # a few tokens in: the answer is streaming
        os.write(master, b"\x03")
        expect(rb"cancelled", 30)
        expect(rb"you>", 30)
        os.write(master, b"/quit\r")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# --------------------------------------------------------------------------- trait needles


def save_trait_bundle(setup, folder, name="malice", layer=1):
    """A trait bundle for the tiny chat model: a random direction calibrated on its tokens."""
    base = Axis.load(setup["bundle"])
    g = torch.Generator().manual_seed(11)
    directions = torch.randn(base.n_layers, base.d_model, generator=g)
    trait = dataclasses.replace(
        base, directions=directions, monitor_layer=layer, metadata={"kind": "trait", "trait": name}
    )
    trait.save(folder)
    return folder


def test_chat_trait_needles_get_a_meter_each(chat_setup, tmp_path):
    folder = save_trait_bundle(chat_setup, tmp_path / "malice")
    auto = tmp_path / "auto.json"
    result = run_chat(
        chat_setup,
        ["Hello there, who are you?", "/quit"],
        "--trait",
        str(folder),
        "--save",
        str(auto),
    )
    assert result.exit_code == 0, result.output
    [transcript] = load_transcripts(auto)
    reading = transcript.readings[0]["traits"]["malice"]
    assert set(reading) == {"projection", "percentile"}
    [meter] = [line for line in plain(result.output).splitlines() if "malice ▕" in line]
    assert meter.rstrip().endswith(f"p{reading['percentile']:.0f}")
    wrong = run_chat(chat_setup, ["/quit"], "--trait", str(chat_setup["bare"]))
    assert wrong.exit_code == 1 and "is not a trait bundle" in wrong.output


def test_live_view_and_meter_of_a_rising_needle():
    from persona_compass.monitor import TraitReading

    view = LiveAnswer(threshold=25.0, capped=False)
    view.update(Delta("Hi", 2, 0.5, 60.0, {"malice": TraitReading(1.0, 90.0)}))
    console = Console(record=True, width=80, height=10)
    console.print(view)
    frame = console.export_text()
    assert "malice ▕" in frame and "p90" in frame
    # a trait drifts upward: 90 is red on its meter, green on the axis' meter
    high = drift_meter(90.0, rising=True)
    assert percentile_colour(10.0) in str(high.spans) and percentile_colour(90.0) not in str(
        high.spans
    )
