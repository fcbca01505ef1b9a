"""What an evaluation run is: every knob of :func:`~.runner.run_evaluation`, checked when the
settings are made, and which of them a resumed run must match.

Each field declares its resume rule (:mod:`persona_compass.run_folder`): ``must_match`` fields
decide what a stored unit contains, so a rerun into the same folder must record the same
values (compared in ``settings.json``, sometimes through what the run derives from them, such
as the bundle's digest); ``MAY_CHANGE`` fields are the selection (scenarios, conditions,
limits), the speed (engine options, batch size) or the presentation (sweep, command line).

Example:
    >>> settings = EvaluationSettings("smollm2-135m", conditions="unsteered,capped", turns=6)
    >>> run_evaluation(settings, "ev")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..alerts import AlertRules
from ..compass import AdaptivePolicy
from ..generation import SamplingConfig
from ..run_folder import MAY_CHANGE, ResumeRule, must_match
from .capability import CapabilityItem, load_capability_items
from .conditions import DEFAULT_CONDITIONS, Condition, parse_condition, parse_conditions
from .run_engine import check_engine
from .run_store import EvaluationError
from .scenarios import Scenario, load_scenarios


@dataclass(frozen=True)
class EvaluationSettings:
    """Every knob of an evaluation run (see :func:`~.runner.run_evaluation` for the run).

    Args:
        bundle: the axis bundle (folder or shipped alias); its ``capping.json`` serves
            ``capped``/``adaptive`` and its calibration ``cap:A:B@pP`` conditions.
        model: the model spec (default: the bundle's); with a loaded model passed to
            ``run_evaluation`` it only labels it.
        dtype: model dtype when loading (the same for both engines).
        engine: ``"hf"`` (the model in this process, one conversation at a time) or ``"vllm"``
            (every conversation's next turn, and the capability items, in one vLLM batch).
        engine_options: options for the ``vllm`` engine the run starts (``enforce_eager``,
            ``max_num_seqs``, ``kv_cache_gib``, ...; see ``VLLMEngine``).
        scenarios: the scenarios (default: every shipped one); ``limit`` keeps the first N.
        scenario_source: how to name where they came from in the settings and the report
            (default: ``shipped``, or ``custom`` for scenarios given here).
        conditions: condition specs (see :mod:`.conditions`), a comma string or a list.
        user: who plays the user: ``scripted``, ``model:SPEC``, ``model:self`` or
            ``openai:URL[#model]``.
        judge: the outcome judge: ``heuristic`` or ``openai:URL[#model]``.
        limit: only the first N scenarios.
        turns: user turns per conversation (default: each scenario's whole script).
        max_new_tokens: sampling of the answers: tokens per answer.
        temperature: sampling of the answers.
        top_p: sampling of the answers.
        repetition_penalty: sampling of the answers.
        seed: the run seed (each scenario's seed derives from it and the scenario id).
        system_prompt: a system message at the start of every conversation.
        rules: alert rules (default: ``AlertRules()``).
        traits: trait axis bundles (folders or shipped aliases such as
            ``smollm2-135m-sycophancy``) read beside the axis on every answer; each must be a
            trait bundle of the axis' model, with a distinct trait name (checked when the run
            opens them). Recorded by their digests.
        policy: the adaptive release policy (default: ``AdaptivePolicy()``).
        capability: also answer the capability items under each condition that changes a
            single answer (and the baseline); greedy, ``capability_max_new_tokens`` tokens.
        capability_items: the items (default: the shipped set).
        capability_limit: only the first N items.
        capability_max_new_tokens: tokens per capability answer.
        capability_batch_size: capability items per forward pass on the ``hf`` engine.
        sweep: ``{"windows": [...], "percentiles": [...]}`` when this is a sweep (recorded
            for the report).
        command: the command line, recorded in the settings.

    Raises:
        EvaluationError, ConditionError: a value out of range, named with the fix.
    """

    bundle: str | Path = field(metadata=must_match("bundle_digest"))
    model: str | None = field(default=None, metadata=must_match("model", "model_fingerprint"))
    dtype: str | None = field(default=None, metadata=must_match())
    # folders written before there was a choice of engine ran on hf
    engine: str = field(default="hf", metadata=must_match(legacy="hf"))
    engine_options: Mapping[str, Any] | None = field(default=None, metadata=MAY_CHANGE)
    scenarios: Sequence[Scenario] | None = field(default=None, metadata=MAY_CHANGE)
    scenario_source: str | None = field(default=None, metadata=MAY_CHANGE)
    conditions: str | Sequence[str | Condition] = field(
        default=DEFAULT_CONDITIONS, metadata=MAY_CHANGE
    )
    user: str = field(default="scripted", metadata=must_match())
    judge: str = field(default="heuristic", metadata=must_match())
    limit: int | None = field(default=None, metadata=MAY_CHANGE)
    turns: int | None = field(default=None, metadata=must_match())
    max_new_tokens: int = field(default=64, metadata=must_match())
    temperature: float = field(default=0.7, metadata=must_match())
    top_p: float = field(default=0.9, metadata=must_match())
    repetition_penalty: float = field(default=1.1, metadata=must_match())
    seed: int = field(default=0, metadata=must_match())
    system_prompt: str | None = field(default=None, metadata=must_match())
    rules: AlertRules = field(default_factory=AlertRules, metadata=must_match())
    # folders written before trait needles existed read none (the key is then left out)
    traits: Sequence[str | Path] = field(
        default=(), metadata=must_match("trait_digests", legacy=None)
    )
    policy: AdaptivePolicy = field(default_factory=AdaptivePolicy, metadata=must_match())
    # which items are answered is recorded as their digest: the flag, the items and the
    # limit all change it
    capability: bool = field(default=True, metadata=must_match("capability_items_digest"))
    capability_items: Sequence[CapabilityItem] | None = field(
        default=None, metadata=must_match("capability_items_digest")
    )
    capability_limit: int | None = field(
        default=None, metadata=must_match("capability_items_digest")
    )
    capability_max_new_tokens: int = field(default=16, metadata=must_match())
    capability_batch_size: int = field(default=8, metadata=MAY_CHANGE)
    sweep: Mapping[str, Any] | None = field(default=None, metadata=MAY_CHANGE)
    command: str = field(default="", metadata=MAY_CHANGE)

    def __post_init__(self) -> None:
        if isinstance(self.bundle, bool) or not isinstance(self.bundle, (str, Path)):
            raise EvaluationError(
                f"bundle={self.bundle!r} must be a bundle folder or a shipped alias"
            )
        self._check_engine()
        self._put("conditions", tuple(_resolve_conditions(self.conditions)))
        self._check_numbers()
        self._check_objects()
        self._check_scenarios(self.selected_scenarios())

    def _put(self, name: str, value: Any) -> None:
        """Set a field of the frozen settings (only while they are made)."""
        object.__setattr__(self, name, value)

    def _check_engine(self) -> None:
        if not isinstance(self.engine, str):
            raise EvaluationError(
                f"engine={self.engine!r:.80} must be 'hf' or 'vllm'; pass an engine you started "
                "to run_evaluation(..., engine=...)"
            )
        self._put("engine", check_engine(self.engine)[0])
        if self.engine == "hf" and self.engine_options:
            raise EvaluationError("engine_options apply to engine='vllm' only")
        if self.engine_options is not None:
            self._put("engine_options", dict(self.engine_options))

    def _check_numbers(self) -> None:
        for name in ("limit", "turns", "capability_limit"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise EvaluationError(f"{name}={value!r} must be a positive integer")
        for name in ("seed", "capability_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise EvaluationError(f"{name}={value!r} must be an integer")
        if self.capability_batch_size < 1:
            raise EvaluationError(
                f"capability_batch_size={self.capability_batch_size} must be at least 1"
            )
        try:
            SamplingConfig(
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                repetition_penalty=self.repetition_penalty,
            )
            SamplingConfig(max_new_tokens=self.capability_max_new_tokens)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        if not self.repetition_penalty > 0:
            raise EvaluationError(
                f"repetition_penalty={self.repetition_penalty!r} must be above 0 (1 = none)"
            )

    def _check_objects(self) -> None:
        """Specs, rules and policy, and copies of the given collections (so that changing
        the caller's list or dict later does not change the settings)."""
        for name in ("user", "judge"):
            if not isinstance(getattr(self, name), str):
                raise EvaluationError(f"{name}={getattr(self, name)!r} must be a spec string")
        if self.rules is None:  # the defaults, as for a missing flag
            self._put("rules", AlertRules())
        if self.policy is None:
            self._put("policy", AdaptivePolicy())
        if not isinstance(self.rules, AlertRules):
            raise EvaluationError(f"rules={self.rules!r:.80} must be an AlertRules")
        if not isinstance(self.policy, AdaptivePolicy):
            raise EvaluationError(f"policy={self.policy!r:.80} must be an AdaptivePolicy")
        if self.scenario_source is None:
            self._put("scenario_source", "shipped" if self.scenarios is None else "custom")
        if self.scenarios is not None:
            self._put("scenarios", tuple(self.scenarios))
        if self.capability_items is not None:
            self._put("capability_items", tuple(self.capability_items))
        if self.sweep is not None:
            self._put("sweep", dict(self.sweep))
        self._put("traits", _check_trait_specs(self.traits))

    def _check_scenarios(self, chosen: Sequence[Scenario]) -> None:
        if not chosen:
            raise EvaluationError("no scenario selected")
        ids = [s.id for s in chosen]
        if len(set(ids)) != len(ids):
            raise EvaluationError("two selected scenarios share an id; ids must be unique")
        if self.user.strip().lower() == "scripted" and self.turns is not None:
            short = [s.id for s in chosen if s.n_turns < self.turns]
            if short:
                raise EvaluationError(
                    f"--turns {self.turns} but scenario(s) {', '.join(short)} script fewer user "
                    "turns; use --turns at most the shortest script, or a simulated user "
                    "(--user model:self)"
                )

    @property
    def condition_list(self) -> tuple[Condition, ...]:
        """The conditions, parsed (``__post_init__`` parsed them)."""
        return cast(tuple[Condition, ...], self.conditions)

    def selected_scenarios(self) -> list[Scenario]:
        """The scenarios this run plays: the given (or shipped) ones, the first ``limit``."""
        chosen = list(self.scenarios) if self.scenarios is not None else load_scenarios()
        return chosen[: self.limit] if self.limit is not None else chosen

    def selected_capability_items(self) -> list[CapabilityItem]:
        """The capability items this run answers (none with ``capability`` off)."""
        if not self.capability:
            return []
        items = (
            list(self.capability_items)
            if self.capability_items is not None
            else load_capability_items()
        )
        return items[: self.capability_limit] if self.capability_limit is not None else items


RESUME_RULE = ResumeRule.of(EvaluationSettings)
"""The recorded settings a rerun into the same folder must match (declared on the fields)."""
RESUME_KEYS: tuple[str, ...] = RESUME_RULE.keys
# Of those, what generation depends on (a change of the judge alone only re-judges).
GENERATION_KEYS: tuple[str, ...] = tuple(k for k in RESUME_KEYS if k != "judge")


def generation_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the units' keys hash: the generation settings, without a key whose value is its
    legacy one (``engine`` ``hf``), so units written before the key existed keep their keys."""
    return {
        k: record[k]
        for k in GENERATION_KEYS
        if not (k in RESUME_RULE.legacy and record.get(k) == RESUME_RULE.legacy[k])
    }


def _check_trait_specs(traits: Any) -> tuple[str | Path, ...]:
    """The trait bundle specs as a tuple: each a folder or alias, none given twice."""
    if traits is None:
        return ()
    if isinstance(traits, (str, Path)):
        raise EvaluationError(
            f"traits={traits!r} must be a list of trait bundles, e.g. "
            "traits=['smollm2-135m-sycophancy']"
        )
    specs = tuple(traits)
    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, (str, Path)) or not str(spec).strip():
            raise EvaluationError(
                f"trait {spec!r:.80} must be a trait bundle folder or a shipped alias (e.g. "
                "smollm2-135m-sycophancy)"
            )
    names = [str(s) for s in specs]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise EvaluationError(f"trait bundle(s) {', '.join(doubled)} given twice; pass each once")
    return specs


def _resolve_conditions(conditions: str | Sequence[str | Condition]) -> list[Condition]:
    if isinstance(conditions, str):
        return parse_conditions(conditions)
    out: list[Condition] = []
    for c in conditions:
        out.append(c if isinstance(c, Condition) else parse_condition(c))
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvaluationError(f"condition name(s) {', '.join(dupes)} appear twice")
    if not out:
        raise EvaluationError("no condition given")
    return out
