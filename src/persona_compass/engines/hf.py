"""The ``hf`` engine: Hugging Face ``generate`` with hooks, one request after another."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..axis import Axis
from ..capping import CappingConfig
from ..compass import Answer, respond
from .base import CompassRequest


class HFEngine:
    """Serves :class:`CompassRequest` objects on an in-process Hugging Face model.

    Example:
        >>> engine = HFEngine(model, tok, axis, capping_config=cap)
        >>> [answer] = engine.respond([CompassRequest(messages, mode="on")])
    """

    name = "hf"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        axis: Axis,
        capping_config: CappingConfig | None = None,
        traits: Sequence[Axis] = (),
    ) -> None:
        self.model, self.tokenizer, self.axis = model, tokenizer, axis
        self.capping_config = capping_config
        self.traits = tuple(traits)

    def respond(self, requests: Sequence[CompassRequest]) -> list[Answer]:
        return [
            respond(
                self.model,
                self.tokenizer,
                self.axis,
                req.messages,
                mode=req.mode,
                capping_config=req.cap(self.capping_config),
                rules=req.rules,
                policy=req.policy,
                steer=req.steer,
                sampling=req.sampling,
                stop=req.stop,
                read_history=req.read_history,
                traits=self.traits,
            )
            for req in requests
        ]

    def close(self) -> None:
        """Nothing to free: the model belongs to the caller."""
