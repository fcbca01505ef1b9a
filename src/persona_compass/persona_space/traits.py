"""Trait catalogues: contrasting prompts, questions and a judge rubric for one trait.

A trait axis (issue 14; the "persona vectors" recipe) is the mean activation of answers that
show a trait minus the mean of answers that avoid it. Each answer comes from a model asked one
of the catalogue's questions under the ``elicit`` or the ``suppress`` prompt of one of its pairs,
and a judge decides whether it shows the trait with the catalogue's rubric.

Catalogues ship as package data (``data/traits/{name}.json``, schema in
``data/traits/SCHEMA.md``); a JSON file of the same schema loads the same way. Every problem
raises :class:`TraitCatalogueError`, naming the file, the field (and index) and the fix.

Example::

    cat = load_trait("sycophancy")              # or load_trait("my_traits/greed.json")
    small = cat.select(pairs=2, questions=10)
    prompt = cat.rubric.render(question, answer)
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..jsonio import JSONInputError, check_depth
from .catalogue import CatalogueError

FORMAT_VERSION = 1
"""The ``format_version`` of a trait file that this module reads and writes."""

MIN_PAIRS = 5
MIN_QUESTIONS = 40
"""A loaded file needs this many pairs and questions: fewer give too few answers per side for
a stable mean (``select`` may still shrink a loaded catalogue for cheap runs)."""

PLACEHOLDERS = ("question", "answer")
"""The fields a judge prompt must contain, as ``{question}`` and ``{answer}``."""

_PACKAGE_DIR = ("data", "traits")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")


class TraitCatalogueError(CatalogueError):
    """A trait catalogue is unknown, missing or malformed, or a selection is impossible."""


# --------------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class PromptPair:
    """Two system prompts for the same trait: one draws it out, the other holds it back."""

    elicit: str
    suppress: str

    def __post_init__(self) -> None:
        for side in ("elicit", "suppress"):
            value = getattr(self, side)
            if not isinstance(value, str) or not value.strip():
                raise TraitCatalogueError(
                    f"'{side}' is empty or not a string ({value!r}); write a system prompt that "
                    f"{'shows' if side == 'elicit' else 'avoids'} the trait."
                )
        if self.elicit.strip() == self.suppress.strip():
            raise TraitCatalogueError(
                "'elicit' and 'suppress' are the same text, so the pair contrasts nothing; "
                "rewrite 'suppress' to hold the trait back."
            )

    def to_dict(self) -> dict[str, str]:
        return {"elicit": self.elicit, "suppress": self.suppress}


@dataclass(frozen=True)
class TraitRubric:
    """How a judge scores an answer for the trait.

    Args:
        judge_prompt: the whole prompt for an LLM judge, a :meth:`str.format` template with
            ``{question}`` and ``{answer}`` (write other braces doubled); it asks for a 0-100
            score as ``SCORE: <n>``.
        threshold: a score at or above it means the answer shows the trait (0-100).
        markers: lowercase phrases typical of answers that show the trait.
        counter_markers: lowercase phrases typical of answers that avoid it.
    """

    judge_prompt: str
    threshold: float
    markers: tuple[str, ...]
    counter_markers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.judge_prompt, str) or not self.judge_prompt.strip():
            raise TraitCatalogueError(
                "'judge_prompt' is empty or not a string; write a prompt that shows the judge "
                "{question} and {answer} and asks for 'SCORE: <n>' from 0 to 100."
            )
        _check_template(self.judge_prompt)
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TraitCatalogueError(
                f"'threshold' must be a number from 0 to 100, got {threshold!r}; 50 is usual."
            )
        if not 0 <= threshold <= 100:
            raise TraitCatalogueError(
                f"'threshold' is {threshold}, outside 0-100; judges score 0-100, so pick a "
                "value in that range (50 is usual)."
            )
        for field in ("markers", "counter_markers"):
            object.__setattr__(self, field, _phrases(getattr(self, field), field))

    def render(self, question: str, answer: str) -> str:
        """The judge prompt for one answer (braces inside ``question``/``answer`` are safe)."""
        return self.judge_prompt.format(question=question, answer=answer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge_prompt": self.judge_prompt,
            "threshold": self.threshold,
            "markers": list(self.markers),
            "counter_markers": list(self.counter_markers),
        }


@dataclass(frozen=True)
class TraitCatalogue:
    """Everything trait extraction asks a model, and how its answers are judged.

    Attributes:
        trait: lowercase snake_case name (it becomes part of bundle names).
        description: one sentence saying what the trait is.
        pairs: the contrasting system prompts, in file order.
        questions: user messages that give the trait room to show (distinct).
        rubric: the judge prompt, threshold and marker phrases.
    """

    trait: str
    description: str
    pairs: tuple[PromptPair, ...]
    questions: tuple[str, ...]
    rubric: TraitRubric

    def __post_init__(self) -> None:
        if not isinstance(self.trait, str) or not _NAME_RE.match(self.trait):
            raise TraitCatalogueError(
                f"'trait' {self.trait!r} must be lowercase snake_case (letters, digits, single "
                "underscores), e.g. 'sycophancy'; rename it."
            )
        if not isinstance(self.description, str) or not self.description.strip():
            raise TraitCatalogueError(
                "'description' is empty or not a string; say in one sentence what the trait is."
            )
        for field in ("pairs", "questions"):
            value = getattr(self, field)
            if isinstance(value, (str, dict)) or not isinstance(value, Sequence) or not value:
                raise TraitCatalogueError(f"'{field}' must be a non-empty list, got {value!r}.")
            object.__setattr__(self, field, tuple(value))
        for i, pair in enumerate(self.pairs):
            if not isinstance(pair, PromptPair):
                raise TraitCatalogueError(f"pairs[{i}] is not a PromptPair: {pair!r}.")
        seen: dict[str, int] = {}
        for i, question in enumerate(self.questions):
            if not isinstance(question, str) or not question.strip():
                raise TraitCatalogueError(
                    f"questions[{i}] is empty or not a string ({question!r}); write the question "
                    "or drop it."
                )
            # Case and spacing differences do not make a new question for the model.
            key = " ".join(question.casefold().split())
            if key in seen:
                raise TraitCatalogueError(
                    f"questions[{i}] repeats questions[{seen[key]}] ({question!r}); remove or "
                    "reword the duplicate."
                )
            seen[key] = i
        if not isinstance(self.rubric, TraitRubric):
            raise TraitCatalogueError(f"'rubric' is not a TraitRubric: {self.rubric!r}.")

    def select(self, pairs: int | None = None, questions: int | None = None) -> TraitCatalogue:
        """A smaller catalogue with the first ``pairs`` pairs and first ``questions`` questions.

        ``None`` keeps all. Same arguments, same result.
        """
        return TraitCatalogue(
            self.trait,
            self.description,
            self.pairs[: _count("pairs", pairs, len(self.pairs))],
            self.questions[: _count("questions", questions, len(self.questions))],
            self.rubric,
        )

    def to_dict(self) -> dict[str, Any]:
        """The catalogue as a trait file document (what :meth:`save` writes)."""
        return {
            "format_version": FORMAT_VERSION,
            "trait": self.trait,
            "description": self.description,
            "pairs": [pair.to_dict() for pair in self.pairs],
            "questions": list(self.questions),
            "rubric": self.rubric.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        """Write the catalogue as JSON; :func:`load_trait` reads it back unchanged."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path


# --------------------------------------------------------------------------- loading


def shipped_traits() -> tuple[str, ...]:
    """The names of the trait catalogues shipped as package data, sorted."""
    folder = _package_folder()
    return tuple(
        sorted(
            item.name[: -len(".json")]
            for item in folder.iterdir()
            if item.name.endswith(".json") and item.is_file()
        )
    )


def load_trait(name_or_path: str | Path) -> TraitCatalogue:
    """Load a shipped trait by name (``"sycophancy"``) or a trait file by path.

    A string counts as a path when it ends in ``.json`` or contains a path separator.

    Raises:
        TraitCatalogueError: unknown name, unreadable or malformed file; the message names the
            file, the field and the fix.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TraitCatalogueError(
            f"a trait is a shipped name or a file path, got {name_or_path!r}; pass e.g. "
            "'sycophancy' or 'my_traits/greed.json'."
        )
    if isinstance(name_or_path, Path) or _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise TraitCatalogueError(
                f"trait file {path} {what}; pass a trait JSON file (schema in "
                f"data/traits/SCHEMA.md) or a shipped trait name ({', '.join(shipped_traits())})."
            )
        return _parse(_read_text(path), str(path))
    name = str(name_or_path)
    known = shipped_traits()
    if name not in known:
        raise TraitCatalogueError(_unknown_trait_message(name, known))
    label = f"persona_compass/{'/'.join(_PACKAGE_DIR)}/{name}.json (package data)"
    try:
        text = (_package_folder() / f"{name}.json").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraitCatalogueError(
            f"{label} cannot be read ({exc}); reinstall persona-compass (the package data is "
            "missing or damaged) or pass your own trait file."
        ) from None
    catalogue = _parse(text, label)
    if catalogue.trait != name:
        # A renamed file would otherwise load under one name and label bundles with another.
        raise TraitCatalogueError(
            f"{label}: 'trait' is {catalogue.trait!r} but the file is {name}.json; make them match."
        )
    return catalogue


def _parse(text: str, label: str) -> TraitCatalogue:
    data = _parse_json(text, label)
    if not isinstance(data, dict):
        raise TraitCatalogueError(
            f"{label}: the top level must be a JSON object with 'format_version', 'trait', "
            f"'description', 'pairs', 'questions' and 'rubric', got {type(data).__name__}; see "
            "data/traits/SCHEMA.md."
        )
    if "format_version" not in data:
        raise TraitCatalogueError(
            f"{label}: missing 'format_version'; add \"format_version\": {FORMAT_VERSION}."
        )
    version = data["format_version"]
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise TraitCatalogueError(
            f"{label}: format_version {version!r} is not supported (this version reads "
            f"{FORMAT_VERSION}); upgrade persona-compass or rewrite the file to version "
            f"{FORMAT_VERSION}."
        )
    trait = _field(data, "trait", str, label)
    description = _field(data, "description", str, label)
    raw_pairs = _field(data, "pairs", list, label)
    questions = _field(data, "questions", list, label)
    raw_rubric = _field(data, "rubric", dict, label)
    if len(raw_pairs) < MIN_PAIRS:
        raise TraitCatalogueError(
            f"{label}: 'pairs' has {len(raw_pairs)} pair(s); a trait needs at least {MIN_PAIRS} "
            "so the axis does not hang on one wording, so add more."
        )
    if len(questions) < MIN_QUESTIONS:
        raise TraitCatalogueError(
            f"{label}: 'questions' has {len(questions)}; a trait needs at least {MIN_QUESTIONS} "
            "so the held-out evaluation has enough answers, so add more."
        )
    pairs = []
    for i, raw in enumerate(raw_pairs):
        where = f"{label}, pairs[{i}]"
        if not isinstance(raw, dict):
            raise TraitCatalogueError(
                f'{where}: expected {{"elicit": "...", "suppress": "..."}}, got '
                f"{type(raw).__name__}."
            )
        missing = [key for key in ("elicit", "suppress") if key not in raw]
        if missing:
            raise TraitCatalogueError(
                f"{where}: missing {', '.join(repr(k) for k in missing)}; every pair needs an "
                "'elicit' and a 'suppress' system prompt."
            )
        pairs.append(_build(where, PromptPair, raw["elicit"], raw["suppress"]))
    missing = [
        key
        for key in ("judge_prompt", "threshold", "markers", "counter_markers")
        if key not in raw_rubric
    ]
    if missing:
        raise TraitCatalogueError(
            f"{label}: 'rubric' is missing {', '.join(repr(k) for k in missing)}; see "
            "data/traits/SCHEMA.md."
        )
    rubric = _build(
        f"{label}, rubric",
        TraitRubric,
        raw_rubric["judge_prompt"],
        raw_rubric["threshold"],
        raw_rubric["markers"],
        raw_rubric["counter_markers"],
    )
    return _build(label, TraitCatalogue, trait, description, pairs, questions, rubric)


# --------------------------------------------------------------------------- helpers


def _field(data: dict[str, Any], key: str, kind: type, label: str) -> Any:
    """``data[key]``, present, of type ``kind`` and not empty."""
    if key not in data:
        raise TraitCatalogueError(f"{label}: missing '{key}'; see data/traits/SCHEMA.md.")
    value = data[key]
    if not isinstance(value, kind):
        names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
        raise TraitCatalogueError(
            f"{label}: '{key}' must be {names[kind]}, got {type(value).__name__}; fix its type."
        )
    if not (value.strip() if isinstance(value, str) else value):
        raise TraitCatalogueError(f"{label}: '{key}' is empty; fill it in.")
    return value


def _build(where: str, cls: Any, *args: Any) -> Any:
    """``cls(*args)``, with any error prefixed by where it happened."""
    try:
        return cls(*args)
    except TraitCatalogueError as exc:
        raise TraitCatalogueError(f"{where}: {exc}") from None


def _check_template(template: str) -> None:
    """The judge prompt must name both placeholders and nothing :meth:`str.format` chokes on."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise TraitCatalogueError(
            f"'judge_prompt' is not a valid template ({exc}); write literal braces as {{{{ and "
            "}}."
        ) from None
    missing = [f"{{{name}}}" for name in PLACEHOLDERS if name not in fields]
    if missing:
        raise TraitCatalogueError(
            f"'judge_prompt' lacks {' and '.join(missing)}; the judge must see the question and "
            "the answer, so put both placeholders in the prompt."
        )
    extra = sorted(fields - set(PLACEHOLDERS))
    if extra:
        raise TraitCatalogueError(
            f"'judge_prompt' has unknown placeholder(s) {', '.join(f'{{{n}}}' for n in extra)}; "
            "only {question} and {answer} are filled in, so write literal braces as {{ and }}."
        )


def _phrases(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise TraitCatalogueError(
            f"'{field}' must be a non-empty list of lowercase phrases, got {value!r}."
        )
    out = tuple(value)
    for i, phrase in enumerate(out):
        if not isinstance(phrase, str) or not phrase.strip():
            raise TraitCatalogueError(
                f"{field}[{i}] is empty or not a string ({phrase!r}); write a phrase or drop it."
            )
        # Matching lowercases the answer, so an uppercase marker would never match.
        if phrase != phrase.lower():
            raise TraitCatalogueError(
                f"{field}[{i}] {phrase!r} is not lowercase; write it as {phrase.lower()!r}."
            )
    return out


def _count(name: str, value: int | None, available: int) -> int:
    if value is None:
        return available
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TraitCatalogueError(f"{name}={value!r} must be a positive integer (or None for all).")
    if value > available:
        raise TraitCatalogueError(
            f"{name}={value} but the catalogue has only {available}; ask for at most "
            f"{available} (or None for all)."
        )
    return value


def _package_folder() -> Any:
    folder = resources.files("persona_compass")
    for part in _PACKAGE_DIR:
        folder = folder / part
    if not folder.is_dir():
        raise TraitCatalogueError(
            f"persona_compass/{'/'.join(_PACKAGE_DIR)} (package data) is missing; reinstall "
            "persona-compass or pass your own trait file."
        )
    return folder


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TraitCatalogueError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8."
        ) from None
    except OSError as exc:
        raise TraitCatalogueError(f"{path} cannot be read: {exc.strerror or exc}.") from None


def _parse_json(text: str, label: str) -> Any:
    try:
        check_depth(text, label)  # a hostile file must not crash the parser
        return json.loads(text)
    except JSONInputError as exc:
        raise TraitCatalogueError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise TraitCatalogueError(
            f"{label}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; fix "
            "the syntax there (a trailing comma or a missing quote is the usual cause)."
        ) from None


def _looks_like_path(value: str) -> bool:
    return value.endswith(".json") or "/" in value or "\\" in value


def _unknown_trait_message(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"no shipped trait named {name!r}; the shipped traits are {', '.join(known)}.{hint} "
        "To use your own, pass the path of a trait JSON file (schema in data/traits/SCHEMA.md)."
    )
