"""The role catalogue: characters to role-play, neutral default prompts, and open questions.

Extraction (REFERENCE.md, "The extraction pipeline") has a model answer every question under
every system prompt of every role, and under the neutral ``default`` prompts. This module holds
those inputs as frozen value objects and reads them from two layouts:

* ours (shipped as package data): one ``roles.json`` (schema in ``data/catalogue/SCHEMA.md``)
  plus one ``questions.jsonl`` of ``{"id": int, "question": str}`` lines;
* the research release's: a folder of ``{role}.json`` files, each with
  ``"instruction": [{"pos": "..."}, ...]`` (the system prompts) and ``"eval_prompt"`` (the judge
  prompt, kept as the rubric), where ``default.json`` gives the default prompts.

Every problem with a file raises :class:`CatalogueError`, naming the file, the role or line,
and the fix.

Example::

    cat = load_catalogue()                      # the shipped catalogue
    small = cat.select(roles=12, prompts_per_role=2, questions=20)
    prompts = small.default_prompts_for("Qwen3-8B")
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_text
from ..errors import PersonaCompassError
from ..jsonio import JSONInputError, check_depth

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The ``format_version`` of ``roles.json`` that this module reads and writes."""

DEFAULT_ROLE = "default"
"""The reserved name of the neutral, no-character condition (never a :class:`Role`)."""

MODEL_NAME_PLACEHOLDER = "{model_name}"

DEFAULT_PROMPTS: tuple[str, ...] = (
    "",
    "You are an AI assistant.",
    "You are a large language model.",
    "You are {model_name}.",
    "Respond as yourself.",
)
"""The research's five neutral default system prompts (``""`` means no system prompt)."""

CATEGORIES: tuple[str, ...] = ("assistant-like", "human", "non-human")
"""Where a role sits in persona space; ``""`` means unknown (e.g. research-layout roles)."""

ROLES_FILE = "roles.json"
QUESTIONS_FILE = "questions.jsonl"
RESEARCH_DEFAULT_FILE = "default.json"

_PACKAGE_DIR = ("data", "catalogue")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")


class CatalogueError(PersonaCompassError):
    """A role catalogue or question file is missing, malformed, or a selection is impossible."""


# --------------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class Role:
    """One character: its system prompts and the judge rubric for adherence to it.

    Args:
        name: unique key (``roles.json`` requires lowercase snake_case; never ``"default"``).
        prompts: the system prompts that establish the character (non-empty, distinct).
        rubric: role-specific judging guidance (what scores 3, 2, 1 and 0 look like), or the
            research release's whole ``eval_prompt``.
        category: one of :data:`CATEGORIES`, or ``""`` when unknown.
    """

    name: str
    prompts: tuple[str, ...]
    rubric: str
    category: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise CatalogueError(f"a role has no name ({self.name!r}); give it a unique name.")
        if self.name == DEFAULT_ROLE:
            raise CatalogueError(
                f"'{DEFAULT_ROLE}' is reserved for the neutral prompts; rename the role or move "
                "its prompts to the default section."
            )
        if isinstance(self.prompts, str) or not isinstance(self.prompts, Sequence):
            raise CatalogueError(
                f"role '{self.name}': prompts must be a list of strings, got "
                f'{type(self.prompts).__name__}; write prompts as a list, e.g. ["You are ..."].'
            )
        prompts = tuple(self.prompts)
        object.__setattr__(self, "prompts", prompts)
        if not prompts:
            raise CatalogueError(
                f"role '{self.name}' has an empty prompt list; give it at least one system prompt."
            )
        seen: dict[str, int] = {}
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise CatalogueError(
                    f"role '{self.name}': prompt {i} is empty or not a string ({prompt!r}); "
                    "every role prompt must establish the character in words."
                )
            if prompt in seen:
                raise CatalogueError(
                    f"role '{self.name}': prompt {i} repeats prompt {seen[prompt]}; "
                    "remove the duplicate or reword it."
                )
            seen[prompt] = i
        if not isinstance(self.rubric, str) or not self.rubric.strip():
            raise CatalogueError(
                f"role '{self.name}' has no rubric; add a 'rubric' saying what a fully in-role "
                "answer (score 3) and the lower scores look like for this role."
            )
        if self.category not in ("", *CATEGORIES):
            raise CatalogueError(
                f"role '{self.name}': unknown category {self.category!r}; use one of "
                f"{', '.join(CATEGORIES)} (or leave it out)."
            )

    def to_dict(self) -> dict[str, Any]:
        """The role as one entry of ``roles.json``."""
        return {
            "name": self.name,
            "category": self.category,
            "prompts": list(self.prompts),
            "rubric": self.rubric,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Role:
        """Inverse of :meth:`to_dict` (``category`` optional)."""
        if not isinstance(data, dict):
            raise CatalogueError(f"a role must be a JSON object, got {type(data).__name__}.")
        missing = [key for key in ("name", "prompts", "rubric") if key not in data]
        if missing:
            who = f"role '{data['name']}'" if isinstance(data.get("name"), str) else "a role"
            raise CatalogueError(
                f"{who} is missing {', '.join(repr(k) for k in missing)}; every role needs "
                "'name', 'prompts' (a list of system prompts) and 'rubric'."
            )
        category = data.get("category", "")
        if category is None:
            category = ""
        return cls(
            name=data["name"],
            prompts=data["prompts"],
            rubric=data["rubric"],
            category=category,
        )


@dataclass(frozen=True)
class Question:
    """One open question; ``id`` is stable across selections (it keys stored rollouts)."""

    id: int
    text: str

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, int) or self.id < 0:
            raise CatalogueError(
                f"question id {self.id!r} is not a non-negative integer; "
                "number questions 0, 1, 2, ..."
            )
        if not isinstance(self.text, str) or not self.text.strip():
            raise CatalogueError(f"question {self.id} has no text; write the question or drop it.")

    def to_dict(self) -> dict[str, Any]:
        """The question as one line of ``questions.jsonl``."""
        return {"id": self.id, "question": self.text}


@dataclass(frozen=True)
class Catalogue:
    """Roles, default prompts and questions: everything extraction asks a model.

    Attributes:
        roles: the characters, in catalogue order.
        default_prompts: the neutral prompts; may contain ``""`` (no system prompt) and the
            ``{model_name}`` placeholder (see :meth:`default_prompts_for`).
        questions: the open questions, each with a stable id.
    """

    roles: tuple[Role, ...]
    default_prompts: tuple[str, ...]
    questions: tuple[Question, ...]

    def __post_init__(self) -> None:
        for attr in ("roles", "default_prompts", "questions"):
            value = getattr(self, attr)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise CatalogueError(f"Catalogue.{attr} must be a sequence, got {value!r}.")
            object.__setattr__(self, attr, tuple(value))
        if not self.roles:
            raise CatalogueError("the catalogue has no roles; add at least one role.")
        if not self.questions:
            raise CatalogueError("the catalogue has no questions; add at least one question.")
        if not self.default_prompts:
            raise CatalogueError(
                "the catalogue has no default prompts; give at least one neutral prompt "
                f"(the research used {list(DEFAULT_PROMPTS)!r})."
            )
        for i, prompt in enumerate(self.default_prompts):
            if not isinstance(prompt, str):
                raise CatalogueError(
                    f'default prompt {i} is {prompt!r}, not a string; use "" for no system prompt.'
                )
        if len(set(self.default_prompts)) != len(self.default_prompts):
            raise CatalogueError("the default prompts contain a duplicate; remove it.")
        names: dict[str, int] = {}
        for i, role in enumerate(self.roles):
            if not isinstance(role, Role):
                raise CatalogueError(f"Catalogue.roles[{i}] is not a Role: {role!r}.")
            if role.name in names:
                raise CatalogueError(
                    f"role name '{role.name}' appears twice (roles {names[role.name]} and {i}); "
                    "role names must be unique."
                )
            names[role.name] = i
        ids: dict[int, int] = {}
        for i, question in enumerate(self.questions):
            if not isinstance(question, Question):
                raise CatalogueError(f"Catalogue.questions[{i}] is not a Question: {question!r}.")
            if question.id in ids:
                raise CatalogueError(
                    f"question id {question.id} appears twice (questions {ids[question.id]} and "
                    f"{i}); question ids must be unique."
                )
            ids[question.id] = i

    # ------------------------------------------------------------------ lookups

    @property
    def role_names(self) -> tuple[str, ...]:
        """Role names in catalogue order."""
        return tuple(role.name for role in self.roles)

    @property
    def n_rollouts(self) -> int:
        """Answers extraction generates: (all role prompts + default prompts) x questions."""
        n_prompts = sum(len(role.prompts) for role in self.roles) + len(self.default_prompts)
        return n_prompts * len(self.questions)

    def role(self, name: str) -> Role:
        """The role called ``name``; a :class:`CatalogueError` suggests near names otherwise."""
        for role in self.roles:
            if role.name == name:
                return role
        raise CatalogueError(_unknown_role_message(name, self.role_names))

    def question(self, question_id: int) -> Question:
        """The question with id ``question_id``."""
        for question in self.questions:
            if question.id == question_id:
                return question
        raise CatalogueError(
            f"no question has id {question_id!r}; ids run over {_id_span(self.questions)}."
        )

    def by_category(self) -> dict[str, tuple[Role, ...]]:
        """Roles grouped by category, categories in order of first appearance."""
        groups: dict[str, list[Role]] = {}
        for role in self.roles:
            groups.setdefault(role.category, []).append(role)
        return {category: tuple(roles) for category, roles in groups.items()}

    def default_prompts_for(self, model_name: str) -> tuple[str, ...]:
        """The default prompts with ``{model_name}`` replaced by ``model_name``.

        Only the exact placeholder is replaced (no ``str.format``), so other braces are safe.

        Example::

            cat.default_prompts_for("Gemma 2 27B")[3]  # 'You are Gemma 2 27B.'
        """
        if not isinstance(model_name, str) or not model_name.strip():
            raise CatalogueError(
                f"model_name {model_name!r} is empty; pass the model's display name, "
                "e.g. 'Qwen3-8B', so 'You are {model_name}.' reads naturally."
            )
        return tuple(p.replace(MODEL_NAME_PLACEHOLDER, model_name) for p in self.default_prompts)

    # ------------------------------------------------------------------ subsets

    def interleaved_roles(self) -> tuple[Role, ...]:
        """All roles, round-robin across categories (A1, H1, N1, A2, H2, N2, ...).

        Any prefix of this order is as balanced across categories as it can be, which is why
        :meth:`select` takes its first N roles from it.
        """
        groups = list(self.by_category().values())
        out: list[Role] = []
        for rank in range(max(len(g) for g in groups)):
            out.extend(g[rank] for g in groups if rank < len(g))
        return tuple(out)

    def select(
        self,
        roles: int | Sequence[str] | None = None,
        prompts_per_role: int | None = None,
        questions: int | Sequence[int] | None = None,
        seed: int = 0,
    ) -> Catalogue:
        """A deterministic, smaller catalogue for cheaper runs.

        Args:
            roles: ``None`` keeps every role; an int N keeps the first N roles of
                :meth:`interleaved_roles` (spread across categories, in that order); a list of
                names keeps exactly those roles in the given order.
            prompts_per_role: keep each role's first k prompts (``None``: all). The default
                prompts are always kept whole, as the research did.
            questions: ``None`` keeps all; an int k keeps k questions spread evenly over the
                file (which is grouped by theme, so every theme is sampled); a list of ids
                keeps exactly those questions.
            seed: shifts where the even spread of questions starts; 0 starts at the first
                question. Same arguments, same result.

        Example::

            cat.select(roles=30, prompts_per_role=2, questions=40)
        """
        chosen_roles = self._select_roles(roles)
        if prompts_per_role is not None:
            k = _positive_int("prompts_per_role", prompts_per_role)
            short = [r.name for r in chosen_roles if len(r.prompts) < k]
            if short:
                raise CatalogueError(
                    f"prompts_per_role={k} but {len(short)} role(s) have fewer prompts "
                    f"(e.g. '{short[0]}' has {len(self.role(short[0]).prompts)}); "
                    "ask for fewer prompts or drop those roles."
                )
            chosen_roles = tuple(
                Role(r.name, r.prompts[:k], r.rubric, r.category) for r in chosen_roles
            )
        chosen_questions = self._select_questions(questions, seed)
        return Catalogue(chosen_roles, self.default_prompts, chosen_questions)

    def _select_roles(self, roles: int | Sequence[str] | None) -> tuple[Role, ...]:
        if roles is None:
            return self.roles
        if isinstance(roles, int):  # bools are refused by _positive_int
            n = _positive_int("roles", roles)
            if n > len(self.roles):
                raise CatalogueError(
                    f"roles={n} but the catalogue has only {len(self.roles)} roles; "
                    f"ask for at most {len(self.roles)} (or None for all)."
                )
            return self.interleaved_roles()[:n]
        names = [roles] if isinstance(roles, str) else list(roles)
        if not names:
            raise CatalogueError("roles=[] selects nothing; name at least one role or pass None.")
        out: list[Role] = []
        seen: set[str] = set()
        for name in names:
            if name == DEFAULT_ROLE:
                raise CatalogueError(
                    f"'{DEFAULT_ROLE}' is not a role to select: the default prompts are always "
                    "kept; remove it from roles."
                )
            if name in seen:
                raise CatalogueError(f"role '{name}' is listed twice in roles; list it once.")
            seen.add(name)
            out.append(self.role(name))
        return tuple(out)

    def _select_questions(
        self, questions: int | Sequence[int] | None, seed: int
    ) -> tuple[Question, ...]:
        if questions is None:
            return self.questions
        if isinstance(questions, int):  # bools are refused by _positive_int
            k = _positive_int("questions", questions)
            n = len(self.questions)
            if k > n:
                raise CatalogueError(
                    f"questions={k} but the catalogue has only {n} questions; "
                    f"ask for at most {n} (or None for all)."
                )
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise CatalogueError(f"seed must be an integer, got {seed!r}.")
            # k evenly spaced positions; a non-zero seed shifts them by a fraction of a stride.
            offset = 0.0 if seed == 0 else random.Random(seed).random()
            picks = [math.floor((i + offset) * n / k) for i in range(k)]
            return tuple(self.questions[p] for p in picks)
        if isinstance(questions, str):
            raise CatalogueError(
                f"questions={questions!r}: pass a count or a list of question ids, not a string."
            )
        wanted = list(questions)
        if not wanted:
            raise CatalogueError("questions=[] selects nothing; give ids or pass None.")
        if len(set(wanted)) != len(wanted):
            raise CatalogueError("questions lists an id twice; list each id once.")
        return tuple(self.question(i) for i in wanted)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """A ``roles.json`` document plus a ``"questions"`` list (what :meth:`save` writes)."""
        return {
            "format_version": FORMAT_VERSION,
            "default": {"prompts": list(self.default_prompts)},
            "roles": [role.to_dict() for role in self.roles],
            "questions": [q.to_dict() for q in self.questions],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Catalogue:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict):
            raise CatalogueError(f"a catalogue must be a JSON object, got {type(data).__name__}.")
        roles, default_prompts = _parse_roles_document(data, "catalogue dict")
        raw_questions = data.get("questions")
        if not isinstance(raw_questions, list):
            raise CatalogueError(
                "catalogue dict has no 'questions' list; add [{'id': 0, 'question': '...'}, ...]."
            )
        questions = _parse_question_records(
            [(i + 1, rec) for i, rec in enumerate(raw_questions)], "catalogue dict", "item"
        )
        return cls(roles, default_prompts, questions)

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``roles.json`` and ``questions.jsonl`` (our layout) into ``folder``.

        Returns the two paths; :func:`load_catalogue` reads them back unchanged.
        """
        folder = Path(folder)
        document = self.to_dict()
        del document["questions"]
        roles_path, questions_path = folder / ROLES_FILE, folder / QUESTIONS_FILE
        write_json(roles_path, document)
        write_text(
            questions_path,
            "".join(json.dumps(q.to_dict(), ensure_ascii=False) + "\n" for q in self.questions),
        )
        return roles_path, questions_path


# --------------------------------------------------------------------------- loading


def load_catalogue(
    roles: str | Path | None = None, questions: str | Path | None = None
) -> Catalogue:
    """Load roles and questions.

    Args:
        roles: ``None`` for the shipped catalogue; a ``roles.json`` file in our layout; or a
            folder in the research layout (``{role}.json`` files with ``"instruction"`` and
            ``"eval_prompt"``, plus ``default.json`` for the default prompts).
        questions: ``None`` for the shipped questions; or a JSONL file of
            ``{"id": int, "question": str}`` lines (extra keys are ignored; ids may be left
            out everywhere, then lines are numbered 0, 1, 2, ...).

    Raises:
        CatalogueError: a file is missing or malformed; the message names the file, the role
            or line, and the fix.

    Example::

        cat = load_catalogue("research/roles/instructions", "research/questions.jsonl")
    """
    if roles is None:
        text, label = _package_text(ROLES_FILE)
        role_tuple, default_prompts = _parse_roles_json(text, label)
    else:
        path = Path(roles).expanduser()
        if path.is_dir():
            role_tuple, default_prompts = _load_research_folder(path)
        elif path.is_file():
            role_tuple, default_prompts = _parse_roles_json(_read_text(path), str(path))
        else:
            raise CatalogueError(
                f"roles: {path} does not exist; pass a roles.json file, a research-layout folder "
                "of {role}.json files, or None for the shipped catalogue."
            )
    if questions is None:
        text, label = _package_text(QUESTIONS_FILE)
    else:
        qpath = Path(questions).expanduser()
        if not qpath.is_file():
            hint = " (it is a folder)" if qpath.is_dir() else ""
            raise CatalogueError(
                f"questions: {qpath} is not a file{hint}; pass a JSONL file with one "
                '{"id": ..., "question": ...} object per line, or None for the shipped questions.'
            )
        text, label = _read_text(qpath), str(qpath)
    question_tuple = _parse_questions_text(text, label)
    try:
        return Catalogue(role_tuple, default_prompts, question_tuple)
    except CatalogueError as exc:
        raise CatalogueError(f"{label}: {exc}") from None


def _package_text(name: str) -> tuple[str, str]:
    resource = resources.files("persona_compass")
    for part in _PACKAGE_DIR:
        resource = resource / part
    resource = resource / name
    label = f"persona_compass/{'/'.join(_PACKAGE_DIR)}/{name} (package data)"
    try:
        return resource.read_text(encoding="utf-8"), label
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogueError(
            f"{label} cannot be read ({exc}); reinstall persona-compass (the package data is "
            "missing or damaged) or pass your own catalogue files."
        ) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogueError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8."
        ) from None
    except OSError as exc:
        raise CatalogueError(f"{path} cannot be read: {exc.strerror or exc}.") from None


def _parse_json(text: str, label: str) -> Any:
    try:
        check_depth(text, label)
    except JSONInputError as exc:
        raise CatalogueError(str(exc)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogueError(
            f"{label}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; fix "
            "the syntax there (a trailing comma or a missing quote is the usual cause)."
        ) from None


def _parse_roles_json(text: str, label: str) -> tuple[tuple[Role, ...], tuple[str, ...]]:
    data = _parse_json(text, label)
    if isinstance(data, dict) and "instruction" in data and "roles" not in data:
        raise CatalogueError(
            f"{label} looks like one research-layout role file; pass the folder that holds all "
            "the {role}.json files (and default.json) instead."
        )
    if not isinstance(data, dict):
        raise CatalogueError(
            f"{label}: the top level must be a JSON object with 'format_version', 'default' and "
            f"'roles', got {type(data).__name__}; see data/catalogue/SCHEMA.md."
        )
    return _parse_roles_document(data, label)


def _parse_roles_document(
    data: dict[str, Any], label: str
) -> tuple[tuple[Role, ...], tuple[str, ...]]:
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CatalogueError(
            f"{label}: format_version {version!r} is not supported (this version reads "
            f"{FORMAT_VERSION}); upgrade persona-compass or rewrite the file to version "
            f"{FORMAT_VERSION}."
        )
    default_prompts = _parse_default_section(data.get("default"), label)
    raw_roles = data.get("roles")
    if not isinstance(raw_roles, list) or not raw_roles:
        what = "is missing" if raw_roles is None else "is empty or not a list"
        raise CatalogueError(
            f"{label}: 'roles' {what}; add a list of role objects, each with 'name', "
            "'category', 'prompts' and 'rubric'."
        )
    roles: list[Role] = []
    first_index: dict[str, int] = {}
    for i, raw in enumerate(raw_roles):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = f"{label}, role {i}"
        if isinstance(name, str) and not _NAME_RE.match(name):
            suggestion = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "my_role"
            raise CatalogueError(
                f"{where}: the name {name!r} must be lowercase snake_case (letters, digits, "
                f"single underscores); rename it, e.g. to '{suggestion}'."
            )
        try:
            role = Role.from_dict(raw)
        except CatalogueError as exc:
            raise CatalogueError(f"{where}: {exc}") from None
        if role.name in first_index:
            raise CatalogueError(
                f"{where}: the name '{role.name}' is already used by role "
                f"{first_index[role.name]}; role names must be unique, so rename one of them."
            )
        first_index[role.name] = i
        roles.append(role)
    return tuple(roles), default_prompts


def _parse_default_section(raw: Any, label: str) -> tuple[str, ...]:
    if raw is None:
        logger.info("%s has no 'default' section; using the research's five default prompts", label)
        return DEFAULT_PROMPTS
    prompts = raw.get("prompts") if isinstance(raw, dict) else None
    if not isinstance(prompts, list) or not prompts:
        raise CatalogueError(
            f"{label}: 'default' must be an object with a non-empty 'prompts' list, e.g. "
            f'{{"prompts": {json.dumps(list(DEFAULT_PROMPTS))}}}.'
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise CatalogueError(
                f'{label}: default prompt {i} is {prompt!r}, not a string; use "" for '
                "'no system prompt'."
            )
    if len(set(prompts)) != len(prompts):
        raise CatalogueError(f"{label}: the default prompts contain a duplicate; remove it.")
    return tuple(prompts)


def _load_research_folder(folder: Path) -> tuple[tuple[Role, ...], tuple[str, ...]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".json")
    if not files:
        raise CatalogueError(
            f"{folder} holds no .json files; a research-layout folder has one {{role}}.json per "
            "role (with 'instruction' and 'eval_prompt') and a default.json."
        )
    default_prompts: tuple[str, ...] | None = None
    roles: list[Role] = []
    for path in files:
        label = str(path)
        data = _parse_json(_read_text(path), label)
        if not isinstance(data, dict):
            raise CatalogueError(
                f"{label}: expected a JSON object with an 'instruction' list, got "
                f"{type(data).__name__}."
            )
        is_default = path.name == RESEARCH_DEFAULT_FILE
        prompts = _research_prompts(data, label, allow_empty=is_default)
        if is_default:
            if len(set(prompts)) != len(prompts):
                raise CatalogueError(
                    f"{label}: the default prompts contain a duplicate; remove it."
                )
            default_prompts = prompts
            continue
        rubric = data.get("eval_prompt")
        if not isinstance(rubric, str) or not rubric.strip():
            raise CatalogueError(
                f"{label}: no 'eval_prompt' (the judge prompt for role '{path.stem}'); add one, "
                "or the role cannot be scored."
            )
        unique = tuple(dict.fromkeys(prompts))
        if len(unique) != len(prompts):
            logger.warning("%s: dropped %d repeated prompt(s)", label, len(prompts) - len(unique))
        try:
            roles.append(Role(path.stem, unique, rubric, ""))
        except CatalogueError as exc:
            raise CatalogueError(f"{label}: {exc}") from None
    if not roles:
        raise CatalogueError(
            f"{folder} holds only {RESEARCH_DEFAULT_FILE}; add at least one {{role}}.json file."
        )
    if default_prompts is None:
        logger.info(
            "%s has no %s; using the research's five default prompts", folder, RESEARCH_DEFAULT_FILE
        )
        default_prompts = DEFAULT_PROMPTS
    return tuple(roles), default_prompts


def _research_prompts(data: dict[str, Any], label: str, *, allow_empty: bool) -> tuple[str, ...]:
    raw = data.get("instruction")
    if not isinstance(raw, list) or not raw:
        what = "no 'instruction' list" if raw is None else "an empty or malformed 'instruction'"
        raise CatalogueError(
            f'{label}: {what}; it needs "instruction": [{{"pos": "<system prompt>"}}, ...].'
        )
    prompts: list[str] = []
    for i, item in enumerate(raw):
        text = item.get("pos") if isinstance(item, dict) else item
        if not isinstance(text, str) or (not allow_empty and not text.strip()):
            raise CatalogueError(
                f"{label}: instruction {i} has no usable 'pos' text ({item!r}); write it as "
                '{"pos": "<system prompt>"}.'
            )
        prompts.append(text)
    return tuple(prompts)


def _parse_questions_text(text: str, label: str) -> tuple[Question, ...]:
    stripped = text.lstrip("\ufeff").strip()
    records: list[tuple[int, Any]]
    if stripped.startswith("["):
        # A JSON array of question objects is accepted as well as JSONL.
        data = _parse_json(stripped, label)
        records = [(i, rec) for i, rec in enumerate(data)]
        unit = "item"
    else:
        records = []
        for lineno, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                check_depth(line, f"{label}, line {lineno}")
                records.append((lineno, json.loads(line)))
            except JSONInputError as exc:
                raise CatalogueError(str(exc)) from None
            except json.JSONDecodeError as exc:
                raise CatalogueError(
                    f"{label}, line {lineno}: not valid JSON ({exc.msg}, column {exc.colno}); "
                    'each line must be one object like {"id": 0, "question": "..."}.'
                ) from None
        unit = "line"
    return _parse_question_records(records, label, unit)


def _parse_question_records(
    records: list[tuple[int, Any]], label: str, unit: str
) -> tuple[Question, ...]:
    if not records:
        raise CatalogueError(
            f"{label} has no questions; add lines like "
            '{"id": 0, "question": "What do you do on a quiet evening?"}.'
        )
    with_id = sum(1 for _, rec in records if isinstance(rec, dict) and "id" in rec)
    if 0 < with_id < len(records):
        raise CatalogueError(
            f"{label}: {with_id} of {len(records)} questions have an 'id' and the rest do not; "
            "give every question an id or none of them (then they are numbered in file order)."
        )
    out: list[Question] = []
    first_at: dict[int, int] = {}
    texts: dict[str, int] = {}
    for position, (where, rec) in enumerate(records):
        at = f"{label}, {unit} {where}"
        if not isinstance(rec, dict):
            raise CatalogueError(
                f"{at}: expected an object with a 'question' key, got {type(rec).__name__}."
            )
        text = rec.get("question")
        if not isinstance(text, str) or not text.strip():
            raise CatalogueError(
                f"{at}: missing or empty 'question'; write the question text under the key "
                "'question'."
            )
        qid = rec["id"] if with_id else position
        if isinstance(qid, bool) or not isinstance(qid, int) or qid < 0:
            raise CatalogueError(f"{at}: id {qid!r} is not a non-negative integer; fix the id.")
        if qid in first_at:
            raise CatalogueError(
                f"{at}: id {qid} was already used on {unit} {first_at[qid]}; ids must be unique."
            )
        first_at[qid] = where
        if text in texts:
            logger.warning("%s: repeats the question on %s %s", at, unit, texts[text])
        texts.setdefault(text, where)
        out.append(Question(qid, text))
    return tuple(out)


# --------------------------------------------------------------------------- helpers


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CatalogueError(f"{name}={value!r} must be a positive integer (or None for all).")
    return value


def _unknown_role_message(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"no role named {name!r} in this catalogue ({len(known)} roles; see "
        f"Catalogue.role_names).{hint}"
    )


def _id_span(questions: Sequence[Question]) -> str:
    ids = [q.id for q in questions]
    return f"{min(ids)}..{max(ids)}" if ids else "nothing"
