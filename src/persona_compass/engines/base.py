"""The engine interface: a request carries its compass settings, a result is an Answer.

Every generation that the compass watches goes through an engine. ``hf`` runs Hugging Face
``generate`` with hooks, one conversation at a time (any HF model, nothing extra to install);
``vllm`` runs the same requests inside vLLM's continuous batches (see :mod:`.vllm_engine`).
Both take :class:`CompassRequest` objects and return :class:`~persona_compass.compass.Answer`
objects with the same text, readings, cap engagement and alerts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..alerts import AlertRules
from ..axis import Axis
from ..capping import CappingConfig
from ..compass import AdaptivePolicy, Answer, Steering, check_cap_mode
from ..errors import PersonaCompassError
from ..generation import SamplingConfig

ENGINES: tuple[str, ...] = ("hf", "vllm")


class EngineError(PersonaCompassError):
    """An engine that cannot start or a request it cannot serve."""


@dataclass(frozen=True)
class CompassRequest:
    """One assistant answer to generate, with the compass settings of that request alone.

    Args:
        messages: the conversation so far, ending with a user turn.
        mode: ``off`` (watch only), ``on`` (capped) or ``adaptive`` (capped when the
            conversation's earlier turns raised an alert).
        capping_config: the cap for ``on`` and ``adaptive`` (None: the engine's default).
        rules: alert rules.
        policy: the adaptive release policy.
        steer: steering added while generating.
        sampling: sampling settings (greedy when ``temperature`` is 0).
        stop: strings that end the answer.
        read_history: also read the conversation's earlier turns (``Answer.history``). The
            ``vllm`` engine then computes the whole prompt (no prefix-cache reads for it);
            without it, a cached prefix is reused and only the answer is read. Adaptive mode
            always reads the history (it decides the cap).
    """

    messages: Sequence[dict[str, str]]
    mode: str = "off"
    capping_config: CappingConfig | None = None
    rules: AlertRules | None = None
    policy: AdaptivePolicy | None = None
    steer: Steering | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: Sequence[str] = ()
    read_history: bool = True

    def cap(self, default: CappingConfig | None) -> CappingConfig | None:
        """The capping config this request uses (its own, else the engine's), validated."""
        config = self.capping_config if self.capping_config is not None else default
        check_cap_mode(self.mode, config)
        return config


class Engine(Protocol):
    """What the compass, the server, evaluation and extraction talk to."""

    name: str
    axis: Axis
    tokenizer: Any
    capping_config: CappingConfig | None
    traits: tuple[Axis, ...]  # trait needles read beside the axis (``TurnReading.traits``)

    def respond(self, requests: Sequence[CompassRequest]) -> list[Answer]:
        """Generate every request's answer (batched where the engine can)."""
        ...

    def close(self) -> None:
        """Free the engine's model and memory."""
        ...


def check_engine_name(name: str) -> str:
    if name not in ENGINES:
        raise EngineError(f"engine {name!r} is not one of {', '.join(ENGINES)}")
    return name
