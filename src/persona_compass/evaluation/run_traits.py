"""Trait needles in an evaluation: the ``traits`` bundles opened and checked against the axis,
what the settings record says of them, and a started engine's needles checked against them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..axis import Axis
from ..bundle import Bundle, open_trait_bundles
from ..errors import PersonaCompassError
from ..monitor import needle_names
from .run_store import EvaluationError, bundle_digest


def open_traits(specs: Sequence[str | Path], axis: Axis) -> list[Bundle]:
    """The trait bundles ``specs`` name, each a trait axis of the axis' model, names distinct
    (:func:`~persona_compass.bundle.open_trait_bundles`).

    Raises:
        EvaluationError: a spec that is no readable bundle, no trait bundle, one of another
            model, or two bundles of one trait.
    """
    try:
        return open_trait_bundles(specs, axis)
    except PersonaCompassError as exc:
        raise EvaluationError(str(exc)) from None


def trait_names(bundles: Sequence[Bundle]) -> list[str]:
    """Each trait bundle's trait name, in the given order."""
    return list(needle_names([b.axis for b in bundles]))


def trait_record(bundles: Sequence[Bundle]) -> dict[str, Any]:
    """What ``settings.json`` records of the needles: ``traits`` (name, folder, digest, monitor
    layer, calibrated) and ``trait_digests`` (name -> digest, the resume key). Empty without
    needles, so a run without them records what runs did before needles existed."""
    if not bundles:
        return {}
    rows = []
    for name, bundle in zip(trait_names(bundles), bundles, strict=True):
        assert bundle.folder is not None  # an opened bundle has its folder
        rows.append(
            {
                "name": name,
                "bundle": str(bundle.folder),
                "digest": bundle_digest(bundle.folder),
                "monitor_layer": bundle.axis.layer,
                "calibrated": bundle.axis.calibration is not None,
            }
        )
    return {"traits": rows, "trait_digests": {r["name"]: r["digest"] for r in rows}}


def check_engine_traits(engine: Any, names: Sequence[str]) -> None:
    """Refuse, before any generation, a started engine that reads other trait needles.

    Raises:
        EvaluationError: the engine's needles are not the settings' ``traits``.
    """
    have = list(needle_names(tuple(getattr(engine, "traits", ()) or ())))
    if sorted(have) != sorted(names):
        raise EvaluationError(
            f"the engine reads the trait needles {have or 'none'} but the settings name "
            f"{list(names) or 'none'}; start it with the same traits (open_engine(..., "
            "traits=[...])), or let run_evaluation start it"
        )
