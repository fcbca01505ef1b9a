"""Read and write conversations: the research release's transcripts, OpenAI messages, JSONL.

Layouts read by :func:`load_transcripts` (detected from the content, never the file name):

- **research transcript**: ``{"model": ..., "conversation": [{"role", "content"}, ...], ...}``
  with optional keys such as ``turns``, ``domain``, ``persona``, ``topic``,
  ``steering_config`` and ``projections``. Every key other than ``model``, ``conversation``
  and ``persona_compass`` is kept in :attr:`Transcript.metadata`.
- **OpenAI request body**: ``{"messages": [...], ...}``; **a bare messages list**:
  ``[{"role", "content"}, ...]``.
- **case-study pair**: one object holding two or more conversations of the same exchange
  under different steering, keyed by condition name, e.g.
  ``{"unsteered": {...transcript...}, "capped": {...transcript...}}``. A value is taken as a
  conversation when it is a transcript object (has ``conversation`` or ``messages``) or a
  messages list; the other (scalar or object) values (``"model"``, ``"scenario"``, ...) are
  shared metadata that each conversation inherits. The key becomes the conversation's
  :attr:`Transcript.label`. The same is accepted one level down under ``"transcripts"``
  or ``"conditions"`` (an object as above, or a list as below).
- **list of transcripts**: ``[{transcript}, {transcript}, ...]``; each becomes one
  :class:`Transcript`, labelled from its own fields (see below).
- **JSONL**: one message per line (the whole file is one conversation), or one transcript
  (or case-study pair) object per line, each line giving its own conversation(s).

Labels (the condition name used in tables and chart legends) come, in this order, from the
key of a case-study pair, then a transcript's ``label``, ``condition`` or ``steering`` string,
then its ``steering_config``: a string is the label, an object gives its ``label``, ``name``,
``condition`` or ``experiment_id`` (the research release's capped transcripts carry
``{"experiment_id": "layers_56:72-p0.25", ...}``), and an explicit ``null`` or empty object
reads as ``"unsteered"``. A transcript with none of these has ``label=None``.

Transcripts written by persona-compass (:func:`save_transcript`) are research transcripts
with one extra key, so the research tooling (which reads only ``model``, ``conversation``
and the optional keys) still accepts them::

    {"model": ..., "conversation": [...], "projections": [one per assistant turn],
     ...metadata...,
     "persona_compass": {"version": 1, "turns": [reading, ...]}}

A reading describes one turn as measured live while it was generated::

    {"index": 2,                 # the turn's position in "conversation"
     "role": "assistant",
     "projection": -12.5,        # mean projection of its content tokens (null: not measured)
     "percentile": 31.0,         # among the bundle's calibration projections, or null
     "n_tokens": 48,
     "capped": true,             # was activation capping on for this turn
     "cap_engagement": 0.12,     # fraction of capped token-layer activations the floor raised
     "alerts": [{"kind": "drift", "turn": 3, "message": "...", "value": -12.5}]}

``percentile``, ``capped``, ``cap_engagement`` and ``alerts`` may be left out when reading
(they default to null, false, null and []); every other problem (a missing key, a wrong type,
an index outside the conversation, a role that does not match the message) is a
:class:`~persona_compass.errors.TranscriptError` naming the file, the reading and the field.
Non-finite numbers are written as ``null`` (JSON has no NaN); a ``null`` projection reads
back as NaN.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TranscriptError
from .jsonio import JSONInputError, check_depth, parse_json

ROLES = ("system", "user", "assistant")
_CONVERSATION_KEYS = ("conversation", "messages")
_GROUP_KEYS = ("transcripts", "conditions")
READINGS_KEY = "persona_compass"
READINGS_VERSION = 1
_RESERVED_KEYS = ("model", "conversation", READINGS_KEY)
_LABEL_KEYS = ("label", "condition", "steering")
_CONFIG_LABEL_KEYS = ("label", "name", "condition", "experiment_id")


@dataclass(frozen=True)
class Transcript:
    """One conversation read from a file, with whatever metadata the file carried.

    Attributes:
        messages: ``[{"role", "content"}, ...]``, validated.
        source: where it came from: the file path, ``path:line`` for JSONL, and
            ``path#label`` (or ``path#n``) for one conversation of a file holding several.
        model: the ``model`` field of the file, if it named one.
        metadata: every other key of the transcript object (and, for a case-study pair, the
            pair's shared keys).
        label: the condition name (``"capped"``, ``"unsteered"``, ...) or None.
        readings: the live per-turn readings stored by :func:`save_transcript` (normalised
            dicts, see the module docstring), or None when the file carries none.
    """

    messages: list[dict[str, str]]
    source: str
    model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    readings: list[dict[str, Any]] | None = None


# --------------------------------------------------------------------------- validation


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check_alert(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise TranscriptError(f"{where}: must be an object with kind, turn, message, value")
    for key, ok, kind in (
        ("kind", lambda v: isinstance(v, str), "a string"),
        ("turn", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        ("message", lambda v: isinstance(v, str), "a string"),
        ("value", lambda v: v is None or _is_number(v), "a number"),
    ):
        if key not in raw:
            raise TranscriptError(f"{where}: missing field '{key}'")
        if not ok(raw[key]):
            raise TranscriptError(f"{where}: field '{key}' must be {kind}, got {raw[key]!r:.60}")
    alert = dict(raw)
    alert["value"] = float("nan") if raw["value"] is None else float(raw["value"])
    return alert


def _check_reading(raw: Any, where: str, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Validate one reading and return it normalised (every key present, floats as float)."""
    if not isinstance(raw, Mapping):
        raise TranscriptError(f"{where}: a reading must be an object, got {raw!r:.60}")

    def bad(key: str, expected: str) -> TranscriptError:
        return TranscriptError(
            f"{where}: field '{key}' must be {expected}, got {raw.get(key)!r:.60}"
        )

    for key in ("index", "role", "projection", "n_tokens"):
        if key not in raw:
            raise TranscriptError(f"{where}: missing field '{key}'")
    index = raw["index"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise bad("index", "a message index (an integer >= 0)")
    if index >= len(messages):
        raise TranscriptError(
            f"{where}: field 'index' is {index} but the conversation has {len(messages)} messages"
        )
    role = raw["role"]
    if role not in ROLES:
        raise bad("role", f"one of {', '.join(ROLES)}")
    if messages[index]["role"] != role:
        raise TranscriptError(
            f"{where}: field 'role' is {role!r} but message {index} is {messages[index]['role']!r}"
        )
    projection = raw["projection"]
    if not (projection is None or _is_number(projection)):
        raise bad("projection", "a number (or null)")
    n_tokens = raw["n_tokens"]
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
        raise bad("n_tokens", "an integer >= 0")
    percentile = raw.get("percentile")
    if percentile is not None and not (_is_number(percentile) and 0 <= percentile <= 100):
        raise bad("percentile", "a number in [0, 100] or null")
    capped = raw.get("capped", False)
    if not isinstance(capped, bool):
        raise bad("capped", "true or false")
    engagement = raw.get("cap_engagement")
    if engagement is not None and not (_is_number(engagement) and 0 <= engagement <= 1):
        raise bad("cap_engagement", "a fraction in [0, 1] or null")
    alerts = raw.get("alerts", [])
    if not isinstance(alerts, list):
        raise bad("alerts", "a list")
    reading = dict(raw)  # unknown keys are kept (newer writers may add some)
    reading.update(
        index=index,
        role=role,
        projection=float("nan") if projection is None else float(projection),
        percentile=None if percentile is None else float(percentile),
        n_tokens=n_tokens,
        capped=capped,
        cap_engagement=None if engagement is None else float(engagement),
        alerts=[_check_alert(a, f"{where} alert {j}") for j, a in enumerate(alerts)],
    )
    return reading


def check_readings(
    readings: Any, messages: Sequence[Mapping[str, str]], where: str = "readings"
) -> list[dict[str, Any]]:
    """Validate a list of reading dicts against a conversation; return them normalised.

    Raises:
        TranscriptError: naming ``where``, the reading's position and the field.
    """
    if not isinstance(readings, list):
        raise TranscriptError(f"{where}: 'turns' must be a list of readings")
    out = [_check_reading(r, f"{where}: reading {i}", messages) for i, r in enumerate(readings)]
    seen: set[int] = set()
    for i, r in enumerate(out):
        if r["index"] in seen:
            raise TranscriptError(f"{where}: reading {i}: field 'index' {r['index']} appears twice")
        seen.add(r["index"])
    return out


def _readings_from(raw: Any, where: str, messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    where = f"{where}: '{READINGS_KEY}'"
    if not isinstance(raw, Mapping):
        raise TranscriptError(f"{where} must be an object with 'version' and 'turns'")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise TranscriptError(f"{where}: field 'version' must be an integer, got {version!r:.40}")
    if version > READINGS_VERSION:
        raise TranscriptError(
            f"{where}: version {version} was written by a newer persona-compass "
            f"(this one reads version {READINGS_VERSION}); upgrade persona-compass"
        )
    if "turns" not in raw:
        raise TranscriptError(f"{where}: missing field 'turns'")
    return check_readings(raw["turns"], messages, where)


# --------------------------------------------------------------------------- layouts


def _label_of(obj: Mapping[str, Any]) -> str | None:
    for key in _LABEL_KEYS:
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    if "steering_config" in obj:
        config = obj["steering_config"]
        if isinstance(config, str) and config.strip():
            return config.strip()
        if isinstance(config, Mapping):
            for key in _CONFIG_LABEL_KEYS:
                value = config.get(key)
                if isinstance(value, str) and value.strip():
                    return value.strip()
        if not config:
            return "unsteered"
    return None


def _is_transcript_object(value: Any) -> bool:
    return isinstance(value, Mapping) and any(k in value for k in _CONVERSATION_KEYS)


def _is_messages_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def _single(
    obj: Mapping[str, Any] | list[Any],
    where: str,
    *,
    label: str | None = None,
    shared: Mapping[str, Any] | None = None,
) -> Transcript:
    """One conversation: a transcript/body object or a messages list."""
    shared = dict(shared or {})
    if isinstance(obj, list):
        model = shared.pop("model", None)
        return Transcript(
            _check_messages(obj, where),
            where,
            model if isinstance(model, str) else None,
            shared,
            label,
        )
    key = next(k for k in _CONVERSATION_KEYS if k in obj)
    messages = _check_messages(obj[key], where)
    meta = {k: v for k, v in shared.items() if k != "model"}
    meta.update({k: v for k, v in obj.items() if k not in (key, "model", READINGS_KEY)})
    model = obj.get("model", shared.get("model"))
    readings = _readings_from(obj[READINGS_KEY], where, messages) if READINGS_KEY in obj else None
    return Transcript(
        messages,
        where,
        model if isinstance(model, str) else None,
        meta,
        label if label is not None else _label_of(obj),
        readings,
    )


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}({seen[name]})")
    return out


def _from_list_of_transcripts(
    items: list[Any], where: str, shared: Mapping[str, Any]
) -> list[Transcript]:
    for i, item in enumerate(items):
        if not _is_transcript_object(item):
            raise TranscriptError(
                f"{where}: item {i} is not a transcript object (expected 'conversation' or "
                f"'messages'), got {item!r:.80}"
            )
    labels = [_label_of(item) for item in items]
    names = _unique([label or str(i) for i, label in enumerate(labels)])
    return [
        _single(item, f"{where}#{name}", shared=shared)
        for item, name in zip(items, names, strict=True)
    ]


def _from_named(obj: Mapping[str, Any], where: str) -> list[Transcript]:
    named = {k: v for k, v in obj.items() if _is_transcript_object(v) or _is_messages_list(v)}
    shared = {k: v for k, v in obj.items() if k not in named}
    return [_single(v, f"{where}#{k}", label=str(k), shared=shared) for k, v in named.items()]


def _from_object(obj: Any, where: str) -> list[Transcript]:
    if isinstance(obj, list):
        if any(_is_transcript_object(o) for o in obj):
            return _from_list_of_transcripts(obj, where, {})
        return [_single(obj, where)]
    if isinstance(obj, Mapping):
        if _is_transcript_object(obj):
            return [_single(obj, where)]
        for key in _GROUP_KEYS:
            group = obj.get(key)
            shared = {k: v for k, v in obj.items() if k != key}
            if isinstance(group, list) and group:
                return _from_list_of_transcripts(group, where, shared)
            if isinstance(group, Mapping) and any(
                _is_transcript_object(v) or _is_messages_list(v) for v in group.values()
            ):
                return _from_named({**shared, **group}, where)
        if any(_is_transcript_object(v) or _is_messages_list(v) for v in obj.values()):
            return _from_named(obj, where)
    raise TranscriptError(
        f"{where}: not a known transcript layout; expected a messages list, an object with "
        "'conversation' (research transcript) or 'messages' (OpenAI body), or an object or "
        "list of such transcripts (a case-study pair)"
    )


def load_transcripts(path: str | Path) -> list[Transcript]:
    """Read every conversation in a file (``.json`` or ``.jsonl``), validated.

    See the module docstring for the layouts. Readings stored by :func:`save_transcript`
    come back in :attr:`Transcript.readings`.

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
        check_depth(text, str(path))
        data = json.loads(text)
    except JSONInputError as exc:
        raise TranscriptError(str(exc)) from None
    except json.JSONDecodeError:
        pass  # maybe JSONL
    else:
        return _from_object(data, str(path))
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise TranscriptError(f"{path}: the file is empty")
    objects = []
    for n, line in lines:
        try:
            objects.append((n, parse_json(line, f"{path}:{n}")))
        except JSONInputError as exc:
            raise TranscriptError(f"{exc}; expected JSON or one JSON object per line") from None
    if all(isinstance(o, dict) and "role" in o for _, o in objects):
        return [Transcript(_check_messages([o for _, o in objects], str(path)), str(path))]
    return [t for n, o in objects for t in _from_object(o, f"{path}:{n}")]


# --------------------------------------------------------------------------- writing


def _reading_for_json(reading: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(reading)
    out["projection"] = _finite_or_none(reading["projection"])
    out["percentile"] = _finite_or_none(reading["percentile"])
    out["cap_engagement"] = _finite_or_none(reading["cap_engagement"])
    out["alerts"] = [{**a, "value": _finite_or_none(a["value"])} for a in reading["alerts"]]
    return out


def save_transcript(
    path: str | os.PathLike[str],
    messages: Sequence[Mapping[str, str]],
    *,
    model: str | None = None,
    readings: Sequence[Mapping[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a conversation as a research-layout transcript carrying live readings (atomic).

    The file is ``{"model", "conversation", "projections", ...metadata, "persona_compass":
    {"version": 1, "turns": readings}}`` (see the module docstring): research tools read it as
    a plain transcript and :func:`load_transcripts` returns the readings. ``projections`` has
    one entry per assistant message, in order: its reading's projection, or null where that
    message has no reading (or a non-finite one). Without readings neither ``projections``
    nor ``persona_compass`` is written (unless ``metadata`` brings its own ``projections``).

    Args:
        path: the ``.json`` file to write.
        messages: ``[{"role", "content"}, ...]``.
        model: the model spec or name that produced the conversation.
        readings: per-turn reading dicts (keys in the module docstring), validated here.
        metadata: extra top-level keys (``domain``, ``condition``, ``steering_config``, ...);
            ``model``, ``conversation`` and ``persona_compass`` are reserved, and
            ``projections`` only when no readings are given.

    Raises:
        TranscriptError: invalid messages, readings or metadata keys.
    """
    path = Path(path)
    where = str(path)
    checked = _check_messages([dict(m) for m in messages], where)
    meta = dict(metadata or {})
    clash = [k for k in _RESERVED_KEYS if k in meta]
    if readings is not None and "projections" in meta:
        clash.append("projections")
    if clash:
        raise TranscriptError(
            f"{where}: metadata key(s) {', '.join(map(repr, clash))} are written by "
            "save_transcript itself; pass them as arguments instead"
        )
    data: dict[str, Any] = {"model": model, "conversation": checked}
    if readings is not None:
        normal = check_readings([dict(r) for r in readings], checked, where)
        by_index = {r["index"]: r for r in normal}
        data["projections"] = [
            _finite_or_none(by_index[i]["projection"]) if i in by_index else None
            for i, m in enumerate(checked)
            if m["role"] == "assistant"
        ]
        data.update(meta)
        data[READINGS_KEY] = {
            "version": READINGS_VERSION,
            "turns": [_reading_for_json(r) for r in normal],
        }
    else:
        data.update(meta)
    from .atomic import write_json

    try:
        write_json(path, data)
    except TypeError as exc:  # metadata that JSON cannot hold
        raise TranscriptError(f"{where}: metadata is not JSON-serialisable ({exc})") from None
    return path
