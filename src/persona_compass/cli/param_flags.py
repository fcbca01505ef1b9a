"""Library errors name Python parameters; the command line shows the flags that set them.

A library message puts a parameter in backticks, as in "`out` x exists; pass `force=True`".
For the command that ran, :func:`with_flags` turns each mark naming one of its options into
the flag ("--out x exists; pass --force"), so the one mapping from parameters to flags is the
commands' own option declarations. A parameter matches an option by its Python name
(``out_dir``) or by its flag (``out`` -> ``--out``); a mark that matches none stays as it is.
"""

from __future__ import annotations

import re

import click

# `name` or `name=value`, with a Python identifier as the name
MARK = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


def find_option(command: click.Command, name: str) -> click.Option | None:
    """The option of ``command`` that the library parameter ``name`` stands for."""
    flag = "--" + name.replace("_", "-")
    for param in command.params:
        if isinstance(param, click.Option) and (param.name == name or flag in param.opts):
            return param
    return None


def flag_text(option: click.Option, value: str | None) -> str:
    """How the command line spells ``option`` set to ``value`` (a Python literal, or None
    for the option itself)."""
    longs = [o for o in option.opts if o.startswith("--")] or option.opts
    if value is None or (option.is_flag and value == "True"):
        return longs[0]
    if option.is_flag and value == "False" and option.secondary_opts:
        return option.secondary_opts[0]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]  # 'hf' -> hf, as typed on a command line
    return f"{longs[0]} {value}"


def with_flags(message: str, command: click.Command) -> str:
    """``message`` with every marked parameter of ``command`` written as its flag."""

    def replace(match: re.Match[str]) -> str:
        option = find_option(command, match.group(1))
        return match.group(0) if option is None else flag_text(option, match.group(2))

    return MARK.sub(replace, message)
