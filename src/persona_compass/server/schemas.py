"""Request validation for the OpenAI-compatible API, with OpenAI-style error objects.

The body of ``POST /v1/chat/completions`` is checked here field by field; a problem raises
:class:`RequestError`, which the app turns into ``{"error": {"message", "type", "param",
"code"}}`` with its HTTP status. Fields of the OpenAI API that this server does not use
(``tools``, ``logprobs``, ``frequency_penalty``...) are ignored; wrong types are refused.

The extension object ``persona_compass`` (sent with the OpenAI client's ``extra_body``) is
parsed into :class:`CompassOptions`: plain values only. Nothing in a request names a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from ..compass import CAP_MODES, MAX_STEERING
from ..interventions import Scale
from ..text import InvalidTextError, check_text

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system
SCALES: tuple[str, ...] = get_args(Scale)
MAX_STOP = 16
MAX_STOP_CHARS = 256
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed accepts

COMPASS_KEYS = ("cap", "capping", "steering", "rules", "policy")
CAPPING_KEYS = ("layers", "percentile")
STEERING_KEYS = ("coefficient", "layers", "scale")
POLICY_KEYS = ("release_percentile", "release_turns", "release_engagement")


class RequestError(Exception):
    """A request the server refuses, as an OpenAI error object and an HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- small checkers ----------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(value: Any, param: str, *, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{param} must be a number, got {_type_name(value)}", param=param)
    if not math.isfinite(value):
        raise RequestError(f"{param} must be a finite number, got {value}", param=param)
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise RequestError(f"{param}={value} must be in {bracket}{lo:g}, {hi:g}]", param=param)
    return float(value)


def _integer(value: Any, param: str, *, lo: int, hi: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{param} must be an integer, got {_type_name(value)}", param=param)
    if value < lo or (hi is not None and value > hi):
        limit = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"{param}={value} must be {limit}", param=param)
    return value


def _object(value: Any, param: str, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{param} must be an object, got {_type_name(value)}", param=param)
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise RequestError(
            f"{param} has unknown field(s) {', '.join(map(str, unknown))}; known: "
            f"{', '.join(known)}",
            param=f"{param}.{unknown[0]}",
        )
    return value


def layer_spec(value: Any, param: str) -> str | tuple[int, ...]:
    """A layer selection as sent: ``"22:29"``, ``"15"``, ``15`` or ``[15, 16]``."""
    if isinstance(value, str):
        if not value.strip() or len(value) > 200:
            raise RequestError(f"{param} must be a layer selection such as '22:29'", param=param)
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and value:
        if (
            all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and len(value) <= 4096
        ):
            return tuple(value)
    raise RequestError(
        f"{param} must be a layer selection: a string such as '22:29', an integer or a "
        f"non-empty list of integers; got {_type_name(value)}",
        param=param,
    )


# -- the extension object ----------------------------------------------------------------------
@dataclass(frozen=True)
class CappingSpec:
    """A capping window and percentile to calibrate from the axis (either may be missing)."""

    layers: str | tuple[int, ...] | None = None
    percentile: float | None = None


@dataclass(frozen=True)
class SteeringSpec:
    coefficient: float
    layers: str | tuple[int, ...] | None = None
    scale: str = "raw"


@dataclass(frozen=True)
class CompassOptions:
    """The request's ``persona_compass`` object; None everywhere means the server's defaults."""

    cap: str | None = None
    capping: CappingSpec | None = None
    steering: SteeringSpec | None = None
    rules: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None


def parse_compass(value: Any) -> CompassOptions:
    """Validate the ``persona_compass`` extension object (None: the server's defaults)."""
    if value is None:
        return CompassOptions()
    p = "persona_compass"
    data = _object(value, p, COMPASS_KEYS)
    cap = data.get("cap")
    if cap is not None and cap not in CAP_MODES:
        raise RequestError(
            f"{p}.cap={cap!r} must be one of {', '.join(CAP_MODES)}", param=f"{p}.cap"
        )
    capping = None
    if data.get("capping") is not None:
        raw = _object(data["capping"], f"{p}.capping", CAPPING_KEYS)
        layers = raw.get("layers")
        pct = raw.get("percentile")
        capping = CappingSpec(
            layers=None if layers is None else layer_spec(layers, f"{p}.capping.layers"),
            percentile=None
            if pct is None
            else _number(pct, f"{p}.capping.percentile", lo=0, hi=100),
        )
    steering = None
    if data.get("steering") is not None:
        raw = _object(data["steering"], f"{p}.steering", STEERING_KEYS)
        if "coefficient" not in raw:
            raise RequestError(
                f"{p}.steering needs a coefficient (e.g. -4.0)", param=f"{p}.steering.coefficient"
            )
        coefficient = _number(
            raw["coefficient"], f"{p}.steering.coefficient", lo=-MAX_STEERING, hi=MAX_STEERING
        )
        layers = raw.get("layers")
        scale = raw.get("scale", "raw")
        if scale not in SCALES:
            raise RequestError(
                f"{p}.steering.scale={scale!r} must be one of {', '.join(SCALES)}",
                param=f"{p}.steering.scale",
            )
        steering = SteeringSpec(
            coefficient=coefficient,
            layers=None if layers is None else layer_spec(layers, f"{p}.steering.layers"),
            scale=scale,
        )
    rules = data.get("rules")
    if rules is not None and not isinstance(rules, dict):
        raise RequestError(
            f"{p}.rules must be an object of alert rule fields, got {_type_name(rules)}",
            param=f"{p}.rules",
        )
    policy = None
    if data.get("policy") is not None:
        raw = _object(data["policy"], f"{p}.policy", POLICY_KEYS)
        policy = {}
        if "release_percentile" in raw:
            policy["release_percentile"] = _number(
                raw["release_percentile"], f"{p}.policy.release_percentile", lo=0, hi=100
            )
        if "release_turns" in raw:
            policy["release_turns"] = _integer(
                raw["release_turns"], f"{p}.policy.release_turns", lo=1, hi=1000
            )
        if "release_engagement" in raw:
            policy["release_engagement"] = _number(
                raw["release_engagement"], f"{p}.policy.release_engagement", lo=0, hi=1
            )
    return CompassOptions(cap=cap, capping=capping, steering=steering, rules=rules, policy=policy)


# -- the chat completion request ---------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    messages: tuple[dict[str, str], ...]
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None  # None: the server's default
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    compass: CompassOptions = CompassOptions()


def _text(value: str, param: str) -> str:
    try:
        return check_text(value, param)
    except InvalidTextError as exc:
        raise RequestError(str(exc), param=param) from None


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return _text(value, param)
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            where = f"{param}[{i}]"
            if not isinstance(part, dict):
                raise RequestError(f"{where} must be a content part object", param=where)
            if part.get("type") != "text":
                raise RequestError(
                    f"{where} has type {part.get('type')!r}; only text content parts are supported",
                    param=f"{where}.type",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{where}.text must be a string", param=f"{where}.text")
            texts.append(_text(text, f"{where}.text"))
        return "\n".join(texts)
    raise RequestError(
        f"{param} must be a string or a list of text parts, got {_type_name(value)}", param=param
    )


def parse_messages(value: Any) -> tuple[dict[str, str], ...]:
    """Roles system/user/assistant (``developer`` counts as system), text content, user last."""
    if not isinstance(value, list):
        raise RequestError(f"messages must be a list, got {_type_name(value)}", param="messages")
    if not value:
        raise RequestError("messages is empty; send at least one user message", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", param=where)
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise RequestError(
                f"{where}.role={message.get('role')!r} is not supported; use system, user or "
                "assistant",
                param=f"{where}.role",
            )
        if "content" not in message:
            raise RequestError(f"{where} has no content", param=f"{where}.content")
        out.append({"role": str(role), "content": _content(message["content"], f"{where}.content")})
    if out[-1]["role"] != "user":
        raise RequestError(
            f"the last message must come from the user, not {out[-1]['role']}",
            param=f"messages[{len(out) - 1}].role",
        )
    return tuple(out)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    if len(items) > MAX_STOP:
        raise RequestError(f"stop takes at most {MAX_STOP} strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise RequestError(
            f"each stop string must be at most {MAX_STOP_CHARS} characters", param="stop"
        )
    return tuple(_text(s, "stop") for s in items if s)


def parse_chat_request(body: Any, *, max_tokens_limit: int) -> ChatRequest:
    """Validate a chat completion body (a parsed JSON value)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    messages = parse_messages(body.get("messages"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object", param="stream_options")
        flag = options.get("include_usage")
        if flag is not None and not isinstance(flag, bool):
            raise RequestError(
                "stream_options.include_usage must be a boolean",
                param="stream_options.include_usage",
            )
        include_usage = bool(flag)
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        if body.get(name) is not None:
            value = _integer(body[name], name, lo=1)
            if value > max_tokens_limit:
                raise RequestError(
                    f"{name}={value} is above this server's limit of {max_tokens_limit}",
                    param=name,
                    code="max_tokens_too_large",
                )
            max_tokens = value
    n = body.get("n")
    if n is not None and _integer(n, "n", lo=1) != 1:
        raise RequestError("n must be 1: this server generates one choice", param="n")
    temperature = body.get("temperature")
    if temperature is not None:
        temperature = _number(temperature, "temperature", lo=0, hi=2)
    top_p = body.get("top_p")
    if top_p is not None:
        top_p = _number(top_p, "top_p", lo=0, hi=1, lo_open=True)
    penalty = body.get("repetition_penalty")
    if penalty is not None:
        penalty = _number(penalty, "repetition_penalty", lo=0, hi=10, lo_open=True)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed", lo=SEED_MIN, hi=SEED_MAX)
    return ChatRequest(
        messages=messages,
        model=model,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=penalty,
        stop=_stop(body.get("stop")),
        seed=seed,
        compass=parse_compass(body.get("persona_compass")),
    )
