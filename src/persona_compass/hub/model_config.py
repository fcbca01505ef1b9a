"""A model's shape from its config alone: no weights are loaded to check an imported axis.

For a 70B model nobody wants the weights read just to learn that it has 80 layers of width
8192: this reads ``config.json`` (from the folder, the alias's cache folder, or the Hub).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..axis import model_fingerprint, text_config
from ..errors import ModelSpecError


@dataclass(frozen=True)
class ModelShape:
    """What an axis must fit.

    Attributes:
        model_id: the resolved spec (alias, folder path or hub id), as bundles record it.
        display_name: the model's human name (``{model_name}`` in the default prompts).
        n_layers: decoder blocks.
        d_model: residual width.
        fingerprint: :func:`~persona_compass.model_fingerprint` of the config.
    """

    model_id: str
    display_name: str
    n_layers: int
    d_model: int
    fingerprint: str


def model_shape(
    spec: str | os.PathLike[str], *, local_files_only: bool | None = None
) -> ModelShape:
    """Read the shape of the model ``spec`` names from its config only.

    Args:
        spec: an alias, a local Hugging Face folder, a ``.gguf`` file (converted once, as
            every command does) or a hub id (only ``config.json`` is fetched).
        local_files_only: for a hub id; None: offline when ``HF_HUB_OFFLINE`` is set or the
            Hub does not answer.

    Raises:
        ModelSpecError: the spec cannot be resolved or has no readable config.
    """
    from ..models.cache import ensure_alias_cached, ensure_gguf_cached, read_marker
    from ..models.loader import resolve_spec
    from ..models.registry import get_entry

    resolved = resolve_spec(spec)
    where: str
    if resolved.kind == "alias":
        entry = get_entry(resolved.value)
        where, name = str(ensure_alias_cached(entry)), entry.display_name
    elif resolved.kind == "gguf":
        where, name = str(ensure_gguf_cached(resolved.value)), Path(resolved.value).stem
    elif resolved.kind == "folder":
        marker = read_marker(Path(resolved.value)) or {}
        where = resolved.value
        name = str(marker.get("display_name") or Path(resolved.value).name)
    else:
        where, name = resolved.value, resolved.value.rsplit("/", 1)[-1]
    config = _read_config(where, resolved.kind == "hub", local_files_only)
    text = text_config(config)
    n_layers = getattr(text, "num_hidden_layers", None)
    d_model = getattr(text, "hidden_size", None)
    if not isinstance(n_layers, int) or not isinstance(d_model, int):
        raise ModelSpecError(
            f"the config of {spec} has no num_hidden_layers/hidden_size (found {n_layers!r}, "
            f"{d_model!r}); pass a causal language model"
        )
    return ModelShape(resolved.value, name, n_layers, d_model, model_fingerprint(config))


def _read_config(where: str, hub: bool, local_files_only: bool | None) -> Any:
    from transformers import AutoConfig

    if hub and local_files_only is None:
        from ..models.loader import hub_reachable
        from .download import hub_offline

        local_files_only = hub_offline() or not hub_reachable()
    try:
        return AutoConfig.from_pretrained(where, local_files_only=bool(hub and local_files_only))
    except OSError as exc:
        hint = (
            "; offline, the model's config.json must be in the Hugging Face cache (download "
            f"it with `hf download {where} config.json`)"
            if hub
            else ""
        )
        raise ModelSpecError(f"cannot read the config of {where}: {exc}{hint}") from None
    except ValueError as exc:  # an unknown model_type
        raise ModelSpecError(f"cannot read the config of {where}: {exc}") from None
