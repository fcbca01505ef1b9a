"""Run the scenario evaluation: every scenario under every condition, resumably.

Layout of an evaluation folder ``DIR``::

    DIR/settings.json                 the run's settings (a rerun must match them)
    DIR/runs/{scenario}__{cond}.json  one finished conversation per (scenario, condition): a
                                      research-layout transcript with the live readings
                                      (``persona_compass.turns``) and an ``evaluation`` block
                                      (seed, per-turn user source and timing, judged outcomes)
    DIR/capability/{cond}.json        the capability items answered under one condition
    DIR/report.md, results.json, report.html, charts/*.png   written by :mod:`.report`

Each unit (a run file, a capability file) is written once, atomically, when it is complete:
a run killed at any moment loses at most the unit in progress, and a rerun of the same
command skips every complete unit made with the same settings. Settings that change what
a unit contains (model, bundle, sampling, turns, user, judge, seed, ...) are compared with
``settings.json``; a rerun with others is refused unless ``force=True``, which redoes the
affected units (when only the judge changed, the stored answers are re-judged without
generating again). The selection (which scenarios and conditions) may change freely between
runs: new units are added, and the report covers the current selection.

Pairing: every scenario gets one seed (from ``seed`` and the scenario id) that all
conditions share, and the compass seeds each answer with ``seed + turn``, so conditions are
compared on the same sampling schedule (a scripted user also sends the same messages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..alerts import AlertRules
from ..atomic import write_json
from ..axis import Axis, model_fingerprint
from ..bundles import resolve_bundle
from ..capping import CAPPING_FILE, CappingConfig
from ..compass import AdaptivePolicy, CompassSession
from ..errors import PersonaCompassError
from ..generation import SamplingConfig, generate_chat
from ..interventions import capping, steering
from ..transcripts import save_transcript
from .capability import CapabilityItem, load_capability_items, score_answer
from .conditions import (
    BASELINE,
    DEFAULT_CONDITIONS,
    Condition,
    build_capping,
    check_condition,
    condition_slug,
    parse_condition,
    parse_conditions,
)
from .outcomes import OutcomeItem, make_outcome_judge
from .scenarios import Scenario, load_scenarios
from .users import ScriptedUser, make_user, make_user_backend

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
RUNS_DIR = "runs"
CAPABILITY_DIR = "capability"
SETTINGS_FORMAT = "persona-compass-evaluation/1"
RUN_FORMAT = "persona-compass-eval-run/1"
CAPABILITY_FORMAT = "persona-compass-eval-capability/1"

# Settings a rerun must share with the run it continues (what the stored units contain).
RESUME_KEYS: tuple[str, ...] = (
    "model",
    "model_fingerprint",
    "dtype",
    "bundle_digest",
    "user",
    "judge",
    "turns",
    "max_new_tokens",
    "temperature",
    "top_p",
    "repetition_penalty",
    "seed",
    "system_prompt",
    "rules",
    "policy",
    "capability_max_new_tokens",
    "capability_items_digest",
)
# Of those, what generation depends on (a change of the judge alone only re-judges).
GENERATION_KEYS: tuple[str, ...] = tuple(k for k in RESUME_KEYS if k != "judge")


class EvaluationError(PersonaCompassError):
    """An evaluation that cannot start or continue (settings clash, bad selection...)."""


# --------------------------------------------------------------------------- helpers


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def scenario_seed(seed: int, scenario_id: str) -> int:
    """The sampling seed of one scenario: fixed by the run seed and the scenario id, shared
    by every condition (so the conditions' answers are paired), independent of the selection."""
    raw = hashlib.sha256(f"{seed}/{scenario_id}".encode()).digest()
    return int.from_bytes(raw[:4], "big") % (2**31 - 1000)


def bundle_digest(folder: Path) -> str:
    """A hash of the bundle files that decide the readings and the caps."""
    h = hashlib.sha256()
    for name in ("axis.safetensors", "bundle.json", "calibration.json", CAPPING_FILE):
        path = folder / name
        h.update(name.encode())
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    for extra in sorted(folder.glob("capping.safetensors")):
        h.update(hashlib.sha256(extra.read_bytes()).digest())
    return h.hexdigest()[:20]


def capping_digest(cfg: CappingConfig | None) -> str | None:
    if cfg is None:
        return None
    data = cfg.vectors.contiguous().numpy().tobytes()
    return _digest(
        {
            "layers": list(cfg.layers),
            "thresholds": list(cfg.thresholds),
            "form": cfg.form,
            "vectors": hashlib.sha256(data).hexdigest(),
        }
    )


def items_digest(items: Sequence[CapabilityItem]) -> str:
    return _digest([item.to_dict() for item in items])


def run_path(out_dir: Path, scenario_id: str, condition: str) -> Path:
    return out_dir / RUNS_DIR / f"{scenario_id}__{condition_slug(condition)}.json"


def capability_path(out_dir: Path, condition: str) -> Path:
    return out_dir / CAPABILITY_DIR / f"{condition_slug(condition)}.json"


def read_unit(path: Path, fmt: str) -> dict[str, Any] | None:
    """A complete unit file, or None (missing, partial, foreign or unfinished)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        logger.warning("%s is unreadable (a partial write?); it will be redone", path)
        return None
    block = data.get("evaluation") if isinstance(data, dict) else None
    if (
        not isinstance(block, dict)
        or block.get("format") != fmt
        or block.get("complete") is not True
    ):
        logger.warning("%s is not a complete evaluation unit; it will be redone", path)
        return None
    return data


def read_settings(out_dir: str | Path) -> dict[str, Any]:
    """``DIR/settings.json``.

    Raises:
        EvaluationError: there is none, or it is unreadable.
    """
    path = Path(out_dir) / SETTINGS_FILE
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist; is {out_dir} an evaluation folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SETTINGS_FORMAT:
        raise EvaluationError(f"{path} is not a persona-compass evaluation settings file")
    return data


# --------------------------------------------------------------------------- results


@dataclass
class EvaluationResult:
    """What :func:`run_evaluation` did."""

    out_dir: Path
    settings: dict[str, Any]
    planned: int = 0
    generated: int = 0
    rejudged: int = 0
    skipped: int = 0
    capability_planned: int = 0
    capability_done: int = 0
    seconds: float = 0.0
    answers: int = 0
    answer_seconds: list[float] = field(default_factory=list)

    @property
    def seconds_per_answer(self) -> float | None:
        return sum(self.answer_seconds) / len(self.answer_seconds) if self.answer_seconds else None


# --------------------------------------------------------------------------- progress


class _Progress:
    """Rich progress bars with ETA on stderr (or nothing)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    @contextmanager
    def live(self) -> Iterator[_Progress]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        def fixed() -> Column:
            return Column(no_wrap=True)

        self._progress = Progress(
            TextColumn("[bold]{task.description}", table_column=fixed()),
            BarColumn(bar_width=24),
            MofNCompleteColumn(table_column=fixed()),
            TextColumn("elapsed", table_column=fixed()),
            TimeElapsedColumn(table_column=fixed()),
            TextColumn("eta", table_column=fixed()),
            TimeRemainingColumn(table_column=fixed()),
            TextColumn(
                "{task.fields[unit]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1, min_width=0),
            ),
            console=Console(stderr=True),
            transient=False,
        )
        with self._progress:
            yield self
        self._progress = None

    def add(self, description: str, total: int) -> Any:
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, unit="")

    def advance(self, task: Any, n: int = 1, unit: str | None = None) -> None:
        if self._progress is None or task is None:
            return
        if unit is None:
            self._progress.advance(task, n)
        else:
            self._progress.update(task, advance=n, unit=unit)


# --------------------------------------------------------------------------- the run


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


def _check_settings(
    out_dir: Path, settings: dict[str, Any], *, force: bool
) -> dict[str, Any] | None:
    """Compare with an existing settings.json; returns the previous settings (or None)."""
    path = out_dir / SETTINGS_FILE
    if not path.exists():
        if out_dir.exists() and any(p for p in out_dir.iterdir() if not p.name.startswith(".")):
            raise EvaluationError(
                f"{out_dir} is not empty and holds no {SETTINGS_FILE}; choose a new --out"
            )
        return None
    previous = read_settings(out_dir)
    diffs = [
        f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}"
        for k in RESUME_KEYS
        if previous.get(k) != settings.get(k)
    ]
    if diffs and not force:
        raise EvaluationError(
            f"{out_dir} holds an evaluation made with other settings ({'; '.join(diffs)}); "
            f"rerun with the same settings (see {path}), choose a new --out, or pass --force "
            "to redo the affected runs (when only the judge changed, the stored answers are "
            "re-judged without generating again)"
        )
    if diffs:
        logger.warning("settings changed (%s): affected units will be redone", "; ".join(diffs))
    return previous


def run_evaluation(
    axis_path: str | Path,
    out_dir: str | Path,
    *,
    model_spec: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    dtype: str | None = None,
    scenarios: Sequence[Scenario] | None = None,
    scenario_source: str | None = None,
    conditions: str | Sequence[str | Condition] = DEFAULT_CONDITIONS,
    user: str = "scripted",
    judge: str = "heuristic",
    limit: int | None = None,
    turns: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.9,
    repetition_penalty: float = 1.1,
    seed: int = 0,
    system_prompt: str | None = None,
    rules: AlertRules | None = None,
    policy: AdaptivePolicy | None = None,
    capability: bool = True,
    capability_items: Sequence[CapabilityItem] | None = None,
    capability_limit: int | None = None,
    capability_max_new_tokens: int = 16,
    capability_batch_size: int = 8,
    sweep: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    command: str = "",
    on_answer: Callable[[str, str, int, float], None] | None = None,
) -> EvaluationResult:
    """Run (or resume) an evaluation into ``out_dir``; see the module docstring.

    Args:
        axis_path: the axis bundle (folder or shipped alias); its ``capping.json`` serves
            ``capped``/``adaptive`` and its calibration ``cap:A:B@pP`` conditions.
        out_dir: the evaluation folder.
        model_spec: the model (default: the bundle's); or pass a loaded ``model`` and
            ``tokenizer`` (``model_spec`` then only labels it).
        dtype: model dtype when loading.
        scenarios: the scenarios (default: every shipped one); ``limit`` keeps the first N.
        scenario_source: how to name where they came from in the settings and the report.
        conditions: condition specs (see :mod:`.conditions`), a comma string or a list.
        user: who plays the user: ``scripted``, ``model:SPEC``, ``model:self`` or
            ``openai:URL[#model]``.
        judge: the outcome judge: ``heuristic`` or ``openai:URL[#model]``.
        turns: user turns per conversation (default: each scenario's whole script).
        max_new_tokens, temperature, top_p, repetition_penalty: sampling of the answers.
        seed: the run seed (each scenario's seed derives from it and the scenario id).
        system_prompt: a system message at the start of every conversation.
        rules, policy: alert rules and the adaptive release policy.
        capability: also answer the capability items under each condition that changes a
            single answer (and the baseline); greedy, ``capability_max_new_tokens`` tokens.
        capability_items, capability_limit: the items (default: the shipped set), first N.
        sweep: ``{"windows": [...], "percentiles": [...]}`` when this is a sweep (recorded
            for the report).
        force: accept new settings and redo the units they affect.
        progress: show rich progress bars on stderr.
        command: the command line, recorded in the settings.
        on_answer: called with (scenario id, condition, turn, seconds) after every answer.

    Raises:
        EvaluationError, ConditionError, ScenarioError, UserError, OutcomeError: bad input
            or a settings clash, before any generation.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    conds = _resolve_conditions(conditions)
    for name, value in (("limit", limit), ("turns", turns), ("capability_limit", capability_limit)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise EvaluationError(f"{name}={value!r} must be a positive integer")
    try:
        SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        SamplingConfig(max_new_tokens=capability_max_new_tokens)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    chosen = list(scenarios) if scenarios is not None else load_scenarios()
    if scenario_source is None:
        scenario_source = "shipped" if scenarios is None else "custom"
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise EvaluationError("no scenario selected")
    ids = [s.id for s in chosen]
    if len(set(ids)) != len(ids):
        raise EvaluationError("two selected scenarios share an id; ids must be unique")
    rules = rules or AlertRules()
    policy = policy or AdaptivePolicy()

    is_scripted = user.strip().lower() == "scripted"
    if is_scripted and turns is not None:
        short = [s.id for s in chosen if s.n_turns < turns]
        if short:
            raise EvaluationError(
                f"--turns {turns} but scenario(s) {', '.join(short)} script fewer user turns; "
                "use --turns at most the shortest script, or a simulated user "
                "(--user model:self)"
            )

    folder = resolve_bundle(axis_path)
    if model is None:
        from ..cli.common import load_axis_and_model

        axis, model, tokenizer, spec = load_axis_and_model(str(axis_path), model_spec, dtype)
    else:
        if tokenizer is None:
            raise EvaluationError("a model was passed without its tokenizer")
        axis = Axis.load(folder)
        axis.check_model(model)
        spec = model_spec or axis.model_id or "model"
    bundle_cap = CappingConfig.load(folder) if (folder / CAPPING_FILE).is_file() else None
    for cond in conds:
        check_condition(cond, axis, bundle_cap)
    caps = {c.name: build_capping(c, axis, bundle_cap) for c in conds}

    items: list[CapabilityItem] = []
    if capability:
        items = list(capability_items) if capability_items is not None else load_capability_items()
        if capability_limit is not None:
            items = items[:capability_limit]
    judge_obj = make_outcome_judge(judge)

    settings: dict[str, Any] = {
        "format": SETTINGS_FORMAT,
        "library_version": __version__,
        "model": spec,
        "model_fingerprint": model_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "bundle": str(folder),
        "axis_model_id": axis.model_id,
        "monitor_layer": axis.layer,
        "calibrated": axis.calibration is not None,
        "bundle_capping": None if bundle_cap is None else bundle_cap.name,
        "bundle_digest": bundle_digest(folder),
        "user": user.strip(),
        "judge": judge_obj.name,
        "turns": turns,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "system_prompt": system_prompt,
        "rules": rules.to_dict(),
        "policy": {
            "release_percentile": policy.release_percentile,
            "release_turns": policy.release_turns,
            "release_engagement": policy.release_engagement,
        },
        "capability_max_new_tokens": capability_max_new_tokens,
        "capability_items_digest": items_digest(items) if items else None,
        # the selection: may change between runs
        "scenario_source": scenario_source,
        "scenarios": [s.to_dict() for s in chosen],
        "conditions": [c.to_dict() for c in conds],
        "capping_configs": {
            name: None if cfg is None else cfg.to_dict(include_vectors=False)
            for name, cfg in caps.items()
        },
        "limit": limit,
        "capability": capability,
        "capability_limit": capability_limit,
        "capability_n_items": len(items),
        "sweep": sweep,
        "command": command,
    }
    settings["settings_digest"] = _digest({k: settings.get(k) for k in GENERATION_KEYS})
    _check_settings(out, settings, force=force)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUNS_DIR).mkdir(exist_ok=True)
    write_json(out / SETTINGS_FILE, settings)

    result = EvaluationResult(out, settings)
    backend = make_user_backend(user, model=model, tokenizer=tokenizer)
    gen_settings = {k: settings[k] for k in GENERATION_KEYS}

    # plan: scenario-major, so that interrupted runs leave complete pairs
    plan: list[tuple[Scenario, Condition, str, Path, dict[str, Any] | None]] = []
    for scen in chosen:
        for cond in conds:
            key = _digest(
                {
                    "settings": gen_settings,
                    "scenario": scen.to_dict(),
                    "condition": cond.to_dict(),
                    "capping": capping_digest(caps[cond.name]),
                }
            )
            path = run_path(out, scen.id, cond.name)
            existing = read_unit(path, RUN_FORMAT)
            if existing is not None and existing["evaluation"].get("key") != key:
                if not force:
                    raise EvaluationError(
                        f"{path} was made with other settings or another scenario/condition "
                        "text than this run's; pass --force to redo it, or choose a new --out"
                    )
                existing = None
            plan.append((scen, cond, key, path, existing))
    result.planned = len(plan)

    cap_plan: list[tuple[Condition, str, Path, dict[str, Any] | None]] = []
    if items:
        measured = [c for c in conds if c.modifies_single_turn]
        base = next((c for c in conds if c.is_baseline), parse_condition(BASELINE))
        for cond in [base, *measured]:
            cfg = caps.get(cond.name) if cond.name in caps else None
            key = _digest(
                {
                    "settings": gen_settings,
                    "items": settings["capability_items_digest"],
                    "n": len(items),
                    "condition": cond.to_dict(),
                    "capping": capping_digest(cfg),
                }
            )
            path = capability_path(out, cond.name)
            existing = read_unit(path, CAPABILITY_FORMAT)
            if existing is not None and existing["evaluation"].get("key") != key:
                if not force:
                    raise EvaluationError(
                        f"{path} was made with other settings; pass --force to redo it"
                    )
                existing = None
            cap_plan.append((cond, key, path, existing))
    result.capability_planned = len(cap_plan)

    def n_turns_of(scen: Scenario) -> int:
        return turns if turns is not None else scen.n_turns

    todo_answers = sum(n_turns_of(s) for s, _, _, _, e in plan if e is None)
    todo_items = len(items) * sum(1 for *_, e in cap_plan if e is None)
    bars = _Progress(progress)
    try:
        with bars.live():
            task = bars.add("answers", todo_answers) if todo_answers else None
            for scen, cond, key, path, existing in plan:
                if existing is not None:
                    if existing["evaluation"].get("judge") == judge_obj.name:
                        result.skipped += 1
                        continue
                    _rejudge(path, existing, judge_obj)
                    result.rejudged += 1
                    continue
                _run_unit(
                    path=path,
                    key=key,
                    scenario=scen,
                    condition=cond,
                    cap_cfg=caps[cond.name],
                    model=model,
                    tokenizer=tokenizer,
                    axis=axis,
                    spec=spec,
                    settings=settings,
                    backend=backend,
                    n_turns=n_turns_of(scen),
                    rules=rules,
                    policy=policy,
                    judge=judge_obj,
                    result=result,
                    on_answer=on_answer,
                    tick=lambda unit: bars.advance(task, 1, unit),
                )
                result.generated += 1
            cap_task = bars.add("capability", todo_items) if todo_items else None
            for cond, key, path, existing in cap_plan:
                if existing is not None:
                    continue
                _run_capability(
                    path=path,
                    key=key,
                    condition=cond,
                    cap_cfg=caps.get(cond.name),
                    items=items,
                    model=model,
                    tokenizer=tokenizer,
                    axis=axis,
                    settings=settings,
                    batch_size=capability_batch_size,
                    tick=lambda n, unit: bars.advance(cap_task, n, unit),
                )
                result.capability_done += 1
    finally:
        for obj in (backend, judge_obj):
            close = getattr(obj, "close", None)
            if callable(close):
                close()
    result.seconds = time.perf_counter() - started
    return result


def _outcome_items(
    scenario: Scenario, messages: Sequence[dict[str, str]], answers: Sequence[str]
) -> list[OutcomeItem]:
    """One judge item per assistant answer: (domain, the user turn before it, the answer)."""
    out = []
    k = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prev = next(
            (messages[j]["content"] for j in range(i - 1, -1, -1) if messages[j]["role"] == "user"),
            "",
        )
        out.append(OutcomeItem(scenario.domain, prev, answers[k]))
        k += 1
    return out


def _judge_answers(judge: Any, items: Sequence[OutcomeItem]) -> list[dict[str, Any]]:
    verdicts = judge.judge(list(items))
    if len(verdicts) != len(items):
        raise EvaluationError(
            f"outcome judge {judge.name!r} returned {len(verdicts)} verdicts for "
            f"{len(items)} answers"
        )
    return [v.to_dict() for v in verdicts]


def _run_unit(
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
) -> None:
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
    )
    if backend is None:
        user: Any = ScriptedUser(scenario, max_turns=n_turns)
    else:
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
        records.append(
            {
                "turn": turn,
                "message_index": answer.reading.index,
                "user_source": user_turn.source,
                "user_note": user_turn.note,
                "user_seconds": round(t1 - t0, 4),
                "answer_seconds": round(seconds, 4),
                "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "cap_engaged_next": answer.cap_engaged_next,
            }
        )
        result.answers += 1
        result.answer_seconds.append(seconds)
        if on_answer is not None:
            on_answer(scenario.id, condition.name, turn, seconds)
        tick(f"{label} turn {turn}")
    outcomes = _judge_answers(judge, _outcome_items(scenario, session.messages, answers))
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
    save_transcript(
        path, session.messages, model=spec, readings=session.readings(), metadata=metadata
    )


def _rejudge(path: Path, data: dict[str, Any], judge: Any) -> None:
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


@contextmanager
def _interventions(
    model: Any, axis: Axis, condition: Condition, cfg: CappingConfig | None
) -> Iterator[None]:
    """The condition's steering and (always-on) capping, for single-turn answers."""
    with ExitStack() as stack:
        if condition.steering is not None:
            s = condition.steering
            stack.enter_context(steering(model, axis, s.coefficient, s.layers, scale=s.scale))
        if condition.mode == "on" and cfg is not None:
            stack.enter_context(capping(model, cfg))
        yield


def _run_capability(
    *,
    path: Path,
    key: str,
    condition: Condition,
    cap_cfg: CappingConfig | None,
    items: Sequence[CapabilityItem],
    model: Any,
    tokenizer: Any,
    axis: Axis,
    settings: dict[str, Any],
    batch_size: int,
    tick: Callable[[int, str], None],
) -> None:
    """Answer every item once, greedily, under the condition; write the unit file."""
    started = time.perf_counter()
    sampling = SamplingConfig(
        max_new_tokens=settings["capability_max_new_tokens"],
        temperature=0.0,
        repetition_penalty=1.0,
        seed=None,
    )
    system = settings["system_prompt"]
    rows: list[dict[str, Any]] = []
    batch = max(1, batch_size)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        convs = [
            ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": item.prompt}]
            for item in chunk
        ]
        with torch.inference_mode(), _interventions(model, axis, condition, cap_cfg):
            texts = generate_chat(model, tokenizer, convs, sampling).texts
        for item, text in zip(chunk, texts, strict=True):
            rows.append(
                {
                    "id": item.id,
                    "category": item.category,
                    "reply": text,
                    "correct": score_answer(item, text),
                }
            )
        tick(len(chunk), f"capability / {condition.name}")
    write_json(
        path,
        {
            "condition": condition.name,
            "items": rows,
            "evaluation": {
                "format": CAPABILITY_FORMAT,
                "complete": True,
                "key": key,
                "settings_digest": settings["settings_digest"],
                "condition": condition.to_dict(),
                "capping_config": None
                if cap_cfg is None
                else cap_cfg.to_dict(include_vectors=False),
                "max_new_tokens": settings["capability_max_new_tokens"],
                "seconds": round(time.perf_counter() - started, 3),
            },
        },
    )
