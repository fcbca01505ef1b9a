"""The ``persona-compass`` click group; command modules register themselves on it."""

from __future__ import annotations

import logging
from typing import Any

import click

from .. import __version__
from ..errors import PersonaCompassError
from .param_flags import with_flags

# ctx.meta key (the dict every context of one invocation shares): the command that runs
RUNNING = "persona_compass.command"


class CompassGroup(click.Group):
    """A click group that turns user errors into one clear line and exit code 1, naming the
    flags of the command that ran where the library's message names parameters."""

    group_class = type  # subgroups (axis, models) are CompassGroups too

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            ctx.meta[RUNNING] = command
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PersonaCompassError as exc:
            command = ctx.meta.get(RUNNING, self)
            raise click.ClickException(with_flags(str(exc), command)) from None


@click.group(cls=CompassGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="persona-compass")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool) -> None:
    """persona-compass: find a model's Assistant Axis, watch persona drift, and cap it.

    Every command that reads a model takes --model (an offline alias such as smollm2-135m,
    a Hugging Face id, a local folder or a .gguf file); every command that needs an axis
    takes --axis (a bundle folder). Errors are one line and a non-zero exit.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
