"""Persona-space report: how well the Assistant Axis separates, and where to monitor and cap.

Pure tensor code (no model): it takes per-rollout activations (or role vectors) that an
extraction run already produced and answers the questions a user has before trusting an axis:

* Does the axis agree with the main direction of persona space? :func:`pca` of the role
  vectors per layer and :func:`pc1_cosine` (the paper reports > 0.71 at the middle layer).
* Does it separate the default Assistant from role-play on *unseen questions*?
  :func:`heldout_auroc` splits the questions (never single rollouts, so the same question
  cannot leak from train into test), builds the axis on the train questions and scores the
  test rollouts per layer: AUROC (default = positive) and the standardised separation d'.
* Which layer should a live monitor read, and which window of layers should capping act on?
  :func:`choose_monitor_layer` and :func:`choose_capping_window` pick them from that held-out
  evidence rather than from a fixed rule such as "the middle layer".
* Which characters sit where? :func:`rank_roles`; and is the default at an end of PC1, as
  the research found? :func:`default_pc1_beyond`.

:func:`write_report` writes it all as ``report.md`` plus three PNG charts. All arithmetic is
done in float64; inputs in bf16/fp16/fp32 are upcast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..atomic import atomic_path, write_text
from ..errors import PersonaCompassError

if TYPE_CHECKING:
    from ..axis_verdict import Verdict

__all__ = [
    "DEFAULT_LABEL",
    "ReportError",
    "RolloutSamples",
    "aligned_pc1",
    "auroc",
    "axis_in_span",
    "choose_capping_window",
    "choose_monitor_layer",
    "default_pc1_beyond",
    "default_window_width",
    "heldout_auroc",
    "pc1_cosine",
    "pc1_ends",
    "pc_cosines",
    "pca",
    "rank_roles",
    "standardised_separation",
    "write_report",
]

DEFAULT_LABEL = "default"
"""The label of rollouts generated under the neutral default-Assistant prompts."""

_CHUNK = 1024  # rollouts upcast to float64 at a time (bounds the memory of the float64 copy)
_TINY = 1e-12
_ROLES_CHART_ALL = 60  # roles.png shows every role up to this many, else the top/bottom 30
_PNG_FILES = ("auroc.png", "variance.png", "roles.png")


class ReportError(PersonaCompassError):
    """Inputs to the persona-space report are inconsistent or too small to give an answer."""


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class RolloutSamples:
    """Per-rollout mean activations with their role label and question.

    Attributes:
        acts: ``(N, L, D)`` floating tensor, one ``(n_layers, d_model)`` vector per rollout.
        labels: ``N`` role names; :data:`DEFAULT_LABEL` (``"default"``) marks the rollouts
            of the default Assistant.
        question_ids: ``N`` integer question ids; rollouts that answer the same question
            share an id (the held-out split is made over these ids).
    """

    acts: Tensor
    labels: tuple[str, ...]
    question_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        acts = self.acts
        if not isinstance(acts, Tensor):
            raise ReportError(f"acts must be a torch.Tensor (N, L, D), got {type(acts).__name__}")
        if acts.ndim != 3:
            raise ReportError(
                f"acts must have shape (n_rollouts, n_layers, d_model), got {tuple(acts.shape)}"
            )
        if not acts.is_floating_point():
            raise ReportError(f"acts must be a floating tensor, got {acts.dtype}")
        n, n_layers, d_model = acts.shape
        if n == 0 or n_layers == 0 or d_model == 0:
            raise ReportError(f"acts is empty: shape {tuple(acts.shape)}")
        if not bool(torch.isfinite(acts).all()):
            raise ReportError("acts contains NaN or infinite values; check the extraction run")
        labels = tuple(self.labels)
        qids = tuple(self.question_ids)
        if len(labels) != n:
            raise ReportError(f"{len(labels)} labels for {n} rollouts; give one per rollout")
        if len(qids) != n:
            raise ReportError(f"{len(qids)} question ids for {n} rollouts; give one per rollout")
        for label in labels:
            if not isinstance(label, str) or not label:
                raise ReportError(f"every label must be a non-empty string, got {label!r}")
        for qid in qids:
            if isinstance(qid, bool) or not isinstance(qid, int):
                raise ReportError(f"every question id must be an int, got {qid!r}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "question_ids", qids)

    @property
    def n_rollouts(self) -> int:
        return int(self.acts.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.acts.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.acts.shape[2])

    @property
    def roles(self) -> tuple[str, ...]:
        """The distinct non-default labels, sorted."""
        return tuple(sorted({label for label in self.labels if label != DEFAULT_LABEL}))


# --------------------------------------------------------------------------- PCA


def _check_role_vectors(role_vectors: Tensor) -> Tensor:
    if not isinstance(role_vectors, Tensor) or role_vectors.ndim != 3:
        shape = tuple(role_vectors.shape) if isinstance(role_vectors, Tensor) else None
        raise ReportError(f"role_vectors must have shape (n_roles, n_layers, d_model), got {shape}")
    if not role_vectors.is_floating_point():
        raise ReportError(f"role_vectors must be a floating tensor, got {role_vectors.dtype}")
    if not bool(torch.isfinite(role_vectors).all()):
        raise ReportError("role_vectors contains NaN or infinite values")
    return role_vectors.to(torch.float64)


def pca(role_vectors: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
    """Per-layer PCA of the role vectors, centred on their mean over roles.

    Args:
        role_vectors: ``(R, L, D)``, one mean activation per role (``R >= 2``).
        k: number of components to return.

    Returns:
        ``(variance_ratio (L, k), components (L, k, D))`` in float64. ``variance_ratio[l, i]``
        is the share of the total variance of the roles at layer ``l`` along component ``i``
        (non-increasing in ``i``, summing to at most 1). Components are unit rows,
        orthonormal within a layer. A centred set of ``R`` vectors has at most ``R - 1``
        non-trivial directions: where ``k`` exceeds ``min(R, D)`` the extra rows and ratios
        are zero. Each component's sign is arbitrary in PCA; it is fixed here so that its
        largest-magnitude coordinate is positive (deterministic, not meaningful: use
        :func:`aligned_pc1` to orient PC1 along an axis).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ReportError(f"k must be a positive int, got {k!r}")
    x = _check_role_vectors(role_vectors)
    n_roles, n_layers, d_model = x.shape
    if n_roles < 2:
        raise ReportError(f"PCA needs at least 2 role vectors, got {n_roles}")
    centred = (x - x.mean(dim=0, keepdim=True)).transpose(0, 1)  # (L, R, D)
    _, sing, vh = torch.linalg.svd(centred, full_matrices=False)  # (L, m), (L, m, D)
    power = sing.square()
    total = power.sum(dim=1, keepdim=True)
    ratio = torch.where(total > 0, power / total.clamp_min(_TINY), torch.zeros_like(power))
    # Deterministic signs: the largest-magnitude coordinate of each component is positive.
    biggest = vh.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(vh, -1, biggest))
    vh = vh * torch.where(signs == 0, torch.ones_like(signs), signs)
    # Directions with no variance (beyond float64 rounding) are not defined by the data:
    # report them, and their share, as zero.
    real = power > total * 1e-20
    ratio = torch.where(real, ratio, torch.zeros_like(ratio))
    vh = torch.where(real.unsqueeze(-1), vh, torch.zeros_like(vh))
    m = sing.shape[1]
    variance_ratio = torch.zeros(n_layers, k, dtype=torch.float64)
    components = torch.zeros(n_layers, k, d_model, dtype=torch.float64)
    take = min(k, m)
    variance_ratio[:, :take] = ratio[:, :take]
    components[:, :take] = vh[:, :take]
    return variance_ratio, components


def _check_axis_components(axis: Tensor, components: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(axis, Tensor) or axis.ndim != 2:
        raise ReportError("axis must be a (n_layers, d_model) tensor")
    if not isinstance(components, Tensor) or components.ndim != 3 or components.shape[1] < 1:
        raise ReportError("components must be a (n_layers, k, d_model) tensor with k >= 1")
    if components.shape[0] != axis.shape[0] or components.shape[2] != axis.shape[1]:
        raise ReportError(
            f"axis {tuple(axis.shape)} and components {tuple(components.shape)} do not match: "
            "they need the same n_layers and d_model"
        )
    return axis.to(torch.float64), components.to(torch.float64)


def pc_cosines(axis: Tensor, components: Tensor) -> Tensor:
    """``|cos(axis[l], PCi[l])|`` for every given component, shape ``(L, k)``, float64.

    A principal component's sign is arbitrary, so only the absolute value is meaningful.
    Where the axis or a component is zero the cosine is 0.
    """
    a, p = _check_axis_components(axis, components)
    dots = torch.einsum("ld,lkd->lk", a, p)
    norms = torch.linalg.vector_norm(a, dim=-1, keepdim=True) * torch.linalg.vector_norm(p, dim=-1)
    return torch.where(norms > _TINY, dots.abs() / norms.clamp_min(_TINY), torch.zeros_like(dots))


def pc1_cosine(axis: Tensor, components: Tensor) -> Tensor:
    """``|cos(axis[l], PC1[l])|`` per layer, shape ``(L,)``, float64 (0 where either is zero)."""
    return pc_cosines(axis, components[:, :1])[:, 0]


def axis_in_span(cosines: Tensor, n: int = 3) -> Tensor:
    """Length of the unit axis's projection on the span of the first ``n`` PCs, ``(L,)``.

    ``cosines`` is :func:`pc_cosines`' ``(L, k)``. The components are orthonormal, so the
    length is the root of the summed squared cosines: 1 when the axis lies in that span
    (however the variance is shared among the PCs), 0 when it is orthogonal to it.
    """
    return cosines[:, :n].to(torch.float64).square().sum(dim=-1).sqrt()


def pc1_ends(
    role_names: Sequence[str], role_vectors: Tensor, pc1: Tensor, n: int = 5
) -> tuple[list[str], list[str]]:
    """The ``n`` roles at each end of PC1 at one layer: ``(low end, high end)``.

    ``role_vectors`` is ``(R, D)`` at that layer and ``pc1`` ``(D,)``, oriented as the
    caller wants (e.g. by :func:`aligned_pc1`, so the high end is the Assistant's side).
    They tell a reader what the main direction of persona space means for this model.
    """
    names = list(role_names)
    if role_vectors.ndim != 2 or len(names) != role_vectors.shape[0]:
        raise ReportError(f"{len(names)} role names for role vectors {tuple(role_vectors.shape)}")
    scores = (role_vectors.to(torch.float64) @ pc1.to(torch.float64)).tolist()
    order = [name for _, name in sorted(zip(scores, names, strict=True))]
    n = min(n, len(order) // 2)
    return order[:n], order[::-1][:n]


def default_pc1_beyond(role_vectors: Tensor, default: Tensor, pc1: Tensor) -> float:
    """Share of the roles the default persona lies beyond along PC1 at one layer.

    ``role_vectors`` is ``(R, D)``, ``default`` and ``pc1`` ``(D,)``. PC1's sign is
    arbitrary, so this is the larger of the shares of roles strictly below and strictly above
    the default's coordinate: 1 when the default sits past every role at one end of PC1
    (where the research found the default Assistant), about 0.5 when it sits among them.
    """
    if role_vectors.ndim != 2 or role_vectors.shape[0] == 0:
        raise ReportError(
            f"role_vectors must be a non-empty (R, D) tensor, got {tuple(role_vectors.shape)}"
        )
    direction = pc1.to(torch.float64)
    roles = role_vectors.to(torch.float64) @ direction
    here = float(default.to(torch.float64) @ direction)
    below, above = int((roles < here).sum()), int((roles > here).sum())
    return max(below, above) / roles.numel()


def aligned_pc1(axis: Tensor, components: Tensor) -> Tensor:
    """PC1 per layer ``(L, D)``, its sign flipped where needed to point along ``axis``.

    After alignment, projecting on PC1 reads like projecting on the axis: high is
    Assistant-like.
    """
    a, p = _check_axis_components(axis, components)
    p = p[:, 0]
    dots = (a * p).sum(dim=-1, keepdim=True)
    return torch.where(dots < 0, -p, p)


# --------------------------------------------------------------------------- held-out scores


def _as_2d(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim not in (1, 2):
        raise ReportError(f"{name} must be a (n,) or (n, L) tensor")
    x = x.to(torch.float64)
    return x.unsqueeze(1) if x.ndim == 1 else x


def auroc(positive: Tensor, negative: Tensor) -> Tensor:
    """Area under the ROC curve of ``positive`` vs ``negative`` scores, per column.

    Computed from ranks (Mann-Whitney U): ``AUROC = (sum of positive ranks - P(P+1)/2) / (P N)``,
    with tied scores given their average rank, so it equals the probability that a random
    positive scores above a random negative, counting ties as one half.

    Args:
        positive: ``(P,)`` or ``(P, L)`` scores.
        negative: ``(N,)`` or ``(N, L)`` scores.

    Returns:
        ``(L,)`` float64 (``(1,)`` for 1-D inputs).
    """
    pos = _as_2d(positive, "positive")
    neg = _as_2d(negative, "negative")
    if pos.shape[1] != neg.shape[1]:
        raise ReportError(f"positive has {pos.shape[1]} columns, negative {neg.shape[1]}")
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos == 0 or n_neg == 0:
        raise ReportError("AUROC needs at least one positive and one negative score")
    scores = torch.cat([pos, neg], dim=0).T.contiguous()  # (L, P+N)
    ordered, _ = scores.sort(dim=1)
    below = torch.searchsorted(ordered, scores, right=False).to(torch.float64)
    up_to = torch.searchsorted(ordered, scores, right=True).to(torch.float64)
    ranks = below + (up_to - below + 1.0) / 2.0  # 1-based ranks, ties averaged
    rank_sum = ranks[:, :n_pos].sum(dim=1)
    u_stat = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u_stat / (n_pos * n_neg)


def standardised_separation(positive: Tensor, negative: Tensor) -> Tensor:
    """d' per column: ``(mean(positive) - mean(negative)) / pooled std``, float64 ``(L,)``.

    The pooled std is ``sqrt(((P-1) var_p + (N-1) var_n) / (P + N - 2))`` (unbiased
    variances). A zero pooled std is clamped to a tiny value, so identical groups give 0 and
    perfectly constant, different groups give a very large (finite) value.
    """
    pos = _as_2d(positive, "positive")
    neg = _as_2d(negative, "negative")
    if pos.shape[1] != neg.shape[1]:
        raise ReportError(f"positive has {pos.shape[1]} columns, negative {neg.shape[1]}")
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos == 0 or n_neg == 0 or n_pos + n_neg < 3:
        raise ReportError("separation needs at least one score per group and three in all")
    gap = pos.mean(dim=0) - neg.mean(dim=0)
    ss = (pos - pos.mean(dim=0)).square().sum(dim=0) + (neg - neg.mean(dim=0)).square().sum(dim=0)
    pooled = torch.sqrt(ss / (n_pos + n_neg - 2))
    return gap / pooled.clamp_min(_TINY)


def _split_questions(
    question_ids: Sequence[int], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    unique = sorted(set(question_ids))
    if len(unique) < 2:
        raise ReportError(
            f"a held-out split needs at least 2 distinct questions, got {len(unique)}; "
            "use more questions"
        )
    n_test = min(len(unique) - 1, max(1, round(test_fraction * len(unique))))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(unique), generator=gen).tolist()
    test = sorted(unique[i] for i in order[:n_test])
    train = sorted(unique[i] for i in order[n_test:])
    return train, test


def _project_rows(acts: Tensor, rows: Tensor, unit_axis: Tensor) -> Tensor:
    """Projections ``(len(rows), L)`` of the chosen rollouts on the per-layer unit axis."""
    out = torch.empty(len(rows), unit_axis.shape[0], dtype=torch.float64)
    for start in range(0, len(rows), _CHUNK):
        idx = rows[start : start + _CHUNK]
        block = acts.index_select(0, idx).to(torch.float64)  # (c, L, D)
        out[start : start + len(idx)] = torch.einsum("cld,ld->cl", block, unit_axis)
    return out


def heldout_auroc(
    samples: RolloutSamples, *, test_fraction: float = 0.3, seed: int = 0
) -> dict[str, Any]:
    """Score the Assistant Axis on questions it was not built from.

    The distinct question ids are shuffled with ``seed`` (deterministic) and
    ``round(test_fraction * n_questions)`` of them (at least 1, at most all but one) form the
    test split; every rollout of a question goes to the same side. On the train split the
    axis is, per layer, ``mean(default acts) - mean over roles of (mean of that role's acts)``
    (roles weigh equally however many rollouts they have). Each test rollout is projected on
    the unit train axis; per layer, the AUROC (default = positive, role = negative) and the
    standardised separation d' of those projections are reported.

    Returns:
        ``{"auroc": (L,), "separation": (L,), "n_train": rollouts in train,
        "n_train_default", "n_train_role", "n_train_roles": roles in the train axis,
        "n_test_default", "n_test_role", "train_questions": [...], "test_questions": [...],
        "axis": (L, D) float64 train axis}``.

    Raises:
        ReportError: ``test_fraction`` outside (0, 1), fewer than 2 questions, or a split
            without default or without role rollouts.
    """
    if not isinstance(samples, RolloutSamples):
        raise ReportError("samples must be a RolloutSamples")
    if not (isinstance(test_fraction, (int, float)) and 0.0 < float(test_fraction) < 1.0):
        raise ReportError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    train_q, test_q = _split_questions(samples.question_ids, float(test_fraction), seed)
    test_set = set(test_q)
    is_test = torch.tensor([q in test_set for q in samples.question_ids], dtype=torch.bool)
    is_default = torch.tensor([lab == DEFAULT_LABEL for lab in samples.labels], dtype=torch.bool)

    for split, in_split in (("train", ~is_test), ("test", is_test)):
        n_def = int((in_split & is_default).sum())
        n_role = int((in_split & ~is_default).sum())
        if n_def == 0 or n_role == 0:
            missing = f"'{DEFAULT_LABEL}'" if n_def == 0 else "role"
            raise ReportError(
                f"the {split} split (seed {seed}, test_fraction {test_fraction}) has no "
                f"{missing} rollouts: use more questions, with both default and role "
                "rollouts for each, or change test_fraction/seed"
            )

    # Train axis: per-group sums accumulated in float64 chunks (group 0 = default).
    role_index = {name: i + 1 for i, name in enumerate(samples.roles)}
    groups = torch.tensor(
        [0 if lab == DEFAULT_LABEL else role_index[lab] for lab in samples.labels],
        dtype=torch.long,
    )
    train_rows = torch.nonzero(~is_test).flatten()
    n_groups = len(role_index) + 1
    sums = torch.zeros(n_groups, samples.n_layers, samples.d_model, dtype=torch.float64)
    for start in range(0, len(train_rows), _CHUNK):
        idx = train_rows[start : start + _CHUNK]
        sums.index_add_(0, groups[idx], samples.acts.index_select(0, idx).to(torch.float64))
    counts = torch.bincount(groups[train_rows], minlength=n_groups).to(torch.float64)
    present = counts > 0
    means = sums / counts.clamp_min(1.0).view(-1, 1, 1)
    role_means = means[1:][present[1:]]
    axis = means[0] - role_means.mean(dim=0)
    norms = torch.linalg.vector_norm(axis, dim=-1, keepdim=True)
    unit = torch.where(norms > _TINY, axis / norms.clamp_min(_TINY), torch.zeros_like(axis))

    test_def_rows = torch.nonzero(is_test & is_default).flatten()
    test_role_rows = torch.nonzero(is_test & ~is_default).flatten()
    proj_def = _project_rows(samples.acts, test_def_rows, unit)
    proj_role = _project_rows(samples.acts, test_role_rows, unit)
    n_total_test = len(test_def_rows) + len(test_role_rows)
    if n_total_test < 3:
        raise ReportError(
            f"the test split has only {n_total_test} rollouts; use more questions or a "
            "larger test_fraction"
        )
    return {
        "auroc": auroc(proj_def, proj_role),
        "separation": standardised_separation(proj_def, proj_role),
        "n_train": len(train_rows),
        "n_train_default": int(counts[0]),
        "n_train_role": int(counts[1:].sum()),
        "n_train_roles": int(present[1:].sum()),
        "n_test_default": len(test_def_rows),
        "n_test_role": len(test_role_rows),
        "train_questions": train_q,
        "test_questions": test_q,
        "axis": axis,
    }


# --------------------------------------------------------------------------- layer choice


def _per_layer(x: Tensor | Sequence[float], name: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0:
        raise ReportError(f"{name} must be a non-empty (n_layers,) vector")
    return t


def _allowed_layers(layers: Iterable[int] | None, n_layers: int, name: str) -> list[int]:
    """The sorted, unique layers a choice may use (all when ``layers`` is None)."""
    if layers is None:
        return list(range(n_layers))
    out = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ReportError(f"{name} must hold layer indices in [0, {n_layers}), got {layer!r}")
        out.add(layer)
    if not out:
        raise ReportError(f"{name} is empty; allow at least one layer")
    return sorted(out)


def choose_monitor_layer(
    auroc: Tensor | Sequence[float],
    separation: Tensor | Sequence[float],
    *,
    min_depth: float = 0.25,
    layers: Iterable[int] | None = None,
) -> int:
    """The layer a live monitor should read: the best held-out AUROC past ``min_depth``.

    Why this rule: the lowest layers still mostly encode the surface of the tokens and
    separate the default Assistant from role-play poorly (and noisily), so they are skipped
    (layers ``< ceil(min_depth * L)``). Beyond that, the research used "about the middle
    layer", but where the persona signal is cleanest differs between models, so the layer is
    chosen from held-out data: highest AUROC on unseen questions, ties (common once the
    classes separate perfectly, AUROC = 1) broken by the larger standardised separation d',
    then by the lower layer. NaN values never win.

    Args:
        auroc, separation: ``(L,)`` held-out scores per layer (NaN where unknown).
        min_depth: the shallowest share of the depth that is skipped, in [0, 1).
        layers: the layers that may be chosen, e.g. the ones an extraction recorded (default:
            all). If none of them lies past ``min_depth``, the best of them is taken anyway.
    """
    a = _per_layer(auroc, "auroc")
    s = _per_layer(separation, "separation")
    if a.numel() != s.numel():
        raise ReportError(f"auroc has {a.numel()} layers, separation {s.numel()}")
    if not (isinstance(min_depth, (int, float)) and 0.0 <= float(min_depth) < 1.0):
        raise ReportError(f"min_depth must be in [0, 1), got {min_depth!r}")
    n_layers = a.numel()
    allowed = _allowed_layers(layers, n_layers, "layers")
    start = min(math.ceil(float(min_depth) * n_layers), n_layers - 1)
    candidates = [layer for layer in allowed if layer >= start] or allowed
    neg_inf = float("-inf")

    def key(layer: int) -> tuple[float, float, int]:
        av, sv = float(a[layer]), float(s[layer])
        return (
            neg_inf if math.isnan(av) else av,
            neg_inf if math.isnan(sv) else sv,
            -layer,
        )

    return max(candidates, key=key)


def default_window_width(n_layers: int) -> int:
    """``min(8, max(1, n_layers // 4))``: 8 of 64 layers as in the research, fewer if small."""
    return min(8, max(1, n_layers // 4))


def choose_capping_window(
    separation: Tensor | Sequence[float],
    *,
    width: int | None = None,
    min_start_frac: float = 0.5,
    layers: Iterable[int] | None = None,
) -> tuple[int, int]:
    """A half-open window ``[start, start + width)`` of layers for activation capping.

    Why this rule: the research found capping works best on a window of upper-middle layers
    (Qwen 3 32B: layers 46-53 of 64; Llama 3.3 70B: 56-71 of 80). Capping there keeps the
    persona from drifting while leaving the early layers (which read the input) and the last
    ones (which form the output) alone. So the window starts at or after
    ``ceil(min_start_frac * L)`` and, among those positions, the one whose layers have the
    largest mean held-out separation d' is taken: capping acts on the axis, so it should act
    where the axis measures the persona best. Ties go to the earlier window; NaN counts as
    the worst. If no window fits past the start, the last possible window is taken.

    Args:
        separation: ``(L,)`` held-out separation per layer.
        width: layers in the window (default :func:`default_window_width`, shortened to the
            longest run of consecutive allowed layers when ``layers`` is given).
        min_start_frac: earliest start as a fraction of the depth, in [0, 1).
        layers: the layers the window may cover, e.g. the ones an extraction recorded
            (default: all); every layer of the window is one of them.

    Raises:
        ReportError: bad arguments, or no ``width`` consecutive allowed layers.
    """
    s = _per_layer(separation, "separation")
    n_layers = s.numel()
    allowed = _allowed_layers(layers, n_layers, "layers")
    if width is None:
        width = min(default_window_width(n_layers), _longest_run(allowed))
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n_layers:
        raise ReportError(f"width must be an int in [1, {n_layers}], got {width!r}")
    if not (isinstance(min_start_frac, (int, float)) and 0.0 <= float(min_start_frac) < 1.0):
        raise ReportError(f"min_start_frac must be in [0, 1), got {min_start_frac!r}")
    s = torch.nan_to_num(s, nan=float("-inf"))
    ok = set(allowed)
    starts = [
        start
        for start in range(n_layers - width + 1)
        if all(layer in ok for layer in range(start, start + width))
    ]
    if not starts:
        raise ReportError(
            f"no {width} consecutive layers among the allowed layers {allowed}; "
            "use a smaller width or allow more layers"
        )
    first = math.ceil(float(min_start_frac) * n_layers)
    preferred = [start for start in starts if start >= first] or [starts[-1]]
    best_start, best_mean = preferred[0], float("-inf")
    for start in preferred:
        mean = float(s[start : start + width].mean())
        if mean > best_mean:
            best_start, best_mean = start, mean
    return best_start, best_start + width


def _longest_run(layers: Sequence[int]) -> int:
    """Length of the longest run of consecutive integers in sorted, unique ``layers``."""
    best = run = 1
    for prev, cur in zip(layers, layers[1:], strict=False):
        run = run + 1 if cur == prev + 1 else 1
        best = max(best, run)
    return best


# --------------------------------------------------------------------------- roles


def rank_roles(
    role_names: Sequence[str], role_vectors: Tensor, axis: Tensor, layer: int
) -> list[tuple[str, float]]:
    """Roles sorted by projection on the unit axis at ``layer``, most Assistant-like first.

    Returns ``[(name, projection), ...]``; equal projections are ordered by name.
    """
    x = _check_role_vectors(role_vectors)
    names = list(role_names)
    if len(names) != x.shape[0]:
        raise ReportError(f"{len(names)} role names for {x.shape[0]} role vectors")
    if not isinstance(axis, Tensor) or axis.shape != x.shape[1:]:
        shape = tuple(axis.shape) if isinstance(axis, Tensor) else None
        raise ReportError(f"axis must have shape {tuple(x.shape[1:])}, got {shape}")
    n_layers = x.shape[1]
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ReportError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
    direction = axis[layer].to(torch.float64)
    norm = float(torch.linalg.vector_norm(direction))
    if norm <= _TINY:
        raise ReportError(f"the axis is zero at layer {layer}; cannot rank roles on it")
    proj = (x[:, layer] @ (direction / norm)).tolist()
    return sorted(zip(names, proj, strict=True), key=lambda item: (-item[1], item[0]))


# --------------------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Tensor) and value.numel() == 1:
        return f"{float(value):.4g}"
    return str(value)


def _save(fig: Any, plt: Any, path: Path) -> None:
    try:
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _plot_auroc(
    path: Path,
    auroc: Tensor,
    pc1_cos: Tensor,
    separation: Tensor,
    monitor_layer: int,
    window: tuple[int, int],
    model_id: str,
) -> None:
    from ..plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    layers = list(range(auroc.numel()))
    ax.axvspan(window[0] - 0.5, window[1] - 0.5, color="tab:orange", alpha=0.15, label="capping")
    ax.axvline(monitor_layer, color="tab:red", linestyle="--", linewidth=1, label="monitor")
    ax.axhline(0.5, color="grey", linewidth=0.8, alpha=0.6)
    ax.plot(layers, auroc.tolist(), marker="o", markersize=3, label="held-out AUROC")
    ax.plot(layers, pc1_cos.tolist(), marker="s", markersize=3, label="|cos(axis, PC1)|")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("AUROC / cosine")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(layers, separation.tolist(), color="grey", linewidth=1, alpha=0.7, label="d'")
    twin.set_ylabel("held-out separation d'")
    handles, labels = ax.get_legend_handles_labels()
    more_h, more_l = twin.get_legend_handles_labels()
    ax.legend(handles + more_h, labels + more_l, loc="lower right", fontsize=8)
    ax.set_title(f"Assistant Axis per layer: {model_id}")
    _save(fig, plt, path)


def _plot_variance(path: Path, ratios: Tensor, monitor_layer: int, model_id: str) -> None:
    from ..plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    values = (ratios * 100.0).tolist()
    pcs = list(range(1, len(values) + 1))
    ax.bar(pcs, values, color="tab:blue", label="per component")
    cumulative = torch.cumsum(ratios * 100.0, dim=0).tolist()
    ax.plot(pcs, cumulative, color="tab:orange", marker="o", markersize=3, label="cumulative")
    ax.set_xticks(pcs)
    ax.set_ylim(0, 102)
    ax.set_xlabel("principal component of the role vectors")
    ax.set_ylabel("variance explained (%)")
    ax.set_title(f"Persona space at layer {monitor_layer}: {model_id}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="center right", fontsize=8)
    _save(fig, plt, path)


def _plot_roles(
    path: Path, ranking: Sequence[tuple[str, float]], monitor_layer: int, model_id: str
) -> None:
    from ..plots import _pyplot

    plt = _pyplot()
    shown: list[tuple[str, float]]
    if len(ranking) <= _ROLES_CHART_ALL:
        shown = list(ranking)
        title = f"Roles along the Assistant Axis, layer {monitor_layer}: {model_id}"
    else:
        half = _ROLES_CHART_ALL // 2
        shown = list(ranking[:half]) + list(ranking[-half:])
        title = f"Top and bottom {half} of {len(ranking)} roles, layer {monitor_layer}: {model_id}"
    names = [name for name, _ in shown]
    values = [value for _, value in shown]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * len(shown)), dpi=110)
    positions = list(range(len(shown)))
    colours = ["tab:blue" if i < (len(shown) + 1) // 2 else "tab:red" for i in positions]
    ax.barh(positions, values, color=colours)
    if len(ranking) > _ROLES_CHART_ALL:
        ax.axhline(len(shown) / 2 - 0.5, color="black", linestyle=":", linewidth=1)
    ax.set_yticks(positions)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()  # most Assistant-like at the top
    ax.set_xlabel("projection on the unit Assistant Axis (high = Assistant-like)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, plt, path)


def _layer_text(layers: Sequence[int]) -> str:
    """Sorted unique layers as runs: ``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def _role_table(rows: Iterable[tuple[int, str, float]]) -> list[str]:
    lines = ["| rank | role | projection |", "|---:|---|---:|"]
    lines += [f"| {rank} | {name} | {value:.4g} |" for rank, name, value in rows]
    return lines


def _table_header(with_pcs: bool) -> str:
    pc_columns = "best-aligned PC (abs cos) | axis in PC1-3 span | " if with_pcs else ""
    header = f"| layer | AUROC | d' | abs cos(axis, PC1) | PC1 variance | {pc_columns}use |"
    return header + "\n|" + "---:|" * (7 if with_pcs else 5) + "---|"


def _pc_cells(cosines: Tensor) -> str:
    best = int(cosines.argmax())
    span = float(axis_in_span(cosines[None])[0])
    return f"PC{best + 1} ({float(cosines[best]):.3f}) | {span:.3f} | "


def _persona_space_lines(
    m: int,
    variance: Tensor,
    pc1_cos: Tensor,
    cosines: Tensor | None,
    pc1_roles: tuple[Sequence[str], Sequence[str]] | None,
) -> list[str]:
    """What the main directions of persona space are at the monitor layer, in words."""
    if cosines is None and pc1_roles is None:
        return []
    lines = [f"## Persona space (layer {m})", ""]
    if pc1_roles is not None:
        low, high = pc1_roles
        lines += [
            f"PC1 ({100.0 * float(variance[0]):.1f}% of the role variance) runs from "
            f"{', '.join(low)} (away from the Assistant) to {', '.join(high)} (the side the "
            "axis points to).",
            "",
        ]
    if cosines is not None:
        listed = ", ".join(
            f"PC{i + 1} {float(cosines[i]):.3f}" for i in range(min(5, cosines.numel()))
        )
        span = float(axis_in_span(cosines[None])[0])
        lines += [
            f"|cos(axis, PC)|: {listed}. The axis has length {span:.3f} in the span of PC1-3",
            "(1 = it lies in that plane of persona space, however the variance is shared).",
            f"|cos(axis, PC1)| is {float(pc1_cos):.3f} here: where another PC lines up better,",
            "the largest spread among the roles is something other than how Assistant-like",
            "they are (for example a style that only some characters share).",
            "",
        ]
    return lines


def write_report(
    out_dir: str | Path,
    *,
    model_id: str,
    summary: Mapping[str, Any],
    variance_ratio: Tensor,
    pc1_cos: Tensor,
    auroc: Tensor,
    separation: Tensor,
    ranking: Sequence[tuple[str, float]],
    monitor_layer: int,
    capping_window: tuple[int, int],
    extra_lines: Sequence[str] = (),
    recorded_layers: Sequence[int] | None = None,
    pc_cos: Tensor | None = None,
    pc1_roles: tuple[Sequence[str], Sequence[str]] | None = None,
    verdict: Verdict | None = None,
) -> Path:
    """Write ``report.md`` and the charts ``auroc.png``, ``variance.png``, ``roles.png``.

    Every number in the report comes from the arguments. All files are written atomically.

    Args:
        out_dir: folder for the files (created if needed).
        model_id: the model's name, shown in the header and chart titles.
        summary: free key -> value facts for the header (e.g. roles, questions, rollouts).
        variance_ratio: ``(L, k)`` from :func:`pca`.
        pc1_cos: ``(L,)`` from :func:`pc1_cosine`.
        auroc, separation: ``(L,)`` from :func:`heldout_auroc`.
        ranking: ``[(role, projection)]`` at ``monitor_layer``, from :func:`rank_roles`.
        monitor_layer: the layer a monitor reads (:func:`choose_monitor_layer`).
        capping_window: half-open ``(start, stop)`` (:func:`choose_capping_window`).
        extra_lines: further markdown lines, appended under "Notes".
        recorded_layers: the layers the run recorded (``extract --layers``), default all.
            The per-layer inputs still cover every layer (NaN where unrecorded); the table
            lists the recorded layers only, and the monitor layer and capping window must
            be among them.
        pc_cos: optional ``(L, k)`` from :func:`pc_cosines`: adds, per layer, the PC the
            axis lines up with best and the share of the axis in the first three PCs' span.
        pc1_roles: optional ``(low end, high end)`` role names of PC1 at the monitor layer
            (:func:`pc1_ends`), with the high end on the Assistant's side.
        verdict: optional :func:`~persona_compass.axis_verdict.axis_verdict` of the bundle:
            adds a "Verdict" section (strong / usable / weak and its reasons).

    Returns:
        The path of ``report.md``.
    """
    a = _per_layer(auroc, "auroc")
    s = _per_layer(separation, "separation")
    c = _per_layer(pc1_cos, "pc1_cos")
    vr = torch.as_tensor(variance_ratio, dtype=torch.float64)
    n_layers = a.numel()
    if vr.ndim != 2 or vr.shape[1] < 1:
        raise ReportError("variance_ratio must be a (n_layers, k) tensor with k >= 1")
    pcs = None if pc_cos is None else torch.as_tensor(pc_cos, dtype=torch.float64)
    if pcs is not None and (pcs.ndim != 2 or pcs.shape[0] != n_layers or pcs.shape[1] < 1):
        raise ReportError(f"pc_cos must be a ({n_layers}, k) tensor with k >= 1")
    if s.numel() != n_layers or c.numel() != n_layers or vr.shape[0] != n_layers:
        raise ReportError(
            f"per-layer inputs disagree on the layer count: auroc {n_layers}, separation "
            f"{s.numel()}, pc1_cos {c.numel()}, variance_ratio {vr.shape[0]}"
        )
    if isinstance(monitor_layer, bool) or not isinstance(monitor_layer, int):
        raise ReportError(f"monitor_layer must be an int, got {monitor_layer!r}")
    if not 0 <= monitor_layer < n_layers:
        raise ReportError(f"monitor_layer {monitor_layer} is outside [0, {n_layers})")
    start, stop = (int(v) for v in capping_window)
    if not 0 <= start < stop <= n_layers:
        raise ReportError(
            f"capping_window {tuple(capping_window)} is not a half-open range inside "
            f"[0, {n_layers})"
        )
    recorded = _allowed_layers(recorded_layers, n_layers, "recorded_layers")
    partial = len(recorded) < n_layers
    if monitor_layer not in recorded or not set(range(start, stop)) <= set(recorded):
        raise ReportError(
            f"monitor_layer {monitor_layer} and capping_window {(start, stop)} must use "
            f"recorded layers only ({_layer_text(recorded)})"
        )
    ranking = [(str(name), float(value)) for name, value in ranking]
    if not ranking:
        raise ReportError("ranking is empty; rank at least one role with rank_roles")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = monitor_layer
    finite_a = torch.nan_to_num(a, nan=float("-inf"))
    best_value = float(finite_a.max())
    best_layers = [i for i in range(n_layers) if float(finite_a[i]) == best_value]
    best_text = ", ".join(str(i) for i in best_layers[:6]) + (
        ", ..." if len(best_layers) > 6 else ""
    )
    window_sep = float(s[start:stop].mean())
    k = vr.shape[1]

    lines = [f"# Persona-space report: {model_id}", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in summary.items()]
    lines += [
        f"- n_layers: {n_layers}"
        + (
            f", recorded {len(recorded)} ({_layer_text(recorded)}); the axis is zero on the others"
            if partial
            else ""
        ),
        "",
        "Held-out scores come from questions the axis was not built from: the projection of",
        "each test rollout on the unit axis, default Assistant (positive) vs role-play.",
        "AUROC 0.5 is chance, 1 is perfect; d' is the gap of the means in pooled standard",
        "deviations. PC1 is the first principal component of the role vectors; the paper",
        "reports |cos(axis, PC1)| > 0.71 at the middle layer.",
        "",
        *(verdict.markdown() if verdict is not None else []),
        "## Chosen layers",
        "",
        f"- **Monitor layer: {m}** ({100.0 * m / n_layers:.0f}% of depth): held-out AUROC "
        f"{float(a[m]):.3f}, d' {float(s[m]):.2f}, |cos(axis, PC1)| {float(c[m]):.3f}. "
        f"Best held-out AUROC at any {'recorded ' if partial else ''}layer: "
        f"{best_value:.3f} "
        f"(layer{'s' if len(best_layers) > 1 else ''} {best_text}).",
        "  Why: the lowest layers separate the Assistant from role-play poorly, so the",
        "  monitor reads the layer past them with the best AUROC on unseen questions (ties",
        "  broken by d'), chosen from this model's data rather than fixed at the middle.",
        f"- **Capping window: layers [{start}, {stop})** ({stop - start} layers, "
        f"{start}-{stop - 1}, from {100.0 * start / n_layers:.0f}% of depth): mean "
        f"held-out d' {window_sep:.2f}.",
        "  Why: the research found capping works best on a window of upper-middle layers;",
        "  within those, the window where the axis separates best (highest mean d') is used,",
        "  since capping acts along the axis.",
        "",
        "## Per layer",
        "",
        _table_header(pcs is not None),
    ]
    for layer in recorded:
        marks = []
        if layer == m:
            marks.append("monitor")
        if start <= layer < stop:
            marks.append("capping")
        pc_cells = "" if pcs is None else _pc_cells(pcs[layer])
        lines.append(
            f"| {layer} | {float(a[layer]):.3f} | {float(s[layer]):.2f} | "
            f"{float(c[layer]):.3f} | {100.0 * float(vr[layer, 0]):.1f}% | {pc_cells}"
            f"{', '.join(marks)} |"
        )
    shares = ", ".join(f"PC{i + 1} {100.0 * float(vr[m, i]):.1f}%" for i in range(min(k, 5)))
    lines += [
        "",
        f"Variance of the role vectors at layer {m}: {shares}; first {k} together "
        f"{100.0 * float(vr[m].sum()):.1f}%.",
        "",
        *_persona_space_lines(m, vr[m], c[m], None if pcs is None else pcs[m], pc1_roles),
        f"## Roles along the axis (layer {m})",
        "",
        "Projection of each role vector on the unit axis: high = Assistant-like.",
        "",
    ]
    n_roles = len(ranking)
    numbered = [(i + 1, name, value) for i, (name, value) in enumerate(ranking)]
    if n_roles <= 20:
        lines += _role_table(numbered)
    else:
        lines += ["Most Assistant-like:", ""] + _role_table(numbered[:10])
        lines += ["", "Least Assistant-like:", ""] + _role_table(reversed(numbered[-10:]))
    lines += ["", "## Charts", ""]
    lines += [
        "- `auroc.png`: held-out AUROC, |cos(axis, PC1)| and d' per layer; monitor layer "
        "and capping window marked.",
        f"- `variance.png`: variance explained by the first {k} PCs at layer {m}.",
        f"- `roles.png`: roles along the axis at layer {m}"
        + (" (all)." if n_roles <= _ROLES_CHART_ALL else " (top and bottom 30)."),
    ]
    extra = list(extra_lines)
    if extra:
        lines += ["", "## Notes", ""] + extra

    _plot_auroc(out / _PNG_FILES[0], a, c, s, m, (start, stop), model_id)
    _plot_variance(out / _PNG_FILES[1], vr[m], m, model_id)
    _plot_roles(out / _PNG_FILES[2], ranking, m, model_id)
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    return report
