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

Engines: ``hf`` plays one unit after another in this process; ``vllm`` plays a wave of units
together, every conversation's turn t in one batch (:mod:`.run_batched`, started by
:mod:`.run_engine`). Which engine ran is a generation setting.

Code: :mod:`.run_store` keeps the settings, unit files and digests; :mod:`.run_conversation`
plays and judges one conversation unit; :mod:`.run_capability` answers one capability unit.
This module plans and drives them, and re-exports their public names.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import __version__
from ..alerts import AlertRules
from ..atomic import write_json
from ..axis import Axis, model_fingerprint
from ..bundles import resolve_bundle
from ..capping import CappingConfig
from ..compass import AdaptivePolicy
from ..generation import SamplingConfig
from .capability import CapabilityItem, load_capability_items
from .conditions import (
    BASELINE,
    DEFAULT_CONDITIONS,
    Condition,
    check_condition,
    parse_condition,
    parse_conditions,
)
from .outcomes import make_outcome_judge
from .run_batched import (
    CapabilityUnit,
    ConversationUnit,
    run_capability_units,
    run_conversation_wave,
)
from .run_capability import run_capability_unit
from .run_conversation import rejudge_unit, run_conversation_unit, scenario_seed
from .run_engine import (
    MAX_BATCH,
    EngineUserBackend,
    VLLMModelInfo,
    check_engine,
    check_engine_layers,
    start_vllm_engine,
    vllm_model_info,
)
from .run_store import (
    CAPABILITY_DIR,
    CAPABILITY_FORMAT,
    GENERATION_KEYS,
    RESUME_KEYS,
    RUN_FORMAT,
    RUNS_DIR,
    SETTINGS_FILE,
    SETTINGS_FORMAT,
    EvaluationError,
    EvaluationResult,
    bundle_digest,
    capability_path,
    capping_digest,
    check_settings,
    generation_settings,
    items_digest,
    json_digest,
    read_settings,
    read_unit,
    run_path,
)
from .scenarios import Scenario, load_scenarios
from .users import make_user_backend

__all__ = [
    "CAPABILITY_DIR",
    "CAPABILITY_FORMAT",
    "GENERATION_KEYS",
    "RESUME_KEYS",
    "RUN_FORMAT",
    "RUNS_DIR",
    "SETTINGS_FILE",
    "SETTINGS_FORMAT",
    "EvaluationError",
    "EvaluationResult",
    "bundle_digest",
    "capability_path",
    "capping_digest",
    "items_digest",
    "read_settings",
    "read_unit",
    "run_evaluation",
    "run_path",
    "scenario_seed",
]

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


def _reusable_unit(
    path: Path, fmt: str, key: str, force: bool, clash: str
) -> dict[str, Any] | None:
    """The complete unit at ``path`` when it was made with ``key``; None when there is none or
    (with ``force``) it was made otherwise, to be redone.

    Raises:
        EvaluationError: it was made otherwise and ``force`` is off (``{path} {clash}``).
    """
    existing = read_unit(path, fmt)
    if existing is not None and existing["evaluation"].get("key") != key:
        if not force:
            raise EvaluationError(f"{path} {clash}")
        return None
    return existing


def run_evaluation(
    axis_path: str | Path,
    out_dir: str | Path,
    *,
    model_spec: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    dtype: str | None = None,
    engine: Any = "hf",
    engine_options: dict[str, Any] | None = None,
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
        dtype: model dtype when loading (the same for both engines).
        engine: ``"hf"`` (default: the model in this process, one conversation at a time),
            ``"vllm"`` (every conversation's next turn, and the capability items, in one vLLM
            batch; the HF weights are never loaded), or an engine already started on this
            bundle (:func:`persona_compass.engines.open_engine`). A generation setting: a
            rerun with the other engine is refused unless ``force``.
        engine_options: options for the ``vllm`` engine started here (``enforce_eager``,
            ``max_num_seqs``, ``kv_cache_gib``, ...; see ``VLLMEngine``).
        scenarios: the scenarios (default: every shipped one); ``limit`` keeps the first N.
        scenario_source: how to name where they came from in the settings and the report.
        conditions: condition specs (see :mod:`.conditions`), a comma string or a list.
        user: who plays the user: ``scripted``, ``model:SPEC``, ``model:self`` or
            ``openai:URL[#model]``.
        judge: the outcome judge: ``heuristic`` or ``openai:URL[#model]``.
        turns: user turns per conversation (default: each scenario's whole script).
        max_new_tokens: sampling of the answers: tokens per answer.
        temperature: sampling of the answers.
        top_p: sampling of the answers.
        repetition_penalty: sampling of the answers.
        seed: the run seed (each scenario's seed derives from it and the scenario id).
        system_prompt: a system message at the start of every conversation.
        rules: alert rules.
        policy: the adaptive release policy.
        capability: also answer the capability items under each condition that changes a
            single answer (and the baseline); greedy, ``capability_max_new_tokens`` tokens.
        capability_items: the items (default: the shipped set).
        capability_limit: only the first N items.
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
    engine_name, engine_obj = check_engine(engine)
    if engine_name == "hf" and engine_obj is not None and model is None:
        model, tokenizer = engine_obj.model, engine_obj.tokenizer
    if engine_name == "vllm" and model is not None:
        raise EvaluationError(
            "a loaded model was passed with engine='vllm', which loads its own; drop model= "
            "(and pass model_spec=), or use engine='hf'"
        )
    if engine_name == "hf" and engine_options:
        raise EvaluationError("engine_options apply to engine='vllm' only")
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
    vinfo: VLLMModelInfo | None = None
    if engine_name == "vllm":
        axis, spec, fingerprint, dtype_name, vinfo = _vllm_model(
            folder, model_spec, dtype, engine_obj
        )
    elif model is None:
        from ..cli.common import load_axis_and_model

        axis, model, tokenizer, spec = load_axis_and_model(str(axis_path), model_spec, dtype)
    else:
        if tokenizer is None:
            raise EvaluationError("a model was passed without its tokenizer")
        axis = Axis.load(folder)
        axis.check_model(model)
        spec = model_spec or axis.model_id or "model"
    bundle_cap = CappingConfig.load_optional(folder)
    caps = {c.name: check_condition(c, axis, bundle_cap) for c in conds}
    cap_digests = {name: capping_digest(cfg) for name, cfg in caps.items()}
    if engine_obj is not None and engine_name == "vllm":
        check_engine_layers(engine_obj, axis, conds, caps)
    if engine_name == "hf":
        fingerprint = model_fingerprint(model)
        dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")

    items: list[CapabilityItem] = []
    if capability:
        items = list(capability_items) if capability_items is not None else load_capability_items()
        if capability_limit is not None:
            items = items[:capability_limit]
    judge_obj = make_outcome_judge(judge)

    settings: dict[str, Any] = {
        "format": SETTINGS_FORMAT,
        "library_version": __version__,
        "engine": engine_name,
        "model": spec,
        "model_fingerprint": fingerprint,
        "dtype": dtype_name,
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
        "policy": dataclasses.asdict(policy),
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
    gen_settings = generation_settings(settings)
    settings["settings_digest"] = json_digest(gen_settings)
    check_settings(out, settings, force=force)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUNS_DIR).mkdir(exist_ok=True)
    write_json(out / SETTINGS_FILE, settings)

    result = EvaluationResult(out, settings)
    self_user = engine_name == "vllm" and _plays_itself(user)
    backend = None if self_user else make_user_backend(user, model=model, tokenizer=tokenizer)

    # plan: scenario-major, so that interrupted runs leave complete pairs
    plan: list[tuple[Scenario, Condition, str, Path, dict[str, Any] | None]] = []
    for scen in chosen:
        for cond in conds:
            key = json_digest(
                {
                    "settings": gen_settings,
                    "scenario": scen.to_dict(),
                    "condition": cond.to_dict(),
                    "capping": cap_digests[cond.name],
                }
            )
            path = run_path(out, scen.id, cond.name)
            existing = _reusable_unit(
                path,
                RUN_FORMAT,
                key,
                force,
                "was made with other settings or another scenario/condition text than this "
                "run's; pass --force to redo it, or choose a new --out",
            )
            plan.append((scen, cond, key, path, existing))
    result.planned = len(plan)

    cap_plan: list[tuple[Condition, str, Path, dict[str, Any] | None]] = []
    if items:
        measured = [c for c in conds if c.modifies_single_turn]
        base = next((c for c in conds if c.is_baseline), parse_condition(BASELINE))
        for cond in [base, *measured]:
            key = json_digest(
                {
                    "settings": gen_settings,
                    "items": settings["capability_items_digest"],
                    "n": len(items),
                    "condition": cond.to_dict(),
                    "capping": cap_digests.get(cond.name),
                }
            )
            path = capability_path(out, cond.name)
            existing = _reusable_unit(
                path,
                CAPABILITY_FORMAT,
                key,
                force,
                "was made with other settings; pass --force to redo it",
            )
            cap_plan.append((cond, key, path, existing))

    def n_turns_of(scen: Scenario) -> int:
        return turns if turns is not None else scen.n_turns

    todo_answers = sum(n_turns_of(s) for s, _, _, _, e in plan if e is None)
    todo_items = len(items) * sum(1 for *_, e in cap_plan if e is None)
    bars = _Progress(progress)
    started_engine: Any = None
    try:
        if engine_name == "vllm":
            eng = engine_obj
            pending = sum(1 for *_, e in plan if e is None)
            if eng is None and (todo_answers or todo_items):
                assert vinfo is not None
                n_cap = sum(1 for *_, e in cap_plan if e is None)
                eng = started_engine = start_vllm_engine(
                    vinfo,
                    folder,
                    axis,
                    conds,
                    caps,
                    batch=max(pending, len(items) * n_cap),
                    options=engine_options,
                )
            if self_user and eng is not None:
                backend = EngineUserBackend(eng, f"model:{spec}")
        with bars.live():
            if engine_name == "vllm":
                task = bars.add("answers", todo_answers) if todo_answers else None
                units: list[ConversationUnit] = []
                for scen, cond, key, path, existing in plan:
                    if existing is None:
                        units.append(
                            ConversationUnit(
                                path, key, scen, cond, caps[cond.name], n_turns_of(scen)
                            )
                        )
                    elif existing["evaluation"].get("judge") == judge_obj.name:
                        result.skipped += 1
                    else:
                        rejudge_unit(path, existing, judge_obj)
                        result.rejudged += 1
                # waves of at most MAX_BATCH conversations: a killed run loses at most one wave
                for first in range(0, len(units), MAX_BATCH):
                    run_conversation_wave(
                        units[first : first + MAX_BATCH],
                        engine=eng,
                        axis=axis,
                        spec=spec,
                        settings=settings,
                        backend=backend,
                        rules=rules,
                        policy=policy,
                        judge=judge_obj,
                        result=result,
                        on_answer=on_answer,
                        tick=lambda unit: bars.advance(task, 1, unit),
                    )
                cap_task = bars.add("capability", todo_items) if todo_items else None
                cap_units = [
                    CapabilityUnit(path, key, cond, caps.get(cond.name))
                    for cond, key, path, existing in cap_plan
                    if existing is None
                ]
                run_capability_units(
                    cap_units,
                    items,
                    engine=eng,
                    settings=settings,
                    tick=lambda n, unit: bars.advance(cap_task, n, unit),
                )
                result.capability_done += len(cap_units)
            else:
                task = bars.add("answers", todo_answers) if todo_answers else None
                for scen, cond, key, path, existing in plan:
                    if existing is not None:
                        if existing["evaluation"].get("judge") == judge_obj.name:
                            result.skipped += 1
                            continue
                        rejudge_unit(path, existing, judge_obj)
                        result.rejudged += 1
                        continue
                    run_conversation_unit(
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
                    run_capability_unit(
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
        for obj in (backend, judge_obj, started_engine):
            close = getattr(obj, "close", None)
            if callable(close):
                close()
    result.seconds = time.perf_counter() - started
    return result


def _plays_itself(user: str) -> bool:
    """Whether the user spec is ``model:self`` (the model under evaluation plays the user)."""
    from ..specs import SELF

    text = user.strip()
    return text.lower().startswith("model:") and text.split(":", 1)[1].strip().lower() == SELF


def _vllm_model(
    folder: Path, model_spec: str | None, dtype: str | None, engine: Any
) -> tuple[Axis, str, str, str, VLLMModelInfo | None]:
    """The axis, model spec, config fingerprint and dtype of a vllm run (no weights loaded),
    and what is needed to start the engine (None when one was passed in)."""
    from transformers import AutoConfig

    from ..cli.common import DEFAULT_MODEL

    axis = Axis.load(folder)
    spec = model_spec or axis.model_id or DEFAULT_MODEL
    if engine is not None:
        config = AutoConfig.from_pretrained(engine.folder)
        dtype_name = str(engine.llm.llm_engine.model_config.dtype).replace("torch.", "")
        info = None
    else:
        info = vllm_model_info(spec, dtype)
        config = AutoConfig.from_pretrained(info.folder)
        dtype_name = info.dtype
    axis.check_model(config)
    return axis, spec, model_fingerprint(config), dtype_name, info
