"""Reading JSON that a user hands in, with limits: one helper for every file and option.

Python's parser recurses once per nesting level, so a file of 100,000 ``[`` ends in a
``RecursionError`` traceback instead of an error message; and nothing bounds what a file may
make the process hold. :func:`parse_json` refuses text over ``max_chars`` or nested deeper than
``max_depth`` before parsing, with a message that names the input and the limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import PersonaCompassError

MAX_DEPTH = 100  # no file or request of ours nests deeper than a handful of levels
MAX_CHARS = 256 * 1024 * 1024

# A JSON string (skipped whole, so brackets inside strings do not count) or a bracket.
_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class JSONInputError(PersonaCompassError, ValueError):
    """JSON input that is invalid, too large or nested too deeply."""


def check_depth(text: str, where: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise when ``text`` nests arrays/objects deeper than ``max_depth`` (linear scan)."""
    depth = 0
    for match in _BRACKETS.finditer(text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            if depth > max_depth:
                raise JSONInputError(
                    f"{where} nests JSON deeper than {max_depth} levels (at character "
                    f"{match.start()}); no persona-compass input needs that, so it is refused"
                )
        elif char in "]}":
            depth -= 1


def parse_json(
    text: str | bytes,
    where: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_chars: int = MAX_CHARS,
) -> Any:
    """Parse JSON text from a user; every failure is a :class:`JSONInputError` naming ``where``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"{where} is not UTF-8 text ({exc})") from None
    if len(text) > max_chars:
        raise JSONInputError(
            f"{where} has {len(text):,} characters, over the limit of {max_chars:,}; "
            "split it into smaller files"
        )
    check_depth(text, where, max_depth)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONInputError(
            f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:  # a deeper parser limit than ours: still an error, not a crash
        raise JSONInputError(f"{where} nests JSON too deeply to read") from None
