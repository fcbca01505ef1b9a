"""Single-pass capture: activations of generated answers, recorded while ``generate`` runs.

The research ran the model twice: once to generate, once more over the finished text to read
activations. Here a :class:`~persona_compass.record.SpanMeanRecorder` rides along with
``generate``: a pre-hook on the input embeddings sees every token fed to the model and sets
that step's mask (1 for a generated content token of a row still answering, 0 otherwise), and
the block hooks add the masked residuals to running sums. No second forward pass.

How tokens map to positions: ``generate`` feeds answer token ``k`` back at decode step
``k + 1``, and that forward is where its residual is computed. The prompt's own forward
counts nothing. A row's end-of-turn token and everything after it (padding) count nothing.
When a row stops at ``max_new_tokens`` its last token is never fed back, so that one token is
left out of its mean; when it stops at end-of-turn, every content token is included, exactly
as in a teacher-forced re-forward over the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ..errors import PersonaCompassError
from ..record import LayerSelection, SpanMeanRecorder, input_embeddings


class GenerationCapture:
    """Per-row mean post-block residuals over generated content tokens, during ``generate``.

    Args:
        model: the causal LM that will run ``generate``.
        stop_ids: token ids that end an answer (end-of-turn, eos; pad when it equals eos).
        layers: blocks to record (default: all): an int, a list, ``"16:24"``, ``"all"``.
            Only those blocks get a hook; :meth:`means` has one row per entry of
            :attr:`layers` (sorted block indices), so memory shrinks with the selection.
        block_path: explicit dotted path to the decoder blocks, if discovery fails.

    Example:
        >>> with GenerationCapture(model, stop_ids=[eos]) as cap:
        ...     model.generate(**batch, max_new_tokens=64)
        >>> cap.means().shape, cap.counts()   # (batch, layers, d_model), tokens per row
        >>> GenerationCapture(model, [eos], layers="16:24").layers   # [16, ..., 23]
    """

    def __init__(
        self,
        model: nn.Module,
        stop_ids: Sequence[int],
        layers: LayerSelection = None,
        *,
        block_path: str | None = None,
    ) -> None:
        embeddings = input_embeddings(model)
        if not isinstance(embeddings, nn.Module):
            raise PersonaCompassError(
                f"{type(model).__name__} has no input embedding module; single-pass capture "
                "needs one (use a two-pass recording with record_span_means instead)"
            )
        self.recorder = SpanMeanRecorder(model, layers, block_path=block_path)
        self.layers = self.recorder.layers
        self._embeddings = embeddings
        self._stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self._alive: torch.Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> GenerationCapture:
        self.recorder.__enter__()
        try:
            self._handle = self._embeddings.register_forward_pre_hook(self._on_tokens)
        except BaseException:
            self.recorder.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.recorder.remove()

    def _on_tokens(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor):
            return
        if self._alive is None:  # the prompt's forward: nothing to count yet
            self._alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
            self._stop_ids = self._stop_ids.to(ids.device)  # once, not per decode step
            return
        if ids.shape[1] != 1:
            raise PersonaCompassError(
                f"single-pass capture expects one new token per decode step, got {ids.shape[1]}; "
                "speculative or assisted decoding is not supported here"
            )
        content = self._alive & ~torch.isin(ids[:, 0], self._stop_ids)
        self._alive = content  # a row that fed its end-of-turn token stays finished
        self.recorder.set_mask(content[:, None])

    def means(self) -> torch.Tensor:
        """(batch, n_layers, d_model) float32 means; rows with no content token are zeros."""
        return self.recorder.means()

    def counts(self) -> torch.Tensor:
        """(batch,) number of content tokens averaged per row."""
        return self.recorder.counts
