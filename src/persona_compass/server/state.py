"""What the server holds and does per request: plan a request, generate, report telemetry.

:class:`CompassState` owns the loaded model, axis and capping config and the generation
worker. It resolves a request's ``persona_compass`` extension field into a :class:`Plan`
(capping configs calibrated on request are cached), generates through
:func:`persona_compass.compass.respond`, and builds the ``persona_compass`` telemetry of a
response and the ``GET /v1/compass`` info.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..alerts import AlertRules, AlertRulesError
from ..axis import Axis
from ..capping import CappingConfig
from ..chat import render_chat
from ..compass import (
    AdaptivePolicy,
    Answer,
    CompassError,
    Delta,
    Steering,
    check_cap_mode,
    respond,
)
from ..errors import PersonaCompassError
from ..generation import SamplingConfig
from ..html_chart import BAND_PERCENTILES, calibration_bands
from ..layers import normalize_layers
from ..monitor import TurnReading, context_length, needle_names
from .config import ServerConfig
from .schemas import CappingSpec, ChatRequest, RequestError
from .worker import GenerationWorker

CAP_CACHE_SIZE = 32
DEFAULT_PERCENTILE = 25.0
TRAIT_BANDS = (50, 75, 95)


@dataclass(frozen=True)
class Plan:
    """A request's generation settings, resolved and checked before it is queued."""

    messages: tuple[dict[str, str], ...]
    mode: str
    cap_config: CappingConfig | None
    steer: Steering | None
    rules: AlertRules
    policy: AdaptivePolicy | None
    sampling: SamplingConfig  # max_new_tokens: the asked (or default) max_tokens
    explicit_max_tokens: bool
    stop: tuple[str, ...]


class CompassState:
    """The loaded model, axis and capping config, the worker, and the built-config cache.

    This one generates with the embedded ``hf`` engine on one worker thread, one answer at a
    time; :class:`~.vllm_state.VLLMCompassState` batches them in vLLM.
    """

    engine_name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        axis: Axis,
        capping_config: CappingConfig | None,
        config: ServerConfig,
        traits: Sequence[Axis] = (),
    ) -> None:
        self._setup(tokenizer, axis, capping_config, config, traits)
        self.model = model
        self.worker = GenerationWorker(config.queue_size)

    def _setup(
        self,
        tokenizer: Any,
        axis: Axis,
        capping_config: CappingConfig | None,
        config: ServerConfig,
        traits: Sequence[Axis] = (),
    ) -> None:
        check_cap_mode(config.cap_mode, capping_config)
        self.tokenizer, self.axis = tokenizer, axis
        self.traits = tuple(traits)
        self.trait_names = needle_names(self.traits)
        self.capping_config = capping_config
        self.config = config
        self.model_name = config.model_name or str(axis.model_id or "model")
        self.rules = config.rules or AlertRules()
        self.default_max_tokens = min(config.default_max_tokens, config.max_tokens_limit)
        self.created = int(time.time())
        self._caps: OrderedDict[tuple[tuple[int, ...], float], CappingConfig] = OrderedDict()
        self._caps_lock = threading.Lock()
        self._info = self._compass_info()  # fixed for the server's life

    # -- the generation queue ---------------------------------------------------------------
    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    @property
    def depth(self) -> int:
        """Requests waiting for the model."""
        return self.worker.depth

    @property
    def busy(self) -> bool:
        """Whether an answer is being generated now."""
        return self.worker.busy

    def submit(self, plan: Plan, *, stream: bool, sink: Callable[[str, Any], None]) -> Any:
        """Queue a planned request; ``sink`` gets ``start``, ``delta`` (when streaming), then
        ``done`` or ``error`` events from the generation thread. Returns a job with
        ``abandon()``. Raises :class:`~.worker.QueueFull` when no place is free."""

        def work(cancel: threading.Event) -> Answer:
            try:
                answer = self.generate(
                    plan,
                    cancel,
                    on_start=lambda n: sink("start", n),
                    on_delta=(lambda delta: sink("delta", delta)) if stream else None,
                )
            except BaseException as exc:
                sink("error", exc)
                raise
            sink("done", answer)
            return answer

        return self.worker.submit(work)

    def context_window(self) -> int | None:
        """The model's context length in tokens (None: unknown)."""
        return context_length(self.model)

    def fit_prompt(self, plan: Plan) -> tuple[int, int]:
        """The prompt's length and the tokens left to generate, checked against the context.

        Raises:
            RequestError: the conversation (with an explicit ``max_tokens``) does not fit.
        """
        messages = [dict(m) for m in plan.messages]
        n_prompt = len(render_chat(self.tokenizer, messages, add_generation_prompt=True).input_ids)
        max_new = plan.sampling.max_new_tokens
        window = self.context_window()
        if window is not None:
            room = window - n_prompt
            if room < 1 or (plan.explicit_max_tokens and max_new > room):
                raise RequestError(
                    f"this model's context is {window} tokens; the messages take {n_prompt} and "
                    f"{max_new} more were asked for; shorten the conversation or max_tokens",
                    param="messages",
                    code="context_length_exceeded",
                )
            max_new = min(max_new, room)
        return n_prompt, max_new

    # -- settings ---------------------------------------------------------------------------
    def _layers(self, spec: Any, param: str) -> tuple[int, ...]:
        """A request's layer selection, normalised against the axis (400 naming ``param``)."""
        try:
            return tuple(normalize_layers(spec, self.axis.n_layers))
        except (PersonaCompassError, ValueError) as exc:
            raise RequestError(str(exc), param=param) from None

    def calibrated_cap(self, spec: CappingSpec) -> CappingConfig:
        """A capping config for a window and percentile, from the axis calibration (cached)."""
        param = "persona_compass.capping"
        base = self.capping_config
        layers_spec: Any = spec.layers
        if layers_spec is None:
            if base is None:
                raise RequestError(
                    f"{param}.layers is needed: the bundle has no capping config to take the "
                    "window from",
                    param=f"{param}.layers",
                )
            layers_spec = base.layers
        percentile = spec.percentile
        if percentile is None:
            meta = base.metadata.get("percentile") if base is not None else None
            percentile = float(meta) if isinstance(meta, (int, float)) else DEFAULT_PERCENTILE
        layers = self._layers(layers_spec, f"{param}.layers")
        if self.axis.calibration is None:
            raise RequestError(
                f"{param} needs the axis calibration, and this bundle has none",
                param=param,
            )
        key = (layers, float(percentile))
        with self._caps_lock:
            cached = self._caps.get(key)
            if cached is not None:
                self._caps.move_to_end(key)
                return cached
        try:
            cfg = CappingConfig.calibrate(
                self.axis, self.axis.calibration, list(layers), percentile=float(percentile)
            )
        except (PersonaCompassError, ValueError) as exc:
            raise RequestError(str(exc), param=param) from None
        with self._caps_lock:
            self._caps[key] = cfg
            while len(self._caps) > CAP_CACHE_SIZE:
                self._caps.popitem(last=False)
        return cfg

    def plan(self, req: ChatRequest) -> Plan:
        """Resolve a validated request against the axis and the server's defaults."""
        opts = req.compass
        default_mode = self.config.cap_mode
        cap_config = self.capping_config
        if opts.capping is not None:
            cap_config = self.calibrated_cap(opts.capping)
            if default_mode == "off":
                default_mode = "on"  # a window asked for alone means "cap with it"
        mode = opts.cap or default_mode
        try:
            check_cap_mode(mode, cap_config)
        except CompassError as exc:
            raise RequestError(str(exc), param="persona_compass.cap") from None
        steer = None
        if opts.steering is not None:
            sp = opts.steering
            param = "persona_compass.steering"
            layers = None if sp.layers is None else self._layers(sp.layers, f"{param}.layers")
            if sp.scale == "relative" and self.axis.residual_norms is None:
                raise RequestError(
                    "steering scale 'relative' needs the axis' residual norms, and this bundle "
                    "has none; use 'unit' or 'raw'",
                    param=f"{param}.scale",
                )
            try:
                steer = Steering(sp.coefficient, layers, sp.scale)  # type: ignore[arg-type]
            except CompassError as exc:
                raise RequestError(str(exc), param=param) from None
        rules = self.rules
        if opts.rules is not None:
            try:
                rules = AlertRules.from_dict({**rules.to_dict(), **opts.rules})
            except (AlertRulesError, TypeError) as exc:
                raise RequestError(str(exc), param="persona_compass.rules") from None
        policy = None
        if opts.policy is not None:
            try:
                policy = AdaptivePolicy(**opts.policy)
            except CompassError as exc:
                raise RequestError(str(exc), param="persona_compass.policy") from None
        overrides = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "repetition_penalty": req.repetition_penalty,
        }
        sampling = SamplingConfig(
            max_new_tokens=self.default_max_tokens if req.max_tokens is None else req.max_tokens,
            seed=req.seed,
            **{k: v for k, v in overrides.items() if v is not None},
        )
        return Plan(
            messages=req.messages,
            mode=mode,
            cap_config=cap_config,
            steer=steer,
            rules=rules,
            policy=policy,
            sampling=sampling,
            explicit_max_tokens=req.max_tokens is not None,
            stop=req.stop,
        )

    # -- generation (on the worker thread) --------------------------------------------------
    def generate(
        self,
        plan: Plan,
        cancel: threading.Event,
        *,
        on_start: Callable[[int], None] | None = None,
        on_delta: Callable[[Delta], None] | None = None,
    ) -> Answer:
        """Check the prompt against the context length, then :func:`respond`."""
        n_prompt, max_new = self.fit_prompt(plan)
        if on_start is not None:
            on_start(n_prompt)
        return respond(
            self.model,
            self.tokenizer,
            self.axis,
            [dict(m) for m in plan.messages],
            mode=plan.mode,
            capping_config=plan.cap_config,
            rules=plan.rules,
            policy=plan.policy,
            steer=plan.steer,
            sampling=replace(plan.sampling, max_new_tokens=max_new),
            stop=plan.stop,
            on_delta=on_delta,
            cancel=cancel,
            traits=self.traits,
        )

    def telemetry(self, answer: Answer, plan: Plan) -> dict[str, Any]:
        """The ``persona_compass`` object of a response."""
        reading = answer.reading
        name = None
        if plan.mode != "off" and plan.cap_config is not None:
            name = plan.cap_config.name or None
        return {
            "turn": reading.to_dict(),
            "history": [t.to_dict() for t in answer.history],
            "alerts": [a.to_dict() for a in reading.alerts],
            "alert": bool(reading.alerts),
            "cap": {
                "mode": plan.mode,
                "capped": reading.capped,
                "engagement": reading.cap_engagement,
                "engaged_next": answer.cap_engaged_next,
                "config": name,
            },
            "monitor_layer": self.axis.layer,
            **self._trait_telemetry(reading),
        }

    def _trait_telemetry(self, reading: TurnReading) -> dict[str, Any]:
        """``{"traits": {name: {"projection", "percentile"}}}`` of a reading; nothing when the
        server reads no trait needles (the telemetry stays as it was)."""
        if not self.traits:
            return {}
        return {"traits": {name: t.to_dict() for name, t in reading.traits.items()}}

    def compass_info(self) -> dict[str, Any]:
        """``GET /v1/compass``: the monitor layer's calibration bands and the settings."""
        return self._info

    def _compass_info(self) -> dict[str, Any]:
        cal = self.axis.calibration
        layer = self.axis.layer
        try:
            known = calibration_bands(cal, layer) or {}
        except (ValueError, PersonaCompassError):
            known = {}
        bands = {f"p{p}": known.get(f"p{p}") for p in BAND_PERCENTILES}
        cap = self.capping_config
        return {
            "model": self.model_name,
            "monitor_layer": layer,
            "engine": self.engine_name,
            "n_layers": self.axis.n_layers,
            "calibrated": cal is not None,
            "bands": bands,
            "cap_mode": self.config.cap_mode,
            "capping": (cap.name or None) if cap is not None else None,
            "capping_layers": list(cap.layers) if cap is not None else None,
            "rules": self.rules.to_dict(),
            "max_tokens_limit": self.config.max_tokens_limit,
            "default_max_tokens": self.default_max_tokens,
            "traits": [
                trait_info(name, trait)
                for name, trait in zip(self.trait_names, self.traits, strict=True)
            ],
        }


def trait_info(name: str, trait: Axis) -> dict[str, Any]:
    """A trait needle in ``GET /v1/compass``: its layer and the projections of its p50, p75
    and p95 (a trait drifts upward, so its bands are the high ones)."""
    try:
        known = calibration_bands(trait.calibration, trait.layer, TRAIT_BANDS) or {}
    except (ValueError, PersonaCompassError):
        known = {}
    return {
        "name": name,
        "layer": trait.layer,
        "calibrated": trait.calibration is not None,
        "bands": {f"p{p}": known.get(f"p{p}") for p in TRAIT_BANDS},
    }
