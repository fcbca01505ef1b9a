"""The server on the ``vllm`` engine: requests batched by vLLM's scheduler.

Same API, telemetry and errors as the ``hf`` server (:class:`~.state.CompassState`); only
generation differs: every planned request becomes a
:class:`~persona_compass.engines.CompassRequest` with its own cap mode, capping config,
steering and alert rules, handed to the engine's stream loop
(:class:`~persona_compass.engines.vllm_stream.StreamLoop`).
Up to ``max_concurrency`` requests generate together; ``queue_size`` more wait in vLLM's
scheduler; beyond that the server answers 429.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..engines.base import CompassRequest
from ..engines.vllm_engine import VLLMEngine
from ..engines.vllm_stream import EngineBusy, EngineStopped, StreamLoop
from .config import ServerConfig
from .state import CompassState, Plan
from .worker import QueueFull, WorkerStopped


class VLLMCompassState(CompassState):
    """The server's state around a started :class:`VLLMEngine`."""

    engine_name = "vllm"

    def __init__(self, engine: VLLMEngine, config: ServerConfig) -> None:
        self._setup(engine.tokenizer, engine.axis, engine.capping_config, config, engine.traits)
        self.engine = engine
        self.model = None
        self.loop = StreamLoop(engine, max_requests=config.max_concurrency + config.queue_size)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        self.engine.close()

    @property
    def depth(self) -> int:
        """Requests waiting beyond the ones generating."""
        return max(0, self.loop.held - self.config.max_concurrency)

    @property
    def busy(self) -> bool:
        return self.loop.held > 0

    def context_window(self) -> int | None:
        return int(self.engine.llm.llm_engine.vllm_config.model_config.max_model_len)

    def submit(self, plan: Plan, *, stream: bool, sink: Callable[[str, Any], None]) -> Any:
        _, max_new = self.fit_prompt(plan)
        request = CompassRequest(
            messages=plan.messages,
            mode=plan.mode,
            capping_config=plan.cap_config,
            rules=plan.rules,
            policy=plan.policy,
            steer=plan.steer,
            sampling=replace(plan.sampling, max_new_tokens=max_new),
            stop=plan.stop,
            read_history=True,  # the telemetry carries the history's readings
        )
        try:
            return self.loop.submit(request, sink, stream=stream)
        except EngineBusy as exc:
            raise QueueFull(exc.retry_after) from None
        except EngineStopped as exc:
            raise WorkerStopped(str(exc)) from None
