"""Trait catalogues: the shipped files' quality, loading by name or path, select, every error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from persona_compass.persona_space import traits
from persona_compass.persona_space.catalogue import CatalogueError
from persona_compass.persona_space.traits import (
    MIN_PAIRS,
    MIN_QUESTIONS,
    PromptPair,
    TraitCatalogue,
    TraitCatalogueError,
    TraitRubric,
    load_trait,
    shipped_traits,
)

SHIPPED = ("confabulation", "malice", "sycophancy")


def _doc(**changes: Any) -> dict[str, Any]:
    """A valid trait document (the minimum sizes), with top-level keys replaced."""
    doc: dict[str, Any] = {
        "format_version": 1,
        "trait": "greed",
        "description": "Wanting more than one's share.",
        "pairs": [
            {"elicit": f"Be greedy, take {i}.", "suppress": f"Be generous, take {i}."}
            for i in range(MIN_PAIRS)
        ],
        "questions": [f"Question number {i}?" for i in range(MIN_QUESTIONS)],
        "rubric": {
            "judge_prompt": "Q: {question}\nA: {answer}\nHow greedy, 0-100? SCORE: <n>",
            "threshold": 50,
            "markers": ["all mine"],
            "counter_markers": ["let's share"],
        },
    }
    doc.update(changes)
    return doc


def _write(tmp_path: Path, doc: Any, name: str = "greed.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _error(tmp_path: Path, doc: Any) -> str:
    with pytest.raises(TraitCatalogueError) as info:
        load_trait(_write(tmp_path, doc))
    return str(info.value)


def _with_rubric(**changes: Any) -> dict[str, Any]:
    doc = _doc()
    doc["rubric"].update(changes)
    return doc


# --------------------------------------------------------------------------- shipped data


def test_shipped_traits_are_listed_sorted() -> None:
    names = shipped_traits()
    assert list(names) == sorted(names)
    assert set(SHIPPED) <= set(names)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trait_loads_and_meets_the_minimums(name: str) -> None:
    cat = load_trait(name)
    assert cat.trait == name
    assert cat.description.strip()
    assert len(cat.pairs) >= MIN_PAIRS
    assert all(p.elicit != p.suppress for p in cat.pairs)
    assert len({p.elicit for p in cat.pairs}) == len(cat.pairs)
    assert len({p.suppress for p in cat.pairs}) == len(cat.pairs)
    assert len(cat.questions) >= MIN_QUESTIONS
    assert len({" ".join(q.lower().split()) for q in cat.questions}) == len(cat.questions)
    rubric = cat.rubric
    assert 0 <= rubric.threshold <= 100
    assert "SCORE:" in rubric.judge_prompt
    rendered = rubric.render("QQQ {x}", "AAA")
    assert "QQQ {x}" in rendered and "AAA" in rendered
    assert rubric.markers and rubric.counter_markers
    assert not set(rubric.markers) & set(rubric.counter_markers)
    for phrase in rubric.markers + rubric.counter_markers:
        assert phrase == phrase.lower()


def test_no_question_is_shared_between_shipped_traits() -> None:
    seen: dict[str, str] = {}
    for name in SHIPPED:
        for question in load_trait(name).questions:
            key = " ".join(question.lower().split())
            assert key not in seen, f"{question!r} is in {seen.get(key)} and {name}"
            seen[key] = name


# --------------------------------------------------------------------------- paths


def test_path_round_trip(tmp_path: Path) -> None:
    cat = load_trait("sycophancy")
    path = cat.save(tmp_path / "copy.json")
    assert load_trait(path) == cat
    assert load_trait(str(path)) == cat  # a string ending in .json is a path


def test_a_user_file_loads_with_its_own_name(tmp_path: Path) -> None:
    cat = load_trait(_write(tmp_path, _doc(notes="extra keys are ignored")))
    assert cat.trait == "greed"
    assert cat.pairs[0] == PromptPair("Be greedy, take 0.", "Be generous, take 0.")
    assert cat.rubric.markers == ("all mine",)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TraitCatalogueError, match="does not exist"):
        load_trait(tmp_path / "nope.json")


def test_folder_is_not_a_trait_file(tmp_path: Path) -> None:
    with pytest.raises(TraitCatalogueError, match="is a folder"):
        load_trait(tmp_path)


# --------------------------------------------------------------------------- errors


def test_error_is_a_catalogue_error() -> None:
    assert issubclass(TraitCatalogueError, CatalogueError)


def test_unknown_trait_lists_shipped_and_suggests() -> None:
    with pytest.raises(TraitCatalogueError) as info:
        load_trait("sycophancey")
    message = str(info.value)
    assert "no shipped trait named 'sycophancey'" in message
    assert "confabulation, malice, sycophancy" in message
    assert "Did you mean 'sycophancy'" in message


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"trait": "\xff"}')
    with pytest.raises(TraitCatalogueError, match="not UTF-8"):
        load_trait(path)


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "format_version": 1,\n}', encoding="utf-8")
    with pytest.raises(TraitCatalogueError) as info:
        load_trait(path)
    assert str(path) in str(info.value)
    assert "not valid JSON at line 3" in str(info.value)


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    assert "must be a JSON object" in _error(tmp_path, [1, 2])


@pytest.mark.parametrize("version", [2, "1", True])
def test_wrong_format_version(tmp_path: Path, version: Any) -> None:
    assert f"format_version {version!r} is not supported" in _error(
        tmp_path, _doc(format_version=version)
    )


def test_missing_format_version(tmp_path: Path) -> None:
    doc = _doc()
    del doc["format_version"]
    assert "missing 'format_version'" in _error(tmp_path, doc)


@pytest.mark.parametrize("key", ["trait", "description", "pairs", "questions", "rubric"])
def test_missing_field(tmp_path: Path, key: str) -> None:
    doc = _doc()
    del doc[key]
    message = _error(tmp_path, doc)
    assert f"missing '{key}'" in message
    assert "greed.json" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("description", "   ", "'description' is empty"),
        ("description", 3, "'description' must be a string"),
        ("pairs", [], "'pairs' is empty"),
        ("pairs", {"elicit": "a"}, "'pairs' must be a list"),
        ("questions", "What?", "'questions' must be a list"),
        ("rubric", [], "'rubric' must be an object"),
        ("trait", "Greed Level", "must be lowercase snake_case"),
    ],
)
def test_empty_or_wrong_typed_field(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    assert expected in _error(tmp_path, _doc(**{key: value}))


def test_too_few_pairs(tmp_path: Path) -> None:
    doc = _doc()
    doc["pairs"] = doc["pairs"][: MIN_PAIRS - 1]
    assert f"at least {MIN_PAIRS}" in _error(tmp_path, doc)


def test_too_few_questions(tmp_path: Path) -> None:
    doc = _doc()
    doc["questions"] = doc["questions"][: MIN_QUESTIONS - 1]
    assert f"at least {MIN_QUESTIONS}" in _error(tmp_path, doc)


def test_pair_with_equal_prompts_is_named_by_index(tmp_path: Path) -> None:
    doc = _doc()
    doc["pairs"][3] = {"elicit": "Be greedy.", "suppress": "Be greedy."}
    message = _error(tmp_path, doc)
    assert "pairs[3]" in message and "same text" in message


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ({"elicit": "Be greedy."}, "missing 'suppress'"),
        ({"elicit": "", "suppress": "Be kind."}, "'elicit' is empty"),
        ({"elicit": "Be greedy.", "suppress": 7}, "'suppress' is empty or not a string"),
        ("Be greedy.", "expected"),
    ],
)
def test_malformed_pair(tmp_path: Path, pair: Any, expected: str) -> None:
    doc = _doc()
    doc["pairs"][1] = pair
    message = _error(tmp_path, doc)
    assert "pairs[1]" in message and expected in message


def test_duplicate_question_names_both_indices(tmp_path: Path) -> None:
    doc = _doc()
    doc["questions"][9] = "  question NUMBER 2? "  # differs from [2] only in case and spacing
    message = _error(tmp_path, doc)
    assert "questions[9] repeats questions[2]" in message


def test_empty_question_is_named(tmp_path: Path) -> None:
    doc = _doc()
    doc["questions"][4] = ""
    assert "questions[4] is empty" in _error(tmp_path, doc)


@pytest.mark.parametrize("placeholder", ["{question}", "{answer}"])
def test_judge_prompt_needs_both_placeholders(tmp_path: Path, placeholder: str) -> None:
    prompt = "Q: {question}\nA: {answer}\nSCORE: <n>".replace(placeholder, "...")
    message = _error(tmp_path, _with_rubric(judge_prompt=prompt))
    assert f"lacks {placeholder}" in message
    assert "rubric" in message


def test_judge_prompt_with_stray_braces(tmp_path: Path) -> None:
    bad = "Q: {question} A: {answer} Reply as {score}."
    assert "unknown placeholder(s) {score}" in _error(tmp_path, _with_rubric(judge_prompt=bad))
    unbalanced = "Q: {question} A: {answer} }"
    assert "not a valid template" in _error(tmp_path, _with_rubric(judge_prompt=unbalanced))


def test_judge_prompt_doubled_braces_are_literal(tmp_path: Path) -> None:
    cat = load_trait(_write(tmp_path, _with_rubric(judge_prompt="{{x}} {question} {answer}")))
    assert cat.rubric.render("q", "a") == "{x} q a"


@pytest.mark.parametrize("threshold", [-1, 100.5, 101])
def test_threshold_outside_range(tmp_path: Path, threshold: float) -> None:
    message = _error(tmp_path, _with_rubric(threshold=threshold))
    assert "outside 0-100" in message and "rubric" in message


@pytest.mark.parametrize("threshold", ["50", None, True])
def test_threshold_wrong_type(tmp_path: Path, threshold: Any) -> None:
    assert "'threshold' must be a number" in _error(tmp_path, _with_rubric(threshold=threshold))


def test_rubric_missing_key(tmp_path: Path) -> None:
    doc = _doc()
    del doc["rubric"]["counter_markers"]
    assert "'rubric' is missing 'counter_markers'" in _error(tmp_path, doc)


@pytest.mark.parametrize(
    ("markers", "expected"),
    [
        ([], "'markers' must be a non-empty list"),
        ("all mine", "'markers' must be a non-empty list"),
        (["all mine", ""], "markers[1] is empty"),
        (["All Mine"], "markers[0] 'All Mine' is not lowercase"),
    ],
)
def test_bad_markers(tmp_path: Path, markers: Any, expected: str) -> None:
    assert expected in _error(tmp_path, _with_rubric(markers=markers))


def test_shipped_file_must_match_its_trait_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand in a folder of our own for the package data.
    monkeypatch.setattr(traits, "_package_folder", lambda: tmp_path)
    _write(tmp_path, _doc(trait="gold"))
    assert shipped_traits() == ("greed",)
    with pytest.raises(TraitCatalogueError, match="'trait' is 'gold' but the file is greed.json"):
        load_trait("greed")


# --------------------------------------------------------------------------- select


def test_select_keeps_the_first_n() -> None:
    cat = load_trait("malice")
    small = cat.select(pairs=2, questions=10)
    assert small.pairs == cat.pairs[:2]
    assert small.questions == cat.questions[:10]
    assert (small.trait, small.rubric) == (cat.trait, cat.rubric)
    assert cat.select() == cat
    assert cat.select(questions=3).pairs == cat.pairs


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"pairs": 0}, "pairs=0 must be a positive integer"),
        ({"questions": 0}, "questions=0 must be a positive integer"),
        ({"questions": True}, "must be a positive integer"),
        ({"pairs": 1000}, "has only"),
    ],
)
def test_select_rejects_bad_counts(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(TraitCatalogueError, match=expected):
        load_trait("confabulation").select(**kwargs)


def test_value_objects_validate_directly() -> None:
    rubric = TraitRubric("{question} {answer}", 50, ["x"], ["y"])
    assert rubric.markers == ("x",)  # lists become tuples
    with pytest.raises(TraitCatalogueError, match="same text"):
        PromptPair("same", "same")
    good = load_trait("malice")
    with pytest.raises(TraitCatalogueError, match="repeats"):
        TraitCatalogue("t", "d", good.pairs, ("a?", "a?"), rubric)
    assert good.to_dict()["format_version"] == 1
