"""Run the scenario evaluation: every scenario under every condition, resumably.

Layout of an evaluation folder ``DIR``::

    DIR/settings.json                 the run's settings (a rerun must match them)
    DIR/.persona-compass.lock         held by the run writing the folder (one at a time)
    DIR/runs/{scenario}__{cond}.json  one finished conversation per (scenario, condition): a
                                      research-layout transcript with the live readings
                                      (``persona_compass.turns``) and an ``evaluation`` block
                                      (seed, per-turn user source and timing, judged outcomes)
    DIR/capability/{cond}.json        the capability items answered under one condition
    DIR/report.md, results.json, report.html, charts/*.png   written by :mod:`.report`

Each unit (a run file, a capability file) is written once, atomically, when it is complete:
a run killed at any moment loses at most the unit in progress, and a rerun of the same
command skips every complete unit made with the same settings. Settings that change what
a unit contains (model, bundle, sampling, turns, user, judge, seed, ...; each field of
:class:`~.settings.EvaluationSettings` declares whether it does) are compared with
``settings.json``; a rerun with others is refused unless ``force=True``, which redoes the
affected units (when only the judge changed, the stored answers are re-judged without
generating again). The selection (which scenarios and conditions) may change freely between
runs: new units are added, and the report covers the current selection.

Pairing: every scenario gets one seed (from ``seed`` and the scenario id) that all
conditions share, and the compass seeds each answer with ``seed + turn``, so conditions are
compared on the same sampling schedule (a scripted user also sends the same messages).

Trait needles (the settings' ``traits``, :mod:`.run_traits`) are read beside the axis on every
answer, by the session (``hf``) or the engine (``vllm``); each answer's record and reading
carry their ``traits``.

Engines: ``hf`` plays one unit after another in this process; ``vllm`` plays a wave of units
together, every conversation's turn t in one batch (:mod:`.run_batched`, started by
:mod:`.run_engine`). Which engine ran is a generation setting.

Code: :mod:`.settings` says what a run is; :mod:`persona_compass.run_folder` holds the folder
(lock, settings record, resume check); :mod:`.run_store` keeps the unit files and digests;
:mod:`.run_conversation` plays and judges one conversation unit; :mod:`.run_capability`
answers one capability unit. This module plans and drives them, and re-exports their public
names.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import __version__
from ..axis import model_fingerprint
from ..bundle import Bundle
from ..run_folder import RunFolder
from .conditions import BASELINE, Condition, check_condition, parse_condition
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
    RUN_FORMAT,
    RUNS_DIR,
    SETTINGS_FILE,
    SETTINGS_FORMAT,
    EvaluationError,
    EvaluationResult,
    bundle_digest,
    capability_path,
    capping_digest,
    items_digest,
    json_digest,
    read_settings,
    read_unit,
    run_path,
)
from .run_traits import check_engine_traits, open_traits, trait_names, trait_record
from .scenarios import Scenario
from .settings import (
    GENERATION_KEYS,
    RESUME_KEYS,
    RESUME_RULE,
    EvaluationSettings,
    generation_settings,
)
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
    "EvaluationSettings",
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


# What a refusal to resume offers besides the same settings or a new folder.
FORCE_OPTION = (
    "pass --force to redo the affected runs (when only the judge changed, the stored answers "
    "are re-judged without generating again)"
)


def _runtime_engine(name: str, engine: Any) -> tuple[str, Any]:
    """The run's engine kind and the started engine passed in (or None), which must be of the
    kind the settings name.

    Raises:
        EvaluationError: ``engine`` is no engine, or one of the other kind.
    """
    if engine is None:
        return name, None
    if isinstance(engine, str):
        raise EvaluationError(
            f"engine={engine!r}: name the engine in the settings "
            f"(EvaluationSettings(..., engine={engine!r})); run_evaluation's engine= takes an "
            "engine you started (persona_compass.engines.open_engine)"
        )
    kind, started = check_engine(engine)
    if kind != name:
        raise EvaluationError(
            f"the engine passed is a {kind} engine but the settings say engine={name!r}; "
            f"set EvaluationSettings(..., engine={kind!r}), or pass a {name} engine"
        )
    return kind, started


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
    settings: EvaluationSettings,
    out_dir: str | Path,
    *,
    model: Any = None,
    tokenizer: Any = None,
    engine: Any = None,
    force: bool = False,
    progress: bool = True,
    on_answer: Callable[[str, str, int, float], None] | None = None,
) -> EvaluationResult:
    """Run (or resume) the evaluation ``settings`` describe into ``out_dir``; see the module
    docstring.

    Args:
        settings: what to run (:class:`~.settings.EvaluationSettings`).
        out_dir: the evaluation folder; one run at a time writes into it (a second is refused
            while the first holds the folder's lock).
        model: a loaded model (with its ``tokenizer``) for the ``hf`` engine; the settings'
            ``model`` then only labels it. Default: the settings' model, loaded here.
        tokenizer: the loaded model's tokenizer.
        engine: an engine already started on this bundle
            (:func:`persona_compass.engines.open_engine`), of the settings' engine kind.
            Default: the ``vllm`` engine is started here when there is something to generate.
        force: accept settings that differ from the folder's and redo the units they affect
            (when only the judge changed, the stored answers are re-judged without generating).
        progress: show rich progress bars on stderr.
        on_answer: called with (scenario id, condition, turn, seconds) after every answer.

    Raises:
        EvaluationError, ConditionError, ScenarioError, UserError, OutcomeError: bad input
            or a settings clash, before any generation.
    """
    started = time.perf_counter()
    if not isinstance(settings, EvaluationSettings):
        raise EvaluationError(
            f"settings must be an EvaluationSettings, not {type(settings).__name__}; build one "
            "with EvaluationSettings(bundle, ...)"
        )
    out = Path(out_dir)
    engine_name, engine_obj = _runtime_engine(settings.engine, engine)
    if engine_name == "hf" and engine_obj is not None and model is None:
        model, tokenizer = engine_obj.model, engine_obj.tokenizer
    if engine_name == "vllm" and model is not None:
        raise EvaluationError(
            "a loaded model was passed with engine='vllm', which loads its own; drop model= "
            "(the settings' model names what it loads), or use engine='hf'"
        )
    conds = list(settings.condition_list)
    chosen = settings.selected_scenarios()
    turns, rules, policy = settings.turns, settings.rules, settings.policy

    bundle = Bundle.open(settings.bundle)
    folder = bundle.folder
    assert folder is not None  # an opened bundle has its folder
    axis = bundle.axis
    traits = open_traits(settings.traits, axis)
    needles = trait_names(traits)
    vinfo: VLLMModelInfo | None = None
    if engine_name == "vllm":
        spec, fingerprint, dtype_name, vinfo = _vllm_model(
            bundle, settings.model, settings.dtype, engine_obj
        )
    elif model is None:
        model, tokenizer = bundle.load_model(settings.model, dtype=settings.dtype)
        spec = bundle.model_spec(settings.model)
    else:
        if tokenizer is None:
            raise EvaluationError("a model was passed without its tokenizer")
        bundle.check_model(model)
        spec = settings.model or axis.model_id or "model"
    bundle_cap = bundle.capping
    caps = {c.name: check_condition(c, axis, bundle_cap) for c in conds}
    cap_digests = {name: capping_digest(cfg) for name, cfg in caps.items()}
    if engine_obj is not None and engine_name == "vllm":
        check_engine_layers(engine_obj, axis, conds, caps)
        check_engine_traits(engine_obj, needles)
    if engine_name == "hf":
        fingerprint = model_fingerprint(model)
        dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")

    items = settings.selected_capability_items()
    judge_obj = make_outcome_judge(settings.judge)

    record: dict[str, Any] = {
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
        "user": settings.user.strip(),
        "judge": judge_obj.name,
        "turns": turns,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
        "seed": settings.seed,
        "system_prompt": settings.system_prompt,
        "rules": rules.to_dict(),
        "policy": dataclasses.asdict(policy),
        **trait_record(traits),
        "capability_max_new_tokens": settings.capability_max_new_tokens,
        "capability_items_digest": items_digest(items) if items else None,
        # the selection: may change between runs
        "scenario_source": settings.scenario_source,
        "scenarios": [s.to_dict() for s in chosen],
        "conditions": [c.to_dict() for c in conds],
        "capping_configs": {
            name: None if cfg is None else cfg.to_dict(include_vectors=False)
            for name, cfg in caps.items()
        },
        "limit": settings.limit,
        "capability": settings.capability,
        "capability_limit": settings.capability_limit,
        "capability_n_items": len(items),
        "sweep": None if settings.sweep is None else dict(settings.sweep),
        "command": settings.command,
    }
    gen_settings = generation_settings(record)
    record["settings_digest"] = json_digest(gen_settings)
    run_folder = RunFolder(
        out,
        settings_file=SETTINGS_FILE,
        what="an evaluation",
        error=EvaluationError,
        fmt=SETTINGS_FORMAT,
    ).open()  # held until the run ends (the finally below), however it ends
    result = EvaluationResult(out, record)
    self_user = engine_name == "vllm" and _plays_itself(settings.user)
    backend: Any = None
    started_engine: Any = None
    try:
        run_folder.resume(record, RESUME_RULE, force=force, force_option=FORCE_OPTION)
        (out / RUNS_DIR).mkdir(exist_ok=True)
        run_folder.write_settings(record)
        if not self_user:
            backend = make_user_backend(settings.user, model=model, tokenizer=tokenizer)

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
                        "items": record["capability_items_digest"],
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
        if engine_name == "vllm":
            eng = engine_obj
            pending = sum(1 for *_, e in plan if e is None)
            if eng is None and (todo_answers or todo_items):
                assert vinfo is not None
                n_cap = sum(1 for *_, e in cap_plan if e is None)
                eng = started_engine = start_vllm_engine(
                    vinfo,
                    bundle,
                    axis,
                    conds,
                    caps,
                    batch=max(pending, len(items) * n_cap),
                    options=settings.engine_options,
                    traits=traits,
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
                        settings=record,
                        backend=backend,
                        rules=rules,
                        policy=policy,
                        judge=judge_obj,
                        result=result,
                        on_answer=on_answer,
                        tick=lambda unit: bars.advance(task, 1, unit),
                        traits=needles,
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
                    settings=record,
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
                        settings=record,
                        backend=backend,
                        n_turns=n_turns_of(scen),
                        rules=rules,
                        policy=policy,
                        judge=judge_obj,
                        result=result,
                        on_answer=on_answer,
                        tick=lambda unit: bars.advance(task, 1, unit),
                        traits=[t.axis for t in traits],
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
                        settings=record,
                        batch_size=settings.capability_batch_size,
                        tick=lambda n, unit: bars.advance(cap_task, n, unit),
                    )
                    result.capability_done += 1
    finally:
        for obj in (backend, judge_obj, started_engine):
            close = getattr(obj, "close", None)
            if callable(close):
                close()
        run_folder.close()
    result.seconds = time.perf_counter() - started
    return result


def _plays_itself(user: str) -> bool:
    """Whether the user spec is ``model:self`` (the model under evaluation plays the user)."""
    from ..backends.spec import names_self

    return names_self(user)


def _vllm_model(
    bundle: Bundle, model_spec: str | None, dtype: str | None, engine: Any
) -> tuple[str, str, str, VLLMModelInfo | None]:
    """The model spec, config fingerprint and dtype of a vllm run (no weights loaded), checked
    against the bundle, and what is needed to start the engine (None when one was passed in)."""
    from transformers import AutoConfig

    spec = bundle.model_spec(model_spec)
    if engine is not None:
        config = AutoConfig.from_pretrained(engine.folder)
        dtype_name = str(engine.llm.llm_engine.model_config.dtype).replace("torch.", "")
        info = None
    else:
        info = vllm_model_info(spec, dtype)
        config = AutoConfig.from_pretrained(info.folder)
        dtype_name = info.dtype
    bundle.check_model(config)
    return spec, model_fingerprint(config), dtype_name, info
