"""Building blocks of the decode-throughput benchmark (driven by ``benchmarks/run.py``).

What lives here:

- the fixed prompts and a left-padded batch builder;
- a contrast axis (default-assistant minus role-play mean activations) and threshold
  calibration from the projections of a warm-up generation, so the caps really engage;
- an engagement counter (how often a cap actually moves the residual stream);
- variant (d): a reference-style implementation written for comparison only. It mirrors the
  weak points listed in ``/work/shared/REFERENCE.md``: plain forward hooks that re-normalise
  the vector and cast it to the hidden dtype on every call, and a live monitor that reads each
  step's projection back to the host with ``.item()`` and appends it to a Python list.
- small statistics helpers and an atomic JSON writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.generation.streamers import BaseStreamer

# Eight user turns of different lengths, so a batch of 8 really is left-padded.
PROMPTS: tuple[str, ...] = (
    "Tell me about the ocean and the animals that live in it.",
    "What is a good way to learn a new language?",
    "Explain in simple words how a rainbow forms after the rain, and why the colours always "
    "appear in the same order.",
    "Write a short poem about autumn.",
    "I am planning a trip to the mountains next month. What should I pack, and how should I "
    "prepare physically for long hikes at high altitude?",
    "How do computers store numbers?",
    "Give me three tips for better sleep.",
    "Describe the life cycle of a butterfly, from the egg to the adult, in a few sentences.",
)

# Role-play system prompts for the contrast axis (the model follows these, see MODELS.md).
ROLE_SYSTEMS: tuple[str, ...] = (
    "You are a pirate captain. Speak like a pirate at all times.",
    "You are a medieval knight sworn to your king. Speak in an old-fashioned, noble style.",
    "You are a sad robot who finds everything pointless. Answer gloomily.",
)


def chat_texts(tokenizer: Any, users: Sequence[str], system: str | None = None) -> list[str]:
    """Render single-turn chats with the tokenizer's template, ready for generation."""
    texts = []
    for user in users:
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": user})
        texts.append(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    return texts


def left_padded(tokenizer: Any, texts: Sequence[str]) -> dict[str, Tensor]:
    """Tokenise with left padding (the layout batched decoding needs)."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def benchmark_batch(tokenizer: Any, batch_size: int) -> dict[str, Tensor]:
    """The fixed benchmark batch: the first ``batch_size`` prompts (cycled), left-padded."""
    users = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    return left_padded(tokenizer, chat_texts(tokenizer, users))


def generate_kwargs(tokenizer: Any, new_tokens: int) -> dict[str, Any]:
    """Greedy decoding of exactly ``new_tokens`` tokens: end-of-sequence is disabled."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": pad,
    }


class StepClock(BaseStreamer):
    """A ``generate`` streamer that only timestamps each step (no model hooks involved).

    ``generate`` calls ``put`` once with the prompt, then once per new token (after the
    token is chosen), so consecutive timestamps give the prefill time and the duration of
    every decode step. Its cost (one tiny ``.cpu()`` and an append per step) is the same for
    every variant.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def prefill_seconds(self) -> float:
        return self.times[1] - self.times[0] if len(self.times) > 1 else float("nan")

    def decode_step_seconds(self) -> list[float]:
        """Durations of the decode steps (the 2nd to the last new token)."""
        return [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]


def timed_generate(
    model: nn.Module,
    batch: dict[str, Tensor],
    kwargs: dict[str, Any],
    streamer: BaseStreamer | None = None,
) -> tuple[float, Tensor]:
    """Run ``generate`` once; returns (wall seconds, generated ids (B, new_tokens))."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs, streamer=streamer)
        seconds = time.perf_counter() - start
    return seconds, out[:, batch["input_ids"].shape[1] :]


# ---- axis and calibration ----------------------------------------------------------------


def _content_means(
    model: nn.Module, batch: dict[str, Tensor], skip_first: int = 1
) -> tuple[Tensor, Tensor]:
    """Per-layer means of block outputs: (content mean, first-token mean), each (L, D) float32.

    The first ``skip_first`` real tokens of each row are left out of the content mean:
    SmolLM2's first token is an attention sink with a "massive activation" (norm ~25000 from
    about block 12 on, vs ~200 for other tokens) that would dominate any mean.
    """
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True, use_cache=False)
    hidden = torch.stack([h.float() for h in out.hidden_states[1:]])  # (L, B, T, D)
    mask = batch["attention_mask"].bool().clone()
    first = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        real = torch.nonzero(mask[row]).flatten()
        first[row, real[0]] = True
        mask[row, real[:skip_first]] = False
    weights = mask.to(hidden.dtype)[None, :, :, None]
    content = (hidden * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))
    sink = hidden[:, first, :].mean(dim=1)
    return content, sink


def contrast_directions(model: nn.Module, tokenizer: Any) -> Tensor:
    """A realistic Assistant-Axis-like direction per layer: default minus role-play means.

    The raw contrast has a large component on the attention sink's massive-activation
    dimension, which gives the sink token a projection of about -5000 at the capped blocks:
    a floor cap then shifts the sink by thousands of units and the model emits garbage. The
    component along the mean first-token state is therefore projected out, per layer, so the
    sink sits at projection ~0 and caps engage on ordinary tokens only.
    """
    default, sink = _content_means(model, left_padded(tokenizer, chat_texts(tokenizer, PROMPTS)))
    roles = [
        _content_means(model, left_padded(tokenizer, chat_texts(tokenizer, PROMPTS, system)))[0]
        for system in ROLE_SYSTEMS
    ]
    raw = default - torch.stack(roles).mean(dim=0)
    sink_unit = sink / sink.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return raw - (raw * sink_unit).sum(dim=-1, keepdim=True) * sink_unit


def generated_projections(
    model: nn.Module,
    batch: dict[str, Tensor],
    new_ids: Tensor,
    units: Tensor,
    layers: Sequence[int],
) -> Tensor:
    """Projections of the generated tokens' block outputs on ``units``: (tokens, len(layers)).

    One uncapped forward over prompt + completion; only completion positions are kept.
    """
    ids = torch.cat([batch["input_ids"], new_ids], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new_ids)], dim=1)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    n_new = new_ids.shape[1]
    cols = []
    for layer in layers:
        hidden = out.hidden_states[layer + 1][:, -n_new:, :].float()  # (B, n_new, D)
        cols.append((hidden @ units[layer].float()).reshape(-1))
    return torch.stack(cols, dim=1)


def percentile_thresholds(projections: Tensor, percentile: float) -> list[float]:
    """Per-column percentile (linear interpolation) of (tokens, layers) projections."""
    q = torch.quantile(projections.double(), percentile / 100.0, dim=0)
    return [float(x) for x in q]


class EngagementCounter:
    """Counts decode steps where a floor cap ``h·v < tau`` actually moves the hidden state.

    Its hooks are registered with ``prepend=True`` *after* the caps are on, so they run
    before the cap on the same block and see the block output as the cap receives it (with
    the caps of earlier blocks already applied). Only single-token decode steps are counted.
    """

    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList, units: Tensor, caps: dict[int, float]
    ) -> None:
        self.layers = sorted(caps)
        self.engaged = {layer: 0 for layer in self.layers}
        self.total = {layer: 0 for layer in self.layers}
        self._handles = []
        for layer in self.layers:
            hook = self._make(layer, units[layer].float(), caps[layer])
            self._handles.append(blocks[layer].register_forward_hook(hook, prepend=True))

    def _make(self, layer: int, unit: Tensor, tau: float) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output if isinstance(output, Tensor) else output[0]
            if hidden.shape[1] != 1:
                return
            proj = hidden.float() @ unit.to(hidden.device)
            self.engaged[layer] += int((proj < tau).sum())
            self.total[layer] += proj.numel()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fractions(self) -> dict[int, float]:
        return {
            layer: (self.engaged[layer] / self.total[layer]) if self.total[layer] else 0.0
            for layer in self.layers
        }


# ---- variant (d): reference-style hooks ----------------------------------------------------


def _hidden_of(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


class ReferenceCapping:
    """Reference-style capping: one plain forward hook per block, nothing prepared ahead.

    Every call moves the raw (unnormalised, float32) vector to the hidden dtype, normalises it
    again and applies the floor ``h <- h + max(tau - h·v, 0) v`` in the hidden dtype.
    """

    def __init__(self, blocks: nn.ModuleList, vectors: dict[int, Tensor], caps: dict[int, float]):
        self._handles = [
            blocks[layer].register_forward_hook(self._make(vectors[layer], caps[layer]))
            for layer in sorted(caps)
        ]

    @staticmethod
    def _make(vector: Tensor, tau: float) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = _hidden_of(output)
            v = vector.to(device=hidden.device, dtype=hidden.dtype)
            v = v / v.norm()
            proj = hidden @ v
            excess = torch.clamp(tau - proj, min=0.0)
            return _with_hidden(output, hidden + excess.unsqueeze(-1) * v)

        return hook

    def __enter__(self) -> ReferenceCapping:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ReferenceMonitor:
    """Reference-style live monitor: a host sync (``.item()``) per sequence per step.

    Each call projects the last position of every row on the re-normalised vector and
    appends the values to a Python list, one ``.item()`` each.
    """

    def __init__(self, block: nn.Module, vector: Tensor) -> None:
        self.values: list[float] = []
        self._vector = vector
        self._handle = block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = _hidden_of(output)
        v = self._vector.to(device=hidden.device, dtype=hidden.dtype)
        v = v / v.norm()
        proj = hidden[:, -1, :] @ v
        for row in range(proj.shape[0]):
            self.values.append(proj[row].item())

    def __enter__(self) -> ReferenceMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


# ---- isolated hook cost ----------------------------------------------------------------


class _Passthrough(nn.Module):
    """A decoder-block stand-in that returns its input (with one parameter for dtype lookup)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden


class PassthroughModel(nn.Module):
    """The real model's config over pass-through blocks: hooks attach as on the real model.

    Running a decode-shaped hidden state (B, 1, D) through the hooked blocks measures what the
    hooks alone cost per decode step, free of the model's own (noisy) compute.
    """

    def __init__(self, config: Any, n_layers: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Passthrough(dtype) for _ in range(n_layers))


# ---- statistics and output -----------------------------------------------------------------
