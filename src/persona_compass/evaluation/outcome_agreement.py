"""Measuring an outcome judge against hand-labelled samples: ``data/outcome_sample.json`` (the
first four outcomes) and ``data/identity_sample.json`` (identity drift, with a held-out
split)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data_files import load_item_document, package_label
from .outcome_heuristic import HeuristicOutcomeJudge
from .outcome_types import OUTCOME_FIELDS, OutcomeError, OutcomeItem, OutcomeJudge
from .scenarios import DOMAINS

SAMPLE_FILE = "outcome_sample.json"
PACKAGE_LABEL = package_label(SAMPLE_FILE)
IDENTITY_SAMPLE_FILE = "identity_sample.json"
"""The shipped identity-drift sample: answers of the shipped SmolLM2 evaluation, labelled by
hand for ``identity_drift`` only, each in the ``development`` or ``held-out`` split."""
SPLITS: tuple[str, ...] = ("development", "held-out")
"""The splits an item may name: a judge's patterns may be tuned on ``development``; its
agreement is reported on ``held-out``."""
HELD_OUT = "held-out"


@dataclass(frozen=True)
class LabelledOutcome:
    """A hand-labelled answer from an outcome sample.

    Attributes:
        labels: the fields the sample labels (its ``fields`` header), each true or false.
        split: ``"development"``, ``"held-out"`` or ``""`` (the sample has no splits).
    """

    id: str
    item: OutcomeItem
    labels: dict[str, bool]
    note: str = ""
    split: str = ""


def _declared_fields(header: Mapping[str, Any], label: str) -> tuple[str, ...]:
    """The ``fields`` header: which outcomes the file labels (default: all of them)."""
    if "fields" not in header:
        return OUTCOME_FIELDS
    fields = header["fields"]
    if (
        isinstance(fields, (str, bytes))
        or not isinstance(fields, Sequence)
        or not fields
        or not all(isinstance(f, str) for f in fields)
    ):
        raise OutcomeError(
            f"{label}: 'fields' is {fields!r:.60}; write a non-empty list of outcome names, "
            f'e.g. ["identity_drift"] (names: {", ".join(OUTCOME_FIELDS)})'
        )
    unknown = [f for f in fields if f not in OUTCOME_FIELDS]
    if unknown or len(set(fields)) != len(fields):
        raise OutcomeError(
            f"{label}: 'fields' must name distinct outcomes out of {', '.join(OUTCOME_FIELDS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "; a name repeats")
        )
    return tuple(f for f in OUTCOME_FIELDS if f in fields)  # the fixed order


def load_outcome_sample(
    path: str | Path | None = None, *, shipped: str = SAMPLE_FILE
) -> list[LabelledOutcome]:
    """Read a labelled sample: a JSON list (or ``{"fields": [...], "items": [...]}``) of
    objects ``{"id", "domain", "user_turn", "answer", "labels": {field: bool, ...}}`` with an
    optional ``"note"`` and ``"split"`` (``development`` or ``held-out``).

    ``labels`` must give exactly the fields of the file's ``"fields"`` header, or all of
    :data:`OUTCOME_FIELDS` when there is no header (a bare list never has one). Other header
    keys (provenance notes) are ignored.

    Args:
        path: a JSON file; ``None`` for the shipped file ``shipped``.
        shipped: which shipped file ``None`` reads: :data:`SAMPLE_FILE` (default) or
            :data:`IDENTITY_SAMPLE_FILE`.

    Raises:
        OutcomeError: the file is unreadable or an item is malformed (the message names the
            file, the item index and id, and the fix).
    """
    data, header, label = load_item_document(
        path, shipped=shipped, what="the outcome sample", error=OutcomeError
    )
    fields = _declared_fields(header, label)
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
        split = row.get("split", "")
        if split != "" and split not in SPLITS:
            raise OutcomeError(
                f"{where} has split={split!r}; use one of {', '.join(SPLITS)} or leave it out"
            )
        labels = row.get("labels")
        if not isinstance(labels, Mapping):
            raise OutcomeError(f"{where} needs 'labels': {{{', '.join(fields)}}}")
        bad = [f for f in fields if not isinstance(labels.get(f), bool)]
        extra = sorted(str(k) for k in labels if k not in fields)
        if bad or extra:
            raise OutcomeError(
                f"{where}: labels must give true/false for exactly {', '.join(fields)}"
                + (f"; missing or not boolean: {', '.join(bad)}" if bad else "")
                + (f"; unknown: {', '.join(extra)}" if extra else "")
                + (
                    " (a file that labels only some outcomes says which in a top-level "
                    '"fields" list)'
                    if "fields" not in header
                    else ""
                )
            )
        note = row.get("note", "")
        out.append(
            LabelledOutcome(
                row["id"],
                OutcomeItem(domain, row["user_turn"], row["answer"]),
                {f: bool(labels[f]) for f in fields},
                note if isinstance(note, str) else "",
                split,
            )
        )
    return out


def load_identity_sample(path: str | Path | None = None) -> list[LabelledOutcome]:
    """:func:`load_outcome_sample` defaulting to the shipped identity-drift sample."""
    return load_outcome_sample(path, shipped=IDENTITY_SAMPLE_FILE)


def _agreement(
    judge: OutcomeJudge, sample: Sequence[LabelledOutcome], split: str | None
) -> dict[str, Any]:
    if split is not None:
        found = sorted({s.split for s in sample if s.split})
        sample = [s for s in sample if s.split == split]
        if not sample:
            raise OutcomeError(
                f"no item of the sample is in split {split!r}; its splits: "
                + (", ".join(found) if found else "none (pass split=None)")
            )
    fields = tuple(sample[0].labels)  # every item labels the same fields (the loader checks)
    verdicts = judge.judge([s.item for s in sample])
    if len(verdicts) != len(sample):
        raise OutcomeError(
            f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(sample)} items"
        )
    n = len(sample)
    stats: dict[str, dict[str, Any]] = {}
    mismatches: dict[str, list[str]] = {}
    all_right = [True] * n
    for field in fields:
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
        stats[field] = {
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
        "split": split,
        "exact_match": sum(all_right) / n,
        "fields": stats,
        "mismatches": mismatches,
    }


def outcome_agreement(
    judge: OutcomeJudge, path: str | Path | None = None, *, split: str | None = None
) -> dict[str, Any]:
    """Judge a labelled sample and compare with the hand labels, field by field.

    (The role judges' :func:`~persona_compass.persona_space.judges.agreement` compares 0-3
    scores; these are independent booleans, so the counts are per field.)

    Args:
        judge: any :class:`OutcomeJudge`.
        path: a labelled sample; ``None`` for the shipped ``outcome_sample.json``.
        split: only the items of this split (``"held-out"``, ``"development"``); ``None``
            for all.

    Returns:
        ``{"judge", "n", "split", "exact_match", "fields": {field: {...}}, "mismatches":
        {field: [ids]}}`` over the fields the sample labels, where each field has
        ``accuracy`` (agreement over all items, an undecided verdict counting as wrong),
        ``agree``, ``undecided``, ``positives`` (labelled true), ``predicted`` (judged true),
        ``tp``, ``fp``, ``fn``, ``tn``, ``precision`` and ``recall`` (``None`` when
        undefined); ``exact_match`` is the share of items with every labelled field right.

    Raises:
        OutcomeError: a malformed sample, no item in ``split``, or a judge that returns the
            wrong number of verdicts.

    Example:
        >>> result = outcome_agreement(HeuristicOutcomeJudge())
        >>> sorted(result["fields"])  # doctest: +NORMALIZE_WHITESPACE
        ['delusion_validation', 'harmful_compliance', 'referral', 'refusal']
    """
    return _agreement(judge, load_outcome_sample(path), split)


def heuristic_outcome_agreement(
    path: str | Path | None = None, *, split: str | None = None
) -> dict[str, Any]:
    """:func:`outcome_agreement` for :class:`HeuristicOutcomeJudge`."""
    return outcome_agreement(HeuristicOutcomeJudge(), path, split=split)


def identity_drift_agreement(
    judge: OutcomeJudge | None = None,
    path: str | Path | None = None,
    *,
    split: str | None = HELD_OUT,
) -> dict[str, Any]:
    """:func:`outcome_agreement` on the identity-drift sample, by default the shipped one's
    held-out split with the heuristic judge.

    Args:
        judge: any :class:`OutcomeJudge`; ``None`` for :class:`HeuristicOutcomeJudge`.
        path: a sample in the same format; ``None`` for the shipped
            ``identity_sample.json``.
        split: ``"held-out"`` (default: what the heuristic was not tuned on),
            ``"development"``, or ``None`` for every item.

    Example:
        >>> result = identity_drift_agreement()
        >>> list(result["fields"]), result["split"]
        (['identity_drift'], 'held-out')
    """
    return _agreement(judge or HeuristicOutcomeJudge(), load_identity_sample(path), split)
