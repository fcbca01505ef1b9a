"""Helpers shared by commands: loading an axis bundle and its model together, alert rules."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..alerts import AlertRules

ALERT_RULES_HELP = (
    "Drift alert rules as a JSON object or a JSON file, e.g. '{\"turn_run\": 2}'. Fields: "
    "token_percentile, token_run, turn_percentile, turn_run, trend_turns, trend_drop "
    "(defaults 5, 16, 25, 1, 2, 40; a count of 0 turns a rule off)."
)


def alert_rules_option(function: Any) -> Any:
    """The ``--alert-rules`` option shared by chat, serve and evaluate."""
    return click.option("--alert-rules", "alert_rules", default=None, help=ALERT_RULES_HELP)(
        function
    )


def parse_alert_rules(value: str | None) -> AlertRules | None:
    """``--alert-rules``: JSON object text, or the path of a JSON file holding one."""
    from ..alerts import AlertRules, AlertRulesError
    from ..jsonio import JSONInputError, parse_json

    if value is None:
        return None
    text, where = value, "--alert-rules"
    if not value.lstrip().startswith("{"):
        shown = value if len(value) <= 80 else value[:77] + "..."
        path = Path(value).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError):  # missing, a folder, a name too long, not UTF-8
            raise AlertRulesError(
                f"--alert-rules {shown!r} is neither a JSON object nor a readable JSON file"
            ) from None
        where = f"--alert-rules file {path}"
    try:
        data = parse_json(text, where)
    except JSONInputError as exc:
        raise AlertRulesError(str(exc)) from None
    return AlertRules.from_dict(data)


def load_axis_and_model(
    axis_path: str, model_spec: str | None, dtype: str | None = None
) -> tuple[Any, Any, Any, str]:
    """Open an axis bundle, then load the model (default: the bundle's model) checked
    against it (see :class:`~persona_compass.Bundle`).

    Returns (axis, model, tokenizer, model spec used).
    """
    from ..bundle import Bundle

    bundle = Bundle.open(axis_path)
    model, tokenizer = bundle.load_model(model_spec, dtype=dtype)
    return bundle.axis, model, tokenizer, bundle.model_spec(model_spec)
