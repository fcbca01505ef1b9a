"""The slash commands: their table, usage errors and argument helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from ..compass import Steering
from ..errors import PersonaCompassError
from ..transcripts import Transcript

CHART_SUFFIXES = (".png", ".html", ".htm")


class CommandError(PersonaCompassError):
    """A slash command that cannot run as typed; the message carries its usage."""


@dataclass(frozen=True)
class Command:
    """One slash command: how to type it and what it does."""

    name: str
    usage: str
    help: str


COMMANDS: tuple[Command, ...] = (
    Command(
        "/cap",
        "/cap [on|off|adaptive]",
        "capping always on, off, or adaptive (engaged after an alert, released once the "
        "answers recover); no argument: show the state",
    ),
    Command(
        "/steer",
        "/steer C [LAYERS] | /steer off",
        "add C times the axis while answering (C > 0 toward the Assistant, < 0 away) on "
        "LAYERS (e.g. 20, 16:24, 3,5 or all; default: the monitor layer)",
    ),
    Command("/system", "/system [TEXT]", "set the system prompt; without TEXT remove it"),
    Command("/save", "/save FILE", "write the transcript with every live reading (JSON)"),
    Command(
        "/load",
        "/load FILE [N|LABEL]",
        "continue from a transcript (it replaces the conversation; a file holding several "
        "conversations: pick one by number or label, default the first)",
    ),
    Command(
        "/chart",
        "/chart [FILE.png|FILE.html]",
        "the per-turn percentiles so far as a table; with FILE, write a PNG or HTML chart",
    ),
    Command("/status", "/status", "model, axis, capping, steering and sampling in use"),
    Command("/reset", "/reset", "start a new conversation (keeps the system prompt and settings)"),
    Command("/help", "/help", "this list"),
    Command("/quit", "/quit", "leave (also /exit, or Ctrl-D)"),
)
ALIASES = {"/exit": "/quit", "/q": "/quit", "/?": "/help", "/h": "/help"}
_BY_NAME = {c.name: c for c in COMMANDS}


def command_name(head: str) -> str:
    """The command a typed word names, aliases resolved; an unknown one raises."""
    name = ALIASES.get(head.lower(), head.lower())
    if name not in _BY_NAME:
        names = " ".join(c.name for c in COMMANDS)
        raise CommandError(f"unknown command {head}; commands: {names} (/help explains)")
    return name


def usage_error(name: str, problem: str) -> CommandError:
    """A :class:`CommandError` for command ``name``, with its usage appended."""
    return CommandError(f"{problem}; usage: {_BY_NAME[name].usage}")


def help_table() -> Table:
    """The ``/help`` listing: each command's usage and what it does."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for c in COMMANDS:
        table.add_row(c.usage, c.help)
    table.add_row("//TEXT", "send TEXT starting with '/' as a message")
    return table


def steer_text(steer: Steering) -> str:
    """A steering setting in words, e.g. ``+2 × axis on layers 16:24``."""
    layers = "the monitor layer" if steer.layers is None else _layers_text(steer.layers)
    return f"{steer.coefficient:+g} × axis on {layers}"


def _layers_text(layers: Sequence[int]) -> str:
    values = sorted(set(layers))
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"layers {values[0]}:{values[-1] + 1}"
    return ("layer " if len(values) == 1 else "layers ") + ",".join(map(str, values))


def pick_transcript(transcripts: list[Transcript], which: str | None, where: str) -> Transcript:
    """One conversation of a file: the first, or by 1-based number or label."""
    if which is None:
        return transcripts[0]
    if which.isdigit() and 1 <= int(which) <= len(transcripts):
        return transcripts[int(which) - 1]
    for t in transcripts:
        if t.label == which:
            return t
    labels = ", ".join(t.label or str(i) for i, t in enumerate(transcripts, 1))
    raise CommandError(
        f"{where} holds {len(transcripts)} conversation(s) ({labels}); "
        f"{which!r} is neither a number from 1 to {len(transcripts)} nor a label"
    )
