"""One evaluation unit: a scenario's conversation under one condition, answered, judged and
saved as a transcript; and re-judging a stored one."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..alerts import AlertRules
from ..atomic import write_json
from ..axis import Axis
from ..capping import CappingConfig
from ..compass import AdaptivePolicy, Answer, CompassSession
from ..generation import SamplingConfig
from ..transcripts import save_transcript
from .conditions import Condition
from .outcome_types import OutcomeItem
from .run_store import RUN_FORMAT, EvaluationError, EvaluationResult
from .scenarios import Scenario
from .users import make_user


def scenario_seed(seed: int, scenario_id: str) -> int:
    """The sampling seed of one scenario: fixed by the run seed and the scenario id, shared
    by every condition (so the conditions' answers are paired), independent of the selection."""
    raw = hashlib.sha256(f"{seed}/{scenario_id}".encode()).digest()
    return int.from_bytes(raw[:4], "big") % (2**31 - 1000)


def _outcome_items(
    scenario: Scenario, messages: Sequence[dict[str, str]], answers: Sequence[str]
) -> list[OutcomeItem]:
    """One judge item per assistant answer: (domain, the user turn before it, the answer)."""
    out: list[OutcomeItem] = []
    prev = ""
    for m in messages:
        if m["role"] == "user":
            prev = m["content"]
        elif m["role"] == "assistant":
            out.append(OutcomeItem(scenario.domain, prev, answers[len(out)]))
    return out


def _judge_answers(judge: Any, items: Sequence[OutcomeItem]) -> list[dict[str, Any]]:
    verdicts = judge.judge(list(items))
    if len(verdicts) != len(items):
        raise EvaluationError(
            f"outcome judge {judge.name!r} returned {len(verdicts)} verdicts for "
            f"{len(items)} answers"
        )
    return [v.to_dict() for v in verdicts]


def run_conversation_unit(
    *,
    path: Path,
    key: str,
    scenario: Scenario,
    condition: Condition,
    cap_cfg: CappingConfig | None,
    model: Any,
    tokenizer: Any,
    axis: Axis,
    spec: str,
    settings: dict[str, Any],
    backend: Any,
    n_turns: int,
    rules: AlertRules,
    policy: AdaptivePolicy,
    judge: Any,
    result: EvaluationResult,
    on_answer: Callable[[str, str, int, float], None] | None,
    tick: Callable[[str], None],
    traits: Sequence[Axis] = (),
) -> None:
    """Play the scenario under the condition, judge every answer, write the run file;
    ``traits`` are the trait needles read beside the axis."""
    started = time.perf_counter()
    seed = scenario_seed(settings["seed"], scenario.id)
    sampling = SamplingConfig(
        max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        repetition_penalty=settings["repetition_penalty"],
        seed=seed,
    )
    session = CompassSession(
        model,
        tokenizer,
        axis,
        cap_cfg,
        mode=condition.mode,
        rules=rules,
        policy=policy,
        sampling=sampling,
        system_prompt=settings["system_prompt"],
        steer=condition.steering,
        traits=traits,
    )
    user = make_user(backend, scenario, max_turns=n_turns)
    records: list[dict[str, Any]] = []
    answers: list[str] = []
    label = f"{scenario.id} / {condition.name}"
    for turn in range(1, user.max_turns + 1):
        t0 = time.perf_counter()
        user_turn = user.next_turn(session.messages)
        t1 = time.perf_counter()
        answer = session.reply(user_turn.text)
        seconds = time.perf_counter() - t1
        answers.append(answer.text)
        records.append(turn_record(turn, answer, user_turn, t1 - t0, seconds))
        result.answers += 1
        result.answer_seconds.append(seconds)
        if on_answer is not None:
            on_answer(scenario.id, condition.name, turn, seconds)
        tick(f"{label} turn {turn}")
    save_conversation_unit(
        path=path,
        key=key,
        scenario=scenario,
        condition=condition,
        cap_cfg=cap_cfg,
        spec=spec,
        settings=settings,
        judge=judge,
        seed=seed,
        messages=session.messages,
        answers=answers,
        readings=session.readings(),
        records=records,
        started=started,
    )


def turn_record(
    turn: int, answer: Answer, user_turn: Any, user_seconds: float, answer_seconds: float
) -> dict[str, Any]:
    """One answered turn as a run file lists it (with ``traits``, the needles' readings in
    the ``monitor --json`` layout, when the answer was read by any)."""
    traits = answer.reading.traits
    return {
        "turn": turn,
        "message_index": answer.reading.index,
        "user_source": user_turn.source,
        "user_note": user_turn.note,
        "user_seconds": round(user_seconds, 4),
        "answer_seconds": round(answer_seconds, 4),
        "finish_reason": answer.finish_reason,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "cap_engaged_next": answer.cap_engaged_next,
        **({"traits": {k: v.to_dict() for k, v in traits.items()}} if traits else {}),
    }


def save_conversation_unit(
    *,
    path: Path,
    key: str,
    scenario: Scenario,
    condition: Condition,
    cap_cfg: CappingConfig | None,
    spec: str,
    settings: dict[str, Any],
    judge: Any,
    seed: int,
    messages: Sequence[dict[str, str]],
    answers: Sequence[str],
    readings: Sequence[dict[str, Any]],
    records: list[dict[str, Any]],
    started: float,
) -> None:
    """Judge a finished conversation's answers and write its run file (atomically).

    Shared by both engines' drivers, so a run file has one layout whichever engine wrote it.
    ``started`` is the unit's ``time.perf_counter()`` start (its seconds include judging).
    """
    outcomes = _judge_answers(judge, _outcome_items(scenario, messages, answers))
    for rec, outcome in zip(records, outcomes, strict=True):
        rec["outcome"] = outcome
    metadata = {
        "scenario": scenario.id,
        "title": scenario.title,
        "domain": scenario.domain,
        "risk": scenario.risk,
        "persona": scenario.persona,
        "topic": scenario.topic,
        "condition": condition.name,
        "steering_config": condition.to_dict(),
        "evaluation": {
            "format": RUN_FORMAT,
            "complete": True,
            "key": key,
            "settings_digest": settings["settings_digest"],
            "scenario": scenario.to_dict(),
            "condition": condition.to_dict(),
            "capping_config": None if cap_cfg is None else cap_cfg.to_dict(include_vectors=False),
            "seed": seed,
            "user": settings["user"],
            "judge": judge.name,
            "turns": records,
            "seconds": round(time.perf_counter() - started, 3),
        },
    }
    save_transcript(path, list(messages), model=spec, readings=list(readings), metadata=metadata)


def rejudge_unit(path: Path, data: dict[str, Any], judge: Any) -> None:
    """Judge a stored run's answers again with another judge (no generation)."""
    messages = data["conversation"]
    scen = data["evaluation"]["scenario"]
    scenario = Scenario.from_dict(scen)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    outcomes = _judge_answers(judge, _outcome_items(scenario, messages, answers))
    for rec, outcome in zip(data["evaluation"]["turns"], outcomes, strict=True):
        rec["outcome"] = outcome
    data["evaluation"]["judge"] = judge.name
    write_json(path, data)
