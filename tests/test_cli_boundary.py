"""The boundary between library and command line: help without torch, options declared once,
library errors that name parameters and command-line errors that name flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from persona_compass.cli import main
from persona_compass.cli.options import DEFAULT_MODEL, DTYPE_HELP, MODEL_HELP
from persona_compass.cli.param_flags import with_flags

HEAVY = ("torch", "transformers", "vllm", "fastapi")

HELP_SCRIPT = f"""
import json, sys
import click
from click.testing import CliRunner
from persona_compass.cli import main

def paths(command, prefix):
    yield prefix
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from paths(sub, [*prefix, name])

codes = {{" ".join(p) or "(group)": CliRunner().invoke(main, [*p, "--help"]).exit_code
         for p in paths(main, [])}}
print(json.dumps({{"codes": codes, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def commands(group: click.Group = main, prefix: str = "") -> dict[str, click.Command]:
    """Every leaf command by its full name (``axis calibrate``)."""
    out: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        full = f"{prefix}{name}"
        if isinstance(command, click.Group):
            out.update(commands(command, f"{full} "))
        else:
            out[full] = command
    return out


def declarations(flag: str) -> dict[str, click.Option]:
    """The option ``flag`` of every command that has it."""
    found = {}
    for name, command in commands().items():
        for param in command.params:
            if isinstance(param, click.Option) and flag in param.opts:
                found[name] = param
    return found


# ---------------------------------------------------------------------------- help, no torch


def test_help_of_every_command_imports_no_heavy_library():
    done = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["heavy"] == []
    assert set(result["codes"]) == {"(group)", "axis", "models", *commands()}
    assert set(result["codes"].values()) == {0}


# ------------------------------------------------------------------- options declared once

# flag -> {command: default}: every command that takes the flag, with today's default
SHARED = {
    "--axis": {"monitor": None, "chat": "smollm2-135m", "serve": None, "evaluate": None},
    "--model": {
        "monitor": None,
        "chat": None,
        "serve": None,
        "evaluate": None,
        "extract": DEFAULT_MODEL,
        "demo": DEFAULT_MODEL,
        "axis import": None,
        "axis calibrate": None,
    },
    "--dtype": dict.fromkeys(
        ["monitor", "chat", "serve", "evaluate", "extract", "axis calibrate"], None
    ),
    "--max-new-tokens": {
        "chat": 128,
        "evaluate": 64,
        "extract": None,
        "demo": 48,
        "axis calibrate": 128,
    },
    "--temperature": {"chat": 0.7, "evaluate": 0.7, "extract": None},
    "--top-p": {"evaluate": 0.9, "extract": None},
    "--repetition-penalty": {"evaluate": 1.1},
    "--seed": {"chat": None, "evaluate": 0, "extract": None, "demo": 0, "axis calibrate": 0},
}


@pytest.mark.parametrize("flag", sorted(SHARED))
def test_a_shared_option_is_declared_alike_everywhere(flag):
    found = declarations(flag)
    assert {name: option.default for name, option in found.items()} == SHARED[flag]
    first = next(iter(found.values()))
    help_start = first.help.split(". ")[0] if first.help else ""
    for name, option in found.items():
        assert (option.name, option.opts) == (first.name, first.opts), name
        assert repr(option.type) == repr(first.type), name  # the same type and range
        assert (option.help or "").startswith(help_start), name
        assert bool(option.show_default) == (option.default is not None), name


def test_shared_help_texts_say_one_thing():
    assert all(o.help.startswith(MODEL_HELP) for o in declarations("--model").values())
    assert all(o.help.startswith(DTYPE_HELP) for o in declarations("--dtype").values())


def test_required_axis_and_model_are_where_they_were():
    required = {
        (flag, name)
        for flag in ("--axis", "--model")
        for name, option in declarations(flag).items()
        if option.required
    }
    assert required == {("--axis", "monitor"), ("--axis", "serve"), ("--model", "axis calibrate")}


def test_the_default_model_is_the_registry_default():
    from persona_compass.models import DEFAULT_ALIAS

    assert DEFAULT_MODEL == DEFAULT_ALIAS


def test_sampling_values_the_library_refuses_are_usage_errors(tmp_path):
    runner = CliRunner()
    for args in (
        ["--top-p", "0"],
        ["--temperature", "-1"],
        ["--max-new-tokens", "0"],
        ["--repetition-penalty", "0"],
    ):
        out = runner.invoke(main, ["evaluate", "--axis", "x", "--out", str(tmp_path), *args])
        assert out.exit_code == 2 and f"Invalid value for '{args[0]}'" in out.output, args


# -------------------------------------------------------------- parameters and flags


def toy_command() -> click.Command:
    @click.command()
    @click.option("--out", "out_dir")
    @click.option("--force", is_flag=True)
    @click.option("--engine")
    @click.option("--eager/--compile", default=None)
    @click.option("-r", "--recursive", is_flag=True)
    def toy(**kwargs: object) -> None:
        """A command with the kinds of option a message may name."""

    return toy


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        ("`out_dir` /x already exists; pass `force=True`", "--out /x already exists; pass --force"),
        ("`out` /x", "--out /x"),  # a library parameter named after the flag
        ("use `engine='hf'` instead", "use --engine hf instead"),
        ("`eager=False` compiles", "--compile compiles"),
        ("`recursive`", "--recursive"),
        ("`layers` is not an option here", "`layers` is not an option here"),
        ("force out_dir engine stay words", "force out_dir engine stay words"),
        ("run `hf auth login`", "run `hf auth login`"),
    ],
)
def test_marked_parameters_become_the_commands_flags(library, cli):
    assert with_flags(library, toy_command()) == cli


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "old.txt").write_text("x")
    return folder


def test_an_existing_out_names_parameters_in_the_library(existing):
    from persona_compass.hub import HubError, import_from_hub

    with pytest.raises(HubError) as err:
        import_from_hub("hf:me/axes", "smollm2-135m", existing)
    assert str(err.value) == (
        f"`out` {existing} already exists; pass `force=True` to replace it, or choose a new folder"
    )


def test_an_existing_out_names_flags_on_the_command_line(existing):
    args = ["axis", "import", "hf:me/axes", "--model", "smollm2-135m", "--out", str(existing)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: --out {existing} already exists; pass --force to replace it, or choose a new "
        "folder\n"
    )


def test_a_used_dry_run_folder_in_the_library_and_on_the_command_line(existing):
    from persona_compass.hub import HubError, push_bundle

    with pytest.raises(HubError, match=r"^`dry_run` .* exists and is not an empty folder"):
        push_bundle("smollm2-135m", "hf:me/axes", dry_run=existing)
    args = ["axis", "push", "smollm2-135m", "hf:me/axes", "--dry-run", str(existing)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert f"Error: --dry-run {existing} exists and is not an empty folder" in result.output


def test_a_bad_layer_selection_in_the_library_and_on_the_command_line(tmp_path):
    from persona_compass.errors import LayerError
    from persona_compass.persona_space.extract import resolve_layers

    with pytest.raises(LayerError, match=r"^`layers` '9': layer=9 is out of range"):
        resolve_layers("9", 4)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    args = ["extract", "--model", str(model), "--out", str(tmp_path / "run"), "--dry-run"]
    result = CliRunner().invoke(main, [*args, "--layers", "9"])
    assert result.exit_code == 1
    assert "Error: --layers '9': layer=9 is out of range" in result.output
