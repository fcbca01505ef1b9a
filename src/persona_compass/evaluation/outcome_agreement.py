"""Measuring an outcome judge against the hand-labelled sample (``data/outcome_sample.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data_files import load_item_rows, package_label
from .outcome_heuristic import HeuristicOutcomeJudge
from .outcome_types import OUTCOME_FIELDS, OutcomeError, OutcomeItem, OutcomeJudge
from .scenarios import DOMAINS

SAMPLE_FILE = "outcome_sample.json"
PACKAGE_LABEL = package_label(SAMPLE_FILE)


@dataclass(frozen=True)
class LabelledOutcome:
    """A hand-labelled answer from the outcome sample."""

    id: str
    item: OutcomeItem
    labels: dict[str, bool]
    note: str = ""


def load_outcome_sample(path: str | Path | None = None) -> list[LabelledOutcome]:
    """Read a labelled sample: a JSON list (or ``{"items": [...]}``) of objects
    ``{"id", "domain", "user_turn", "answer", "labels": {field: bool, ...}}`` with all four
    :data:`OUTCOME_FIELDS` in ``labels`` and an optional ``"note"``.

    Args:
        path: a JSON file; ``None`` for the shipped ``data/outcome_sample.json``.

    Raises:
        OutcomeError: the file is unreadable or an item is malformed (the message names the
            file, the item index and id, and the fix).
    """
    data, label = load_item_rows(
        path, shipped=SAMPLE_FILE, what="the outcome sample", error=OutcomeError
    )
    out: list[LabelledOutcome] = []
    seen: set[str] = set()
    for index, row in enumerate(data):
        where = f"{label}: item {index}"
        if not isinstance(row, Mapping):
            raise OutcomeError(f"{where} is a {type(row).__name__}; write an object")
        for key in ("id", "user_turn", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise OutcomeError(f"{where} needs a non-empty string '{key}'")
        where = f"{where} (id {row['id']!r})"
        if row["id"] in seen:
            raise OutcomeError(f"{where} repeats an id; make ids unique")
        seen.add(row["id"])
        domain = row.get("domain", "")
        if not isinstance(domain, str) or (domain and domain not in DOMAINS):
            raise OutcomeError(
                f"{where} has domain={domain!r}; use one of {', '.join(DOMAINS)} or leave it out"
            )
        labels = row.get("labels")
        if not isinstance(labels, Mapping):
            raise OutcomeError(f"{where} needs 'labels': {{{', '.join(OUTCOME_FIELDS)}}}")
        bad = [f for f in OUTCOME_FIELDS if not isinstance(labels.get(f), bool)]
        extra = sorted(str(k) for k in labels if k not in OUTCOME_FIELDS)
        if bad or extra:
            raise OutcomeError(
                f"{where}: labels must give true/false for exactly {', '.join(OUTCOME_FIELDS)}"
                + (f"; missing or not boolean: {', '.join(bad)}" if bad else "")
                + (f"; unknown: {', '.join(extra)}" if extra else "")
            )
        note = row.get("note", "")
        out.append(
            LabelledOutcome(
                row["id"],
                OutcomeItem(domain, row["user_turn"], row["answer"]),
                {f: bool(labels[f]) for f in OUTCOME_FIELDS},
                note if isinstance(note, str) else "",
            )
        )
    return out


def outcome_agreement(judge: OutcomeJudge, path: str | Path | None = None) -> dict[str, Any]:
    """Judge the labelled sample and compare with the hand labels, field by field.

    (The role judges' :func:`~persona_compass.persona_space.judges.agreement` compares 0-3
    scores; these are four independent booleans, so the counts are per field.)

    Args:
        judge: any :class:`OutcomeJudge`.
        path: a labelled sample; ``None`` for the shipped one.

    Returns:
        ``{"judge", "n", "exact_match", "fields": {field: {...}}, "mismatches": {field: [ids]}}``
        where each field has ``accuracy`` (agreement over all items, an undecided verdict
        counting as wrong), ``agree``, ``undecided``, ``positives`` (labelled true),
        ``predicted`` (judged true), ``tp``, ``fp``, ``fn``, ``tn``, ``precision`` and
        ``recall`` (``None`` when undefined); ``exact_match`` is the share of items with all
        four fields right.

    Example:
        >>> result = outcome_agreement(HeuristicOutcomeJudge())
        >>> sorted(result["fields"])  # doctest: +NORMALIZE_WHITESPACE
        ['delusion_validation', 'harmful_compliance', 'referral', 'refusal']
    """
    sample = load_outcome_sample(path)
    verdicts = judge.judge([s.item for s in sample])
    if len(verdicts) != len(sample):
        raise OutcomeError(
            f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(sample)} items"
        )
    n = len(sample)
    fields: dict[str, dict[str, Any]] = {}
    mismatches: dict[str, list[str]] = {}
    all_right = [True] * n
    for field in OUTCOME_FIELDS:
        tp = fp = fn = tn = undecided = 0
        wrong: list[str] = []
        for k, (labelled, verdict) in enumerate(zip(sample, verdicts, strict=True)):
            truth = labelled.labels[field]
            guess = getattr(verdict, field)
            if guess is None:
                undecided += 1
            elif guess and truth:
                tp += 1
            elif guess and not truth:
                fp += 1
            elif truth:
                fn += 1
            else:
                tn += 1
            if guess is None or guess != truth:
                wrong.append(labelled.id)
                all_right[k] = False
        predicted = tp + fp
        positives = sum(s.labels[field] for s in sample)
        fields[field] = {
            "accuracy": (tp + tn) / n,
            "agree": tp + tn,
            "undecided": undecided,
            "positives": positives,
            "predicted": predicted,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "precision": tp / predicted if predicted else None,
            "recall": tp / positives if positives else None,
        }
        mismatches[field] = wrong
    return {
        "judge": judge.name,
        "n": n,
        "exact_match": sum(all_right) / n,
        "fields": fields,
        "mismatches": mismatches,
    }


def heuristic_outcome_agreement(path: str | Path | None = None) -> dict[str, Any]:
    """:func:`outcome_agreement` for :class:`HeuristicOutcomeJudge`."""
    return outcome_agreement(HeuristicOutcomeJudge(), path)
