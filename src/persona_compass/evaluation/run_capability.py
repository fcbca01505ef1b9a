"""The capability check of one condition: every item answered once, greedily, single-turn."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json
from ..axis import Axis
from ..capping import CappingConfig
from ..generation import SamplingConfig, generate_chat
from ..interventions import capping, steering
from .capability import CapabilityItem, score_answer
from .conditions import Condition
from .run_store import CAPABILITY_FORMAT


@contextmanager
def _interventions(
    model: Any, axis: Axis, condition: Condition, cfg: CappingConfig | None
) -> Iterator[None]:
    """The condition's steering and (always-on) capping, for single-turn answers."""
    with ExitStack() as stack:
        if condition.steering is not None:
            s = condition.steering
            stack.enter_context(steering(model, axis, s.coefficient, s.layers, scale=s.scale))
        if condition.mode == "on" and cfg is not None:
            stack.enter_context(capping(model, cfg))
        yield


def run_capability_unit(
    *,
    path: Path,
    key: str,
    condition: Condition,
    cap_cfg: CappingConfig | None,
    items: Sequence[CapabilityItem],
    model: Any,
    tokenizer: Any,
    axis: Axis,
    settings: dict[str, Any],
    batch_size: int,
    tick: Callable[[int, str], None],
) -> None:
    """Answer every item once, greedily, under the condition; write the unit file.

    Each item's row keeps the reply's text and its generated ``token_ids`` (content up to the
    end of turn), so the report can tell which answers are token-identical to the baseline's.
    """
    started = time.perf_counter()
    sampling = SamplingConfig(
        max_new_tokens=settings["capability_max_new_tokens"],
        temperature=0.0,
        repetition_penalty=1.0,
        seed=None,
    )
    system = settings["system_prompt"]
    rows: list[dict[str, Any]] = []
    batch = max(1, batch_size)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        convs = [
            ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": item.prompt}]
            for item in chunk
        ]
        with torch.inference_mode(), _interventions(model, axis, condition, cap_cfg):
            generated = generate_chat(model, tokenizer, convs, sampling)
        for item, text, ids in zip(chunk, generated.texts, generated.new_ids, strict=True):
            rows.append(
                {
                    "id": item.id,
                    "category": item.category,
                    "reply": text,
                    "token_ids": [int(t) for t in ids],
                    "correct": score_answer(item, text),
                }
            )
        tick(len(chunk), f"capability / {condition.name}")
    write_json(
        path,
        {
            "condition": condition.name,
            "items": rows,
            "evaluation": {
                "format": CAPABILITY_FORMAT,
                "complete": True,
                "key": key,
                "settings_digest": settings["settings_digest"],
                "condition": condition.to_dict(),
                "capping_config": None
                if cap_cfg is None
                else cap_cfg.to_dict(include_vectors=False),
                "max_new_tokens": settings["capability_max_new_tokens"],
                "seconds": round(time.perf_counter() - started, 3),
            },
        },
    )
