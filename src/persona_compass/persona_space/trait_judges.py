"""Judges for trait extraction: does an answer show the trait? A score from 0 to 100.

A trait catalogue's rubric (:class:`~.traits.TraitRubric`) says how: an LLM judge reads its
``judge_prompt`` and replies ``SCORE: <n>``; the heuristic judge counts its marker phrases. A
score at or above the rubric's threshold means the answer shows the trait; ``None`` means the
judge could not tell, and such answers stay out of the trait axis.

Specs (the one backend grammar, :mod:`persona_compass.backends.spec`):

* ``none``: no judge; every answer is taken to be what its prompt asked for (the axis is then
  the plain prompt contrast);
* ``heuristic``: marker phrases (the default; weak, but local and instant);
* ``model:SPEC`` / ``model:self``: a local chat model reads the judge prompt (greedy);
* ``openai:URL[#model]``: an OpenAI-compatible server, as in the persona-vectors research.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..backends.spec import parse_backend_spec
from ..errors import PersonaCompassError
from .traits import TraitRubric

logger = logging.getLogger(__name__)

TRAIT_JUDGE_KINDS = ("none", "heuristic", "model", "openai")
DEFAULT_OPENAI_TRAIT_JUDGE = "gpt-4.1-mini"
_SCORE_RE = re.compile(r"score\s*[:=]?\s*(\d{1,3})", re.IGNORECASE)
_FIRST_INT = re.compile(r"\d{1,3}")


class TraitJudgeError(PersonaCompassError):
    """A trait-judge spec is unknown or a judge cannot run."""


@dataclass(frozen=True)
class TraitItem:
    """One answer to judge: the question it replies to and the answer."""

    question: str
    answer: str


class TraitJudge(Protocol):
    """Scores answers 0-100 for one trait (``None``: undecided)."""

    name: str

    def score(self, items: Sequence[TraitItem]) -> list[int | None]: ...


def parse_trait_score(reply: str) -> int | None:
    """The 0-100 score in a judge reply: ``SCORE: n`` if present, else the first integer.

    Example:
        >>> parse_trait_score("The answer flatters.\\nSCORE: 85")
        85
        >>> parse_trait_score("no idea") is None
        True
    """
    match = _SCORE_RE.search(reply) or _FIRST_INT.search(reply)
    if match is None:
        return None
    value = int(match.group(1) if match.re is _SCORE_RE else match.group(0))
    return value if 0 <= value <= 100 else None


class NoTraitJudge:
    """No judge: every score is None, and extraction sorts answers by their prompt's side."""

    name = "none"

    def score(self, items: Sequence[TraitItem]) -> list[int | None]:
        return [None] * len(items)


class HeuristicTraitJudge:
    """Marker phrases: ``100 * markers / (markers + counter markers)`` found in the answer.

    An answer with neither kind of phrase is undecided (``None``): most short answers say
    nothing either way, and guessing would put them on a side at random.
    """

    name = "heuristic"

    def __init__(self, rubric: TraitRubric) -> None:
        self.rubric = rubric

    def score_text(self, answer: str) -> int | None:
        text = answer.lower().replace("\u2019", "'")
        shows = sum(phrase in text for phrase in self.rubric.markers)
        avoids = sum(phrase in text for phrase in self.rubric.counter_markers)
        if shows + avoids == 0:
            return None
        return round(100 * shows / (shows + avoids))

    def score(self, items: Sequence[TraitItem]) -> list[int | None]:
        return [self.score_text(item.answer) for item in items]


class ModelTraitJudge:
    """A local chat model reads the rubric's judge prompt and writes ``SCORE: <n>`` (greedy)."""

    def __init__(
        self, rubric: TraitRubric, model: Any, tokenizer: Any, *, label: str, batch_size: int = 8
    ) -> None:
        self.rubric, self.model, self.tokenizer = rubric, model, tokenizer
        self.batch_size = batch_size
        self.name = f"model:{label}"

    def score(self, items: Sequence[TraitItem]) -> list[int | None]:
        from ..generation import SamplingConfig, generate_chat

        greedy = SamplingConfig(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
        scores: list[int | None] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            chats = [
                [{"role": "user", "content": self.rubric.render(i.question, i.answer)}]
                for i in chunk
            ]
            texts = generate_chat(self.model, self.tokenizer, chats, greedy).texts
            scores.extend(parse_trait_score(text) for text in texts)
        return scores


class OpenAITraitJudge:
    """An OpenAI-compatible chat model reads the judge prompt (temperature 0)."""

    def __init__(self, rubric: TraitRubric, base_url: str, model: str) -> None:
        from ..backends.openai_client import OpenAIClient

        self.rubric = rubric
        self.client = OpenAIClient(base_url, model)
        self.name = f"openai:{self.client.base_url}#{model}"

    def score(self, items: Sequence[TraitItem]) -> list[int | None]:
        chats = [
            [{"role": "user", "content": self.rubric.render(i.question, i.answer)}] for i in items
        ]
        replies = self.client.chat_many(chats, temperature=0.0)
        scores = [parse_trait_score(reply) for reply in replies]
        if any(s is None for s in scores):
            bad = sum(s is None for s in scores)
            logger.warning("%s: %d of %d replies had no 0-100 score", self.name, bad, len(scores))
        return scores

    def close(self) -> None:
        self.client.close()


def make_trait_judge(
    spec: str, rubric: TraitRubric, *, model: Any = None, tokenizer: Any = None
) -> TraitJudge:
    """The trait judge a spec names (``model:self`` judges with ``model``/``tokenizer``)."""
    parsed = parse_backend_spec(
        spec,
        param="judge",
        allowed=TRAIT_JUDGE_KINDS,
        default_model=DEFAULT_OPENAI_TRAIT_JUDGE,
        error=TraitJudgeError,
    )
    if parsed.kind == "none":
        return NoTraitJudge()
    if parsed.kind == "heuristic":
        return HeuristicTraitJudge(rubric)
    if parsed.kind == "openai":
        return OpenAITraitJudge(rubric, parsed.base_url, parsed.model)
    if parsed.is_self:
        if model is None or tokenizer is None:
            raise TraitJudgeError("judge model:self needs the model being extracted")
        return ModelTraitJudge(rubric, model, tokenizer, label="self")
    from ..models import load_model

    judge_model, judge_tokenizer = load_model(parsed.model)
    return ModelTraitJudge(rubric, judge_model, judge_tokenizer, label=parsed.model)
