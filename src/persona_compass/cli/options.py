"""The options several commands share, each declared once: one flag, one type, one meaning.

A command that differs (a required ``--axis``, a fixed default ``--model``) says so through the
decorator's parameters; the flag, its Python name and its type stay the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

# The offline alias a command loads when nothing else names a model; the same value as
# persona_compass.models.DEFAULT_ALIAS (a test checks), kept here so --help loads no models.
DEFAULT_MODEL = "smollm2-135m"

AXIS_HELP = "Axis bundle folder, or the alias of a shipped bundle."
MODEL_HELP = "Model spec: an offline alias, a Hugging Face id, a local folder or a .gguf file."
BUNDLE_MODEL_DEFAULT = f"[default: the bundle's model, else {DEFAULT_MODEL}]"
DTYPE_HELP = (
    "Model dtype, e.g. bfloat16 or float32 (auto: the checkpoint's own) [default: "
    "$PERSONA_COMPASS_DTYPE, else bfloat16 where the hardware runs it fast, else float32]."
)

TOP_P_HELP = (
    "Nucleus sampling: sample among the most likely tokens that together hold this share of "
    "the probability (1: every token)."
)


def _help(text: str, suffix: str) -> str:
    return f"{text} {suffix}" if suffix else text


def axis_option(
    *, required: bool = False, default: str | None = None, help_suffix: str = ""
) -> Callable[[F], F]:
    """``--axis`` (``axis_path``): the axis bundle, a folder or a shipped alias."""
    return click.option(
        "--axis",
        "axis_path",
        required=required,
        default=default,
        show_default=default is not None,
        help=_help(AXIS_HELP, help_suffix),
    )


def model_option(
    *, default: str | None = None, required: bool = False, help_suffix: str = ""
) -> Callable[[F], F]:
    """``--model`` (``model_spec``): a model spec; ``help_suffix`` says what an absent one
    means for the command (or what else the command asks of it)."""
    return click.option(
        "--model",
        "model_spec",
        default=default,
        required=required,
        show_default=default is not None,
        help=_help(MODEL_HELP, help_suffix),
    )


def dtype_option(*, help_suffix: str = "") -> Callable[[F], F]:
    """``--dtype``: the dtype the model loads in (None: the loader's default)."""
    return click.option("--dtype", default=None, help=_help(DTYPE_HELP, help_suffix))


def max_new_tokens_option(*, default: int | None, help_suffix: str = "") -> Callable[[F], F]:
    """``--max-new-tokens``: the most tokens one answer may have."""
    return click.option(
        "--max-new-tokens",
        type=click.IntRange(min=1),
        default=default,
        show_default=default is not None,
        help=_help("Most tokens per answer.", help_suffix),
    )


def temperature_option(*, default: float | None, help_suffix: str = "") -> Callable[[F], F]:
    """``--temperature``: the sampling temperature, 0 for greedy decoding."""
    return click.option(
        "--temperature",
        type=click.FloatRange(min=0),
        default=default,
        show_default=default is not None,
        help=_help("Sampling temperature (0: greedy).", help_suffix),
    )


def top_p_option(*, default: float | None, help_suffix: str = "") -> Callable[[F], F]:
    """``--top-p``: nucleus sampling, in (0, 1]."""
    return click.option(
        "--top-p",
        type=click.FloatRange(min=0, max=1, min_open=True),
        default=default,
        show_default=default is not None,
        help=_help(TOP_P_HELP, help_suffix),
    )


def repetition_penalty_option(*, default: float | None) -> Callable[[F], F]:
    """``--repetition-penalty``: above 0, 1 for none."""
    return click.option(
        "--repetition-penalty",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=default is not None,
        help="Repetition penalty (1: none).",
    )


def seed_option(*, default: int | None, help_suffix: str = "") -> Callable[[F], F]:
    """``--seed``: the sampling seed."""
    return click.option(
        "--seed",
        type=int,
        default=default,
        show_default=default is not None,
        help=_help("Sampling seed.", help_suffix),
    )


TRAIT_HELP = (
    "A trait axis bundle (folder or alias, e.g. smollm2-135m-sycophancy) read beside the "
    "Assistant Axis at its own monitor layer; repeatable. Its readings are a projection and "
    "a percentile (high = more of the trait), and its alerts fire when the trait goes high."
)


def trait_option(*, help_suffix: str = "") -> Callable[[F], F]:
    """``--trait`` (``trait_specs``, repeatable): trait needles read beside the axis."""
    return click.option(
        "--trait", "trait_specs", multiple=True, help=_help(TRAIT_HELP, help_suffix)
    )
