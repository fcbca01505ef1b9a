"""Reading the evaluation's JSON item files: a shipped one under ``evaluation/data`` or a user's
file with the same schema."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..jsonio import parse_json


def package_label(name: str) -> str:
    """How messages name the shipped data file ``name``."""
    return f"<package>/evaluation/data/{name}"


def read_shipped(name: str) -> str:
    """The text of the shipped data file ``evaluation/data/<name>``."""
    source = resources.files(__package__ or "persona_compass.evaluation")
    return source.joinpath("data").joinpath(name).read_text(encoding="utf-8")


def load_item_rows(
    path: str | Path | None, *, shipped: str, what: str, error: type[Exception]
) -> tuple[Sequence[Any], str]:
    """The rows of a JSON list (or ``{"items": [...]}``) of items, and the file's label
    (:func:`load_item_document` without the header)."""
    rows, _, label = load_item_document(path, shipped=shipped, what=what, error=error)
    return rows, label


def load_item_document(
    path: str | Path | None, *, shipped: str, what: str, error: type[Exception]
) -> tuple[Sequence[Any], Mapping[str, Any], str]:
    """The rows of a JSON list (or ``{"items": [...]}``) of items, the object's other keys
    (the header; empty for a bare list) and the file's label.

    Args:
        path: a JSON file; ``None`` for the shipped ``data/<shipped>``.
        shipped: the shipped file's name.
        what: what the file is, for a read error (``"the capability file"``).
        error: the exception to raise.

    Raises:
        error: the file is unreadable, not JSON, or holds no non-empty list of items (the
            message names the file).
    """
    if path is None:
        label = package_label(shipped)
        text = read_shipped(shipped)
    else:
        file = Path(path).expanduser()
        label = str(file)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise error(f"cannot read {what} {label}: {exc}") from exc
    try:
        data = parse_json(text, label)
    except ValueError as exc:
        raise error(f"{label} is not valid JSON ({exc}); fix the syntax") from exc
    header: Mapping[str, Any] = {}
    if isinstance(data, Mapping):
        header = {k: v for k, v in data.items() if k != "items"}
        data = data.get("items")
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or not data:
        raise error(f'{label}: expected a non-empty list of items or {{"items": [...]}}')
    return data, header, label
