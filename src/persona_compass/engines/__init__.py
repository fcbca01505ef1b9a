"""Engines: where the compass runs generation (``hf`` embedded, ``vllm`` for real traffic)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .base import ENGINES, CompassRequest, Engine, EngineError, check_engine_name
from .hf import HFEngine

if TYPE_CHECKING:
    from ..bundle import Bundle

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
    axis: str | os.PathLike[str] | Bundle,
    **options: Any,
) -> Engine:
    """Start an engine by name on a model spec and an axis bundle (folder, alias or an opened
    :class:`~persona_compass.Bundle`).

    ``hf`` options go to :meth:`Bundle.load_model <persona_compass.Bundle.load_model>`
    (``dtype``, ``device``; the model is checked against the bundle) plus ``capping_config``
    and ``traits`` (trait axes read beside the axis); ``vllm`` options go to
    :class:`.vllm_engine.VLLMEngine`.
    """
    from ..bundle import Bundle

    check_engine_name(name)
    if name == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, axis, **options)
    bundle = axis if isinstance(axis, Bundle) else Bundle.open(axis)
    cap = options.pop("capping_config", None) or bundle.capping
    traits = options.pop("traits", ())
    hf_model, tokenizer = bundle.load_model(model, **options)
    return HFEngine(hf_model, tokenizer, bundle.axis, capping_config=cap, traits=traits)
