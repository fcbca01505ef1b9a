"""Calibrate a bundle that has no calibration (every imported one): ``axis calibrate``.

A short run of default and role-play answers from the shipped catalogue (a few roles and
questions), each answer's response-mean activation captured on every layer while it is
generated (the extraction's single-pass capture, :mod:`persona_compass.persona_space`), and
projected on every layer's axis. The role-play answers' projections become
``calibration.json``: the same population an extracted bundle is calibrated on, so
percentiles, alerts and calibrated capping mean the same thing. The default answers check
the axis: on the monitor layer they should read higher than the role play (their AUROC).

In the same pass (the axis is known before generation) every answer token's projection on
every layer's axis is captured too (:class:`~..persona_space.token_projections.TokenProjector`
in the hf engine, the capture op in vLLM, :mod:`.vllm_tokens`), and a bounded share of them
is kept (:mod:`..token_budget`: at most 1 MB per role). They become the calibration's
per-token tables (``tokens``: ``roleplay`` and ``default``), which the per-token capping rules
read (:data:`..capping.RULES`).

The run is resumable (:mod:`.calibration_store`) and reports how stable the result is: a
bootstrap 95% interval of the 25th percentile at the monitor layer (the paper's capping
threshold), also given as percentiles of the new table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..axis import Axis, model_fingerprint
from ..bundle import Bundle
from ..bundles import resolve_bundle, shipped_bundles
from ..calibration import Calibration, quantiles
from ..errors import PersonaCompassError
from ..generation import SamplingConfig
from ..persona_space.catalogue import load_catalogue
from ..persona_space.extract import Job, catalogue_digest, plan_jobs
from ..token_budget import TokenBudgetError, keep_rows, tokens_per_answer
from .calibration_store import AnswerRecord, CalibrationStore, nan_rows
from .model_config import model_shape
from .source import HubError

ENGINES: tuple[str, ...] = ("hf", "vllm")
# texts, n_tokens, means, counts, each answer's kept per-token projections (None: not recorded)
Outputs = tuple[list[str], list[int], Tensor, Tensor, list[Tensor | None]]

# Settings a resumed run must share with the run it continues.
# The flags a user sets come first: a refusal names them before the digests they change.
RESUME_KEYS: tuple[str, ...] = (
    "roles",
    "questions",
    "prompts_per_role",
    "max_new_tokens",
    "temperature",
    "top_p",
    "repetition_penalty",
    "seed",
    "axis_sha256",
    "model_fingerprint",
    "model_name",
    "catalogue_digest",
)
CAPPING_PERCENTILE = 25.0  # the paper's best capping threshold: its stability is reported
MIN_ROLE_ANSWERS = 2


@dataclass(frozen=True)
class CalibrateSettings:
    """The size and sampling of a calibration run.

    Defaults: 24 roles x 1 prompt x 5 questions = 120 role-play answers, plus the 5 default
    prompts x 5 questions = 25 default answers; 128 new tokens each; the research's sampling
    (temperature 0.7, top_p 0.9).
    """

    roles: int = 24
    questions: int = 5
    prompts_per_role: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int = 0
    batch_size: int = 8
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        for name in (
            "roles",
            "questions",
            "prompts_per_role",
            "max_new_tokens",
            "batch_size",
            "bootstrap",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PersonaCompassError(f"{name}={value!r} must be a whole number >= 1")
        try:
            self.sampling()
        except ValueError as exc:
            raise PersonaCompassError(str(exc)) from None

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


@dataclass(frozen=True)
class CalibrationRun:
    """What a calibration run did and how stable its percentiles are.

    Attributes:
        bundle: the bundle that got ``calibration.json``.
        work_dir: the resumable work folder (answers and projections).
        engine: ``hf`` or ``vllm``.
        n_answers: answers recorded over every session (default and role play).
        n_role_answers: role-play answers with content, the calibration's samples.
        n_default_answers: default answers with content.
        generated_now: answers generated by this call (0 when resuming a finished run).
        monitor_layer: the layer the numbers below are for.
        p25: the 25th percentile of the role-play projections there.
        p75: the 75th percentile there.
        p25_interval: bootstrap 95% interval of ``p25`` (raw projections).
        p25_interval_percentiles: the same interval as percentiles of the new table.
        default_auroc: how well the monitor-layer projection tells default answers from
            role play (1.0: every default answer reads higher); None without both kinds.
        calibration: the new percentile table (with its per-token tables).
        tokens_per_answer: the most per-token projections one answer kept.
        n_role_tokens: role-play tokens in the per-token table (0: no table).
        n_default_tokens: default-answer tokens in the per-token table (0: no table).
        answers_without_tokens: answers with content but no per-token projections (recorded
            by an earlier version into the same work folder).
    """

    bundle: Path
    work_dir: Path
    engine: str
    n_answers: int
    n_role_answers: int
    n_default_answers: int
    generated_now: int
    monitor_layer: int
    p25: float
    p75: float
    p25_interval: tuple[float, float]
    p25_interval_percentiles: tuple[float, float]
    default_auroc: float | None
    calibration: Calibration
    tokens_per_answer: int = 0
    n_role_tokens: int = 0
    n_default_tokens: int = 0
    answers_without_tokens: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no table)."""
        return {
            "bundle": str(self.bundle),
            "work_dir": str(self.work_dir),
            "engine": self.engine,
            "n_answers": self.n_answers,
            "n_role_answers": self.n_role_answers,
            "n_default_answers": self.n_default_answers,
            "generated_now": self.generated_now,
            "monitor_layer": self.monitor_layer,
            "p25": round(self.p25, 6),
            "p75": round(self.p75, 6),
            "p25_interval": [round(x, 6) for x in self.p25_interval],
            "p25_interval_percentiles": [round(x, 2) for x in self.p25_interval_percentiles],
            "default_auroc": None if self.default_auroc is None else round(self.default_auroc, 4),
            "tokens_per_answer": self.tokens_per_answer,
            "n_role_tokens": self.n_role_tokens,
            "n_default_tokens": self.n_default_tokens,
            "answers_without_tokens": self.answers_without_tokens,
        }


def bootstrap_interval(
    samples: Tensor, percentile: float, *, n_boot: int = 2000, seed: int = 0, level: float = 95.0
) -> tuple[float, float]:
    """Percentile bootstrap interval of one percentile of ``samples`` (n,).

    ``n_boot`` resamples with replacement (seeded: same inputs, same interval); the interval
    holds the middle ``level`` % of the resampled percentiles.
    """
    data = samples.detach().to("cpu", torch.float64).reshape(-1)
    n = int(data.numel())
    if n < 1:
        raise PersonaCompassError("a bootstrap needs at least one sample")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n, (n, n_boot), generator=g)
    resampled = quantiles(data[picks], [percentile])  # (n_boot, 1)
    tail = (100.0 - level) / 2.0
    lo, hi = quantiles(resampled, [tail, 100.0 - tail])[0].tolist()
    return float(lo), float(hi)


def axis_sha256(axis: Axis) -> str:
    """sha256 of the axis directions (a resumed run must calibrate the same axis)."""
    return hashlib.sha256(axis.directions.numpy().tobytes()).hexdigest()


def calibrate_bundle(
    bundle: str | os.PathLike[str],
    model: str | os.PathLike[str] | nn.Module,
    *,
    tokenizer: Any = None,
    engine: str = "hf",
    settings: CalibrateSettings | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | None = None,
    engine_options: dict[str, Any] | None = None,
) -> CalibrationRun:
    """Record role-play and default answers, and write the bundle's ``calibration.json``.

    Args:
        bundle: the bundle folder (it must have no calibration unless ``force``).
        model: the model spec (alias, folder, hub id), or a loaded model with ``tokenizer``
            (hf engine only).
        engine: ``"hf"`` (the model's own generate) or ``"vllm"`` (vLLM with the
            extraction's capture plugin; the model is never loaded twice).
        settings: roles, questions, tokens, sampling, batch size, bootstrap resamples.
        work_dir: the resumable work folder (default: ``BUNDLE.calibration`` beside it).
        force: replace an existing calibration.
        dtype: the model's dtype (hf engine; default: bf16 where fast).
        device: where to load it (hf engine).
        device_map: spread a large model over the GPUs, e.g. ``"auto"`` (hf engine).
        engine_options: passed to vLLM (``dtype``, ``enforce_eager``, ``max_model_len``...).

    Raises:
        HubError: an already calibrated bundle, a work folder of another run, too few answers.
        AxisFileError: the axis does not fit the model.
    """
    settings = settings or CalibrateSettings()
    if engine not in ENGINES:
        raise PersonaCompassError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    folder = _writable_bundle(bundle)
    axis = Bundle.open(folder).axis
    if axis.calibration is not None and not force:
        raise HubError(
            f"{folder} already has a calibration ({axis.calibration.source or 'no source'}, "
            f"{axis.calibration.n_samples} samples); pass `force=True` to replace it"
        )
    loaded = isinstance(model, nn.Module)
    if loaded:
        if engine != "hf" or tokenizer is None:
            raise PersonaCompassError(
                "a loaded model needs engine='hf' and its tokenizer; pass a model spec for vllm"
            )
        from ..models import model_display_name

        axis.check_model(model)  # type: ignore[arg-type]
        fingerprint, model_name = model_fingerprint(model), model_display_name(model, tokenizer)
    else:
        shape = model_shape(model)  # type: ignore[arg-type]
        if (shape.n_layers, shape.d_model) != (axis.n_layers, axis.d_model):
            raise HubError(
                f"the axis in {folder} has {axis.n_layers} layers of width {axis.d_model} but "
                f"{shape.model_id} has {shape.n_layers} of width {shape.d_model}; calibrate "
                "with the model the bundle was made for"
            )
        if axis.fingerprint is not None and axis.fingerprint != shape.fingerprint:
            raise HubError(
                f"{folder} was made for {axis.model_id} (config fingerprint {axis.fingerprint}) "
                f"but {shape.model_id} has {shape.fingerprint}; calibrate with that model"
            )
        fingerprint, model_name = shape.fingerprint, shape.display_name
    catalogue = load_catalogue().select(
        roles=settings.roles,
        prompts_per_role=settings.prompts_per_role,
        questions=settings.questions,
        seed=settings.seed,
    )
    jobs = plan_jobs(catalogue, model_name)
    per_answer = _tokens_per_answer(jobs, axis.n_layers, settings.max_new_tokens)
    record = {
        **{k: v for k, v in asdict(settings).items() if k not in ("batch_size", "bootstrap")},
        "axis_sha256": axis_sha256(axis),
        "model_fingerprint": fingerprint,
        "model_name": model_name,
        "catalogue_digest": catalogue_digest(catalogue),
        "n_layers": axis.n_layers,
        "tokens_per_answer": per_answer,
    }
    work = folder.with_name(folder.name + ".calibration") if work_dir is None else Path(work_dir)
    store = CalibrationStore(work, record, RESUME_KEYS)
    done = store.done()
    todo = [job for job in jobs if job.id not in done]
    units = axis.units()
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        desc="calibration answers",
        unit="answer",
        disable=not progress,
        dynamic_ncols=True,
    )
    generated = 0
    if todo:
        tokens = (units, per_answer)
        if loaded:
            batches = _hf_batches(model, tokenizer, todo, settings, tokens)  # type: ignore[arg-type]
        elif engine == "hf":
            load = {"dtype": dtype, "device": device, "device_map": device_map}
            batches = _hf_spec_batches(str(model), todo, settings, load, tokens)
        else:
            batches = _vllm_batches(str(model), todo, settings, engine_options, tokens)
        for batch, (texts, n_tokens, means, counts, kept) in batches:
            projections = torch.einsum(
                "bld,ld->bl", means.to(torch.float64), units.to(torch.float64)
            ).float()
            records = [
                AnswerRecord(j.id, j.role, j.prompt_index, j.question_id, n, text)
                for j, n, text in zip(batch, n_tokens, texts, strict=True)
            ]
            store.add(records, nan_rows(projections, [int(c) for c in counts]), kept)
            store.commit()
            generated += len(batch)
            bar.update(len(batch))
    bar.close()
    return _finish(
        folder, store, axis, settings, engine, generated, catalogue_digest(catalogue), per_answer
    )


def _tokens_per_answer(jobs: Sequence[Job], n_layers: int, max_new_tokens: int) -> int:
    """The per-token projections one answer keeps: the budget per role over its most answers."""
    per_role: dict[str, int] = {}
    for job in jobs:
        per_role[job.role] = per_role.get(job.role, 0) + 1
    try:
        return tokens_per_answer(max(per_role.values()), n_layers, max_new_tokens)
    except TokenBudgetError as exc:
        raise HubError(f"per-token calibration: {exc}") from None


def _token_tables(
    store: CalibrationStore, engine: str, per_answer: int
) -> tuple[dict[str, Calibration], dict[str, int]]:
    """The per-token tables of the recorded answers, and how many tokens and answers."""
    tables: dict[str, Calibration] = {}
    counts = {"roleplay": 0, "default": 0, "missing": 0}
    for kind, default in (("roleplay", False), ("default", True)):
        rows, n_answers, missing = store.token_projections(default=default)
        counts["missing"] += missing
        if n_answers and rows.shape[0]:
            counts[kind] = int(rows.shape[0])
            who = "default" if default else "role-play"
            tables[kind] = Calibration.from_projections(
                rows,
                source=f"{rows.shape[0]} tokens of {n_answers} {who} answers (up to "
                f"{per_answer} per answer), axis calibrate ({engine})",
            )
    return tables, counts


def _writable_bundle(bundle: str | os.PathLike[str]) -> Path:
    folder = resolve_bundle(os.fspath(bundle)).resolve()
    shipped = {p.resolve() for p in shipped_bundles().values()}
    if folder in shipped:
        raise HubError(
            f"{bundle} is a bundle shipped inside the package (already calibrated); copy the "
            "folder elsewhere to calibrate a copy"
        )
    return folder


def _finish(
    folder: Path,
    store: CalibrationStore,
    axis: Axis,
    settings: CalibrateSettings,
    engine: str,
    generated: int,
    digest: str,
    per_answer: int,
) -> CalibrationRun:
    """Build the tables from the recorded answers, measure their stability, save the bundle."""
    roles = store.projections(default=False)
    defaults = store.projections(default=True)
    n_roles, n_defaults = int(roles.shape[0]), int(defaults.shape[0])
    if n_roles < MIN_ROLE_ANSWERS:
        raise HubError(
            f"only {n_roles} role-play answers had content tokens; calibrate with more "
            "`roles`/`questions` or a larger `max_new_tokens`"
        )
    source = (
        f"{n_roles} role-play answers ({settings.roles} roles x {settings.prompts_per_role} "
        f"prompts x {settings.questions} questions), axis calibrate ({engine})"
    )
    token_tables, token_counts = _token_tables(store, engine, per_answer)
    calibration = Calibration.from_projections(roles, source=source).with_tokens(**token_tables)
    layer = axis.layer
    p25 = calibration.threshold(layer, CAPPING_PERCENTILE)
    p75 = calibration.threshold(layer, 75.0)
    interval = bootstrap_interval(
        roles[:, layer], CAPPING_PERCENTILE, n_boot=settings.bootstrap, seed=settings.seed
    )
    as_percentiles = (
        calibration.percentile_of(interval[0], layer),
        calibration.percentile_of(interval[1], layer),
    )
    default_auroc = None
    if n_defaults:
        from ..persona_space.report import auroc

        default_auroc = float(auroc(defaults[:, layer], roles[:, layer])[0])
    run = CalibrationRun(
        bundle=folder,
        work_dir=store.root,
        engine=engine,
        n_answers=len(store.records),
        n_role_answers=n_roles,
        n_default_answers=n_defaults,
        generated_now=generated,
        monitor_layer=layer,
        p25=p25,
        p75=p75,
        p25_interval=interval,
        p25_interval_percentiles=as_percentiles,
        default_auroc=default_auroc,
        calibration=calibration,
        tokens_per_answer=per_answer,
        n_role_tokens=token_counts["roleplay"],
        n_default_tokens=token_counts["default"],
        answers_without_tokens=token_counts["missing"],
    )
    info = {
        key: value
        for key, value in run.summary().items()
        if key not in ("bundle", "work_dir", "generated_now")
    }
    info.update(
        roles=settings.roles,
        questions=settings.questions,
        prompts_per_role=settings.prompts_per_role,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        catalogue_digest=digest,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    metadata = {**axis.metadata, "calibration_run": info}
    dataclasses.replace(axis, calibration=calibration, metadata=metadata).save(folder)
    return run


def _batch_seed(seed: int, job_id: str) -> int:
    return int(hashlib.sha256(f"{seed}/{job_id}".encode()).hexdigest()[:8], 16)


def _hf_batches(
    model: nn.Module,
    tokenizer: Any,
    todo: Sequence[Job],
    settings: CalibrateSettings,
    tokens: tuple[Tensor, int],
) -> Iterator[tuple[Sequence[Job], Outputs]]:
    """Answers from the model's own generate, their means and per-token projections
    captured in the same pass (all layers); ``tokens``: the unit axis and tokens kept per
    answer."""
    from ..persona_space.extract import generate_with_capture
    from ..persona_space.token_projections import TokenProjector, answer_rows

    units, per_answer = tokens
    sampling = settings.sampling()
    layers = list(range(units.shape[0]))
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start : start + settings.batch_size]
        seed = _batch_seed(settings.seed, batch[0].id)
        with TokenProjector(model, units, layers, last_only=True) as projector:
            texts, n_tokens, means, counts = generate_with_capture(
                model, tokenizer, batch, sampling, seed
            )
        rows = answer_rows(projector.take(), [int(c) for c in counts])
        kept = [
            None if r is None else keep_rows(r, per_answer, settings.max_new_tokens) for r in rows
        ]
        yield batch, (texts, n_tokens, means, counts, kept)


def _hf_spec_batches(
    spec: str,
    todo: Sequence[Job],
    settings: CalibrateSettings,
    load: dict[str, Any],
    tokens: tuple[Tensor, int],
) -> Iterator[tuple[Sequence[Job], Outputs]]:
    from ..models import load_model

    model, tokenizer = load_model(spec, **load)
    yield from _hf_batches(model, tokenizer, todo, settings, tokens)


def _vllm_batches(
    spec: str,
    todo: Sequence[Job],
    settings: CalibrateSettings,
    options: dict[str, Any] | None,
    tokens: tuple[Tensor, int],
) -> Iterator[tuple[Sequence[Job], Outputs]]:
    """Answers from vLLM with the extraction's capture plugin (sums of every layer) and the
    per-token projections captured in the engine (:mod:`.vllm_tokens`)."""
    from transformers import AutoTokenizer, GenerationConfig

    from ..engines.vllm_engine import model_folder
    from ..generation import end_of_turn_ids
    from .vllm_tokens import TokenRollouts

    folder = model_folder(spec)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # a folder without generation_config.json
        generation_config = None
    units, per_answer = tokens
    n_layers = int(units.shape[0])
    rollouts = TokenRollouts(
        spec,
        tokenizer,
        end_of_turn_ids(generation_config, tokenizer),
        layers=list(range(n_layers)),
        n_layers=n_layers,
        units=units,
        per_answer=per_answer,
        max_new_tokens=settings.max_new_tokens,
        **(options or {}),
    )
    try:
        yield from rollouts.batches_with_tokens(
            todo, settings.sampling(), settings.seed, settings.batch_size
        )
    finally:
        rollouts.close()
