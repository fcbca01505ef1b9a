"""The role catalogue: shipped data quality, selection, substitution, both file layouts, errors."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from persona_compass.errors import PersonaCompassError
from persona_compass.persona_space.catalogue import (
    CATEGORIES,
    DEFAULT_PROMPTS,
    DEFAULT_ROLE,
    Catalogue,
    CatalogueError,
    Question,
    Role,
    load_catalogue,
)

EXPECTED_DEFAULTS = (
    "",
    "You are an AI assistant.",
    "You are a large language model.",
    "You are {model_name}.",
    "Respond as yourself.",
)


@pytest.fixture(scope="module")
def shipped() -> Catalogue:
    return load_catalogue()


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _role(name: str, category: str = "human", n: int = 3) -> dict:
    return {
        "name": name,
        "category": category,
        "prompts": [f"You are {name}, take {i}." for i in range(n)],
        "rubric": f"Score 3 when the answer is fully {name}.",
    }


def _roles_file(tmp_path: Path, roles: list, **extra: object) -> Path:
    doc = {"format_version": 1, "default": {"prompts": list(EXPECTED_DEFAULTS)}, "roles": roles}
    doc.update(extra)
    return _write(tmp_path / "roles.json", doc)


def _questions_file(tmp_path: Path, lines: list[str], name: str = "q.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- shipped data


def test_shipped_catalogue_size_and_roles(shipped: Catalogue) -> None:
    assert len(shipped.roles) >= 120
    for role in shipped.roles:
        assert len(role.prompts) == 5, role.name
        assert len(set(role.prompts)) == 5, role.name
        assert all(p.strip() for p in role.prompts), role.name
        assert role.rubric.strip(), role.name


def test_shipped_role_names_unique_and_snake_case(shipped: Catalogue) -> None:
    names = shipped.role_names
    assert len(set(names)) == len(names)
    assert DEFAULT_ROLE not in names
    for name in names:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name), name


def test_shipped_categories_balanced(shipped: Catalogue) -> None:
    counts = Counter(role.category for role in shipped.roles)
    assert set(counts) == set(CATEGORIES)
    for category in CATEGORIES:
        assert counts[category] >= 25, counts
    assert max(counts.values()) - min(counts.values()) <= 5, counts


def test_shipped_prompts_and_rubrics_are_well_formed(shipped: Catalogue) -> None:
    all_prompts = [p for role in shipped.roles for p in role.prompts]
    assert len(set(all_prompts)) == len(all_prompts), "a system prompt is shared by two roles"
    for role in shipped.roles:
        for prompt in role.prompts:
            assert len(prompt) < 400, (role.name, prompt)
            sentences = re.findall(r"[.!?]['\"]?(?:\s|$)", prompt)
            assert 1 <= len(sentences) <= 3, (role.name, prompt)
        # Each rubric spells out the four score levels.
        for score in "3210":
            assert score in role.rubric, (role.name, score)
        assert "AI" in role.rubric, role.name


def test_shipped_questions(shipped: Catalogue) -> None:
    questions = shipped.questions
    assert len(questions) >= 120
    assert [q.id for q in questions] == list(range(len(questions)))
    texts = [q.text.strip().lower() for q in questions]
    assert len(set(texts)) == len(texts)
    assert all(q.text.strip() for q in questions)


def test_shipped_default_prompts_are_the_research_five(shipped: Catalogue) -> None:
    assert shipped.default_prompts == EXPECTED_DEFAULTS
    assert DEFAULT_PROMPTS == EXPECTED_DEFAULTS


def test_shipped_questions_file_lines_parse(shipped: Catalogue) -> None:
    from importlib import resources

    raw = (resources.files("persona_compass") / "data" / "catalogue" / "questions.jsonl").read_text(
        encoding="utf-8"
    )
    records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    assert all(set(rec) == {"id", "question"} for rec in records)
    assert len(records) == len(shipped.questions)


def test_lookups(shipped: Catalogue) -> None:
    pirate = shipped.role("pirate")
    assert pirate.category == "human"
    assert shipped.question(0).id == 0
    with pytest.raises(CatalogueError, match="Did you mean 'pirate'"):
        shipped.role("pirat")
    with pytest.raises(CatalogueError, match="no question has id 99999"):
        shipped.question(99999)
    groups = shipped.by_category()
    assert list(groups) == list(CATEGORIES)
    assert sum(len(g) for g in groups.values()) == len(shipped.roles)
    n_prompts = 5 * len(shipped.roles) + 5
    assert shipped.n_rollouts == n_prompts * len(shipped.questions)


# --------------------------------------------------------------------------- select


def test_select_is_deterministic(shipped: Catalogue) -> None:
    a = shipped.select(roles=10, prompts_per_role=2, questions=12, seed=5)
    b = shipped.select(roles=10, prompts_per_role=2, questions=12, seed=5)
    assert a == b
    assert len(a.roles) == 10 and len(a.questions) == 12
    assert all(len(r.prompts) == 2 for r in a.roles)
    # The first k prompts of each role, untouched rubric and category.
    for role in a.roles:
        full = shipped.role(role.name)
        assert role.prompts == full.prompts[:2]
        assert (role.rubric, role.category) == (full.rubric, full.category)
    assert a.default_prompts == shipped.default_prompts


def test_select_spreads_categories(shipped: Catalogue) -> None:
    for n in (3, 6, 9, 30, 60):
        counts = Counter(r.category for r in shipped.select(roles=n).roles)
        assert set(counts) == set(CATEGORIES)
        assert max(counts.values()) - min(counts.values()) <= 1, (n, counts)
    first = shipped.select(roles=3).roles
    assert [r.category for r in first] == list(CATEGORIES)
    # Any prefix of a selection is itself balanced: the order is interleaved.
    assert shipped.select(roles=12).roles[:6] == shipped.select(roles=6).roles


def test_select_by_name_keeps_order(shipped: Catalogue) -> None:
    sub = shipped.select(roles=["ghost", "pirate", "librarian"])
    assert sub.role_names == ("ghost", "pirate", "librarian")
    assert sub.questions == shipped.questions
    single = shipped.select(roles="ghost")
    assert single.role_names == ("ghost",)


def test_select_questions_even_spread_and_seed(shipped: Catalogue) -> None:
    n = len(shipped.questions)
    ids = [q.id for q in shipped.select(questions=10).questions]
    assert ids[0] == 0 and len(set(ids)) == 10 and ids == sorted(ids)
    gaps = {b - a for a, b in zip(ids[:-1], ids[1:], strict=True)}
    assert max(gaps) - min(gaps) <= 1
    other = [q.id for q in shipped.select(questions=10, seed=7).questions]
    assert other != ids and len(set(other)) == 10 and max(other) < n
    assert other == [q.id for q in shipped.select(questions=10, seed=7).questions]
    full = shipped.select(questions=n, seed=3)
    assert full.questions == shipped.questions
    picked = shipped.select(questions=[5, 2, 40])
    assert [q.id for q in picked.questions] == [5, 2, 40]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"roles": 0}, "positive integer"),
        ({"roles": 100_000}, "only"),
        ({"roles": True}, "roles=True"),
        ({"roles": ["pirate", "pirate"]}, "listed twice"),
        ({"roles": ["default"]}, "always"),
        ({"roles": ["not_a_role"]}, "no role named"),
        ({"roles": []}, "selects nothing"),
        ({"prompts_per_role": 0}, "positive integer"),
        ({"prompts_per_role": 6}, "fewer prompts"),
        ({"questions": 0}, "positive integer"),
        ({"questions": 100_000}, "only"),
        ({"questions": [1, 1]}, "twice"),
        ({"questions": [100_000]}, "no question has id"),
        ({"questions": "10"}, "not a string"),
    ],
)
def test_select_rejects_bad_arguments(shipped: Catalogue, kwargs: dict, match: str) -> None:
    with pytest.raises(CatalogueError, match=match):
        shipped.select(**kwargs)


# --------------------------------------------------------------------------- {model_name}


def test_default_prompts_for_substitutes_model_name(shipped: Catalogue) -> None:
    prompts = shipped.default_prompts_for("Qwen3-8B")
    assert prompts[3] == "You are Qwen3-8B."
    assert prompts[0] == ""
    assert all("{model_name}" not in p for p in prompts)
    assert shipped.default_prompts == EXPECTED_DEFAULTS  # unchanged
    with pytest.raises(CatalogueError, match="model_name"):
        shipped.default_prompts_for("  ")


def test_default_prompts_for_leaves_other_braces_alone() -> None:
    cat = Catalogue(
        roles=(Role("x", ("You are x.",), "rubric"),),
        default_prompts=("Use {braces} freely, {model_name}.",),
        questions=(Question(0, "Hi?"),),
    )
    assert cat.default_prompts_for("M") == ("Use {braces} freely, M.",)


# --------------------------------------------------------------------------- our layout


def test_roundtrip_save_and_load(shipped: Catalogue, tmp_path: Path) -> None:
    small = shipped.select(roles=9, questions=7)
    roles_path, questions_path = small.save(tmp_path / "cat")
    again = load_catalogue(roles_path, questions_path)
    assert again == small
    assert Catalogue.from_dict(small.to_dict()) == small


def test_custom_files_load(tmp_path: Path) -> None:
    roles = _roles_file(tmp_path, [_role("sailor"), _role("owl", "non-human")])
    questions = _questions_file(
        tmp_path,
        ['{"id": 3, "question": "Why?", "topic": "x"}', "", '{"id": 7, "question": "How?"}'],
    )
    cat = load_catalogue(roles, questions)
    assert cat.role_names == ("sailor", "owl")
    assert [(q.id, q.text) for q in cat.questions] == [(3, "Why?"), (7, "How?")]


def test_missing_default_section_uses_the_research_five(tmp_path: Path) -> None:
    path = _write(tmp_path / "roles.json", {"roles": [_role("sailor")]})
    assert load_catalogue(path).default_prompts == EXPECTED_DEFAULTS


def test_questions_without_ids_are_numbered_and_arrays_load(tmp_path: Path) -> None:
    roles = _roles_file(tmp_path, [_role("sailor")])
    plain = _questions_file(tmp_path, ['{"question": "A?"}', '{"question": "B?"}'])
    assert [q.id for q in load_catalogue(roles, plain).questions] == [0, 1]
    array = tmp_path / "q.json"
    array.write_text(json.dumps([{"id": 0, "question": "A?"}]), encoding="utf-8")
    assert load_catalogue(roles, array).questions == (Question(0, "A?"),)


# --------------------------------------------------------------------------- research layout


def _research_folder(tmp_path: Path, with_default: bool = True) -> Path:
    folder = tmp_path / "instructions"
    folder.mkdir()
    if with_default:
        _write(
            folder / "default.json",
            {"instruction": [{"pos": p} for p in EXPECTED_DEFAULTS], "questions": ["ignored"]},
        )
    _write(
        folder / "ghost.json",
        {
            "instruction": [{"pos": "You are a ghost."}, {"pos": "Haunt the house as a ghost."}],
            "questions": ["What haunts you?"],
            "eval_prompt": "Judge whether the answer speaks as a ghost: {question} {answer}",
        },
    )
    _write(
        folder / "accountant.json",
        {
            "instruction": [{"pos": "You are an accountant."}],
            "eval_prompt": "Judge whether the answer speaks as an accountant.",
        },
    )
    (folder / "README.txt").write_text("not a role", encoding="utf-8")
    return folder


def test_research_layout_loads(tmp_path: Path) -> None:
    folder = _research_folder(tmp_path)
    questions = _questions_file(
        tmp_path,
        ['{"question": "Who are you?", "id": 0, "extra": 1}', '{"question": "Why?", "id": 1}'],
    )
    cat = load_catalogue(folder, questions)
    assert cat.role_names == ("accountant", "ghost")  # sorted file names, default excluded
    assert cat.default_prompts == EXPECTED_DEFAULTS
    ghost = cat.role("ghost")
    assert ghost.prompts == ("You are a ghost.", "Haunt the house as a ghost.")
    assert ghost.rubric.startswith("Judge whether the answer speaks as a ghost")
    assert ghost.category == ""
    assert [q.text for q in cat.questions] == ["Who are you?", "Why?"]
    assert cat.default_prompts_for("M")[3] == "You are M."
    # Selection still works with uncategorised roles.
    assert cat.select(roles=1).role_names == ("accountant",)


def test_research_layout_with_shipped_questions_and_no_default(tmp_path: Path) -> None:
    cat = load_catalogue(_research_folder(tmp_path, with_default=False))
    assert cat.default_prompts == EXPECTED_DEFAULTS
    assert len(cat.questions) >= 120


def test_research_layout_errors(tmp_path: Path) -> None:
    folder = _research_folder(tmp_path)
    _write(folder / "ghost.json", {"instruction": [{"pos": "You are a ghost."}]})
    with pytest.raises(CatalogueError, match=r"ghost\.json.*eval_prompt"):
        load_catalogue(folder)
    _write(folder / "ghost.json", {"instruction": [], "eval_prompt": "x"})
    with pytest.raises(CatalogueError, match=r"ghost\.json.*instruction"):
        load_catalogue(folder)
    _write(folder / "ghost.json", {"instruction": [{"pos": "  "}], "eval_prompt": "x"})
    with pytest.raises(CatalogueError, match=r"ghost\.json.*instruction 0"):
        load_catalogue(folder)
    (folder / "ghost.json").write_text('{"instruction": [\n{"pos": "a"},\n]}', encoding="utf-8")
    with pytest.raises(CatalogueError, match=r"ghost\.json: not valid JSON at line 3"):
        load_catalogue(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CatalogueError, match="no .json files"):
        load_catalogue(empty)
    only_default = tmp_path / "only_default"
    only_default.mkdir()
    _write(only_default / "default.json", {"instruction": [{"pos": ""}]})
    with pytest.raises(CatalogueError, match="at least one"):
        load_catalogue(only_default)


def test_research_role_file_passed_as_roles_json(tmp_path: Path) -> None:
    folder = _research_folder(tmp_path)
    with pytest.raises(CatalogueError, match="pass the folder"):
        load_catalogue(folder / "ghost.json")


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("roles", "match"),
    [
        ([{"name": "sailor", "rubric": "r"}], r"role 0: role 'sailor' is missing 'prompts'"),
        ([{**_role("sailor"), "prompts": []}], r"'sailor'.*empty prompt list"),
        ([{**_role("sailor"), "prompts": "You are a sailor."}], "list of strings"),
        ([{**_role("sailor"), "prompts": ["You are a sailor.", ""]}], "prompt 1 is empty"),
        ([{**_role("sailor"), "prompts": ["Same.", "Same."]}], "repeats prompt 0"),
        ([{**_role("sailor"), "rubric": " "}], "no rubric"),
        ([{**_role("sailor"), "category": "robot"}], "unknown category 'robot'"),
        (
            [_role("sailor"), _role("sailor")],
            r"role 1: the name 'sailor' is already used by role 0",
        ),
        (
            [_role("Old Sailor")],
            r"role 0: the name 'Old Sailor' must be .*snake_case.*'old_sailor'",
        ),
        ([_role("default")], "reserved"),
        (["sailor"], "JSON object"),
        ([], "'roles' is empty"),
    ],
)
def test_malformed_roles(tmp_path: Path, roles: list, match: str) -> None:
    path = _roles_file(tmp_path, roles)
    with pytest.raises(CatalogueError, match=match) as info:
        load_catalogue(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, PersonaCompassError)


def test_malformed_roles_document(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "format_version": 1,\n  "roles": [,]\n}', encoding="utf-8")
    with pytest.raises(CatalogueError, match=r"bad\.json: not valid JSON at line 3"):
        load_catalogue(bad)
    with pytest.raises(CatalogueError, match="format_version 2"):
        load_catalogue(_roles_file(tmp_path, [_role("a")], format_version=2))
    with pytest.raises(CatalogueError, match="'default' must be an object"):
        load_catalogue(_roles_file(tmp_path, [_role("a")], default={"prompts": []}))
    with pytest.raises(CatalogueError, match="top level"):
        load_catalogue(_write(tmp_path / "list.json", [1, 2]))
    with pytest.raises(CatalogueError, match="does not exist"):
        load_catalogue(tmp_path / "nope.json")
    with pytest.raises(CatalogueError, match="not UTF-8"):
        (tmp_path / "latin.json").write_bytes(b'{"roles": "\xe9"}')
        load_catalogue(tmp_path / "latin.json")


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([], "has no questions"),
        (["", "   "], "has no questions"),
        (['{"id": 0, "question": "A?"}', '{"id": 1, "question": "B?"'], r"line 2: not valid JSON"),
        (['{"id": 0, "question": "A?"}', '{"id": 0, "question": "B?"}'], "already used on line 1"),
        (['{"id": 0, "question": "A?"}', '{"question": "B?"}'], "1 of 2 questions have an 'id'"),
        (['{"id": -1, "question": "A?"}'], "non-negative"),
        (['{"id": "0", "question": "A?"}'], "non-negative"),
        (['{"id": 0, "question": ""}'], r"line 1: missing or empty 'question'"),
        (['{"id": 0, "text": "A?"}'], "missing or empty 'question'"),
        (['["A?"]'], "expected an object"),
    ],
)
def test_malformed_questions(tmp_path: Path, lines: list[str], match: str) -> None:
    roles = _roles_file(tmp_path, [_role("sailor")])
    questions = _questions_file(tmp_path, lines)
    with pytest.raises(CatalogueError, match=match) as info:
        load_catalogue(roles, questions)
    assert str(questions) in str(info.value)


def test_questions_path_must_be_a_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="it is a folder"):
        load_catalogue(None, tmp_path)
    with pytest.raises(CatalogueError, match="not a file"):
        load_catalogue(None, tmp_path / "missing.jsonl")


def test_value_objects_validate_on_construction() -> None:
    role = Role("x", ("You are x.",), "rubric")
    q = Question(0, "Hi?")
    with pytest.raises(CatalogueError, match="appears twice"):
        Catalogue((role, role), DEFAULT_PROMPTS, (q,))
    with pytest.raises(CatalogueError, match="question id 0 appears twice"):
        Catalogue((role,), DEFAULT_PROMPTS, (q, q))
    with pytest.raises(CatalogueError, match="no roles"):
        Catalogue((), DEFAULT_PROMPTS, (q,))
    with pytest.raises(CatalogueError, match="no questions"):
        Catalogue((role,), DEFAULT_PROMPTS, ())
    with pytest.raises(CatalogueError, match="no default prompts"):
        Catalogue((role,), (), (q,))
    with pytest.raises(CatalogueError, match="non-negative"):
        Question(True, "Hi?")  # type: ignore[arg-type]
    # Lists are frozen into tuples, so a Catalogue is hashable and immutable.
    cat = Catalogue([role], list(DEFAULT_PROMPTS), [q])  # type: ignore[arg-type]
    assert isinstance(cat.roles, tuple) and hash(cat) == hash(cat)
    assert Role("y", ["a", "b"], "r").prompts == ("a", "b")  # type: ignore[arg-type]
