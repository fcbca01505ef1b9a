"""Evaluation units on a batching engine (``vllm``): every conversation's turn t in one batch.

A conversation's turn t+1 needs its turn t, but scenarios and conditions do not need each
other, so the driver plays a wave of conversation units in lock step: the next user turn of
each (one call per simulator backend), then every answer in one ``engine.respond`` batch,
each request with its own condition's cap state, capping config, steering and seed. Each
:class:`EngineConversation` keeps what a :class:`~persona_compass.compass.CompassSession`
keeps (messages, turn readings, the alert history, the adaptive state), so the readings,
alerts and adaptive decisions follow the same rules as the ``hf`` path's; a unit's run file is
written (atomically) as soon as its last turn is answered, by the same code as on ``hf``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..alerts import Alert, AlertRules, AlertTracker
from ..atomic import write_json
from ..axis import Axis
from ..capping import CappingConfig
from ..compass import AdaptiveCap, AdaptivePolicy, Answer, CompassError, check_cap_mode
from ..engines.base import CompassRequest
from ..generation import SamplingConfig
from ..monitor import DriftMonitor, TurnReading
from .capability import CapabilityItem, score_answer
from .conditions import Condition
from .run_conversation import save_conversation_unit, scenario_seed, turn_record
from .run_store import CAPABILITY_FORMAT, EvaluationResult
from .scenarios import Scenario
from .users import User, make_user, next_turns


@dataclass
class ConversationUnit:
    """One planned (scenario, condition) run file."""

    path: Path
    key: str
    scenario: Scenario
    condition: Condition
    cap_cfg: CappingConfig | None
    n_turns: int


class EngineConversation:
    """A conversation's state between batches, as a ``CompassSession`` keeps it.

    The engine reads each answer; the alerts are decided here, on this conversation's own alert
    history (the engine sees one request and no history), and so is the adaptive cap. The
    trait needles (``traits``, their names) get the same treatment: the engine's readings are
    kept, their turn and trend rules run on this conversation's history.
    """

    def __init__(
        self,
        axis: Axis,
        cap_cfg: CappingConfig | None,
        condition: Condition,
        *,
        rules: AlertRules,
        policy: AdaptivePolicy,
        sampling: SamplingConfig,
        system_prompt: str | None,
        traits: Sequence[str] = (),
    ) -> None:
        self.mode = check_cap_mode(condition.mode, cap_cfg)
        self.cap_cfg = cap_cfg
        self.steer = condition.steering
        self.rules = rules
        self.sampling = sampling
        self.adaptive = AdaptiveCap(policy)
        self.monitor = DriftMonitor.from_projections(axis, torch.empty(0), rules=rules)
        self.trait_trackers = [AlertTracker(rules, needle=name) for name in traits]
        self.messages: list[dict[str, str]] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})

    @property
    def cap_engaged(self) -> bool:
        return self.mode == "on" or (self.mode == "adaptive" and self.adaptive.engaged)

    def request(self, user_text: str) -> CompassRequest:
        """The next answer's request: this turn's cap state and seed (seed + turn number)."""
        if not isinstance(user_text, str) or not user_text.strip():
            raise CompassError("the user message is empty; type something to send")
        messages = [*self.messages, {"role": "user", "content": user_text}]
        n_answers = sum(1 for m in messages if m["role"] == "assistant")
        sampling = self.sampling
        if sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + n_answers + 1)
        return CompassRequest(
            messages,
            mode="on" if self.cap_engaged else "off",
            capping_config=self.cap_cfg,
            rules=self.rules,
            steer=self.steer,
            sampling=sampling,
            read_history=False,
        )

    def accept(self, request: CompassRequest, answer: Answer) -> Answer:
        """Take the engine's answer: its alerts on this conversation's history, the state."""
        got = answer.reading
        answer.reading = self.monitor.measure_turn(
            answer.tokens,
            index=got.index,
            capped=got.capped,
            cap_engagement=got.cap_engagement,
        )
        if self.trait_trackers:
            answer.reading = replace(
                answer.reading,
                traits=dict(got.traits),
                alerts=(*answer.reading.alerts, *self._trait_alerts(got)),
            )
        self.monitor.turns.append(answer.reading)
        self.messages = [
            *request.messages,
            {"role": "assistant", "content": answer.text or "..."},
        ]
        if self.mode == "adaptive":
            self.adaptive.update(answer.reading)
        answer.cap_engaged_next = self.cap_engaged
        return answer

    def _trait_alerts(self, got: TurnReading) -> list[Alert]:
        """The needles' alerts on this answer, in the order a ``DriftMonitor`` raises them."""
        out: list[Alert] = []
        for tracker in self.trait_trackers:
            # the tokens rule reads one answer's tokens, so the engine's verdict stands; it
            # kept no token percentiles of the needles to judge it again here
            out += [a for a in got.alerts if a.needle == tracker.needle and a.kind == "tokens"]
            trait = got.traits.get(str(tracker.needle))
            out += tracker.observe(got.index, None if trait is None else trait.percentile)
        return out


@dataclass
class _Live:
    unit: ConversationUnit
    conversation: EngineConversation
    user: User
    seed: int
    started: float
    records: list[dict[str, Any]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


def run_conversation_wave(
    units: Sequence[ConversationUnit],
    *,
    engine: Any,
    axis: Axis,
    spec: str,
    settings: dict[str, Any],
    backend: Any,
    rules: AlertRules,
    policy: AdaptivePolicy,
    judge: Any,
    result: EvaluationResult,
    on_answer: Callable[[str, str, int, float], None] | None,
    tick: Callable[[str], None],
    traits: Sequence[str] = (),
) -> None:
    """Play ``units`` together, one engine batch per turn; write each when it is complete
    (``traits``: the names of the needles the engine reads).

    A record's ``answer_seconds`` (and ``user_seconds``) is its share of its batch's wall time
    (batch seconds / answers in the batch): what an answer costs when the turn is batched.
    """
    live: list[_Live] = []
    for unit in units:
        seed = scenario_seed(settings["seed"], unit.scenario.id)
        sampling = SamplingConfig(
            max_new_tokens=settings["max_new_tokens"],
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            repetition_penalty=settings["repetition_penalty"],
            seed=seed,
        )
        conversation = EngineConversation(
            axis,
            unit.cap_cfg,
            unit.condition,
            rules=rules,
            policy=policy,
            sampling=sampling,
            system_prompt=settings["system_prompt"],
            traits=traits,
        )
        user = make_user(backend, unit.scenario, max_turns=unit.n_turns)
        live.append(_Live(unit, conversation, user, seed, time.perf_counter()))
    while live:
        t0 = time.perf_counter()
        turns = next_turns([x.user for x in live], [x.conversation.messages for x in live])
        t1 = time.perf_counter()
        requests = [x.conversation.request(t.text) for x, t in zip(live, turns, strict=True)]
        answers = engine.respond(requests)
        seconds = (time.perf_counter() - t1) / len(live)
        user_seconds = (t1 - t0) / len(live)
        for x, user_turn, req, answer in zip(live, turns, requests, answers, strict=True):
            answer = x.conversation.accept(req, answer)
            turn = len(x.records) + 1
            x.answers.append(answer.text)
            x.records.append(turn_record(turn, answer, user_turn, user_seconds, seconds))
            result.answers += 1
            result.answer_seconds.append(seconds)
            if on_answer is not None:
                on_answer(x.unit.scenario.id, x.unit.condition.name, turn, seconds)
            tick(f"{x.unit.scenario.id} / {x.unit.condition.name} turn {turn}")
        for x in [x for x in live if len(x.records) >= x.user.max_turns]:
            u = x.unit
            save_conversation_unit(
                path=u.path,
                key=u.key,
                scenario=u.scenario,
                condition=u.condition,
                cap_cfg=u.cap_cfg,
                spec=spec,
                settings=settings,
                judge=judge,
                seed=x.seed,
                messages=x.conversation.messages,
                answers=x.answers,
                readings=[t.to_dict() for t in x.conversation.monitor.turns],
                records=x.records,
                started=x.started,
            )
            result.generated += 1
        live = [x for x in live if len(x.records) < x.user.max_turns]


@dataclass
class CapabilityUnit:
    """One planned capability file: every item under one condition."""

    path: Path
    key: str
    condition: Condition
    cap_cfg: CappingConfig | None


def run_capability_units(
    units: Sequence[CapabilityUnit],
    items: Sequence[CapabilityItem],
    *,
    engine: Any,
    settings: dict[str, Any],
    tick: Callable[[int, str], None],
) -> None:
    """Every unit's items in one greedy engine batch; each unit's file written after it.

    As on ``hf``: single-turn, greedy, the condition's steering, and its cap when always on.
    """
    if not units:
        return
    started = time.perf_counter()
    sampling = SamplingConfig(
        max_new_tokens=settings["capability_max_new_tokens"],
        temperature=0.0,
        repetition_penalty=1.0,
        seed=None,
    )
    system = settings["system_prompt"]
    requests = []
    for unit in units:
        capped = unit.condition.mode == "on" and unit.cap_cfg is not None
        for item in items:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": item.prompt}
            ]
            requests.append(
                CompassRequest(
                    messages,
                    mode="on" if capped else "off",
                    capping_config=unit.cap_cfg if capped else None,
                    steer=unit.condition.steering,
                    sampling=sampling,
                    read_history=False,
                )
            )
    answers = engine.respond(requests)
    seconds = time.perf_counter() - started
    for n, unit in enumerate(units):
        mine = answers[n * len(items) : (n + 1) * len(items)]
        rows = [
            {
                "id": item.id,
                "category": item.category,
                "reply": a.text,
                "token_ids": [int(t) for t in a.token_ids],  # for the report's unchanged_share
                "correct": score_answer(item, a.text),
            }
            for item, a in zip(items, mine, strict=True)
        ]
        cfg = unit.cap_cfg
        write_json(
            unit.path,
            {
                "condition": unit.condition.name,
                "items": rows,
                "evaluation": {
                    "format": CAPABILITY_FORMAT,
                    "complete": True,
                    "key": unit.key,
                    "settings_digest": settings["settings_digest"],
                    "condition": unit.condition.to_dict(),
                    "capping_config": None if cfg is None else cfg.to_dict(include_vectors=False),
                    "max_new_tokens": settings["capability_max_new_tokens"],
                    # the batch is shared: each unit gets its share of the wall time
                    "seconds": round(seconds / len(units), 3),
                },
            },
        )
        tick(len(items), f"capability / {unit.condition.name}")
