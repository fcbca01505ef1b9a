"""Backend specs shared by judges, simulated users, outcome judges and generators.

A spec is a plain word (``"heuristic"``) or ``KIND:TARGET`` (``"model:self"``,
``"openai:http://127.0.0.1:8000/v1#Qwen/Qwen3-8B"``). Each maker decides which kinds it takes;
these helpers read the target of the two kinds several makers share, and raise the maker's own
error class with a message that names the spec.
"""

from __future__ import annotations

from .persona_space.openai_client import OpenAIError, split_url_model

SELF = "self"


def spec_text(spec: object) -> str:
    """The spec, stripped (``""`` for anything that is not a string)."""
    return spec.strip() if isinstance(spec, str) else ""


def model_target(spec: str, what: str, error: type[Exception], forms: str) -> str:
    """The target of ``"model:TARGET"``: an alias, path or id, or :data:`SELF` (lower-cased).

    Raises ``error`` when the target is empty; ``what`` names the spec in the message
    (``"judge spec"``) and ``forms`` lists the accepted forms.
    """
    target = spec_text(spec)[len("model:") :].strip()
    if not target:
        raise error(f"{what} {spec!r} names no model; accepted forms: {forms}")
    return SELF if target.lower() == SELF else target


def openai_target(spec: str, what: str, error: type[Exception]) -> tuple[str, str | None]:
    """``"openai:URL[#model]"`` -> (validated base URL, model or None), else ``error``."""
    try:
        return split_url_model(spec_text(spec)[len("openai:") :])
    except OpenAIError as exc:
        raise error(f"{what} {spec!r}: {exc}") from exc
