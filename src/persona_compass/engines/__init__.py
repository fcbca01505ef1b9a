"""Engines: where the compass runs generation (``hf`` embedded, ``vllm`` for real traffic)."""

from __future__ import annotations

import os
from typing import Any

from .base import ENGINES, CompassRequest, Engine, EngineError, check_engine_name
from .hf import HFEngine

__all__ = [
    "ENGINES",
    "CompassRequest",
    "Engine",
    "EngineError",
    "HFEngine",
    "check_engine_name",
    "open_engine",
]


def open_engine(
    name: str,
    model: str | os.PathLike[str],
    axis: str | os.PathLike[str],
    **options: Any,
) -> Engine:
    """Start an engine by name on a model spec and an axis bundle (folder or alias).

    ``hf`` options go to :func:`~persona_compass.load_model` (``dtype``, ``device``) plus
    ``capping_config``; ``vllm`` options go to :class:`.vllm_engine.VLLMEngine`.
    """
    check_engine_name(name)
    if name == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, axis, **options)
    from ..axis import Axis
    from ..bundles import resolve_bundle
    from ..capping import CappingConfig
    from ..models import load_model

    bundle = resolve_bundle(os.fspath(axis))
    cap = options.pop("capping_config", None) or CappingConfig.load_optional(bundle)
    hf_model, tokenizer = load_model(model, **options)
    return HFEngine(hf_model, tokenizer, Axis.load(bundle), capping_config=cap)
