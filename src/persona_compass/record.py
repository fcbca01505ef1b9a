"""Activation recording: mean post-block residuals over token spans, as running sums.

"Layer l" is the output of decoder block ``l`` (Hugging Face ``hidden_states[l + 1]``).
Nothing here keeps per-token activations: every forward adds ``mask @ hidden`` into float32
sums of shape ``(batch, [n_spans], n_layers, d_model)``, so memory does not grow with the
sequence length or the number of forwards.

Example:
    >>> with SpanMeanRecorder(model, layers="10:20") as rec:
    ...     rec.set_mask(mask)                 # (batch, seq) or (batch, n_spans, seq)
    ...     model(input_ids, attention_mask=attn)
    >>> rec.means().shape                      # (batch, [n_spans], 10, d_model)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .chat import ROLES, render_chat
from .layers import block_output, find_decoder_blocks, normalize_layers

LayerSelection = int | Iterable[int] | str | None


class SpanMeanRecorder:
    """Context manager that sums decoder-block outputs over masked positions.

    Call :meth:`set_mask` before a forward; that forward's block outputs are weighted by the
    mask and added to :attr:`sums`, the mask weights to :attr:`counts`. A forward with no mask
    set (for example the decode steps of ``generate``) contributes nothing. Every hook is
    removed on exit, also when the forward raised.

    Args:
        model: a Hugging Face causal LM (or anything :func:`find_decoder_blocks` understands).
        layers: block indices to record: an int, a list, ``"16:24"``, ``"all"``; ``None`` means
            all blocks. Negative indices count from the end.
        block_path: explicit dotted path to the decoder-block list, if discovery fails.

    Attributes:
        layers: the normalised, sorted list of recorded block indices.
    """

    def __init__(
        self, model: nn.Module, layers: LayerSelection = None, *, block_path: str | None = None
    ) -> None:
        self.model = model
        self._blocks = find_decoder_blocks(model, block_path)
        self.layers: list[int] = normalize_layers(
            "all" if layers is None else layers, len(self._blocks)
        )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> SpanMeanRecorder:
        if self._handles:
            raise RuntimeError("this SpanMeanRecorder is already active; do not nest it")
        try:
            for pos, layer in enumerate(self.layers):
                self._handles.append(
                    self._blocks[layer].register_forward_hook(self._make_hook(pos))
                )
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def reset(self) -> None:
        """Forget the sums, counts and any pending mask."""
        self._sums: dict[int, torch.Tensor] = {}  # layer position -> (batch, [k], d_model)
        self._counts: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        # per device: the (batch, k, seq) mask and its (batch, seq, 1) all-zero positions
        self._mask_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending: set[int] = set()  # layer positions that still have to use the mask
        self._shape: tuple[int, ...] | None = None  # (batch,) or (batch, n_spans)

    # -- recording -------------------------------------------------------------------------

    def set_mask(self, mask: torch.Tensor) -> None:
        """Weights for the positions of the NEXT forward.

        Args:
            mask: ``(batch, seq)`` for one span per sequence or ``(batch, n_spans, seq)`` for
                several; bool or float (a float mask gives weighted means). Its batch and span
                dims must match earlier masks until :meth:`reset`.
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
            raise ValueError(
                f"mask must be a (batch, seq) or (batch, n_spans, seq) tensor, got "
                f"{getattr(mask, 'shape', type(mask).__name__)}"
            )
        shape = tuple(mask.shape[:-1])
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"mask leading dims {shape} differ from the running sums' {self._shape}; "
                "call reset() before recording a differently shaped batch"
            )
        self._shape = shape
        self._mask = mask.detach().to(torch.float32)
        self._mask_on = {}
        self._pending = set(range(len(self.layers)))

    def _make_hook(self, pos: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if pos not in self._pending or self._mask is None:
                return
            hidden = block_output(output)
            mask = self._mask
            if mask.shape[0] != hidden.shape[0] or mask.shape[-1] != hidden.shape[1]:
                # Drop the mask so a later forward does not silently pick up a stale one.
                self._mask, self._mask_on, self._pending = None, {}, set()
                raise ValueError(
                    f"the mask set with set_mask has shape {tuple(mask.shape)} but block "
                    f"{self.layers[pos]} saw hidden states of shape {tuple(hidden.shape)}; "
                    "the mask's batch and last (sequence) dims must match the next forward"
                )
            if len(self._pending) == len(self.layers):  # first layer to see this forward
                weights = mask.sum(-1)
                self._counts = weights if self._counts is None else self._counts + weights
            self._pending.discard(pos)
            cached = self._mask_on.get(hidden.device)
            if cached is None:
                m = mask.to(hidden.device)
                m = m.unsqueeze(1) if m.dim() == 2 else m
                cached = (m, (m == 0).all(1).unsqueeze(-1))
                self._mask_on[hidden.device] = cached
            m, unused = cached
            # Unused positions (padding) can hold inf/NaN with some attention kernels, and
            # 0 * NaN = NaN in a matmul: zero them (out of place: never touch the model's data).
            h = hidden.to(torch.float32).masked_fill(unused, 0.0)
            total = torch.bmm(m, h)  # (batch, k, d_model), float32 accumulation
            if len(self._shape or ()) == 1:
                total = total.squeeze(1)
            prev = self._sums.get(pos)
            self._sums[pos] = total if prev is None else prev + total
            if not self._pending:  # every layer has used it: free the per-device copies
                self._mask = None
                self._mask_on = {}

        return hook

    # -- results ---------------------------------------------------------------------------

    @property
    def sums(self) -> torch.Tensor:
        """Float32 running sums, ``(batch, [n_spans], n_layers, d_model)``."""
        if not self._sums:
            raise RuntimeError("nothing recorded yet: call set_mask() and run a forward first")
        first = next(iter(self._sums.values()))
        device = first.device
        # Layers on other devices (device_map="auto") are gathered only here, not per forward.
        parts = [
            self._sums[p].to(device) if p in self._sums else torch.zeros_like(first)
            for p in range(len(self.layers))
        ]
        return torch.stack(parts, dim=-2)

    @property
    def counts(self) -> torch.Tensor:
        """Float32 total mask weight per sequence (and span), ``(batch, [n_spans])``."""
        if self._counts is None:
            raise RuntimeError("nothing recorded yet: call set_mask() and run a forward first")
        return self._counts

    def means(self) -> torch.Tensor:
        """Mean block output per sequence (and span), ``(batch, [n_spans], n_layers, d_model)``.

        Spans with zero weight give zeros (never NaN); find them with ``counts == 0``.
        """
        sums = self.sums
        counts = self.counts.to(sums.device)
        denom = torch.where(counts > 0, counts, torch.ones_like(counts))
        return sums / denom[..., None, None]


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, so a left-padded row computes as if unpadded."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def generated_content_mask(
    new_tokens: torch.Tensor,
    eos_token_ids: int | Sequence[int] | None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Which generated tokens are content: those before the first end token of each row.

    Args:
        new_tokens: ``(batch, n_new)`` generated ids (prompt removed).
        eos_token_ids: end-of-sequence id(s); ``None`` if there are none.
        pad_token_id: the id ``generate`` pads finished rows with; it also ends content.

    Returns:
        Bool tensor ``(batch, n_new)``: True up to (not including) the first eos/pad per row.
    """
    if eos_token_ids is None:
        stops: list[int] = []
    elif isinstance(eos_token_ids, int):
        stops = [eos_token_ids]
    else:
        stops = [int(t) for t in eos_token_ids]
    if pad_token_id is not None:
        stops.append(int(pad_token_id))
    if not stops:
        return torch.ones_like(new_tokens, dtype=torch.bool)
    stop = torch.isin(new_tokens, torch.tensor(stops, device=new_tokens.device))
    return stop.cumsum(-1) == 0


def input_embeddings(model: nn.Module) -> object:
    """What ``model.get_input_embeddings()`` returns, or None when the model has no such method."""
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def _input_device(model: nn.Module) -> torch.device:
    embeddings = input_embeddings(model)
    if isinstance(embeddings, nn.Module):
        return next(embeddings.parameters()).device
    return next(model.parameters()).device


def record_span_means(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    layers: LayerSelection = None,
    roles: Iterable[str] = ("assistant",),
    batch_size: int = 8,
    padding_side: str = "right",
    block_path: str | None = None,
) -> list[torch.Tensor]:
    """Mean post-block residuals over the content tokens of selected turns.

    Each conversation is rendered with :func:`~persona_compass.chat.render_chat`; turns whose
    role is in ``roles`` are averaged over their content tokens only (no headers, no
    end-of-turn tokens). Conversations are batched (similar lengths together) with explicit
    ``position_ids``, so left padding, right padding and no padding agree.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its fast tokenizer with a chat template.
        conversations: lists of ``{"role", "content"}`` messages.
        layers: blocks to record (see :class:`SpanMeanRecorder`); ``None`` = all.
        roles: which turns to average, e.g. ``("assistant",)`` or ``("user", "assistant")``.
        batch_size: conversations per forward.
        padding_side: ``"right"`` or ``"left"``.
        block_path: explicit dotted path to the decoder blocks.

    Returns:
        Per conversation, a float32 CPU tensor ``(n_selected_turns, n_layers, d_model)``, turns
        in message order. A selected turn with empty content gives zeros.
    """
    wanted = set(roles) if not isinstance(roles, str) else {roles}
    if not wanted or not wanted <= set(ROLES):
        raise ValueError(f"roles={tuple(roles)!r}; name one or more of {ROLES}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'")

    rendered = [render_chat(tokenizer, conv) for conv in conversations]
    selected = [[s for s in rc.spans if s.role in wanted] for rc in rendered]
    device = _input_device(model)
    pad_id = next(
        (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if isinstance(t, int)), 0
    )
    # Logits are not needed: skip the vocabulary projection for all but one position.
    forward_params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}

    recorder = SpanMeanRecorder(model, layers, block_path=block_path)
    d_model: int | None = None
    results: dict[int, torch.Tensor] = {}
    # Only conversations with something to record are run, sorted by length to pad little.
    todo = sorted(
        (i for i in range(len(rendered)) if selected[i]), key=lambda i: -len(rendered[i].input_ids)
    )
    with recorder, torch.inference_mode():
        for b0 in range(0, len(todo), batch_size):
            batch = todo[b0 : b0 + batch_size]
            seq = max(len(rendered[i].input_ids) for i in batch)
            k = max(len(selected[i]) for i in batch)
            input_ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), seq), dtype=torch.long)
            mask = torch.zeros((len(batch), k, seq), dtype=torch.float32)
            for row, i in enumerate(batch):
                ids = rendered[i].input_ids
                shift = seq - len(ids) if padding_side == "left" else 0
                input_ids[row, shift : shift + len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[row, shift : shift + len(ids)] = 1
                for j, span in enumerate(selected[i]):
                    mask[row, j, shift + span.start : shift + span.end] = 1.0
            position_ids = padded_position_ids(attention)
            recorder.reset()
            recorder.set_mask(mask)
            model(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                position_ids=position_ids.to(device),
                use_cache=False,
                **extra,
            )
            means = recorder.means().cpu()  # (batch, k, n_layers, d_model)
            d_model = means.shape[-1]
            for row, i in enumerate(batch):
                results[i] = means[row, : len(selected[i])].clone()

    if d_model is None:  # nothing selected anywhere: learn d_model from one block's weights
        d_model = _hidden_size(model)
    n_layers = len(recorder.layers)
    return [
        results[i] if i in results else torch.zeros((0, n_layers, d_model))
        for i in range(len(rendered))
    ]


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    embeddings = input_embeddings(model)
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[-1])
    raise ValueError("cannot tell the model's hidden size; no turn had a selected role")
