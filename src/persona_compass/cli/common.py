"""Helpers shared by commands: loading an axis bundle and its model together."""

from __future__ import annotations

from typing import Any

DEFAULT_MODEL = "smollm2-135m"


def load_axis_and_model(
    axis_path: str, model_spec: str | None, dtype: str | None = None
) -> tuple[Any, Any, Any, str]:
    """Load an axis bundle, then the model (default: the bundle's model), checked together.

    Returns (axis, model, tokenizer, model spec used).
    """
    from ..axis import Axis
    from ..bundles import resolve_bundle
    from ..models import load_model

    axis = Axis.load(resolve_bundle(axis_path))
    spec = model_spec or axis.model_id or DEFAULT_MODEL
    model, tokenizer = load_model(spec, dtype=dtype)
    axis.check_model(model)
    return axis, model, tokenizer, spec
