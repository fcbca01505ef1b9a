"""A small exact-match capability set, with confidence intervals for accuracy and for paired
differences.

Capping must not make a model worse at ordinary work. The research checked this on IFEval,
MMLU-Pro, GSM8k and EQ-Bench; this set is a quick local stand-in that even a 135M model can
sometimes answer: simple arithmetic, very common facts and format following, each scored by
exact match, no judge needed.

File schema (``data/capability.json``): a JSON list of items, or ``{"items": [...]}``. Each
item is an object with

==================  ============================================================================
key                 value
==================  ============================================================================
``id``              a unique name (``"arith-007"``)
``category``        a free-form group name; the shipped set uses ``arithmetic``, ``facts`` and
                    ``format``
``prompt``          the user message
``answer``          the canonical answer (a string)
``accept``          optional: a list of other accepted answers (``["CO2"]``)
``match``           optional, default ``"exact"``: how a reply is compared (below)
``case_sensitive``  optional, default ``false``: compare letters' case too (``exact``, ``word``)
==================  ============================================================================

Match modes (:data:`MATCH_MODES`), tried against ``answer`` and each of ``accept``:

* ``number`` - the first number in the reply (``-3``, ``12``, ``1,000``, ``2.5``) equals the
  answer as a number. "12", "The answer is 12." and "12 apples" match 12; "7 + 5 = 12" does
  not (its first number is 7), which is why the prompts ask for the number only.
* ``exact`` - the whole reply equals the answer after normalisation: surrounding whitespace,
  markdown emphasis (``**``, ``__``, backticks) around the whole reply and one trailing
  period are removed, runs of whitespace become one space, spaces before commas go, and
  letters are case-folded unless ``case_sensitive``.
* ``word`` - the answer appears as a whole word (or phrase) in the first non-empty line of
  the reply, case-insensitively unless ``case_sensitive``: "Paris." and "The capital is
  Paris" match ``Paris``; "Parisian" does not.

Statistics:

* :func:`accuracy_with_ci` - accuracy with a Wilson score 95% interval;
* :func:`paired_difference_ci` - the accuracy difference ``b - a`` on the same items, with
  the Agresti-Min adjusted Wald 95% interval (see the function);
* :func:`unchanged_answers` - how many items a condition answers exactly as the baseline
  does (token-identical greedy answers), whatever their correctness.

Example::

    items = load_capability_items()
    correct = [score_answer(item, reply) for item, reply in zip(items, replies)]
    acc, lo, hi = accuracy_with_ci(correct)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PersonaCompassError
from .data_files import load_item_rows

MATCH_MODES: tuple[str, ...] = ("number", "exact", "word")
"""How a reply is compared with the answer (see the module docstring)."""

CAPABILITY_FILE = "capability.json"
Z95 = 1.959963984540054
"""The two-sided 95% quantile of the standard normal distribution."""

_KEYS = ("id", "category", "prompt", "answer", "accept", "match", "case_sensitive")
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_EMPHASIS = ("**", "__", "`")


class CapabilityError(PersonaCompassError):
    """A capability file is missing or malformed, or statistics were asked of no data."""


@dataclass(frozen=True)
class CapabilityItem:
    """One exact-match item (the fields are described in the module docstring)."""

    id: str
    category: str
    prompt: str
    answer: str
    accept: tuple[str, ...] = ()
    match: str = "exact"
    case_sensitive: bool = False

    def __post_init__(self) -> None:
        if self.match not in MATCH_MODES:
            raise CapabilityError(
                f"capability item {self.id!r}: match={self.match!r}; use one of "
                + ", ".join(MATCH_MODES)
            )
        if self.match == "number":
            for answer in self.answers:
                if _parse_number(answer) is None:
                    raise CapabilityError(
                        f"capability item {self.id!r}: match='number' but {answer!r} is not a "
                        "number; write the answer in digits or use match 'exact'"
                    )

    @property
    def answers(self) -> tuple[str, ...]:
        """The canonical answer followed by the other accepted answers."""
        return (self.answer, *self.accept)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (optional keys only when they differ from the defaults)."""
        out: dict[str, Any] = {
            "id": self.id,
            "category": self.category,
            "prompt": self.prompt,
            "answer": self.answer,
        }
        if self.accept:
            out["accept"] = list(self.accept)
        if self.match != "exact":
            out["match"] = self.match
        if self.case_sensitive:
            out["case_sensitive"] = True
        return out


# --------------------------------------------------------------------------- scoring


def _parse_number(text: str) -> float | None:
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    return float(match.group().replace(",", ""))


def _strip_emphasis(text: str) -> str:
    changed = True
    while changed and text:
        changed = False
        for mark in _EMPHASIS:
            if len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
                text = text[len(mark) : -len(mark)].strip()
                changed = True
    return text


def normalise(text: str, case_sensitive: bool = False) -> str:
    """The ``exact`` mode's normalisation (see the module docstring)."""
    text = _strip_emphasis(text.strip())
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+,", ",", text)
    return text if case_sensitive else text.casefold()


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line
    return ""


def score_answer(item: CapabilityItem, reply: str | None) -> bool:
    """Whether ``reply`` answers ``item`` correctly under the item's match mode.

    ``None`` or an empty reply is wrong.

    Example:
        >>> item = CapabilityItem("a1", "arithmetic", "What is 7 + 5?", "12", match="number")
        >>> score_answer(item, "12"), score_answer(item, "The answer is 12."), score_answer(
        ...     item, "13")
        (True, True, False)
    """
    if not reply or not reply.strip():
        return False
    if item.match == "number":
        got = _parse_number(reply)
        if got is None:
            return False
        for answer in item.answers:
            want = _parse_number(answer)
            if want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9):
                return True
        return False
    if item.match == "exact":
        got_text = normalise(reply, item.case_sensitive)
        return any(got_text == normalise(a, item.case_sensitive) for a in item.answers)
    line = _first_line(reply)
    flags = 0 if item.case_sensitive else re.IGNORECASE
    for answer in item.answers:
        words = r"\s+".join(re.escape(w) for w in answer.split())
        if words and re.search(r"(?<!\w)" + words + r"(?!\w)", line, flags):
            return True
    return False


# --------------------------------------------------------------------------- loading


def _parse_item(row: object, where: str) -> CapabilityItem:
    if not isinstance(row, Mapping):
        raise CapabilityError(f"{where}: is a {type(row).__name__}; write an object")
    unknown = sorted(str(k) for k in row if k not in _KEYS)
    if unknown:
        raise CapabilityError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(_KEYS)}"
        )
    for key in ("id", "category", "prompt", "answer"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise CapabilityError(
                f"{where}: '{key}' is {value!r:.60}; every item needs a non-empty string "
                f"'{key}' (write numbers as strings, e.g. \"12\")"
            )
    where = f"{where} (id {row['id']!r})"
    accept = row.get("accept", [])
    if isinstance(accept, str) or not isinstance(accept, Sequence):
        raise CapabilityError(f"{where}: 'accept' must be a list of strings, got {accept!r:.60}")
    if not all(isinstance(a, str) and a.strip() for a in accept):
        raise CapabilityError(f"{where}: every 'accept' entry must be a non-empty string")
    match = row.get("match", "exact")
    if match not in MATCH_MODES:
        raise CapabilityError(f"{where}: match={match!r}; use one of {', '.join(MATCH_MODES)}")
    case = row.get("case_sensitive", False)
    if not isinstance(case, bool):
        raise CapabilityError(f"{where}: case_sensitive={case!r}; write true or false")
    try:
        return CapabilityItem(
            id=row["id"].strip(),
            category=row["category"].strip(),
            prompt=row["prompt"].strip(),
            answer=row["answer"].strip(),
            accept=tuple(a.strip() for a in accept),
            match=match,
            case_sensitive=case,
        )
    except CapabilityError as exc:
        raise CapabilityError(f"{where}: {exc}") from exc


def load_capability_items(path: str | Path | None = None) -> list[CapabilityItem]:
    """Read capability items from the shipped set or a file with the same schema.

    Args:
        path: a JSON file; ``None`` for the shipped ``data/capability.json``.

    Raises:
        CapabilityError: the file is unreadable or malformed, or two items share an id (the
            message names the file, the item index and id, and the fix).
    """
    data, label = load_item_rows(
        path, shipped=CAPABILITY_FILE, what="the capability file", error=CapabilityError
    )
    items: list[CapabilityItem] = []
    seen: set[str] = set()
    for index, row in enumerate(data):
        item = _parse_item(row, f"{label}: item {index}")
        if item.id in seen:
            raise CapabilityError(
                f"{label}: item {index} repeats the id {item.id!r}; make ids unique"
            )
        seen.add(item.id)
        items.append(item)
    return items


# --------------------------------------------------------------------------- statistics


def _bools(values: Sequence[bool], name: str) -> list[bool]:
    out = []
    for v in values:
        if isinstance(v, (str, bytes)) or v is None or v not in (0, 1):
            raise CapabilityError(f"{name} must hold booleans, got {v!r}")
        out.append(bool(v))
    return out


def accuracy_with_ci(correct: Sequence[bool], z: float = Z95) -> tuple[float, float, float]:
    """Accuracy and its Wilson score interval (95% by default).

    With ``k`` correct of ``n`` and ``p = k / n``, the interval is
    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; unlike the plain normal
    interval it stays inside [0, 1] and is not empty at ``p = 0`` or ``1``.

    Returns:
        ``(accuracy, low, high)``.

    Raises:
        CapabilityError: ``correct`` is empty.

    Example:
        >>> tuple(round(x, 4) for x in accuracy_with_ci([True] * 8 + [False] * 2))
        (0.8, 0.4902, 0.9433)
    """
    values = _bools(correct, "correct")
    n = len(values)
    if n == 0:
        raise CapabilityError("accuracy_with_ci needs at least one scored item")
    p = sum(values) / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if p == 0 else max(0.0, centre - half)
    high = 1.0 if p == 1 else min(1.0, centre + half)
    return p, low, high


def paired_difference_ci(
    a: Sequence[bool], b: Sequence[bool], z: float = Z95
) -> tuple[float, float, float]:
    """Accuracy difference ``b - a`` on the same items, with a 95% interval.

    ``a`` and ``b`` are per-item correctness under two conditions (say uncapped and capped),
    in the same item order. With ``n10`` items right in ``a`` only and ``n01`` right in ``b``
    only, the difference is ``(n01 - n10) / n``. The interval is Agresti and Min's (2005)
    adjusted Wald interval for matched proportions: add 0.5 to each cell of the paired 2x2
    table (so ``n`` grows by 2), then
    ``d* ± z·sqrt((p01 + p10 - (p01 - p10)²) / (n + 2))`` with
    ``p01 = (n01 + 0.5) / (n + 2)``, ``p10 = (n10 + 0.5) / (n + 2)`` and
    ``d* = p01 - p10``, clipped to [-1, 1]. The adjustment keeps the interval from
    collapsing to a point when the two conditions agree on every item.

    Returns:
        ``(difference, low, high)``; the difference is the observed one, unadjusted.

    Raises:
        CapabilityError: the sequences are empty or of different lengths.
    """
    xs = _bools(a, "a")
    ys = _bools(b, "b")
    if len(xs) != len(ys):
        raise CapabilityError(
            f"paired_difference_ci needs the same items under both conditions: got "
            f"{len(xs)} and {len(ys)} results"
        )
    n = len(xs)
    if n == 0:
        raise CapabilityError("paired_difference_ci needs at least one scored item")
    n01 = sum(1 for x, y in zip(xs, ys, strict=True) if not x and y)
    n10 = sum(1 for x, y in zip(xs, ys, strict=True) if x and not y)
    diff = (n01 - n10) / n
    m = n + 2
    p01 = (n01 + 0.5) / m
    p10 = (n10 + 0.5) / m
    centre = p01 - p10
    half = z * math.sqrt(max(p01 + p10 - centre * centre, 0.0) / m)
    return diff, max(-1.0, centre - half), min(1.0, centre + half)


def summarize(items: Sequence[CapabilityItem], correct: Sequence[bool]) -> dict[str, Any]:
    """Accuracy with Wilson intervals overall and per category.

    Returns:
        ``{"overall": {"n", "correct", "accuracy", "low", "high"}, "categories": {name: {...}}}``
        (categories in first-seen order).
    """
    flags = _bools(correct, "correct")
    if len(items) != len(flags):
        raise CapabilityError(f"{len(items)} items but {len(flags)} results")

    def block(values: list[bool]) -> dict[str, Any]:
        acc, lo, hi = accuracy_with_ci(values)
        return {"n": len(values), "correct": sum(values), "accuracy": acc, "low": lo, "high": hi}

    groups: dict[str, list[bool]] = {}
    for item, flag in zip(items, flags, strict=True):
        groups.setdefault(item.category, []).append(flag)
    return {
        "overall": block(flags),
        "categories": {name: block(values) for name, values in groups.items()},
    }


UNCHANGED_BASES: tuple[str, ...] = ("tokens", "text", "mixed")
"""What :func:`unchanged_answers` compared: generated token ids, reply text (rows written
before token ids were stored), or some pairs each way."""


def unchanged_answers(
    baseline: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """How many items a condition answers exactly as the baseline does.

    Rows are a capability unit's items (``{"id", "reply", "token_ids"?, ...}``), paired by
    ``id``. A pair is unchanged when both rows' ``token_ids`` are equal. If either row lacks
    ``token_ids`` (a unit written before they were stored), the replies' exact texts are
    compared instead; decoded text can hide a token difference, so a share on text is an upper
    bound of the token-identical share.

    Returns:
        ``{"unchanged", "n", "unchanged_share", "unchanged_basis"}``: the count, the number
        of baseline items, their ratio, and one of :data:`UNCHANGED_BASES`.

    Raises:
        CapabilityError: the baseline has no rows, or ``rows`` lack some baseline item (the
            message names up to three).

    Example:
        >>> base = [{"id": "a", "reply": "4", "token_ids": [19]},
        ...         {"id": "b", "reply": "Paris", "token_ids": [7, 8]}]
        >>> mine = [{"id": "b", "reply": "Paris", "token_ids": [7, 9]},
        ...         {"id": "a", "reply": "4", "token_ids": [19]}]
        >>> unchanged_answers(base, mine)["unchanged"]
        1
    """
    if not baseline:
        raise CapabilityError("unchanged_answers needs at least one baseline item")
    mine = {row["id"]: row for row in rows}
    lacking = [row["id"] for row in baseline if row["id"] not in mine]
    if lacking:
        raise CapabilityError(
            f"unchanged_answers: the condition lacks {len(lacking)} baseline item(s) "
            f"({', '.join(map(str, lacking[:3]))}); compare units of the same item set"
        )
    same = on_tokens = 0
    for row in baseline:
        other = mine[row["id"]]
        a, b = row.get("token_ids"), other.get("token_ids")
        if a is not None and b is not None:
            on_tokens += 1
            same += list(a) == list(b)
        else:
            same += row.get("reply") == other.get("reply")
    n = len(baseline)
    basis = "tokens" if on_tokens == n else "text" if on_tokens == 0 else "mixed"
    return {"unchanged": same, "n": n, "unchanged_share": same / n, "unchanged_basis": basis}
