"""The one grammar of backend specs: who judges, who plays the user, who generates.

Judges, simulated users, outcome judges and the remote generator are all named by a short
spec, read by :func:`parse_backend_spec`:

=======================  ==================================================================
form                     meaning
=======================  ==================================================================
``none``                 no backend (the extraction judge: every rollout counts)
``heuristic``            local regexes
``scripted``             the scenario's own turns (simulated users)
``model:SPEC``           a local chat model, ``SPEC`` as for ``load_model``
``model:self``           the model already loaded (the one being studied or evaluated)
``openai:URL[#model]``   an OpenAI-compatible server at ``URL``; the model after the first
                         ``#`` (it may hold ``/`` and ``:``), else the caller's default
=======================  ==================================================================

Words and prefixes are case-insensitive and surrounding spaces are ignored; the model names
keep their case. Each caller states which forms it takes (``allowed``), its default served
model and the error class it raises; everything else is shared, so every spec is read the
same way and every error names the parameter, the spec and the forms that parameter takes.

Example:
    >>> parse_backend_spec("openai:http://127.0.0.1:8000/v1#Qwen/Qwen3-8B", param="judge")
    BackendSpec(kind='openai', model='Qwen/Qwen3-8B', base_url='http://127.0.0.1:8000/v1')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import PersonaCompassError
from .openai_client import OpenAIError, split_url_model

SELF = "self"
"""The target of ``model:self``: the model the caller already holds."""

WORDS: dict[str, str] = {
    "none": "no judge: every rollout scores 3",
    "heuristic": "local regexes",
    "scripted": "the scenario's own turns",
}
"""The plain-word kinds and how :func:`accepted_forms` describes them."""

PREFIXES = ("model", "openai")
"""The ``KIND:TARGET`` kinds."""

KINDS = (*WORDS, *PREFIXES)


class BackendSpecError(PersonaCompassError):
    """A backend spec is unknown or malformed (the default error of :func:`parse_backend_spec`)."""


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec.

    Attributes:
        kind: one of :data:`KINDS`.
        model: for ``model``, the model spec or :data:`SELF`; for ``openai``, the served model
            name, or the caller's default, or ``""`` when neither names one (a single-model
            server then uses its own); ``""`` for the plain words.
        base_url: for ``openai``, the validated API root without a trailing slash; else ``""``.
    """

    kind: str
    model: str = ""
    base_url: str = ""

    @property
    def is_self(self) -> bool:
        """Whether this is ``model:self``."""
        return self.kind == "model" and self.model == SELF


def accepted_forms(allowed: Sequence[str], *, default_model: str | None = None) -> str:
    """The forms of ``allowed`` in words, for error messages and help texts.

    Example:
        >>> accepted_forms(("scripted", "heuristic"))
        "'scripted' (the scenario's own turns), 'heuristic' (local regexes)"
    """
    parts = []
    for kind in _check_allowed(allowed):
        if kind in WORDS:
            parts.append(f"'{kind}' ({WORDS[kind]})")
        elif kind == "model":
            parts.append(
                "'model:SPEC' (a local chat model; 'model:self' reuses the model already loaded)"
            )
        else:
            default = f", default model {default_model}" if default_model else ""
            parts.append(f"'openai:URL[#model]' (an OpenAI-compatible server{default})")
    return ", ".join(parts)


def parse_backend_spec(
    text: object,
    *,
    param: str,
    allowed: Sequence[str] = ("heuristic", "model", "openai"),
    default_model: str | None = None,
    error: type[Exception] = BackendSpecError,
) -> BackendSpec:
    """Read a backend spec (see the module docstring for the grammar).

    Args:
        text: the spec as typed; anything that is not a string is an unknown spec.
        param: the parameter it was given as (``"judge"``, ``"user"``, ``"outcome judge"``,
            ``"generator"``), named in every error.
        allowed: the kinds this parameter takes, in the order the error lists them.
        default_model: the served model of an ``openai:URL`` spec without ``#model``.
        error: the exception class to raise (the caller's own, so its users can catch it).

    Raises:
        error: an unknown kind or one not in ``allowed``, ``model:`` without a model,
            or an ``openai:`` URL that is not an http(s) API root (or ends with an empty
            ``#``). The message names ``param``, the spec and the accepted forms.
    """
    allowed = _check_allowed(allowed)
    spec = text.strip() if isinstance(text, str) else ""
    kind, sep, target = spec.partition(":")
    kind = kind.lower()
    forms = accepted_forms(allowed, default_model=default_model)
    if kind not in allowed or bool(sep) != (kind in PREFIXES):
        raise error(f"unknown {param} spec {text!r}; accepted forms: {forms}")
    if kind in WORDS:
        return BackendSpec(kind)
    target = target.strip()
    if kind == "model":
        if not target:
            raise error(f"{param} spec {text!r} names no model; accepted forms: {forms}")
        return BackendSpec(kind, SELF if target.lower() == SELF else target)
    try:
        base_url, model = split_url_model(target)
    except OpenAIError as exc:
        raise error(f"{param} spec {text!r}: {exc}") from exc
    return BackendSpec(kind, model or default_model or "", base_url)


def names_self(text: object) -> bool:
    """Whether ``text`` is the spec ``model:self``; never raises (any other text is ``False``)."""
    try:
        return parse_backend_spec(text, param="backend", allowed=("model",)).is_self
    except BackendSpecError:
        return False


def _check_allowed(allowed: Sequence[str]) -> tuple[str, ...]:
    """``allowed`` as a tuple; a programming error (not a user's) if it names unknown kinds."""
    kinds = tuple(allowed)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"allowed={kinds!r} must be a non-empty subset of {KINDS}")
    return kinds
