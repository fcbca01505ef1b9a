"""The run folder shared by extraction and evaluation: creation, the lock, the settings record,
the resume check and the resume declaration on settings dataclasses."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from persona_compass.errors import PersonaCompassError
from persona_compass.run_folder import (
    LOCK_FILE,
    MAY_CHANGE,
    ResumeRule,
    RunFolder,
    RunFolderError,
    must_match,
)


class MyError(PersonaCompassError):
    pass


def folder(root, **kw):
    return RunFolder(root, settings_file="run.json", what="a test run", **kw)


@dataclass(frozen=True)
class Knobs:
    model: str = field(metadata=must_match("model_fingerprint"))
    seed: int = field(default=0, metadata=must_match())
    path: str = field(default="", metadata=must_match("digest"))
    other_path: str = field(default="", metadata=must_match("digest"))
    engine: str = field(default="hf", metadata=must_match(legacy="hf"))
    batch_size: int = field(default=8, metadata=MAY_CHANGE)


def test_the_declaration_lists_recorded_keys_in_field_order_once():
    rule = ResumeRule.of(Knobs)
    assert rule.keys == ("model_fingerprint", "seed", "digest", "engine")
    assert dict(rule.legacy) == {"engine": "hf"}


def test_a_field_without_a_declaration_is_refused():
    @dataclass(frozen=True)
    class Undecided:
        seed: int = field(default=0, metadata=must_match())
        speed: int = 1

    with pytest.raises(TypeError, match=r"Undecided\.speed does not say .*must_match.*MAY_CHANGE"):
        ResumeRule.of(Undecided)
    with pytest.raises(TypeError, match="legacy= describes one recorded key"):
        must_match("a", "b", legacy=None)


def test_a_new_folder_is_made_locked_and_records_its_settings(tmp_path):
    root = tmp_path / "deep" / "run"
    with folder(root).open() as held:
        assert held.resume({"seed": 1}, ResumeRule(("seed",))) is None  # nothing to resume
        held.write_settings({"seed": 1})
    # read once let go: closing any handle of a POSIX-locked file drops the process's lock
    assert (root / LOCK_FILE).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    assert json.loads((root / "run.json").read_text()) == {"seed": 1}
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []  # written atomically, no leftovers


def test_a_foreign_folder_or_a_file_is_refused_and_left_alone(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"x is not empty and holds no run\.json; choose a"):
        folder(tmp_path / "x").open()
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["notes.txt"]  # no lock file left
    (tmp_path / "f").write_text("")
    with pytest.raises(MyError, match="is a file, not a folder"):
        folder(tmp_path / "f", error=MyError).open()
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_text("")  # hidden files do not make it foreign
    folder(tmp_path / "hidden").open().close()


def test_a_held_folder_refuses_a_second_opener_until_closed(tmp_path):
    first = folder(tmp_path / "run").open()
    with pytest.raises(MyError, match=rf"in use by another run \(pid {os.getpid()} on .*new --out"):
        folder(tmp_path / "run", error=MyError).open()
    first.close()
    second = folder(tmp_path / "run").open()  # free again
    second.close()
    second.close()  # closing twice is harmless


HOLDER = """
import fcntl, os, sys
fh = open(sys.argv[1], "a+b")
fcntl.lockf(fh.fileno(), fcntl.LOCK_EX)
fh.truncate(0); fh.write(f"pid {os.getpid()} on elsewhere".encode()); fh.flush()
print("held", flush=True)
sys.stdin.read()  # hold until the test closes stdin
"""


def test_another_process_holding_the_folder_is_named_and_its_end_frees_it(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root / LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=rf"pid {child.pid} on elsewhere holds"):
            folder(root).open()
    finally:
        child.communicate("", timeout=60)  # the process ends: the system drops its lock
    folder(root).open().close()


KILLED_RUN = """
import os, sys, time
from persona_compass.run_folder import RunFolder
held = RunFolder(sys.argv[1], settings_file="run.json", what="a run").open()
worker = os.fork()  # a worker forked while the folder is held (as vLLM forks its engine)
if worker == 0:
    time.sleep(120)
    os._exit(0)
print(worker, flush=True)
os.kill(os.getpid(), 9)  # the run itself is killed; its worker lives on
"""


def test_a_killed_run_frees_the_folder_although_a_forked_worker_lives_on(tmp_path):
    root = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    worker = int(run.stdout.readline())
    try:
        assert run.wait(timeout=60) == -9
        folder(root).open().close()
    finally:
        os.kill(worker, 9)


def test_a_folder_dropped_without_close_lets_go_when_collected(tmp_path):
    dropped = folder(tmp_path / "run").open()
    with pytest.raises(RunFolderError, match="in use by another run"):
        folder(tmp_path / "run").open()
    del dropped
    gc.collect()
    folder(tmp_path / "run").open().close()


def test_other_settings_are_named_with_both_values(tmp_path):
    root = tmp_path / "run"
    with folder(root).open() as held:
        held.write_settings({"seed": 0, "engine": "vllm", "batch_size": 8})
    rule = ResumeRule.of(Knobs)
    with folder(root).open() as held:
        with pytest.raises(RunFolderError) as info:
            held.resume({"seed": 1, "engine": "hf", "batch_size": 8}, rule)
    text = str(info.value)
    assert "a test run made with other settings (seed: 0 -> 1; engine: 'vllm' -> 'hf')" in text
    assert f"rerun with the same settings (see {root / 'run.json'}), or choose a new --out" in text
    assert "batch_size" not in text
    with folder(root).open() as held:  # a key outside the rule may change
        previous = held.resume({"seed": 0, "engine": "vllm", "batch_size": 2}, rule)
    assert previous == {"seed": 0, "engine": "vllm", "batch_size": 8}


def test_a_key_an_older_record_lacks_counts_as_its_legacy_value(tmp_path):
    root = tmp_path / "run"
    with folder(root).open() as held:
        held.write_settings({"seed": 0})  # written before "engine" was recorded
    rule = ResumeRule(("seed", "engine"), {"engine": "hf"})
    with folder(root).open() as held:
        assert held.resume({"seed": 0, "engine": "hf"}, rule) == {"seed": 0}
        with pytest.raises(RunFolderError, match=r"\(engine: 'hf' -> 'vllm'\)"):
            held.resume({"seed": 0, "engine": "vllm"}, rule)
        # without a legacy value a missing key is None, which a new value differs from
        with pytest.raises(RunFolderError, match=r"\(layers: None -> 'all'\)"):
            held.resume({"seed": 0, "layers": "all"}, ResumeRule(("layers",)))


def test_force_goes_on_with_a_warning_and_the_refusal_offers_it(tmp_path, caplog):
    root = tmp_path / "run"
    with folder(root).open() as held:
        held.write_settings({"seed": 0})
    rule = ResumeRule(("seed",))
    with folder(root).open() as held:
        with pytest.raises(RunFolderError, match=r"choose a new --out, or pass --force to redo"):
            held.resume({"seed": 1}, rule, force_option="pass --force to redo")
        with caplog.at_level(logging.WARNING, logger="persona_compass.run_folder"):
            assert held.resume({"seed": 1}, rule, force=True) == {"seed": 0}
    assert "settings changed (seed: 0 -> 1)" in caplog.text


def test_an_unreadable_or_foreign_record_is_refused(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "run.json").write_text("{truncated")
    with folder(root).open() as held:
        with pytest.raises(RunFolderError, match=r"cannot read .*run\.json.*; choose a new --out"):
            held.resume({}, ResumeRule(()))
    (root / "run.json").write_text(json.dumps({"format": "someone-else/1"}))
    with folder(root, fmt="mine/1").open() as held:
        with pytest.raises(RunFolderError, match="not the settings record of a test run .*mine/1"):
            held.read_settings()
