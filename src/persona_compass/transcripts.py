"""Read conversations from files: the research release's transcripts, OpenAI messages, JSONL.

Accepted layouts (detected from the content, not the file name):

- research transcript: ``{"model": ..., "conversation": [{"role", "content"}, ...], ...}``
- OpenAI request body: ``{"messages": [...], ...}``
- a bare messages list: ``[{"role", "content"}, ...]``
- JSONL, one message per line (one conversation), or one transcript object per line
  (one conversation per line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TranscriptError

ROLES = ("system", "user", "assistant")
_CONVERSATION_KEYS = ("conversation", "messages")


@dataclass(frozen=True)
class Transcript:
    """One conversation read from a file, with whatever metadata the file carried."""

    messages: list[dict[str, str]]
    source: str
    model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _check_messages(raw: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise TranscriptError(f"{where}: expected a non-empty list of messages")
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise TranscriptError(
                f"{where}: message {i} must be an object with 'role' and 'content', got {msg!r:.80}"
            )
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise TranscriptError(
                f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise TranscriptError(f"{where}: message {i} content must be a string")
        messages.append({"role": role, "content": content})
    return messages


def _from_object(obj: Any, where: str) -> Transcript:
    if isinstance(obj, list):
        return Transcript(_check_messages(obj, where), where)
    if isinstance(obj, dict):
        for key in _CONVERSATION_KEYS:
            if key in obj:
                meta = {k: v for k, v in obj.items() if k not in (key, "model")}
                model = obj.get("model")
                return Transcript(
                    _check_messages(obj[key], where),
                    where,
                    model if isinstance(model, str) else None,
                    meta,
                )
    raise TranscriptError(
        f"{where}: not a known transcript layout; expected a messages list, or an object with "
        "'conversation' (research transcript) or 'messages' (OpenAI body)"
    )


def load_transcripts(path: str | Path) -> list[Transcript]:
    """Read every conversation in a file (``.json`` or ``.jsonl``), validated.

    Raises:
        TranscriptError: naming the file (and line), the problem and the expected layout.
    """
    path = Path(path)
    if not path.is_file():
        raise TranscriptError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TranscriptError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    try:
        return [_from_object(json.loads(text), str(path))]
    except json.JSONDecodeError:
        pass  # maybe JSONL
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise TranscriptError(f"{path}: the file is empty")
    objects = []
    for n, line in lines:
        try:
            objects.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TranscriptError(
                f"{path}:{n}: invalid JSON ({exc.msg}); expected JSON or one JSON object per line"
            ) from None
    if all(isinstance(o, dict) and "role" in o for _, o in objects):
        return [Transcript(_check_messages([o for _, o in objects], str(path)), str(path))]
    return [_from_object(o, f"{path}:{n}") for n, o in objects]
