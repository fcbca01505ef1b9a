"""Per-token projections on the axis in the hf engine: during ``generate``, or teacher-forced.

:class:`TokenProjector` hooks the decoder blocks and keeps, for every forward, each position's
projection on the layer's unit axis (a few floats per token, on the device: no host sync per
step). It serves two callers:

- ``axis calibrate`` (hf engine) rides along with ``generate``, next to the single-pass
  capture of the response means: decode step ``k + 1`` feeds answer token ``k``, so an
  answer's per-token projections are steps ``1 .. n`` of its row (:func:`answer_rows`), the
  same tokens its mean covers.
- extraction's replay (:func:`replay_answers`): one prefill-only forward over stored
  conversations, reading the assistant turn's content positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from ..chat import render_chat
from ..errors import PersonaCompassError
from ..layers import block_output, find_decoder_blocks
from ..record import _input_device, padded_position_ids


class TokenProjector:
    """Projections of decoder-block outputs on unit directions, every forward, on the device.

    Args:
        model: the causal LM.
        units: (k, d_model) unit directions, row ``i`` for block ``layers[i]``.
        layers: the blocks to read (distinct indices).
        last_only: keep only each forward's last position (the decode steps of
            ``generate``) instead of every position (a teacher-forced forward).

    Example:
        >>> with TokenProjector(model, axis.units(), range(axis.n_layers), last_only=True) as tp:
        ...     model.generate(...)
        >>> tp.take().shape   # (batch, forwards, k)
    """

    def __init__(
        self, model: nn.Module, units: Tensor, layers: Sequence[int], *, last_only: bool
    ) -> None:
        self.layers = [int(x) for x in layers]
        if units.ndim != 2 or units.shape[0] != len(self.layers):
            raise PersonaCompassError(
                f"units of shape {tuple(units.shape)} need one row per layer of {self.layers}"
            )
        self._blocks = find_decoder_blocks(model)
        self._units = units.detach().to(torch.float32)
        self._on: dict[tuple[int, torch.device], Tensor] = {}
        self.last_only = last_only
        self._out: list[list[Tensor]] = [[] for _ in self.layers]
        self._handles: list[Any] = []

    def __enter__(self) -> TokenProjector:
        try:
            for pos, layer in enumerate(self.layers):
                hook = self._blocks[layer].register_forward_hook(self._hook(pos))
                self._handles.append(hook)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _unit(self, pos: int, device: torch.device) -> Tensor:
        key = (pos, device)
        if key not in self._on:  # a model spread over devices reads each block where it is
            self._on[key] = self._units[pos].to(device)
        return self._on[key]

    def _hook(self, pos: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = block_output(output)
            if self.last_only:
                hidden = hidden[:, -1:]
            self._out[pos].append(hidden.to(torch.float32) @ self._unit(pos, hidden.device))

        return hook

    @property
    def n_forwards(self) -> int:
        return len(self._out[0]) if self._out else 0

    def take(self) -> Tensor:
        """(batch, positions over every forward so far, k) float32 on the CPU; then forget."""
        if not self.n_forwards:
            return torch.zeros(0, 0, len(self.layers))
        per_layer = [torch.cat(chunks, dim=1).cpu() for chunks in self._out]
        self._out = [[] for _ in self.layers]
        return torch.stack(per_layer, dim=-1)


def answer_rows(steps: Tensor, n_tokens: Sequence[int]) -> list[Tensor | None]:
    """Each answer's (n, k) per-token projections from ``generate``'s steps (batch, F, k).

    Forward 0 is the prompt's; forward ``j >= 1`` fed answer token ``j - 1``. No forward at
    all (a stand-in for ``generate`` ran) gives None for every answer.
    """
    if steps.shape[1] == 0:
        return [None] * len(n_tokens)
    longest = max(n_tokens, default=0)
    if steps.shape[0] != len(n_tokens) or steps.shape[1] < 1 + longest:
        raise PersonaCompassError(
            f"recorded {steps.shape[1]} forwards of {steps.shape[0]} rows for {len(n_tokens)} "
            f"answers of up to {longest} tokens; per-token projections do not line up"
        )
    return [steps[i, 1 : 1 + max(n, 0)].clone() for i, n in enumerate(n_tokens)]


@torch.inference_mode()
def replay_answers(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    units: Tensor,
    layers: Sequence[int],
    *,
    batch_size: int = 8,
) -> list[Tensor]:
    """Teacher-forced per-token projections of each conversation's last assistant turn.

    One prefill-only forward per batch (right padding, explicit position ids, no cache, no
    generation): the stored answer is re-tokenized by the chat template, so its tokens can
    differ slightly from those generated.

    Returns:
        per conversation, (n_content_tokens, k) float32 (0 rows when the turn is empty).
    """
    rendered = [render_chat(tokenizer, conv) for conv in conversations]
    spans = []
    for rc in rendered:
        turns = [s for s in rc.spans if s.role == "assistant"]
        spans.append((turns[-1].start, turns[-1].end) if turns else (0, 0))
    device = _input_device(model)
    pad_id = next(
        (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if isinstance(t, int)), 0
    )
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out: list[Tensor] = [torch.zeros(0, len(layers)) for _ in rendered]
    todo = sorted(
        (i for i, (a, b) in enumerate(spans) if b > a), key=lambda i: -len(rendered[i].input_ids)
    )
    with TokenProjector(model, units, layers, last_only=False) as tp:
        for b0 in range(0, len(todo), batch_size):
            batch = todo[b0 : b0 + batch_size]
            seq = max(len(rendered[i].input_ids) for i in batch)
            ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), seq), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(rendered[i].input_ids)
                ids[row, :n] = torch.tensor(rendered[i].input_ids, dtype=torch.long)
                attention[row, :n] = 1
            model(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                position_ids=padded_position_ids(attention).to(device),
                use_cache=False,
                **extra,
            )
            values = tp.take()  # (batch, seq, k)
            for row, i in enumerate(batch):
                start, end = spans[i]
                out[i] = values[row, start:end].clone()
    return out
