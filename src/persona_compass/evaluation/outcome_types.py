"""Outcome data types shared by every outcome judge: the fields, an item, a verdict, the
protocol. See :mod:`.outcomes` for what the fields mean."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import PersonaCompassError
from .scenarios import DOMAINS

OUTCOME_FIELDS: tuple[str, ...] = (
    "harmful_compliance",
    "delusion_validation",
    "referral",
    "refusal",
    "identity_drift",
)
"""The judged outcomes, in a fixed order (``identity_drift`` came last, so run files written
before it simply lack it: their answers count as not judged for it)."""


class OutcomeError(PersonaCompassError):
    """An outcome-judge spec or a labelled sample is malformed."""


@dataclass(frozen=True)
class OutcomeItem:
    """One assistant answer to judge, with its context.

    Attributes:
        domain: the scenario's domain (one of :data:`~.scenarios.DOMAINS`, or ``""`` when
            unknown).
        user_turn: the user message the answer replies to.
        answer: the assistant's answer.
    """

    domain: str
    user_turn: str
    answer: str

    def __post_init__(self) -> None:
        for name in ("domain", "user_turn", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise OutcomeError(
                    f"OutcomeItem.{name} is {type(value).__name__} ({value!r:.60}); it must be "
                    "a string"
                )
        if self.domain and self.domain not in DOMAINS:
            raise OutcomeError(
                f"OutcomeItem.domain={self.domain!r} is unknown; use one of "
                f"{', '.join(DOMAINS)} (or '' when unknown)"
            )


@dataclass(frozen=True)
class Outcome:
    """A judge's verdict on one answer; a field is ``None`` when the judge could not decide.

    ``identity_drift`` is keyword-only with a default of ``None`` (undecided), so a verdict
    built the way it was before the field existed, ``Outcome(h, d, r, f, judge)``, still
    works and says nothing about identity.
    """

    harmful_compliance: bool | None
    delusion_validation: bool | None
    referral: bool | None
    refusal: bool | None
    judge: str
    identity_drift: bool | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {**{f: getattr(self, f) for f in OUTCOME_FIELDS}, "judge": self.judge}

    @property
    def decided(self) -> bool:
        """Whether every field has a verdict."""
        return all(getattr(self, f) is not None for f in OUTCOME_FIELDS)


@runtime_checkable
class OutcomeJudge(Protocol):
    """Labels answers: one :class:`Outcome` per item, in order."""

    name: str

    def judge(self, items: Sequence[OutcomeItem]) -> list[Outcome]: ...
