"""Batched chat generation with the model's template (left padding, seeded sampling)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .chat import render_chat
from .record import generated_content_mask


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; the research used temperature 0.7 and top_p 0.9."""

    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,
            "repetition_penalty": self.repetition_penalty,
        }


@dataclass(frozen=True)
class Generation:
    """Generated token ids per conversation (content only, up to end-of-turn) and text."""

    prompt_ids: list[list[int]]
    new_ids: list[list[int]]
    texts: list[str]


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Left-pad token rows into ``input_ids`` and ``attention_mask`` (see padded_position_ids)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row))
            mask[i, width - len(row) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every token id that ends a turn for this model (generation config and tokenizer)."""
    return end_of_turn_ids(getattr(model, "generation_config", None), tokenizer)


def end_of_turn_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a turn: the generation config's and the tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


@torch.inference_mode()
def generate_chat(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    sampling: SamplingConfig | None = None,
) -> Generation:
    """Generate the next assistant turn for each conversation, in one left-padded batch."""
    sampling = sampling or SamplingConfig()
    prompts = [
        render_chat(tokenizer, list(c), add_generation_prompt=True).input_ids for c in conversations
    ]
    stops = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    batch = left_pad(prompts, pad_id, device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    out = model.generate(  # type: ignore[operator]
        **batch,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stops,
        **sampling.generate_kwargs(),
    )
    new = out[:, batch["input_ids"].shape[1] :].cpu()
    keep = generated_content_mask(new, stops, pad_id)
    new_ids = [row[m].tolist() for row, m in zip(new, keep, strict=True)]
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
    return Generation(prompts, new_ids, texts)
