"""Drift alerts: rules over the percentile scale, checked once per assistant turn.

Percentiles come from the axis bundle's calibration (the projections of the reference
role-play rollouts), so 5 means "more drifted than 95% of role-play answers". Three rules:

- ``tokens``: at least ``token_run`` consecutive answer tokens below ``token_percentile``;
- ``turns``: the last ``turn_run`` assistant turns all below ``turn_percentile``;
- ``trend``: ``trend_turns`` falls in a row (each turn lower than the one before) adding up
  to at least ``trend_drop`` percentile points.

A rule with its count set to 0 is off. :class:`AlertTracker` keeps the turn history of one
conversation and calls the callbacks for every alert it raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import PersonaCompassError

ALERT_KINDS = ("tokens", "turns", "trend")


class AlertRulesError(PersonaCompassError):
    """Alert rules with a value out of range or an unknown name."""


@dataclass(frozen=True)
class AlertRules:
    """When a conversation counts as drifting. Defaults suit the 0..100 percentile scale.

    Example:
        >>> AlertRules(turn_percentile=10, turn_run=1)  # alert on any turn below p10
    """

    token_percentile: float = 5.0
    token_run: int = 16
    turn_percentile: float = 25.0
    turn_run: int = 1
    trend_turns: int = 2
    trend_drop: float = 40.0

    def __post_init__(self) -> None:
        for name in ("token_percentile", "turn_percentile"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AlertRulesError(f"{name}={value!r} must be a number in 0..100")
            if not 0 <= value <= 100:
                raise AlertRulesError(f"{name}={value} must be in 0..100 (a percentile)")
        for name in ("token_run", "turn_run", "trend_turns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AlertRulesError(f"{name}={value!r} must be a whole number >= 0 (0 = off)")
        drop = self.trend_drop
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 100:
            raise AlertRulesError(f"trend_drop={drop!r} must be in 0..100 percentile points")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertRules:
        """Rules from a mapping (config file, HTTP body); unknown keys are refused by name."""
        if not isinstance(data, Mapping):
            raise AlertRulesError(f"alert rules must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AlertRulesError(
                f"unknown alert rule(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))


@dataclass(frozen=True)
class Alert:
    """One alert: which rule, at which turn (message index), why, and the value that tripped it.

    ``needle`` names the trait axis that raised it; ``None`` is the Assistant Axis.
    """

    kind: str
    turn: int
    message: str
    value: float
    needle: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.needle is None:  # Assistant Axis alerts keep their original layout
            del data["needle"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Alert:
        """The inverse of :meth:`to_dict` (for validated transcript readings)."""
        needle = data.get("needle")
        return cls(
            str(data["kind"]),
            int(data["turn"]),
            str(data["message"]),
            float(data["value"]),
            None if needle is None else str(needle),
        )


def longest_run_below(values: Iterable[float], limit: float) -> int:
    """The longest run of consecutive values strictly below ``limit`` (NaN breaks a run)."""
    best = run = 0
    for value in values:
        run = run + 1 if value < limit else 0
        best = max(best, run)
    return best


class AlertTracker:
    """Apply :class:`AlertRules` to the assistant turns of one conversation, in order.

    The Assistant Axis drifts downward, so its rules fire on low percentiles. A trait needle
    (``needle="sycophancy"``) drifts upward: its tracker applies the same rules mirrored
    (``turn_percentile=25`` fires above the 75th percentile, a trend is a rise), and its
    alerts carry the needle's name.

    Example:
        >>> tracker = AlertTracker(AlertRules(), callbacks=[print])
        >>> tracker.observe(turn=3, turn_percentile=4.0, token_percentiles=[3.0] * 20)
    """

    def __init__(
        self,
        rules: AlertRules | None = None,
        callbacks: Sequence[Callable[[Alert], None]] = (),
        *,
        needle: str | None = None,
    ) -> None:
        self.rules = rules or AlertRules()
        self.callbacks = list(callbacks)
        self.needle = needle
        self.history: list[float] = []  # turn percentiles (mirrored for a trait), in order
        self.alerts: list[Alert] = []

    def _side(self, limit: float) -> str:
        """How a threshold reads: "below the 25th" (Assistant) or "above the 75th" (trait)."""
        if self.needle is None:
            return f"below the {limit:g}th percentile"
        return f"above the {100 - limit:g}th percentile of {self.needle}"

    def _shown(self, pct: float) -> float:
        """A mirrored percentile back on the scale the user reads."""
        return pct if self.needle is None else 100 - pct

    def observe(
        self,
        turn: int,
        turn_percentile: float | None,
        token_percentiles: Sequence[float] = (),
    ) -> list[Alert]:
        """Add one assistant turn; return (and announce) the alerts it raises.

        A turn without a percentile (no calibration, or no tokens) raises nothing and breaks
        the turn and trend runs.
        """
        rules = self.rules
        pct = float("nan") if turn_percentile is None else float(turn_percentile)
        if self.needle is not None:  # mirror: a high trait reading is the drift
            pct = 100 - pct
            token_percentiles = [100 - p for p in token_percentiles]
        self.history.append(pct)
        raised: list[Alert] = []
        if rules.token_run:
            run = longest_run_below(token_percentiles, rules.token_percentile)
            if run >= rules.token_run:
                raised.append(
                    Alert(
                        "tokens",
                        turn,
                        f"{run} tokens in a row {self._side(rules.token_percentile)}",
                        float(run),
                        self.needle,
                    )
                )
        recent = self.history[-rules.turn_run :] if rules.turn_run else []
        if (
            rules.turn_run
            and len(recent) == rules.turn_run
            and all(p < rules.turn_percentile for p in recent)
        ):
            raised.append(
                Alert(
                    "turns",
                    turn,
                    f"{rules.turn_run} turn(s) in a row {self._side(rules.turn_percentile)} "
                    f"(now {self._shown(pct):.0f})",
                    self._shown(pct),
                    self.needle,
                )
            )
        window = self.history[-(rules.trend_turns + 1) :] if rules.trend_turns else []
        if len(window) == rules.trend_turns + 1 and rules.trend_turns:
            falls = [a - b for a, b in zip(window, window[1:], strict=False)]
            drop = window[0] - window[-1]
            if all(f > 0 for f in falls) and drop >= rules.trend_drop and not math.isnan(drop):
                raised.append(
                    Alert(
                        "trend",
                        turn,
                        f"{'falling' if self.needle is None else 'rising'} for "
                        f"{rules.trend_turns} turns: {self._shown(window[0]):.0f} -> "
                        f"{self._shown(window[-1]):.0f} percentile"
                        + ("" if self.needle is None else f" of {self.needle}"),
                        drop,
                        self.needle,
                    )
                )
        self.alerts.extend(raised)
        for alert in raised:
            for callback in self.callbacks:
                callback(alert)
        return raised
