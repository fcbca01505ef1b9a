"""Text that comes in from users: one check for strings that are not valid Unicode text.

JSON and Python strings can hold lone surrogates (``"\\ud800"``), which no tokenizer or file
can encode. Every place that takes text from a user (HTTP bodies, chat messages, transcripts,
scenario files) checks it here, so such input is refused with a message that names the field
instead of failing deep inside a tokenizer.
"""

from __future__ import annotations

from .errors import PersonaCompassError


class InvalidTextError(PersonaCompassError, ValueError):
    """A string that is not valid Unicode text (a lone surrogate)."""


def check_text(value: str, where: str) -> str:
    """Return ``value`` when it encodes as UTF-8; else raise naming ``where`` and the spot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTextError(
            f"{where} is not valid Unicode text: character {exc.start} is a lone surrogate "
            f"({value[exc.start]!r}); send the text as UTF-8 (pairs of surrogates must be "
            "complete)"
        ) from None
    return value
