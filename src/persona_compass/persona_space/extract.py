"""The extraction pipeline: role play -> judged rollouts -> role vectors -> a calibrated bundle.

One pass per rollout: activations are captured while the answer is generated
(:mod:`.capture`), judged at once, and added to the role's running sums (:mod:`.store`), which
are committed atomically per role after every batch. Rerunning the same command resumes.
When every rollout is in, :func:`build_bundle` turns the sums into the axis, calibration,
recommended monitor layer and capping config, and writes the report. The calibration's
per-token tables come from a prefill-only replay of the sampled answers on the finished axis
(:mod:`.token_replay`: the axis is unknown while generating, so this is a second, cheap pass).

Recorded layers (``--layers``): by default every decoder block is recorded. A selection such
as ``"16:24"`` records only those blocks (hooks on them only; role states, samples and memory
shrink in proportion). The bundle keeps the full ``(n_layers, d_model)`` shape every consumer
expects: unrecorded layers are zero rows of the axis and of its vectors (an :class:`Axis`
treats a zero row as "no direction here" and refuses to project, steer or cap on it), their
per-layer scores in the metadata are ``null``, and ``metadata["recorded_layers"]`` lists the
recorded ones. The monitor layer and the capping window are chosen among recorded layers only.
The selection is a resume setting: a rerun with other ``--layers`` is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..axis import Axis, model_fingerprint
from ..axis_verdict import bundle_verdict, default_identity
from ..calibration import Calibration
from ..capping import CappingConfig
from ..chat import render_chat
from ..errors import LayerError, PersonaCompassError
from ..generation import SamplingConfig, eos_ids, left_pad
from ..layers import normalize_layers, num_layers
from ..record import record_span_means
from ..run_folder import MAY_CHANGE, ResumeRule, must_match
from .capture import GenerationCapture
from .catalogue import DEFAULT_ROLE, Catalogue, load_catalogue
from .judges import JudgeItem, make_judge
from .report import (
    RolloutSamples,
    aligned_pc1,
    axis_in_span,
    choose_capping_window,
    choose_monitor_layer,
    default_pc1_beyond,
    heldout_auroc,
    pc1_ends,
    pc_cosines,
    pca,
    rank_roles,
    write_report,
)
from .store import ExtractionStore, RoleState, RolloutRecord, StoreError, bucket_of
from .trait_extract import (
    TRAIT_SAMPLES_PER_SIDE,
    TraitScorer,
    build_trait_bundle,
    plan_trait_jobs,
    trait_catalogue,
)
from .trait_judges import TraitItem, make_trait_judge
from .traits import TraitCatalogue

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    # about 40 roles x 2 prompts x 12 questions, 64 new tokens: minutes on 2 CPU cores
    "quick": {
        "n_roles": 40,
        "prompts_per_role": 2,
        "n_questions": 12,
        "max_new_tokens": 64,
        "batch_size": 16,
    },
    # every role, 5 prompts, 40 questions, 128 tokens: hours on a CPU, minutes on a GPU.
    # 10 sampled rollouts per role (1,450 over all roles, more than quick's 800) keep a
    # role's store under 1 MB on SmolLM2 although each role has 200 answers to keep.
    "standard": {
        "n_roles": None,
        "prompts_per_role": 5,
        "n_questions": 40,
        "max_new_tokens": 128,
        "batch_size": 16,
        "samples_per_role": 10,
    },
    # the research scale: every role x 5 prompts x every question, 512 tokens (GPUs)
    "paper": {
        "n_roles": None,
        "prompts_per_role": 5,
        "n_questions": None,
        "max_new_tokens": 512,
        "batch_size": 32,
        "samples_per_role": 10,
    },
}

# Where rollouts are generated: the model's own generate (hf) or vLLM (vllm_rollouts); both
# capture the same tokens, so a run may be resumed with the other engine.
ENGINES = ("hf", "vllm")

_LAYER_PART = re.compile(r"^(-?\d+|(-?\d+)?:(-?\d+)?)$")


def check_layer_spec(spec: Any) -> str:
    """Check the syntax of a layer selection and return it as a string (no model needed).

    Accepts ``"all"``, ``"20"``, ``"16:24"`` (half-open), ``"-8:"``, ``"3,5,16:20"``, an int
    or a list of ints. Whether the blocks exist is checked against the model later
    (:func:`resolve_layers`).

    Raises:
        LayerError: the selection cannot be read.
    """
    if isinstance(spec, bool):
        raise LayerError(f"layers={spec!r} is not a layer selection")
    if isinstance(spec, int):
        return str(spec)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise LayerError("the layer selection is empty; name at least one block index")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in spec):
            raise LayerError(f"layers={list(spec)!r} must be block indices (integers)")
        return ",".join(str(x) for x in spec)
    if not isinstance(spec, str):
        raise LayerError(f"layers={spec!r} must be a string such as 'all' or '16:24'")
    text = spec.strip().lower()
    parts = [part.strip() for part in text.split(",")]
    if text != "all" and not all(_LAYER_PART.match(part) for part in parts):
        raise LayerError(
            f"cannot read the layer selection {spec!r}; write 'all', one block '20', a "
            "half-open range '16:24' (negative counts from the end, '-8:' = the last 8), or a "
            "comma list such as '3,5,16:20'"
        )
    return text.replace(" ", "")


def resolve_layers(spec: str, n_layers: int) -> list[int]:
    """The sorted block indices a layer selection names on a model with ``n_layers`` blocks."""
    try:
        return normalize_layers(spec, n_layers)
    except LayerError as exc:
        raise LayerError(f"`layers` {spec!r}: {exc}") from None


def layers_text(layers: Sequence[int], n_layers: int) -> str:
    """The canonical form of a selection: ``"all"``, or runs such as ``"3,5,16:24"``."""
    chosen = sorted(set(layers))
    if chosen == list(range(n_layers)):
        return "all"
    runs: list[list[int]] = []
    for layer in chosen:
        if runs and layer == runs[-1][1]:
            runs[-1][1] = layer + 1
        else:
            runs.append([layer, layer + 1])
    return ",".join(str(lo) if hi == lo + 1 else f"{lo}:{hi}" for lo, hi in runs)


@dataclass(frozen=True)
class ExtractSettings:
    """Every knob of an extraction run; presets fill the sizes, flags override any of them.

    Each field says whether a resumed run must match it (the science: ``must_match``) or may
    change it (the speed and the bundle building: ``MAY_CHANGE``); see
    :mod:`persona_compass.run_folder`. Where the run records something derived (the model's
    fingerprint, the selected catalogue's digest), that is what must match.
    """

    model: str = field(metadata=must_match("model_fingerprint"))
    preset: str = field(default="quick", metadata=MAY_CHANGE)  # it only fills the sizes
    n_roles: int | None = field(default=40, metadata=must_match())
    prompts_per_role: int | None = field(default=2, metadata=must_match())
    n_questions: int | None = field(default=12, metadata=must_match())
    max_new_tokens: int = field(default=64, metadata=must_match())
    batch_size: int = field(default=16, metadata=MAY_CHANGE)
    temperature: float = field(default=0.7, metadata=must_match())
    top_p: float = field(default=0.9, metadata=must_match())
    repetition_penalty: float = field(default=1.1, metadata=must_match())
    judge: str = field(default="heuristic", metadata=must_match())
    min_role_count: int = field(default=5, metadata=MAY_CHANGE)
    samples_per_role: int = field(default=20, metadata=must_match())
    percentile: float = field(default=25.0, metadata=MAY_CHANGE)
    seed: int = field(default=0, metadata=must_match())
    roles_path: str | None = field(default=None, metadata=must_match("catalogue_digest"))
    questions_path: str | None = field(default=None, metadata=must_match("catalogue_digest"))
    generator: str | None = field(default=None, metadata=must_match())
    # a run.json written before --layers existed recorded every layer
    layers: str = field(default="all", metadata=must_match(legacy="all"))
    # both engines capture the same tokens, so a run may be resumed with the other one
    engine: str = field(default="hf", metadata=MAY_CHANGE)
    # a run.json written before --trait existed extracted the role axis
    trait: str | None = field(default=None, metadata=must_match(legacy=None))
    command: str = field(default="", metadata=MAY_CHANGE)

    @classmethod
    def from_preset(cls, model: str, preset: str = "quick", **overrides: Any) -> ExtractSettings:
        if preset not in PRESETS:
            raise PersonaCompassError(
                f"preset={preset!r} is unknown; use one of {', '.join(PRESETS)}"
            )
        values = {**PRESETS[preset]}
        if overrides.get("trait"):
            # a trait run asks every pair and question (a few hundred answers) and keeps
            # more per-answer activations: two sides, not hundreds of roles
            values.update(
                n_roles=None,
                prompts_per_role=None,
                n_questions=None,
                samples_per_role=TRAIT_SAMPLES_PER_SIDE,
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model=model, preset=preset, **values)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", check_layer_spec(self.layers))
        for name in ("max_new_tokens", "batch_size", "min_role_count"):
            if getattr(self, name) < 1:
                raise PersonaCompassError(f"{name}={getattr(self, name)} must be at least 1")
        if self.samples_per_role < 2:
            raise PersonaCompassError(
                f"samples_per_role={self.samples_per_role} must be at least 2 (they calibrate "
                "the axis and measure its held-out AUROC)"
            )
        if not 0 < self.percentile < 100:
            raise PersonaCompassError(f"percentile={self.percentile} must be in (0, 100)")
        if self.engine not in ENGINES:
            raise PersonaCompassError(f"engine={self.engine!r} is unknown; use hf or vllm")
        if self.trait is not None and (self.roles_path or self.questions_path):
            raise PersonaCompassError(
                "`trait` takes its prompts and questions from the trait catalogue; drop "
                "`roles_path`/`questions_path` (write your own catalogue file and pass "
                "`trait=FILE.json`)"
            )
        if self.engine == "vllm" and self.generator:
            raise PersonaCompassError(
                "`generator` takes answers from a server, `engine='vllm'` generates them in "
                "vLLM: use one of the two"
            )

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


# The recorded settings a resumed run must share with the run it continues (the science, not
# the speed), and what a run.json written before a key was recorded meant by it.
RESUME_RULE = ResumeRule.of(ExtractSettings)
RESUME_KEYS: tuple[str, ...] = RESUME_RULE.keys
LEGACY_SETTINGS: dict[str, Any] = dict(RESUME_RULE.legacy)


@dataclass(frozen=True)
class Job:
    """One planned rollout."""

    id: str
    role: str
    prompt_index: int
    system_prompt: str
    question_id: int
    question: str
    rubric: str = ""

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": self.question}]


@dataclass
class ExtractionResult:
    """Where the bundle went and what the run measured."""

    out_dir: Path
    bundle_dir: Path | None
    planned: int
    generated_now: int
    summary: dict[str, Any] = field(default_factory=dict)


def catalogue_digest(catalogue: Catalogue | TraitCatalogue) -> str:
    """A short hash of the exact catalogue selection (a resume must use the same one)."""
    text = json.dumps(catalogue.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_jobs(catalogue: Catalogue, model_name: str) -> list[Job]:
    """Every (role, prompt, question) rollout, default role first, in a stable order."""
    jobs = []
    for p, prompt in enumerate(catalogue.default_prompts_for(model_name)):
        for q in catalogue.questions:
            jobs.append(Job(f"{DEFAULT_ROLE}/p{p}/q{q.id}", DEFAULT_ROLE, p, prompt, q.id, q.text))
    for role in catalogue.roles:
        for p, prompt in enumerate(role.prompts):
            for q in catalogue.questions:
                jobs.append(
                    Job(
                        f"{role.name}/p{p}/q{q.id}", role.name, p, prompt, q.id, q.text, role.rubric
                    )
                )
    return jobs


def sample_ids(jobs: Sequence[Job], per_role: int, seed: int) -> set[str]:
    """Which rollouts keep their per-rollout activations: a fixed seeded subset per role."""
    by_role: dict[str, list[str]] = {}
    for job in jobs:
        by_role.setdefault(job.role, []).append(job.id)
    chosen: set[str] = set()
    for role, ids in by_role.items():
        rng = random.Random(f"{seed}/{role}")
        chosen.update(rng.sample(ids, min(per_role, len(ids))))
    return chosen


def _truncate(ids: list[int], stops: set[int], budget: int) -> list[int]:
    for i, tok in enumerate(ids[:budget]):
        if tok in stops:
            return ids[:i]
    return ids[:budget]


@torch.inference_mode()
def generate_with_capture(
    model: nn.Module,
    tokenizer: Any,
    batch: Sequence[Job],
    sampling: SamplingConfig,
    seed: int,
    *,
    layers: Sequence[int] | None = None,
) -> tuple[list[str], list[int], torch.Tensor, torch.Tensor]:
    """Generate answers for a batch and capture their mean activations in the same pass.

    Generates ``max_new_tokens + 1`` tokens and keeps ``max_new_tokens``: the extra step feeds
    the last kept token back, so every kept token is captured (the stored answer and its
    activations cover exactly the same tokens).

    Returns (texts, content token counts, means (B, n_recorded, D), captured counts (B,));
    ``layers`` picks the recorded blocks (default: all).
    """
    prompts = [
        render_chat(tokenizer, job.messages(), add_generation_prompt=True).input_ids
        for job in batch
    ]
    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    inputs = left_pad(prompts, pad, next(model.parameters()).device)
    torch.manual_seed(seed)
    budget = sampling.max_new_tokens
    with GenerationCapture(model, stop_ids=stops, layers=layers) as cap:
        out = model.generate(  # type: ignore[operator]
            **inputs,
            max_new_tokens=budget + 1,
            pad_token_id=pad,
            eos_token_id=stops,
            **sampling.generate_kwargs(),
        )
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    stop_set = set(stops)
    contents = [_truncate(row, stop_set, budget) for row in new]
    texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in contents]
    counts = cap.counts().cpu()
    means = cap.means().cpu()
    for i, content in enumerate(contents):
        if int(counts[i]) != len(content):
            raise PersonaCompassError(
                f"capture counted {int(counts[i])} tokens for a {len(content)}-token answer"
            )
    return texts, [len(c) for c in contents], means, counts


def generate_external(
    model: nn.Module,
    tokenizer: Any,
    generator: Any,
    batch: Sequence[Job],
    sampling: SamplingConfig,
    *,
    layers: Sequence[int] | None = None,
) -> tuple[list[str], list[int], torch.Tensor, torch.Tensor]:
    """Answers from an external server, activations recorded locally in a second pass."""
    texts = generator.generate([job.messages() for job in batch], sampling)
    convs = [
        [*job.messages(), {"role": "assistant", "content": t}]
        for job, t in zip(batch, texts, strict=True)
    ]
    recorded = record_span_means(model, tokenizer, convs, layers=layers, batch_size=len(convs))
    n_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    means = torch.stack([r[-1] for r in recorded])
    return list(texts), n_tokens, means, torch.tensor(n_tokens)


def plan_run(
    settings: ExtractSettings, model_name: str
) -> tuple[Catalogue | TraitCatalogue, list[Job], dict[str, Any]]:
    """The catalogue selection, every planned rollout, and a summary of the plan."""
    if settings.trait is not None:
        trait = trait_catalogue(settings)
        jobs = plan_trait_jobs(trait)
        return (
            trait,
            jobs,
            {
                "trait": trait.trait,
                "pairs": len(trait.pairs),
                "questions": len(trait.questions),
                "rollouts": len(jobs),
                "max_new_tokens": settings.max_new_tokens,
                "max_tokens_total": len(jobs) * settings.max_new_tokens,
                "judge": settings.judge,
                "layers": settings.layers,
            },
        )
    catalogue = load_catalogue(settings.roles_path, settings.questions_path).select(
        roles=settings.n_roles,
        prompts_per_role=settings.prompts_per_role,
        questions=settings.n_questions,
        seed=settings.seed,
    )
    jobs = plan_jobs(catalogue, model_name)
    plan = {
        "roles": len(catalogue.roles),
        "questions": len(catalogue.questions),
        "rollouts": len(jobs),
        "max_new_tokens": settings.max_new_tokens,
        "max_tokens_total": len(jobs) * settings.max_new_tokens,
        "judge": settings.judge,
        "layers": settings.layers,
    }
    return catalogue, jobs, plan


def run_extraction(
    settings: ExtractSettings,
    out_dir: str | Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    model_id: str,
    model_name: str,
    progress: bool = True,
    on_plan: Callable[[dict[str, Any]], None] | None = None,
    dry_run: bool = False,
    engine_options: dict[str, Any] | None = None,
    compare_with: Sequence[Axis] = (),
) -> ExtractionResult:
    """Run (or resume) an extraction into ``out_dir`` and build its bundle in ``out_dir/bundle``.

    With ``settings.trait`` set it extracts that trait's axis instead (:mod:`.trait_extract`);
    its report gives the cosine with each axis of ``compare_with`` at the monitor layer.

    ``settings.layers`` is resolved against the model's blocks before anything is written.
    With ``settings.engine == "vllm"`` the rollouts are generated in vLLM (started only when
    there is something to generate, with ``engine_options`` such as ``dtype`` or
    ``enforce_eager``); ``model`` still gives the fingerprint, the judge and the bundle.
    """
    catalogue, jobs, plan = plan_run(settings, model_name)
    n_layers = num_layers(model)
    layers = resolve_layers(settings.layers, n_layers)
    plan.update(
        layers=layers_text(layers, n_layers), n_layers=n_layers, n_recorded_layers=len(layers)
    )
    record = {
        **asdict(settings),
        "layers": plan["layers"],
        "recorded_layers": layers,
        "n_layers": n_layers,
        "model_id": model_id,
        "model_fingerprint": model_fingerprint(model),
        "catalogue_digest": catalogue_digest(catalogue),
        "library_version": __version__,
    }
    if on_plan is not None:
        on_plan(plan)
    out_dir = Path(out_dir)
    if dry_run:
        return ExtractionResult(out_dir, None, len(jobs), 0, {"plan": plan})

    with ExtractionStore(
        out_dir, record, resume_keys=RESUME_KEYS, legacy=LEGACY_SETTINGS
    ) as store:  # the folder is held until the run ends, however it ends
        states: dict[str, RoleState] = {}
        for job in jobs:
            if job.role not in states:
                states[job.role] = _check_rows(store.load_role(job.role), len(layers), store)
        todo = [job for job in jobs if job.id not in states[job.role].records]
        keep = sample_ids(jobs, settings.samples_per_role, settings.seed)
        scorer: RoleScorer | TraitScorer
        if isinstance(catalogue, TraitCatalogue):
            trait_judge = make_trait_judge(
                settings.judge, catalogue.rubric, model=model, tokenizer=tokenizer
            )
            scorer = TraitScorer(trait_judge, catalogue)
        else:
            scorer = RoleScorer(make_judge(settings.judge, model=model, tokenizer=tokenizer))
        generator = None
        if settings.generator:
            from .generators import OpenAIGenerator

            generator = OpenAIGenerator.from_spec(settings.generator, default_model=model_id)
        sampling = settings.sampling()
        rollouts = None
        if settings.engine == "vllm" and todo:
            from .vllm_rollouts import VLLMRollouts

            rollouts = VLLMRollouts(
                settings.model,
                tokenizer,
                eos_ids(model, tokenizer),
                layers=layers,
                n_layers=n_layers,
                **(engine_options or {}),
            )
        # Time spent in earlier sessions of a resumed run counts too; a rerun that generates
        # nothing keeps the recorded total.
        earlier_seconds = store.generation_seconds()
        started = time.perf_counter()
        bar = tqdm(
            total=len(jobs),
            initial=len(jobs) - len(todo),
            desc="rollouts",
            unit="rollout",
            disable=not progress,
            dynamic_ncols=True,
        )
        batches: Iterator[tuple[Sequence[Job], Any]]
        if rollouts is not None:
            batches = _closing(
                rollouts, rollouts.batches(todo, sampling, settings.seed, settings.batch_size)
            )
        else:
            batches = _local_batches(model, tokenizer, generator, todo, settings, layers)
        for batch, (texts, n_tokens, means, counts) in batches:
            touched: dict[str, RoleState] = {}
            for i, (score, judged_by, bucket) in enumerate(scorer(batch, texts)):
                job = batch[i]
                rec = RolloutRecord(
                    job.id,
                    job.role,
                    job.prompt_index,
                    job.question_id,
                    job.system_prompt,
                    job.question,
                    texts[i],
                    n_tokens[i],
                    score,
                    judged_by,
                )
                state = states[job.role]
                mean = means[i] if int(counts[i]) > 0 else None
                state.add(rec, mean, keep_sample=job.id in keep, bucket=bucket)
                touched[job.role] = state
            for state in touched.values():
                store.commit(state)
            store.record_generation_seconds(
                (earlier_seconds or 0.0) + time.perf_counter() - started
            )
            bar.update(len(batch))
        bar.close()
        if isinstance(scorer, TraitScorer):
            bundle = build_trait_bundle(
                store,
                states,
                settings,
                scorer,
                model=model,
                model_id=model_id,
                record=record,
                compare_with=compare_with,
            )
        else:
            bundle = build_bundle(
                store,
                states,
                settings,
                model=model,
                model_id=model_id,
                record=record,
                tokenizer=tokenizer,
            )
        return ExtractionResult(
            out_dir,
            bundle,
            len(jobs),
            len(todo),
            json.loads((bundle / "bundle.json").read_text())["metadata"],
        )


class RoleScorer:
    """Scores a batch of role-play rollouts: (score, judge name, bucket) per rollout.

    Default-Assistant rollouts are not judged: they all count (bucket ``unscored``)."""

    def __init__(self, judge: Any) -> None:
        self.judge = judge

    def __call__(
        self, batch: Sequence[Job], texts: Sequence[str]
    ) -> list[tuple[int | None, str, str]]:
        to_judge = [i for i, job in enumerate(batch) if job.role != DEFAULT_ROLE]
        scores: list[int | None] = [None] * len(batch)
        if to_judge:
            items = [
                JudgeItem(batch[i].role, batch[i].rubric, batch[i].question, texts[i])
                for i in to_judge
            ]
            for i, score in zip(to_judge, self.judge.score(items), strict=True):
                scores[i] = score
        return [
            (score, self.judge.name if job.role != DEFAULT_ROLE else "", bucket_of(score))
            for job, score in zip(batch, scores, strict=True)
        ]


def _closing(engine: Any, batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, then the engine shut down (its memory is free for building the bundle)."""
    try:
        yield from batches
    finally:
        engine.close()


def _local_batches(
    model: nn.Module,
    tokenizer: Any,
    generator: Any,
    todo: Sequence[Job],
    settings: ExtractSettings,
    layers: Sequence[int],
) -> Iterator[tuple[Sequence[Job], tuple[list[str], list[int], torch.Tensor, torch.Tensor]]]:
    """The hf engine's batches: the model's own generate (or an external generator)."""
    sampling = settings.sampling()
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start : start + settings.batch_size]
        seed = int(hashlib.sha256(f"{settings.seed}/{batch[0].id}".encode()).hexdigest()[:8], 16)
        if generator is None:
            yield (
                batch,
                generate_with_capture(model, tokenizer, batch, sampling, seed, layers=layers),
            )
        else:
            yield (
                batch,
                generate_external(model, tokenizer, generator, batch, sampling, layers=layers),
            )


def _check_rows(state: RoleState, n_recorded: int, store: ExtractionStore) -> RoleState:
    """A role state whose activations do not have one row per recorded layer is refused."""
    rows = state.n_rows
    if rows is not None and rows != n_recorded:
        raise StoreError(
            f"{store.state_path(state.role)} holds activations of {rows} layers but the run "
            f"records {n_recorded}; it belongs to another `layers` setting: delete it to redo "
            "that role, or choose a new `out_dir`"
        )
    return state


def _scatter(
    values: torch.Tensor, layers: Sequence[int], n_layers: int, fill: float
) -> torch.Tensor:
    """Put ``values`` (k, ...) at rows ``layers`` of an (n_layers, ...) tensor of ``fill``."""
    out = torch.full((n_layers, *values.shape[1:]), fill, dtype=values.dtype)
    out[torch.tensor(list(layers), dtype=torch.long)] = values.to("cpu")
    return out


def _rounded(values: torch.Tensor) -> list[float | None]:
    """Per-layer numbers for the metadata: 4 decimals, ``None`` for an unrecorded layer."""
    return [None if math.isnan(float(v)) else round(float(v), 4) for v in values]


def build_bundle(
    store: ExtractionStore,
    states: dict[str, RoleState],
    settings: ExtractSettings,
    *,
    model: nn.Module,
    model_id: str,
    record: dict[str, Any],
    tokenizer: Any = None,
) -> Path:
    """Role vectors, axis, calibration, monitor layer, capping config and report -> bundle.

    The scores are computed on the recorded layers (``record["recorded_layers"]``, default
    all) and put back in place in full-depth tensors: unrecorded layers get zero rows in the
    axis and its vectors, NaN in the report, ``None`` in the metadata.

    With ``tokenizer``, the sampled rollouts are replayed teacher-forced on the finished axis
    for the calibration's per-token tables (:mod:`.token_replay`, resumable per role);
    without it the calibration has response means only.
    """
    n_layers = num_layers(model)
    layers: list[int] = list(record.get("recorded_layers") or range(n_layers))
    nan = float("nan")
    generation_seconds = store.generation_seconds()  # every session of the run together
    for state in states.values():
        _check_rows(state, len(layers), store)
    default_state = states[DEFAULT_ROLE]
    default_vec, n_default = default_state.mean()
    if default_vec is None:
        raise PersonaCompassError("no default rollout has activations; rerun the extraction")
    role_names, role_vecs, role_counts, dropped = [], [], {}, {}
    for role, state in states.items():
        if role == DEFAULT_ROLE:
            continue
        vec, count = state.mean(("s3",))
        role_counts[role] = count
        if vec is not None and count >= settings.min_role_count:
            role_names.append(role)
            role_vecs.append(vec)
        else:
            dropped[role] = count
    if len(role_vecs) < 2:
        raise PersonaCompassError(
            f"only {len(role_vecs)} roles have >= {settings.min_role_count} fully in-role "
            "(score 3) rollouts; lower `min_role_count`, use more prompts/questions, or use "
            "`judge='none'`"
        )
    # Everything below up to the scatter works on the k recorded layers: (.., k, D).
    role_stack = torch.stack(role_vecs)  # (R, k, D)
    directions = default_vec - role_stack.mean(0)

    acts, labels, qids = [], [], []
    for role, state in states.items():
        for rid, sample in zip(state.sample_ids, state.samples, strict=True):
            acts.append(sample.float())
            labels.append(role)
            qids.append(state.records[rid].question_id)
    samples = RolloutSamples(torch.stack(acts), tuple(labels), tuple(qids))
    held = heldout_auroc(samples, seed=settings.seed)
    auroc = _scatter(held["auroc"], layers, n_layers, nan)
    separation = _scatter(held["separation"], layers, n_layers, nan)
    monitor_layer = choose_monitor_layer(auroc, separation, layers=layers)
    units = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projections_k = torch.einsum("nld,ld->nl", samples.acts.double(), units.double()).float()
    # an unrecorded layer's axis is zero, so every projection on it is 0
    projections = _scatter(projections_k.T, layers, n_layers, 0.0).T.contiguous()  # (N, L)
    is_role = torch.tensor([lab != DEFAULT_ROLE for lab in labels])
    calibration = Calibration.from_projections(
        projections[is_role], source=f"{int(is_role.sum())} sampled role-play rollouts"
    )
    if tokenizer is not None:
        from .token_replay import token_tables

        replayed = token_tables(
            store,
            states,
            units,
            layers,
            n_layers,
            model=model,
            tokenizer=tokenizer,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
        )
        calibration = calibration.with_tokens(**replayed)
    variance_k, components = pca(role_stack, k=min(10, len(role_vecs)))
    variance = _scatter(variance_k, layers, n_layers, nan)
    cosines_k = pc_cosines(directions, components)  # (k layers, PCs)
    cosines = _scatter(cosines_k, layers, n_layers, nan)
    cos = cosines[:, 0]
    at_monitor = layers.index(monitor_layer)
    ranking = rank_roles(role_names, role_stack, directions, at_monitor)
    pc1_roles = pc1_ends(
        role_names, role_stack[:, at_monitor], aligned_pc1(directions, components)[at_monitor]
    )
    window = choose_capping_window(separation, layers=layers)
    storage = store.storage_bytes()
    metadata = {
        "method": "role-play extraction (single-pass capture)",
        "preset": settings.preset,
        "judge": settings.judge,
        "command": settings.command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_default": n_default,
        "roles": {r: role_counts[r] for r in role_names},
        "dropped_roles": dropped,
        "questions": settings.n_questions,
        "max_new_tokens": settings.max_new_tokens,
        "layers": layers_text(layers, n_layers),
        "recorded_layers": layers,
        "auroc": _rounded(auroc),
        "separation": _rounded(separation),
        "pc1_cosine": _rounded(cos),
        "pc1_variance": _rounded(variance[:, 0]),
        "monitor_auroc": round(float(auroc[monitor_layer]), 4),
        "monitor_pc1_cosine": round(float(cos[monitor_layer]), 4),
        "monitor_pc_cosines": _rounded(cosines[monitor_layer, :5]),
        "axis_in_pc1_3": _rounded(axis_in_span(cosines)),
        # facts for the axis-quality verdict (persona_compass.axis_verdict)
        "monitor_default_pc1_beyond": round(
            default_pc1_beyond(
                role_stack[:, at_monitor], default_vec[at_monitor], components[at_monitor, 0]
            ),
            4,
        ),
        "default_identity": default_identity(r.response for r in default_state.records.values()),
        "capping_window": list(window),
        "generation_seconds": None if generation_seconds is None else round(generation_seconds, 1),
        "storage_bytes_per_role_max": max(storage.values()) if storage else 0,
        "storage_bytes_total": sum(storage.values()),
        "settings": {k: record[k] for k in sorted(record) if k != "command"},
    }
    axis = Axis(
        directions=_scatter(directions.float(), layers, n_layers, 0.0),
        model_id=model_id,
        fingerprint=model_fingerprint(model),
        monitor_layer=monitor_layer,
        vectors={
            "default": _scatter(default_vec, layers, n_layers, 0.0),
            **{
                f"role/{r}": _scatter(v, layers, n_layers, 0.0)
                for r, v in zip(role_names, role_vecs, strict=True)
            },
        },
        residual_norms=_scatter(samples.acts.norm(dim=-1).mean(0).float(), layers, n_layers, 0.0),
        calibration=calibration,
        metadata=metadata,
    )
    bundle_dir = store.root / "bundle"
    axis.save(bundle_dir)
    cap = CappingConfig.calibrate(
        axis, projections[is_role], f"{window[0]}:{window[1]}", percentile=settings.percentile
    )
    cap.save(bundle_dir)
    write_report(
        bundle_dir,
        model_id=model_id,
        summary=metadata,
        variance_ratio=variance,
        pc1_cos=cos,
        pc_cos=cosines,
        pc1_roles=pc1_roles,
        verdict=bundle_verdict(axis, cap),
        auroc=auroc,
        separation=separation,
        ranking=ranking,
        monitor_layer=monitor_layer,
        capping_window=window,
        recorded_layers=layers,
    )
    return bundle_dir


def command_line() -> str:
    """The command that is running, for the bundle's record."""
    return " ".join(shlex.quote(a) for a in ["persona-compass", *sys.argv[1:]])


def rejudge(
    out_dir: str | Path,
    judge_spec: str,
    *,
    model: nn.Module,
    tokenizer: Any,
    model_id: str,
    batch_size: int = 8,
    progress: bool = True,
    compare_with: Sequence[Axis] = (),
) -> ExtractionResult:
    """Score a finished run's rollouts again with another judge, without regenerating.

    The stored answers are re-scored; the per-score running sums are rebuilt from one
    teacher-forced forward pass over each stored conversation (a rollout's activations are
    only kept as sums, so moving it between score buckets needs them once more). Sampled
    per-rollout activations are refreshed the same way (on the run's recorded layers), then
    the bundle is rebuilt.
    """
    root = Path(out_dir)
    run_file = root / "run.json"
    if not run_file.exists():
        raise PersonaCompassError(f"{root} holds no extraction run (no run.json) to re-judge")
    record = json.loads(run_file.read_text(encoding="utf-8"))
    if record.get("model_fingerprint") != model_fingerprint(model):
        raise PersonaCompassError(
            f"{root} was extracted with {record.get('model_id')!r}; re-judge it with that model"
        )
    known = {f.name for f in ExtractSettings.__dataclass_fields__.values()}
    settings = ExtractSettings(**{k: v for k, v in record.items() if k in known})
    settings = ExtractSettings(**{**asdict(settings), "judge": judge_spec})
    n_layers = num_layers(model)
    layers = list(record.get("recorded_layers") or resolve_layers(settings.layers, n_layers))
    record = {
        **record,
        "judge": judge_spec,
        "layers": layers_text(layers, n_layers),
        "recorded_layers": layers,
        "n_layers": n_layers,
    }
    with ExtractionStore(root, record, resume_keys=()) as store:
        trait_scorer = None
        if settings.trait is not None:
            trait = trait_catalogue(settings)
            trait_judge = make_trait_judge(
                judge_spec, trait.rubric, model=model, tokenizer=tokenizer
            )
            trait_scorer = TraitScorer(trait_judge, trait)
        else:
            catalogue = load_catalogue(settings.roles_path, settings.questions_path)
            rubrics = {r.name: r.rubric for r in catalogue.roles}
            judge = make_judge(judge_spec, model=model, tokenizer=tokenizer)
        states = {role: store.load_role(role) for role in store.roles()}
        bar = tqdm(
            total=sum(len(s.records) for s in states.values()),
            desc="re-judging",
            unit="rollout",
            disable=not progress,
            dynamic_ncols=True,
        )
        for role, old in states.items():
            records = list(old.records.values())
            if trait_scorer is not None:
                trait_items = [TraitItem(r.question, r.response) for r in records]
                for rec, score in zip(records, trait_scorer.judge.score(trait_items), strict=True):
                    rec.score, rec.judge = score, trait_scorer.judge.name
            elif role != DEFAULT_ROLE:
                items = [
                    JudgeItem(role, rubrics.get(role, ""), r.question, r.response) for r in records
                ]
                for rec, score in zip(records, judge.score(items), strict=True):
                    rec.score, rec.judge = score, judge.name
            fresh = RoleState(role)
            keep = set(old.sample_ids)
            for start in range(0, len(records), batch_size):
                chunk = records[start : start + batch_size]
                means = record_span_means(
                    model,
                    tokenizer,
                    [r.conversation() for r in chunk],
                    layers=layers,
                    batch_size=batch_size,
                )
                for rec, mean in zip(chunk, means, strict=True):
                    usable = rec.n_tokens > 0 and mean.shape[0] > 0
                    bucket = trait_scorer.bucket(rec) if trait_scorer is not None else None
                    fresh.add(
                        rec, mean[-1] if usable else None, keep_sample=rec.id in keep, bucket=bucket
                    )
                bar.update(len(chunk))
            store.commit(fresh)
            states[role] = fresh
        bar.close()
        store.write_settings(record)
        if trait_scorer is not None:
            bundle = build_trait_bundle(
                store,
                states,
                settings,
                trait_scorer,
                model=model,
                model_id=model_id,
                record=record,
                compare_with=compare_with,
            )
        else:
            bundle = build_bundle(
                store,
                states,
                settings,
                model=model,
                model_id=model_id,
                record=record,
                tokenizer=tokenizer,
            )
        n = sum(len(s.records) for s in states.values())
        return ExtractionResult(
            root, bundle, n, 0, json.loads((bundle / "bundle.json").read_text())["metadata"]
        )
