"""Find a model's decoder blocks and normalise layer indices, in one place.

"Layer l" everywhere in persona-compass means the output of decoder block ``l`` (the
post-block residual stream), which is ``hidden_states[l + 1]`` in Hugging Face terms for
every block but the last: Hugging Face applies the final norm to the last entry of
``hidden_states``, while persona-compass always reads the raw block output.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import LayerError

# Attribute paths to the decoder-block list, tried in order. Covers llama, qwen2, qwen3,
# mistral, gemma2/3 (``model.layers``), gpt2-style (``transformer.h``), gpt-neox, opt and
# multimodal wrappers (``model.language_model.layers``).
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "layers",
)


def _get_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_decoder_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the model's list of decoder blocks.

    Args:
        model: a Hugging Face causal LM (or its base model).
        path: an explicit dotted attribute path (e.g. ``"model.layers"``) overriding the search;
            also settable per model as ``model.config.persona_compass_block_path``.

    Raises:
        LayerError: when no block list is found, naming the paths tried and the override.
    """
    override = path or getattr(getattr(model, "config", None), "persona_compass_block_path", None)
    paths = (override,) if override else BLOCK_PATHS
    for candidate in paths:
        blocks = _get_path(model, candidate)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    if override:
        raise LayerError(
            f"block_path={override!r} does not name a non-empty nn.ModuleList on "
            f"{type(model).__name__}; print(model) and pass the dotted path of its decoder blocks"
        )
    raise LayerError(
        f"cannot find the decoder blocks of {type(model).__name__} "
        f"(tried {', '.join(BLOCK_PATHS)}); "
        "pass block_path='dotted.path.to.blocks' or set model.config.persona_compass_block_path"
    )


def num_layers(model: nn.Module, path: str | None = None) -> int:
    """Number of decoder blocks."""
    return len(find_decoder_blocks(model, path))


def normalize_layer(layer: int, n_layers: int, *, name: str = "layer") -> int:
    """Map a possibly negative layer index into ``[0, n_layers)`` or raise a clear error."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LayerError(f"{name}={layer!r} must be an integer block index")
    idx = layer + n_layers if layer < 0 else layer
    if not 0 <= idx < n_layers:
        raise LayerError(
            f"{name}={layer} is out of range for a model with {n_layers} decoder blocks; "
            f"use 0..{n_layers - 1} (or -1..-{n_layers} from the end)"
        )
    return idx


def normalize_layers(layers: int | Iterable[int] | str, n_layers: int) -> list[int]:
    """Normalise a layer selection to a sorted list of unique block indices.

    Accepts an int, an iterable of ints, or a string such as ``"20"``, ``"16:24"`` (half-open
    range), ``"3,5,7"``, ``"all"``. Negative indices count from the end.
    """
    if isinstance(layers, str):
        return parse_layer_spec(layers, n_layers)
    if isinstance(layers, int):
        return [normalize_layer(layers, n_layers)]
    out = sorted({normalize_layer(int(layer), n_layers) for layer in layers})
    if not out:
        raise LayerError("the layer selection is empty; name at least one block index")
    return out


def parse_layer_spec(spec: str, n_layers: int) -> list[int]:
    """Parse ``"all"``, ``"12"``, ``"16:24"`` (half-open) or ``"3,5,16:20"``."""
    text = spec.strip().lower()
    if text == "all":
        return list(range(n_layers))
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                lo_s, hi_s = part.split(":", 1)
                lo = normalize_layer(int(lo_s), n_layers) if lo_s else 0
                hi = int(hi_s) if hi_s else n_layers
                hi = hi + n_layers if hi < 0 else hi
                if not lo < hi <= n_layers:
                    raise LayerError(
                        f"layer range {part!r} is empty or past the end ({n_layers} blocks); "
                        "write START:STOP with START < STOP <= number of blocks"
                    )
                out.update(range(lo, hi))
            else:
                out.add(normalize_layer(int(part), n_layers))
        except ValueError:
            raise LayerError(
                f"cannot read layer selection {spec!r}; write e.g. '20', '16:24', '3,5,7' or 'all'"
            ) from None
    if not out:
        raise LayerError("the layer selection is empty; name at least one block index")
    return sorted(out)


def block_output(output: object) -> torch.Tensor:
    """The hidden-state tensor of a block's forward output (a tensor or a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LayerError(f"unexpected decoder-block output type {type(output).__name__}")


def replace_block_output(output: object, hidden: torch.Tensor) -> object:
    """Rebuild a block's forward output with ``hidden`` in place of its hidden states."""
    if isinstance(output, torch.Tensor):
        return hidden
    assert isinstance(output, tuple)
    return (hidden, *output[1:])
