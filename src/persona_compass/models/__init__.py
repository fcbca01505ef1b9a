"""Models: specs, the offline registry of pip-installable GGUF models, the conversion cache,
and :func:`load_model`.

Example:
    >>> from persona_compass.models import load_model, model_display_name
    >>> model, tok = load_model("smollm2-135m")  # doctest: +SKIP
    >>> model_display_name(model)  # doctest: +SKIP
    'SmolLM2-135M-Instruct'
"""

from __future__ import annotations

from .cache import (
    alias_cache_dir,
    ensure_alias_cached,
    ensure_gguf_cached,
    gguf_cache_dir,
    load_gguf,
    models_dir,
)
from .install import pip_command, pull_model
from .loader import (
    ResolvedSpec,
    cpu_supports_bf16,
    default_dtype,
    load_model,
    model_display_name,
    model_id,
    resolve_dtype,
    resolve_spec,
)
from .registry import (
    DEFAULT_ALIAS,
    REGISTRY,
    ModelEntry,
    WeightPart,
    aliases,
    get_entry,
    is_installed,
)

__all__ = [
    "DEFAULT_ALIAS",
    "REGISTRY",
    "ModelEntry",
    "ResolvedSpec",
    "WeightPart",
    "alias_cache_dir",
    "aliases",
    "cpu_supports_bf16",
    "default_dtype",
    "ensure_alias_cached",
    "ensure_gguf_cached",
    "get_entry",
    "gguf_cache_dir",
    "is_installed",
    "load_gguf",
    "load_model",
    "model_display_name",
    "model_id",
    "models_dir",
    "pip_command",
    "pull_model",
    "resolve_dtype",
    "resolve_spec",
]
