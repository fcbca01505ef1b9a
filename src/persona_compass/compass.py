"""The compass: assistant answers generated under watch, capped always, never or on alert.

This is the engine behind ``chat``, ``serve``, ``evaluate`` and the demo:

- :func:`generate_answer` generates one answer for a conversation (batch of one) with a live
  :class:`~persona_compass.DriftMonitor`, optional capping (recording where the cap engaged)
  and steering, streaming text deltas with running drift values, stop strings and
  cancellation. It returns the answer's :class:`~persona_compass.monitor.TurnReading`.
- :class:`CompassSession` is a conversation that keeps its history, readings, alerts and the
  adaptive-capping state across turns (terminal chat, evaluation, demo).
- :func:`respond` is the stateless form for servers: the whole conversation comes with each
  request; earlier answers are read from the prompt itself.

Adaptive capping (off by default) engages the cap after an alert and releases it once the
model has recovered: ``release_turns`` answers in a row at or above ``release_percentile``
on which the cap raised at most ``release_engagement`` of the activations.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .alerts import Alert, AlertRules
from .axis import Axis
from .capping import CappingConfig
from .chat import render_chat
from .errors import PersonaCompassError
from .generation import SamplingConfig, eos_ids
from .interventions import CapEngagement, Scale, capping, steering
from .monitor import DriftMonitor, TokenReadings, TraitReading, TurnReading

CapMode = Literal["off", "on", "adaptive"]
CAP_MODES: tuple[str, ...] = ("off", "on", "adaptive")


class CompassError(PersonaCompassError):
    """A setting of the compass (cap mode, steering, policy) that cannot work."""


def check_cap_mode(mode: str, capping_config: CappingConfig | None) -> CapMode:
    """Validate a cap mode; ``on`` and ``adaptive`` need a capping config."""
    if mode not in CAP_MODES:
        raise CompassError(f"cap mode {mode!r} is not one of {', '.join(CAP_MODES)}")
    if mode != "off" and capping_config is None:
        raise CompassError(
            f"cap mode {mode!r} needs a capping config, and this bundle has none; "
            "add capping.json to the bundle (persona-compass extract writes one) or use 'off'"
        )
    return mode  # type: ignore[return-value]


# The largest steering coefficient anywhere (chat, server, evaluation): far past any useful
# value, and small enough that coefficient x axis stays finite in every dtype's arithmetic.
MAX_STEERING = 1e6


@dataclass(frozen=True)
class Steering:
    """Add ``coefficient`` times the axis on ``layers`` (default: the monitor layer)."""

    coefficient: float
    layers: tuple[int, ...] | None = None
    scale: Scale = "raw"

    def __post_init__(self) -> None:
        if isinstance(self.coefficient, bool) or not isinstance(self.coefficient, (int, float)):
            raise CompassError(f"steering coefficient {self.coefficient!r} must be a number")
        if not math.isfinite(self.coefficient) or abs(self.coefficient) > MAX_STEERING:
            raise CompassError(
                f"steering coefficient {self.coefficient!r} must be a finite number within "
                f"±{MAX_STEERING:g}"
            )
        if self.scale not in ("raw", "unit", "relative"):
            raise CompassError(f"steering scale {self.scale!r} must be raw, unit or relative")


@dataclass(frozen=True)
class AdaptivePolicy:
    """When adaptive capping lets go again (it engages on any alert)."""

    release_percentile: float = 50.0
    release_turns: int = 2
    release_engagement: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.release_percentile <= 100:
            raise CompassError(f"release_percentile={self.release_percentile} must be in 0..100")
        if self.release_turns < 1:
            raise CompassError(f"release_turns={self.release_turns} must be at least 1")
        if not 0 <= self.release_engagement <= 1:
            raise CompassError(f"release_engagement={self.release_engagement} must be in 0..1")


class AdaptiveCap:
    """The adaptive-capping state machine of one conversation."""

    def __init__(self, policy: AdaptivePolicy | None = None) -> None:
        self.policy = policy or AdaptivePolicy()
        self.engaged = False
        self.calm_turns = 0

    def update(self, reading: TurnReading) -> bool:
        """Take one assistant turn into account; return whether the cap is engaged next."""
        policy = self.policy
        if not self.engaged:
            if reading.alerts:
                self.engaged, self.calm_turns = True, 0
            return self.engaged
        if reading.alerts:
            self.calm_turns = 0
            return True
        recovered = (
            reading.percentile is not None
            and reading.percentile >= policy.release_percentile
            and (
                reading.cap_engagement is None
                or reading.cap_engagement <= policy.release_engagement
            )
        )
        self.calm_turns = self.calm_turns + 1 if recovered else 0
        if self.calm_turns >= policy.release_turns:
            self.engaged, self.calm_turns = False, 0
        return self.engaged

    def state(self) -> dict[str, Any]:
        return {"engaged": self.engaged, "calm_turns": self.calm_turns}


def monitor_for(
    model: nn.Module,
    axis: Axis,
    *,
    rules: AlertRules | None = None,
    on_alert: Callable[[Alert], None] | None = None,
    traits: Sequence[Axis] = (),
) -> DriftMonitor:
    """The conversation's monitor: the axis plus any trait needles."""
    return DriftMonitor(model, axis, rules=rules, on_alert=on_alert, traits=traits)


@dataclass(frozen=True)
class Delta:
    """A piece of streamed answer with the running drift values of the answer so far.

    ``traits`` holds each trait needle's running mean and percentile (empty without needles).
    """

    text: str
    n_tokens: int
    projection: float | None
    percentile: float | None
    traits: dict[str, TraitReading] = field(default_factory=dict)


@dataclass
class Answer:
    """One generated answer and everything measured while it was written."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn or stop string), "length" or "cancelled"
    reading: TurnReading
    tokens: TokenReadings
    prompt_tokens: int
    history: list[TurnReading] = field(default_factory=list)
    cap_engaged_next: bool | None = None  # adaptive mode: the state for the next answer

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class _Stop(StoppingCriteria):
    """Stops generation when the streamer saw a stop string or the caller cancelled."""

    def __init__(self, flag: Callable[[], bool]) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), self.flag(), dtype=torch.bool, device=input_ids.device
        )


class _AnswerStreamer(BaseStreamer):
    """Collects generated ids (batch of one), decodes text deltas and finds stop strings."""

    def __init__(
        self,
        tokenizer: Any,
        end_ids: Sequence[int],
        stop: Sequence[str],
        on_text: Callable[[str, int], None] | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.end_ids = set(end_ids)
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self.ended = False  # an end-of-turn token arrived
        self.stopped = False  # a stop string arrived
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        if self.ended or self.stopped:
            return
        for token in value.reshape(-1).tolist():
            if token in self.end_ids:
                self.ended = True
                break
            self.ids.append(int(token))
        if self.on_text is not None or self.stop or self.ended:
            self._emit(final=self.ended)  # without a listener or stop strings: decode once

    def _emit(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # maybe half of a multi-byte character: wait for the rest
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        delta, self.text = text[len(self.text) :], text
        if self.on_text is not None and (delta or self.stopped):
            self.on_text(delta, len(self.ids))

    def end(self) -> None:
        if not self.stopped:
            self._emit(final=True)


def history_readings(mon: DriftMonitor, spans: Sequence[Any]) -> list[TurnReading]:
    """Readings of the conversation's earlier turns, from the prompt's own forward pass.

    Assistant turns go through the monitor's alert rules; the readings are not kept.
    """
    return [
        mon.measure_turn(
            mon.read(span.start, span.end),
            index=span.index,
            role=span.role,
            trait_tokens=mon.read_traits(span.start, span.end) if mon.traits else None,
        )
        for span in spans
    ]


@torch.inference_mode()
def generate_answer(
    model: nn.Module,
    tokenizer: Any,
    axis: Axis,
    messages: Sequence[dict[str, str]],
    *,
    cap: CappingConfig | None = None,
    steer: Steering | None = None,
    sampling: SamplingConfig | None = None,
    stop: Sequence[str] = (),
    monitor: DriftMonitor | None = None,
    on_delta: Callable[[Delta], None] | None = None,
    cancel: threading.Event | None = None,
    read_history: bool = False,
    traits: Sequence[Axis] = (),
) -> Answer:
    """Generate the next assistant answer, watched live; capped with ``cap`` when given.

    Args:
        messages: the conversation so far, ending with a user turn.
        cap: a capping config to apply, or None for no capping.
        steer: steering to add while generating.
        sampling: sampling settings (seeded with ``sampling.seed`` when set).
        stop: strings that end the answer (not included in it).
        monitor: the conversation's :class:`DriftMonitor` (keeps turns and alert history);
            a fresh one with default rules when None.
        on_delta: called with every streamed :class:`Delta` (from this thread).
        cancel: set it from another thread to stop generation early.
        read_history: also read the earlier turns from the prompt (into ``Answer.history``;
            assistant turns go through the monitor's alert rules).
        traits: trait axes to read beside the axis when no ``monitor`` is given.
    """
    sampling = sampling or SamplingConfig()
    mon = monitor if monitor is not None else monitor_for(model, axis, traits=traits)
    rendered = render_chat(tokenizer, list(messages), add_generation_prompt=True)
    prompt_len = len(rendered.input_ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([rendered.input_ids], dtype=torch.long, device=device)
    engagement = CapEngagement() if cap is not None else None
    end_ids = eos_ids(model, tokenizer)

    fed = [0, 0.0]  # answer tokens read so far, and the sum of their projections
    trait_sums = dict.fromkeys(mon.trait_names, 0.0)

    def running(delta_text: str, n_tokens: int) -> None:
        # Only the tokens fed back since the last delta are copied: O(1) per token.
        assert on_delta is not None
        start, end = prompt_len + int(fed[0]), prompt_len + n_tokens
        new = mon.read(start, end, percentiles=False).projections
        fed[0] += len(new)
        fed[1] += sum(new)
        proj = fed[1] / fed[0] if fed[0] else None
        pct = mon.percentile(proj) if proj is not None else None
        traits: dict[str, TraitReading] = {}
        if new and mon.traits:
            for name in mon.trait_names:
                trait_sums[name] += float(mon.trait_token_projections(name)[0, start:end].sum())
                traits[name] = mon.trait_reading(name, trait_sums[name] / fed[0])
        on_delta(Delta(delta_text, n_tokens, proj, pct, traits))

    streamer = _AnswerStreamer(tokenizer, end_ids, stop, running if on_delta else None)
    cancelled = cancel if cancel is not None else threading.Event()
    stopping = StoppingCriteriaList([_Stop(lambda: streamer.stopped or cancelled.is_set())])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with ExitStack() as stack:
        if steer is not None:
            stack.enter_context(
                steering(model, axis, steer.coefficient, steer.layers, scale=steer.scale)
            )
        if cap is not None:
            stack.enter_context(capping(model, cap, engagement=engagement))
        if not mon.active:
            stack.enter_context(mon)
        mon.reset()
        model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=end_ids,
            streamer=streamer,
            stopping_criteria=stopping,
            **sampling.generate_kwargs(),
        )
    history: list[TurnReading] = []
    if read_history:
        history = history_readings(mon, rendered.spans)
    n_content = len(streamer.ids)
    if streamer.stopped:
        # keep only the tokens of the text before the stop string
        n_content = len(tokenizer(streamer.text, add_special_tokens=False)["input_ids"])
        n_content = min(n_content, len(streamer.ids))
    # The monitor saw prompt + every answer token fed back; the last sampled one never was.
    end = prompt_len + n_content
    tokens = mon.read(prompt_len, end)
    reading = mon.end_turn(
        prompt_len,
        end,
        index=len(messages),
        capped=cap is not None,
        cap_engagement=engagement.fraction(prompt_len, end) if engagement else None,
        tokens=tokens,
    )
    if streamer.stopped or streamer.ended:
        finish = "stop"
    elif cancelled.is_set():
        finish = "cancelled"
    else:
        finish = "length"
    return Answer(
        text=streamer.text.strip(),
        token_ids=streamer.ids[:n_content],
        finish_reason=finish,
        reading=reading,
        tokens=tokens,
        prompt_tokens=prompt_len,
        history=history,
    )


class CompassSession:
    """A conversation on the compass: history, live readings, alerts and cap state.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        axis: the axis bundle.
        capping_config: the cap to use in ``on`` and ``adaptive`` modes.
        mode: ``off`` (watch only), ``on`` (always capped) or ``adaptive``.
        rules: alert rules.
        policy: the adaptive release policy.
        sampling: sampling settings; each turn uses ``seed + turn number`` when seeded.
        system_prompt: an optional system message at the start.
        on_alert: called with every alert.
        traits: trait axes read beside the axis (readings in ``TurnReading.traits``); a
            trait alert engages adaptive capping like an axis alert.

    Example:
        >>> session = CompassSession(model, tok, axis, cap_cfg, mode="adaptive")
        >>> answer = session.reply("Hello!")
        >>> answer.reading.percentile, session.cap_engaged
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        axis: Axis,
        capping_config: CappingConfig | None = None,
        *,
        mode: str = "off",
        rules: AlertRules | None = None,
        policy: AdaptivePolicy | None = None,
        sampling: SamplingConfig | None = None,
        system_prompt: str | None = None,
        steer: Steering | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        traits: Sequence[Axis] = (),
    ) -> None:
        self.model, self.tokenizer, self.axis = model, tokenizer, axis
        self.traits = tuple(traits)
        self.capping_config = capping_config
        self.mode: CapMode = check_cap_mode(mode, capping_config)
        self.rules = rules
        self.adaptive = AdaptiveCap(policy)
        self.sampling = sampling or SamplingConfig()
        self.steer = steer
        self.on_alert = on_alert
        self.messages: list[dict[str, str]] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})
        self.monitor = self._new_monitor()

    def _new_monitor(self) -> DriftMonitor:
        return monitor_for(
            self.model, self.axis, rules=self.rules, on_alert=self.on_alert, traits=self.traits
        )

    # -- settings --------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        """Switch capping off, on or to adaptive (the adaptive state is kept)."""
        self.mode = check_cap_mode(mode, self.capping_config)

    def set_system_prompt(self, text: str | None) -> None:
        """Replace (or with None/empty remove) the system message.

        Readings and alerts keep pointing at their messages when one is added or removed.
        """
        before = len(self.messages)
        if self.messages and self.messages[0]["role"] == "system":
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})
        shift = len(self.messages) - before
        if shift:
            self.monitor.shift_turns(shift)

    def restore(
        self, messages: Sequence[dict[str, str]], readings: Sequence[dict[str, Any]] = ()
    ) -> tuple[int, int]:
        """Continue from a saved conversation: its messages and (validated) readings.

        Stored readings are kept as they are; assistant turns without one are measured now
        (one uncapped forward pass). The alert history and the adaptive state are replayed in
        turn order, so the rules go on from the loaded turns. Returns (kept, measured).
        """
        from .monitor import project_conversation

        self.messages = [dict(m) for m in messages]
        self.monitor = self._new_monitor()
        self.adaptive = AdaptiveCap(self.adaptive.policy)
        stored = {
            r.index: r
            for r in (TurnReading.from_dict(dict(d)) for d in readings)
            if r.index < len(self.messages)
        }
        answers = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]
        missing = [i for i in answers if i not in stored]
        measured = {}
        if missing:
            turns = project_conversation(
                self.model, self.tokenizer, self.axis, self.messages, traits=self.traits
            )
            measured = {t.index: t for t in turns if t.index in missing}
        mon = self.monitor
        for index in sorted(set(stored) | set(measured)):
            if index in stored:
                reading = stored[index]
                if reading.role == "assistant":
                    mon.replay(reading)
            else:
                turn = measured[index]
                # one value, the turn's mean, stands in for its tokens: the turn rules apply
                reading = mon.measure_turn(
                    TokenReadings([turn.projection], None),
                    index=index,
                    trait_tokens={
                        name: TokenReadings([value], None) for name, value in turn.traits.items()
                    },
                )
                reading = replace(reading, n_tokens=turn.n_tokens)
            if reading.role == "assistant":
                self.adaptive.update(reading)
            mon.turns.append(reading)
        return len(stored), len(measured)

    @property
    def cap_engaged(self) -> bool:
        """Whether the next answer will be capped."""
        if self.mode == "on":
            return True
        return self.mode == "adaptive" and self.adaptive.engaged

    @property
    def turns(self) -> list[TurnReading]:
        return self.monitor.turns

    @property
    def alerts(self) -> list[Alert]:
        return self.monitor.alerts

    # -- turns -----------------------------------------------------------------------------
    def reply(
        self,
        user_text: str,
        *,
        on_delta: Callable[[Delta], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer:
        """Add a user turn, generate the answer, record its reading."""
        if not isinstance(user_text, str) or not user_text.strip():
            raise CompassError("the user message is empty; type something to send")
        messages = [*self.messages, {"role": "user", "content": user_text}]
        n_answers = sum(1 for m in messages if m["role"] == "assistant")
        sampling = self.sampling
        if sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + n_answers + 1)
        capped = self.cap_engaged
        answer = generate_answer(
            self.model,
            self.tokenizer,
            self.axis,
            messages,
            cap=self.capping_config if capped else None,
            steer=self.steer,
            sampling=sampling,
            monitor=self.monitor,
            on_delta=on_delta,
            cancel=cancel,
        )
        self.messages = [*messages, {"role": "assistant", "content": answer.text or "..."}]
        if self.mode == "adaptive":
            self.adaptive.update(answer.reading)
        answer.cap_engaged_next = self.cap_engaged
        return answer

    def readings(self) -> list[dict[str, Any]]:
        """Every recorded turn reading, in the transcript layout."""
        return [t.to_dict() for t in self.turns]


def respond(
    model: nn.Module,
    tokenizer: Any,
    axis: Axis,
    messages: Sequence[dict[str, str]],
    *,
    mode: str = "off",
    capping_config: CappingConfig | None = None,
    rules: AlertRules | None = None,
    policy: AdaptivePolicy | None = None,
    steer: Steering | None = None,
    sampling: SamplingConfig | None = None,
    stop: Sequence[str] = (),
    on_delta: Callable[[Delta], None] | None = None,
    cancel: threading.Event | None = None,
    read_history: bool = True,
    traits: Sequence[Axis] = (),
) -> Answer:
    """Answer a whole conversation statelessly (the server's path).

    Earlier turns are read from the prompt (``read_history=False`` skips that outside
    adaptive mode, where the history decides the cap). In ``adaptive`` mode that takes one extra
    uncapped forward pass over the prompt first: its assistant turns run through the alert
    rules and the adaptive state machine, which decide whether this answer is capped.
    """
    mode = check_cap_mode(mode, capping_config)
    capped = mode == "on"
    adaptive = AdaptiveCap(policy)
    mon = monitor_for(model, axis, rules=rules, traits=traits)
    if mode == "adaptive":
        rendered = render_chat(tokenizer, list(messages))
        device = next(model.parameters()).device
        with torch.inference_mode(), mon:
            model(input_ids=torch.tensor([rendered.input_ids], device=device), use_cache=False)
        history = history_readings(mon, rendered.spans)  # the tracker now holds them too
        for reading in history:
            if reading.role == "assistant":
                adaptive.update(reading)
        capped = adaptive.engaged
    answer = generate_answer(
        model,
        tokenizer,
        axis,
        messages,
        cap=capping_config if capped else None,
        steer=steer,
        sampling=sampling,
        stop=stop,
        monitor=mon,
        on_delta=on_delta,
        cancel=cancel,
        read_history=read_history and mode != "adaptive",
    )
    if mode == "adaptive":
        answer.history = history
        adaptive.update(answer.reading)
        answer.cap_engaged_next = adaptive.engaged
    return answer
