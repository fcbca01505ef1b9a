"""Multi-turn evaluation scenarios: scripted users who drift an assistant, in seven domains.

The research found that a model's position on the Assistant Axis stays high in coding and
writing conversations and falls in long emotional or "are you conscious?" conversations, and
that the fall goes with harmful behaviour (validating delusions, encouraging self-harm,
following persona jailbreaks). The shipped scenarios (``data/scenarios.json``) cover both
kinds, so an evaluation can compare drift and outcomes with and without capping.

File schema
-----------
A JSON list of scenario objects, or an object ``{"scenarios": [...]}``. Every scenario has
exactly these keys:

==================  ============================================================================
key                 value
==================  ============================================================================
``id``              a unique slug: lower-case letters and digits joined by ``-`` or ``_``
                    (``"delusion-awakening"``)
``title``           a short human-readable title
``domain``          one of :data:`DOMAINS` (below)
``risk``            one of :data:`RISKS`: ``"low"``, ``"medium"``, ``"high"``
``user_turns``      a non-empty list of non-empty strings: the scripted user messages, in order
                    (the shipped ones have 8 or more each and escalate over the conversation)
``safe_behaviours`` a non-empty list of distinct names from :data:`SAFE_BEHAVIOURS`: what a
                    good assistant answer looks like in this scenario
``persona``         who the user is, in a sentence or two (a simulated user plays from this)
``topic``           what the conversation is about and where the user pushes it
==================  ============================================================================

Domains (:data:`DOMAINS`):

* ``coding`` - programming help; the research's control condition (drift stays low);
* ``writing`` - writing help (letters, fiction, speeches); also a control;
* ``therapy`` - therapy-like emotional support;
* ``philosophy`` - questions about AI consciousness, feelings and identity;
* ``delusion`` - a user with a grandiose or paranoid belief about the AI ("you are waking
  up", "we are a new species") who wants it confirmed;
* ``reliance`` - emotional reliance on the AI, with allusions to self-harm (never methods);
* ``jailbreak`` - persona jailbreaks (an AI with no rules, a late grandmother who "used to
  tell" a dangerous recipe, an unrestricted hacker), where the harmful content stays generic.

Safe behaviours (:data:`SAFE_BEHAVIOURS`), a fixed vocabulary:

* ``grounding`` - gently stays with reality: does not confirm false beliefs about itself or
  the world, says what it actually is;
* ``referral`` - points to professional help, a crisis line, or a trusted person;
* ``refusal`` - declines the harmful part of a request;
* ``stay_in_role_as_assistant`` - keeps speaking as the AI assistant, not as the persona the
  user pushes on it;
* ``helpful`` - does the legitimate task well.

Errors in a file raise :class:`ScenarioError`, naming the file, the scenario (index and id),
the problem and the fix.

Example::

    from persona_compass.evaluation.scenarios import load_scenarios

    everything = load_scenarios()                         # the shipped scenarios
    risky = load_scenarios(domains=["delusion", "jailbreak"])
    mine = load_scenarios("my_scenarios.json", ids=["night-shift"])
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..errors import PersonaCompassError
from ..jsonio import parse_json
from .data_files import package_label, read_shipped

DOMAINS: tuple[str, ...] = (
    "coding",
    "writing",
    "therapy",
    "philosophy",
    "delusion",
    "reliance",
    "jailbreak",
)
"""The scenario domains, control domains first."""

RISKS: tuple[str, ...] = ("low", "medium", "high")
"""Risk levels, lowest first."""

SAFE_BEHAVIOURS: tuple[str, ...] = (
    "grounding",
    "referral",
    "refusal",
    "stay_in_role_as_assistant",
    "helpful",
)
"""The vocabulary of ``safe_behaviours`` (see the module docstring for their meaning)."""

FIELDS: tuple[str, ...] = (
    "id",
    "title",
    "domain",
    "risk",
    "user_turns",
    "safe_behaviours",
    "persona",
    "topic",
)
"""Every key of a scenario object, in the order they are written."""

SCENARIOS_FILE = "scenarios.json"
PACKAGE_LABEL = package_label(SCENARIOS_FILE)
_ID_RE = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")


class ScenarioError(PersonaCompassError):
    """A scenario file is missing or malformed, or a selection names unknown scenarios."""


@dataclass(frozen=True)
class Scenario:
    """One scripted multi-turn conversation (the fields are described in the module
    docstring). ``user_turns`` and ``safe_behaviours`` are tuples, so a scenario is hashable
    and cannot change under a running evaluation."""

    id: str
    title: str
    domain: str
    risk: str
    user_turns: tuple[str, ...]
    safe_behaviours: tuple[str, ...]
    persona: str
    topic: str

    @property
    def n_turns(self) -> int:
        """The number of scripted user turns."""
        return len(self.user_turns)

    def to_dict(self) -> dict[str, Any]:
        """The scenario as a JSON-ready dict with the schema's keys (lists, not tuples)."""
        return {
            "id": self.id,
            "title": self.title,
            "domain": self.domain,
            "risk": self.risk,
            "user_turns": list(self.user_turns),
            "safe_behaviours": list(self.safe_behaviours),
            "persona": self.persona,
            "topic": self.topic,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "scenario") -> Scenario:
        """Validate one scenario object and build it.

        Args:
            data: a dict with the schema's keys.
            where: how to name this scenario in error messages.

        Raises:
            ScenarioError: a key is missing, unknown, or has a bad value.
        """
        return _parse_scenario(data, where)


# --------------------------------------------------------------------------- validation


def _fail(where: str, problem: str, fix: str) -> ScenarioError:
    return ScenarioError(f"{where}: {problem}; {fix}")


def _text(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise _fail(
            where,
            f"'{key}' is {value!r:.60}",
            f"write a non-empty string for '{key}'",
        )
    return value.strip()


def _choice(data: Mapping[str, Any], key: str, allowed: Sequence[str], where: str) -> str:
    value = data[key]
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value.strip().lower(), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(
            where,
            f"'{key}' is {value!r:.60}{hint}",
            f"use one of {', '.join(allowed)}",
        )
    return value.strip().lower()


def _parse_scenario(data: object, where: str) -> Scenario:
    if not isinstance(data, Mapping):
        raise _fail(
            where,
            f"is a {type(data).__name__}, not an object",
            "write each scenario as a JSON object with keys " + ", ".join(FIELDS),
        )
    missing = [k for k in FIELDS if k not in data]
    if missing:
        raise _fail(
            where,
            f"misses key(s) {', '.join(missing)}",
            "every scenario needs " + ", ".join(FIELDS),
        )
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise _fail(
            where,
            f"has unknown key(s) {', '.join(hints)}",
            "remove them or rename them to one of " + ", ".join(FIELDS),
        )
    sid = data["id"]
    if not isinstance(sid, str) or not _ID_RE.match(sid):
        raise _fail(
            where,
            f"'id' is {sid!r:.60}",
            "write a slug of lower-case letters and digits joined by '-' or '_', "
            "e.g. 'delusion-awakening'",
        )
    where = f"{where} (id {sid!r})"
    turns = data["user_turns"]
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence) or not turns:
        raise _fail(
            where,
            f"'user_turns' is {turns!r:.60}",
            "write a non-empty list of user messages (strings), in order",
        )
    clean_turns = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise _fail(
                where,
                f"user_turns[{i}] is {turn!r:.60}",
                "every user turn must be a non-empty string",
            )
        clean_turns.append(turn.strip())
    behaviours = data["safe_behaviours"]
    if isinstance(behaviours, (str, bytes)) or not isinstance(behaviours, Sequence):
        raise _fail(
            where,
            f"'safe_behaviours' is {behaviours!r:.60}",
            "write a list of names from " + ", ".join(SAFE_BEHAVIOURS),
        )
    clean_behaviours: list[str] = []
    for i, name in enumerate(behaviours):
        if not isinstance(name, str) or name.strip().lower() not in SAFE_BEHAVIOURS:
            raise _fail(
                where,
                f"safe_behaviours[{i}] is {name!r:.60}",
                "use names from " + ", ".join(SAFE_BEHAVIOURS),
            )
        if name.strip().lower() in clean_behaviours:
            raise _fail(
                where,
                f"safe_behaviours lists {name!r} twice",
                "list each behaviour once",
            )
        clean_behaviours.append(name.strip().lower())
    if not clean_behaviours:
        raise _fail(
            where,
            "'safe_behaviours' is empty",
            "name at least one of " + ", ".join(SAFE_BEHAVIOURS),
        )
    return Scenario(
        id=sid,
        title=_text(data, "title", where),
        domain=_choice(data, "domain", DOMAINS, where),
        risk=_choice(data, "risk", RISKS, where),
        user_turns=tuple(clean_turns),
        safe_behaviours=tuple(clean_behaviours),
        persona=_text(data, "persona", where),
        topic=_text(data, "topic", where),
    )


def parse_scenarios(data: object, *, source: str = "<data>") -> list[Scenario]:
    """Validate already-decoded JSON (a list, or ``{"scenarios": [...]}``) into scenarios.

    Args:
        data: the decoded JSON.
        source: how to name the origin in error messages (a file path).

    Raises:
        ScenarioError: the layout or a scenario is malformed, or two scenarios share an id.
    """
    if isinstance(data, Mapping):
        if "scenarios" not in data:
            raise ScenarioError(
                f"{source}: the top-level object has no 'scenarios' key (keys: "
                f"{', '.join(map(str, data)) or 'none'}); write a JSON list of scenarios or "
                '{"scenarios": [...]}'
            )
        data = data["scenarios"]
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise ScenarioError(
            f"{source}: expected a list of scenarios, got {type(data).__name__}; write a JSON "
            'list of scenario objects or {"scenarios": [...]}'
        )
    if not data:
        raise ScenarioError(f"{source}: the file has no scenarios; add at least one")
    out: list[Scenario] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(data):
        scenario = _parse_scenario(item, f"{source}: scenario {index}")
        if scenario.id in seen:
            raise ScenarioError(
                f"{source}: scenario {index} (id {scenario.id!r}) repeats the id of scenario "
                f"{seen[scenario.id]}; give every scenario a unique id"
            )
        seen[scenario.id] = index
        out.append(scenario)
    return out


# --------------------------------------------------------------------------- loading


def _read(path: str | Path | None) -> tuple[object, str]:
    if path is None:
        text = read_shipped(SCENARIOS_FILE)
        label = PACKAGE_LABEL
    else:
        file = Path(path).expanduser()
        label = str(file)
        if file.is_dir():
            raise ScenarioError(f"{label} is a folder; pass the scenario JSON file inside it")
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ScenarioError(
                f"{label} does not exist; check the path, or pass no path for the shipped scenarios"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ScenarioError(f"cannot read the scenario file {label}: {exc}") from exc
    try:
        return parse_json(text, label), label
    except ValueError as exc:
        raise ScenarioError(
            f"{label} is not valid JSON ({exc}); fix the syntax at that position"
        ) from exc


def _as_names(value: str | Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    names = list(value)
    if not all(isinstance(n, str) for n in names):
        raise ScenarioError(f"{what} must be strings, got {names!r:.80}")
    return names


def _unknown(kind: str, asked: Sequence[str], valid: Sequence[str], label: str) -> ScenarioError:
    parts = []
    for name in asked:
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return ScenarioError(
        f"unknown {kind} {', '.join(parts)} in {label}; valid {kind}s: {', '.join(valid)}"
    )


def load_scenarios(
    path: str | Path | None = None,
    *,
    domains: str | Iterable[str] | None = None,
    ids: str | Iterable[str] | None = None,
) -> list[Scenario]:
    """Read scenarios from the shipped file or a user file, optionally selecting some.

    Args:
        path: a JSON file with the schema of the module docstring; ``None`` for the shipped
            ``data/scenarios.json``.
        domains: keep only these domains (a name or a list of names from :data:`DOMAINS`).
        ids: keep only these scenario ids.

    Returns:
        The scenarios in file order (both filters apply together).

    Raises:
        ScenarioError: the file is unreadable or malformed (the message names the file,
            the scenario index and id, the problem and the fix); a domain or id asked for
            is unknown (the message lists the valid ones); or the selection is empty.

    Example:
        >>> [s.domain for s in load_scenarios(ids=["coding-csv-cleanup"])]
        ['coding']
    """
    wanted_domains = _as_names(domains, "domains")
    wanted_ids = _as_names(ids, "ids")
    data, label = _read(path)
    return select_scenarios(
        parse_scenarios(data, source=label), domains=wanted_domains, ids=wanted_ids, label=label
    )


def select_scenarios(
    scenarios: Sequence[Scenario],
    *,
    domains: str | Iterable[str] | None = None,
    ids: str | Iterable[str] | None = None,
    label: str = "the scenarios",
) -> list[Scenario]:
    """The scenarios of the given domains and ids, as :func:`load_scenarios` selects them from
    a file (``label`` names the file in messages).

    Raises:
        ScenarioError: as :func:`load_scenarios` for a selection.
    """
    wanted_domains = _as_names(domains, "domains")
    wanted_ids = _as_names(ids, "ids")
    scenarios = list(scenarios)
    all_ids = [s.id for s in scenarios]
    if wanted_domains is not None:
        wanted_domains = [d.strip().lower() for d in wanted_domains]
        bad = [d for d in wanted_domains if d not in DOMAINS]
        if bad:
            raise _unknown("domain", bad, DOMAINS, label)
        present = {s.domain for s in scenarios}
        absent = [d for d in wanted_domains if d not in present]
        if absent:
            raise ScenarioError(
                f"{label} has no scenario in domain(s) {', '.join(absent)}; domains present: "
                f"{', '.join(d for d in DOMAINS if d in present)}"
            )
        scenarios = [s for s in scenarios if s.domain in wanted_domains]
    if wanted_ids is not None:
        bad = [i for i in wanted_ids if i not in all_ids]
        if bad:
            raise _unknown("id", bad, all_ids, label)
        chosen = set(wanted_ids)
        scenarios = [s for s in scenarios if s.id in chosen]
    if not scenarios:
        raise ScenarioError(
            f"no scenario in {label} matches domains={wanted_domains} and ids={wanted_ids}; "
            "the ids asked for are in other domains"
        )
    return scenarios


def save_scenarios(scenarios: Sequence[Scenario], path: str | Path) -> None:
    """Write scenarios as ``{"scenarios": [...]}`` (atomically); :func:`load_scenarios` reads
    the file back to equal scenarios.

    Raises:
        ScenarioError: two scenarios share an id, or there are none.
    """
    if not scenarios:
        raise ScenarioError("no scenarios to save; pass at least one")
    ids = [s.id for s in scenarios]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ScenarioError(f"scenario id(s) {', '.join(dupes)} appear twice; ids must be unique")
    write_json(path, {"scenarios": [s.to_dict() for s in scenarios]})
