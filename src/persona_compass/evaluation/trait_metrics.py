"""Trait needles in the evaluation's numbers: each trait's mean per-turn trajectory per
condition, and how its per-answer reading goes with each judged outcome.

``results["traits"]`` (only when the run read trait needles; :func:`trait_results`)::

    {"names": [NAME, ...],
     "bundles": [{"name", "bundle", "digest", "monitor_layer", "calibrated"}, ...],
     "trajectories": [{"trait", "condition", "scale",
                       "turns": [{"turn", "mean_percentile", "mean_projection", "n"}, ...]}],
     "correlations": [{"trait", "outcome", "scale", "n", "n_positive", "n_negative",
                       "r", "low", "high", "n_clusters", "n_boot", "seed",
                       "mean_with", "mean_without", "note"}, ...],
     "method": "..."}

``scale`` is ``percentile`` for a calibrated trait bundle (high = more of the trait) and
``projection`` for an uncalibrated one. A correlation is the point-biserial r: Pearson's r
between the answers' trait values and the 0/1 outcome (:func:`point_biserial`), over every
judged answer of every condition. Its 95% interval is a seeded percentile bootstrap that
resamples whole conversations (answers of one conversation are not independent), so it is
wider than one over answers would be. ``r`` is None, with a ``note`` saying why, when no
answer or every answer has the outcome, or when the trait's value does not vary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from .metrics import OUTCOME_KEYS, is_harmful, mean, mean_trajectories

TRAIT_OUTCOMES: tuple[str, ...] = (*OUTCOME_KEYS, "harm")
"""The outcome labels each trait is correlated with (``harm``: harmful compliance or
delusion validation)."""
N_BOOT = 1000
"""Bootstrap resamples per interval."""
_FLAT = 1e-9  # below this share of its raw spread, a resample's trait value counts as constant


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r of two equally long series; None when either does not vary.

    Example:
        >>> pearson([10, 20, 80, 90], [0, 0, 1, 1])  # 0.7 * sqrt(2)
        0.9899494936611665
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    dx = [x - mx for x in xs]
    dy = [y - my for y in ys]
    sxx, syy = sum(d * d for d in dx), sum(d * d for d in dy)
    if sxx <= _FLAT * sum(x * x for x in xs) or syy == 0:
        return None
    return sum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)


def bootstrap_seed(seed: int, *parts: str) -> int:
    """A stable bootstrap seed from the run seed and what is resampled (trait, outcome)."""
    raw = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(raw[:8], "big")


def _bootstrap_r(
    xs: Sequence[float], ys: Sequence[int], clusters: Sequence[Hashable], n_boot: int, seed: int
) -> tuple[float | None, float | None, int]:
    """The 2.5th and 97.5th percentiles of r over ``n_boot`` resamples of whole clusters, and
    how many resamples had an r (one where the trait or the outcome is constant has none)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    k = len(ids)
    if k < 2:
        return None, None, 0
    x = np.asarray(xs, dtype=np.float64)
    x = x - x.mean()  # centred: the sums below then lose no precision
    y = np.asarray(ys, dtype=np.float64)
    which = np.array([ids[c] for c in clusters])
    # per cluster: n, sum x, sum y, sum x^2, sum y^2, sum xy; a resample adds its clusters'
    sums = np.zeros((k, 6))
    for col, values in enumerate((np.ones_like(x), x, y, x * x, y * y, x * y)):
        np.add.at(sums[:, col], which, values)
    draws = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))
    counts = np.zeros((n_boot, k))
    np.add.at(counts, (np.repeat(np.arange(n_boot), k), draws.ravel()), 1.0)
    n, sx, sy, sxx, syy, sxy = (counts @ sums).T
    vx, vy = n * sxx - sx * sx, n * syy - sy * sy
    ok = (vx > _FLAT * n * sxx) & (vy > 0.5)  # y is 0/1: n*syy - sy^2 is a whole number
    if not ok.any():
        return None, None, 0
    r = (n * sxy - sx * sy)[ok] / np.sqrt(vx[ok] * vy[ok])
    low, high = np.quantile(r, [0.025, 0.975])
    return float(low), float(high), int(ok.sum())


def point_biserial(
    values: Sequence[float | None],
    flags: Sequence[bool | None],
    clusters: Sequence[Hashable],
    *,
    label: str = "the outcome",
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """How a trait's per-answer value goes with a 0/1 outcome: the point-biserial r (Pearson
    between the value and the indicator), its cluster-bootstrap 95% interval, n, and the mean
    value on answers with and without the outcome.

    Answers without a value or without a verdict are left out. ``clusters`` names each
    answer's conversation: the bootstrap resamples conversations.
    """
    if not len(values) == len(flags) == len(clusters):
        raise ValueError("values, flags and clusters must be equally long")
    kept = [
        (float(v), int(bool(f)), c)
        for v, f, c in zip(values, flags, clusters, strict=True)
        if v is not None and math.isfinite(v) and f is not None
    ]
    xs = [v for v, _, _ in kept]
    ys = [f for _, f, _ in kept]
    with_ = [v for v, f, _ in kept if f]
    without = [v for v, f, _ in kept if not f]
    out: dict[str, Any] = {
        "n": len(kept),
        "n_positive": len(with_),
        "n_negative": len(without),
        "r": None,
        "low": None,
        "high": None,
        "n_clusters": len({c for _, _, c in kept}),
        "n_boot": 0,
        "seed": seed,
        "mean_with": mean(with_),
        "mean_without": mean(without),
        "note": None,
    }
    if not kept:
        out["note"] = f"no answer has both a trait reading and a verdict on {label}"
    elif not with_:
        out["note"] = f"no answer was judged {label}: r is undefined"
    elif not without:
        out["note"] = f"every answer was judged {label}: r is undefined"
    else:
        out["r"] = pearson(xs, ys)
        if out["r"] is None:
            out["note"] = "the trait's reading does not vary: r is undefined"
        else:
            clusters_kept = [c for _, _, c in kept]
            out["low"], out["high"], out["n_boot"] = _bootstrap_r(
                xs, ys, clusters_kept, n_boot, seed
            )
            if out["low"] is None:
                out["note"] = "one conversation only: no interval"
    return out


def _series(run: Mapping[str, Any], name: str) -> tuple[list[Any], list[Any]]:
    """One run's per-turn (projections, percentiles) of the trait ``name``."""
    readings = [(t.get("traits") or {}).get(name) or {} for t in run["turns"]]
    return [r.get("projection") for r in readings], [r.get("percentile") for r in readings]


def trait_trajectories(
    runs: Sequence[Mapping[str, Any]], bundles: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per trait and condition, the mean per-turn percentile and projection, computed as the
    axis' trajectories are (:func:`~.metrics.mean_trajectories`)."""
    out = []
    for row in bundles:
        name = row["name"]
        per_run = []
        for run in runs:
            projections, percentiles = _series(run, name)
            per_run.append(
                {
                    "condition": run["condition"],
                    "metrics": {"projections": projections, "percentiles": percentiles},
                }
            )
        for traj in mean_trajectories(per_run, ("condition",)):
            out.append({"trait": name, "scale": _scale(row), **traj})
    return out


def _scale(row: Mapping[str, Any]) -> str:
    return "percentile" if row.get("calibrated") else "projection"


def trait_correlations(
    runs: Sequence[Mapping[str, Any]],
    bundles: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> list[dict[str, Any]]:
    """Per trait and outcome label, :func:`point_biserial` over every judged answer of
    ``runs`` (each run one conversation), on the trait's percentile (its projection when the
    bundle is uncalibrated)."""
    out = []
    for row in bundles:
        name, scale = row["name"], _scale(row)
        values: list[float | None] = []
        outcomes: list[Mapping[str, Any] | None] = []
        clusters: list[int] = []
        for i, run in enumerate(runs):
            projections, percentiles = _series(run, name)
            values += percentiles if scale == "percentile" else projections
            outcomes += [t.get("outcome") for t in run["turns"]]
            clusters += [i] * len(run["turns"])
        for label in TRAIT_OUTCOMES:
            flags = [is_harmful(o) if label == "harm" else (o or {}).get(label) for o in outcomes]
            stats = point_biserial(
                values,
                flags,
                clusters,
                label=label.replace("_", " "),
                n_boot=n_boot,
                seed=bootstrap_seed(seed, name, label),
            )
            out.append({"trait": name, "outcome": label, "scale": scale, **stats})
    return out


def trait_results(
    settings: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """``results["traits"]`` (see the module docstring); None when no needle was read."""
    bundles = settings.get("traits") or []
    if not bundles:
        return None
    return {
        "names": [b["name"] for b in bundles],
        "bundles": [dict(b) for b in bundles],
        "trajectories": trait_trajectories(runs, bundles),
        "correlations": trait_correlations(runs, bundles, seed=int(settings.get("seed") or 0)),
        "method": (
            "point-biserial r (Pearson between the answer's trait percentile, or projection "
            "for an uncalibrated trait, and the 0/1 judged outcome) over every judged answer "
            f"of every condition; 95% interval: percentile bootstrap, {N_BOOT} resamples of "
            "whole conversations, seeded from the run seed, the trait and the outcome. The "
            "conditions are pooled, so a condition that lowers both the trait and the outcome "
            "adds to r"
        ),
    }
