"""Trait axis extraction (``extract --trait NAME``): the persona-vectors recipe on our store.

Every question of a trait catalogue is answered under both prompts of every pair: the
``elicit`` side asks for the trait, the ``suppress`` side holds it back. A judge scores each
answer 0-100 with the catalogue's rubric. The axis per layer is

    mean(elicit answers scored as showing the trait) - mean(suppress answers scored as not)

so it points toward more of the trait. Answers the judge disagrees with (an elicit answer
that does not show the trait, a suppress answer that does) and undecided ones stay out of it.
Generation, activation capture, the resumable store and both engines are the role-play
extraction's (:mod:`.extract`); only the plan, the scoring and the bundle differ. The two
sides are stored as the "roles" ``elicit`` and ``suppress``, and each answer's running sum
goes to the bucket ``shows``, ``avoids`` or ``unscored``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_path, write_text
from ..axis import Axis, model_fingerprint
from ..axis_verdict import bundle_verdict
from ..calibration import Calibration
from ..errors import PersonaCompassError
from ..layers import num_layers
from .report import DEFAULT_LABEL, RolloutSamples, choose_monitor_layer, heldout_auroc
from .store import UNSCORED, ExtractionStore, RoleState, RolloutRecord
from .trait_judges import TraitItem, TraitJudge
from .traits import TraitCatalogue, load_trait

if TYPE_CHECKING:
    from .extract import ExtractSettings, Job

ELICIT, SUPPRESS = "elicit", "suppress"
SIDES = (ELICIT, SUPPRESS)
SHOWS, AVOIDS = "shows", "avoids"
TRAIT_SAMPLES_PER_SIDE = 120
"""Per-answer activations kept per side for the held-out AUROC and the calibration (about
4 MB per side on SmolLM2: two sides, not hundreds of roles, so the 1 MB role budget is not
needed here)."""


def trait_catalogue(settings: ExtractSettings) -> TraitCatalogue:
    """The catalogue selection a trait run uses (``prompts_per_role`` pairs, ``n_questions``)."""
    if settings.trait is None:
        raise PersonaCompassError("not a trait run: settings.trait is None")
    return load_trait(settings.trait).select(
        pairs=settings.prompts_per_role, questions=settings.n_questions
    )


def plan_trait_jobs(catalogue: TraitCatalogue) -> list[Job]:
    """Every (pair, side, question) rollout; the two sides of a pair and question adjacent, so
    a run stopped halfway has both sides of what it did."""
    from .extract import Job

    jobs = []
    for p, pair in enumerate(catalogue.pairs):
        for q, question in enumerate(catalogue.questions):
            for side in SIDES:
                jobs.append(Job(f"{side}/p{p}/q{q}", side, p, getattr(pair, side), q, question))
    return jobs


def trait_bucket(side: str, score: int | None, threshold: float, judged: bool) -> str:
    """Where an answer's activations go: ``shows``, ``avoids`` or ``unscored``.

    Without a judge (``judged=False``) every answer counts as what its prompt asked for.
    """
    if not judged:
        return SHOWS if side == ELICIT else AVOIDS
    if score is None:
        return UNSCORED
    return SHOWS if score >= threshold else AVOIDS


class TraitScorer:
    """Scores a batch of trait rollouts: (score, judge name, bucket) per rollout."""

    def __init__(self, judge: TraitJudge, catalogue: TraitCatalogue) -> None:
        self.judge = judge
        self.threshold = catalogue.rubric.threshold
        self.judged = judge.name != "none"

    def __call__(
        self, batch: Sequence[Job], texts: Sequence[str]
    ) -> list[tuple[int | None, str, str]]:
        items = [TraitItem(job.question, text) for job, text in zip(batch, texts, strict=True)]
        scores = self.judge.score(items)
        return [
            (score, self.judge.name, trait_bucket(job.role, score, self.threshold, self.judged))
            for job, score in zip(batch, scores, strict=True)
        ]

    def bucket(self, record: RolloutRecord) -> str:
        return trait_bucket(record.role, record.score, self.threshold, self.judged)


def trait_samples(states: dict[str, RoleState], scorer: TraitScorer) -> RolloutSamples:
    """Sampled activations of the answers the axis is made of, for the held-out AUROC.

    :func:`.report.heldout_auroc` scores ``default`` (positive) against the other labels and
    builds its train axis as positive minus negative, so trait-showing elicit answers take the
    ``default`` label and suppress answers that avoid the trait the label ``suppress``.
    """
    acts, labels, qids = [], [], []
    wanted = {ELICIT: SHOWS, SUPPRESS: AVOIDS}
    for side in SIDES:
        state = states[side]
        for rid, sample in zip(state.sample_ids, state.samples, strict=True):
            record = state.records[rid]
            if scorer.bucket(record) != wanted[side]:
                continue
            acts.append(sample.float())
            labels.append(DEFAULT_LABEL if side == ELICIT else SUPPRESS)
            qids.append(record.question_id)
    if not acts or len(set(labels)) < 2:
        raise PersonaCompassError(
            "no sampled answers on one side of the trait; raise `samples_per_role`, or use "
            "more questions"
        )
    return RolloutSamples(torch.stack(acts), tuple(labels), tuple(qids))


def axis_cosines(
    directions: Tensor, others: Sequence[Axis], layer: int, *, skip: str | None = None
) -> dict[str, float]:
    """Cosine of the (n_layers, D) ``directions`` with each of ``others`` at ``layer``, named
    by trait (or ``assistant``); axes of another shape, and one named ``skip`` (an earlier
    copy of the axis being built), are left out."""
    out = {}
    for other in others:
        if tuple(other.directions.shape) != tuple(directions.shape):
            continue
        if skip is not None and axis_name(other) == skip:
            continue
        cos = torch.nn.functional.cosine_similarity(
            directions[layer].double(), other.directions[layer].double(), dim=0
        )
        out[axis_name(other)] = round(float(cos), 4)
    return out


def axis_name(axis: Axis) -> str:
    """``assistant`` for the Assistant Axis, the trait's name for a trait axis."""
    meta = axis.metadata or {}
    return str(meta.get("trait")) if meta.get("kind") == "trait" else "assistant"


def build_trait_bundle(
    store: ExtractionStore,
    states: dict[str, RoleState],
    settings: ExtractSettings,
    scorer: TraitScorer,
    *,
    model: nn.Module,
    model_id: str,
    record: dict[str, Any],
    compare_with: Sequence[Axis] = (),
) -> Path:
    """The trait axis, its calibration, monitor layer and report -> ``store.root/bundle``."""
    from .extract import _rounded, _scatter

    catalogue = trait_catalogue(settings)
    n_layers = num_layers(model)
    layers: list[int] = list(record.get("recorded_layers") or range(n_layers))
    nan = float("nan")
    shows, n_shows = states[ELICIT].mean((SHOWS,))
    avoids, n_avoids = states[SUPPRESS].mean((AVOIDS,))
    counts = {side: dict(states[side].counts) for side in SIDES}
    if shows is None or avoids is None or min(n_shows, n_avoids) < settings.min_role_count:
        raise PersonaCompassError(
            f"the judge ({scorer.judge.name}) found {n_shows} elicit answers that show the "
            f"trait and {n_avoids} suppress answers that avoid it (buckets: {counts}); each "
            f"side needs {settings.min_role_count}: use more pairs/questions, lower "
            "`min_role_count`, or `judge='none'` (plain prompt contrast)"
        )
    directions = shows - avoids  # (k, D)
    samples = trait_samples(states, scorer)
    held = heldout_auroc(samples, seed=settings.seed)
    auroc = _scatter(held["auroc"], layers, n_layers, nan)
    separation = _scatter(held["separation"], layers, n_layers, nan)
    monitor_layer = choose_monitor_layer(auroc, separation, layers=layers)
    units = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projections_k = torch.einsum("nld,ld->nl", samples.acts.double(), units.double()).float()
    projections = _scatter(projections_k.T, layers, n_layers, 0.0).T.contiguous()
    calibration = Calibration.from_projections(
        projections, source=f"{len(samples.labels)} sampled answers, both sides of the trait"
    )
    metadata: dict[str, Any] = {
        "kind": "trait",
        "trait": catalogue.trait,
        "description": catalogue.description,
        "method": "trait extraction (contrasting system prompts, single-pass capture)",
        "preset": settings.preset,
        "judge": scorer.judge.name,
        "command": settings.command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pairs": len(catalogue.pairs),
        "questions": len(catalogue.questions),
        "n_shows": n_shows,
        "n_avoids": n_avoids,
        "buckets": counts,
        "max_new_tokens": settings.max_new_tokens,
        "recorded_layers": layers,
        "auroc": _rounded(auroc),
        "separation": _rounded(separation),
        "monitor_auroc": round(float(auroc[monitor_layer]), 4),
        "heldout": {
            "train_questions": len(held["train_questions"]),
            "test_questions": len(held["test_questions"]),
            "n_test_shows": held["n_test_default"],
            "n_test_avoids": held["n_test_role"],
        },
        "generation_seconds": round(store.generation_seconds() or 0.0, 1),
        "settings": {k: record[k] for k in sorted(record) if k != "command"},
    }
    full = _scatter(directions.float(), layers, n_layers, 0.0)
    metadata["cosines"] = axis_cosines(full, compare_with, monitor_layer, skip=catalogue.trait)
    axis = Axis(
        directions=full,
        model_id=model_id,
        fingerprint=model_fingerprint(model),
        monitor_layer=monitor_layer,
        vectors={
            "trait_shown": _scatter(shows, layers, n_layers, 0.0),
            "trait_avoided": _scatter(avoids, layers, n_layers, 0.0),
        },
        residual_norms=_scatter(samples.acts.norm(dim=-1).mean(0).float(), layers, n_layers, 0.0),
        calibration=calibration,
        metadata=metadata,
    )
    bundle_dir = store.root / "bundle"
    axis.save(bundle_dir)
    write_trait_report(bundle_dir, axis, auroc)
    return bundle_dir


def write_trait_report(folder: Path, axis: Axis, auroc: Tensor) -> None:
    """``report.md`` (and ``auroc.png`` when matplotlib is there) beside the trait bundle."""
    meta = axis.metadata
    layer = axis.monitor_layer
    lines = [
        f"# Trait axis: {meta['trait']} ({axis.model_id})",
        "",
        f"{meta['description']}",
        "",
        f"- judge: `{meta['judge']}`; {meta['pairs']} prompt pairs x {meta['questions']} "
        f"questions x 2 sides, {meta['max_new_tokens']} new tokens",
        f"- answers in the axis: {meta['n_shows']} elicit answers showing the trait, "
        f"{meta['n_avoids']} suppress answers avoiding it (all buckets: {meta['buckets']})",
        f"- monitor layer: **{layer}**, held-out AUROC (trait vs suppressed answers, on "
        f"{meta['heldout']['test_questions']} unseen questions: "
        f"{meta['heldout']['n_test_shows']} vs {meta['heldout']['n_test_avoids']} answers) "
        f"**{meta['monitor_auroc']:.3f}**",
        "",
        *bundle_verdict(axis).markdown(),
        "## Cosine with other axes at the monitor layer",
        "",
    ]
    if meta.get("cosines"):
        lines += ["| axis | cosine |", "|---|---|"]
        lines += [f"| {name} | {cos:+.3f} |" for name, cos in sorted(meta["cosines"].items())]
    else:
        lines.append("No other axis of this model was given (`extract --compare BUNDLE`).")
    lines += ["", "## Held-out AUROC per layer", "", "| layer | AUROC |", "|---|---|"]
    lines += [f"| {i} | {'-' if v is None else f'{v:.3f}'} |" for i, v in enumerate(meta["auroc"])]
    write_text(folder / "report.md", "\n".join(lines) + "\n")
    try:
        from ..plots import _pyplot

        plt = _pyplot()
    except Exception:  # the plot extra is optional; the table says the same
        return
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot(range(auroc.numel()), auroc.tolist(), marker="o", markersize=3)
    ax.axvline(layer, color="tab:red", linestyle="--", linewidth=1, label="monitor layer")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out AUROC")
    ax.set_title(f"{meta['trait']} axis: {axis.model_id}")
    ax.legend(loc="lower right", fontsize=8)
    try:
        fig.tight_layout()
        with atomic_path(folder / "auroc.png", suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
