"""Capability set: shipped items, exact-match scoring and the confidence intervals."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from persona_compass.evaluation.capability import (
    MATCH_MODES,
    CapabilityError,
    CapabilityItem,
    accuracy_with_ci,
    load_capability_items,
    normalise,
    paired_difference_ci,
    score_answer,
    summarize,
    unchanged_answers,
)

# ------------------------------------------------------------------ the shipped set


def test_shipped_set_size_and_categories():
    items = load_capability_items()
    assert len(items) >= 100
    counts = Counter(i.category for i in items)
    assert counts["arithmetic"] >= 35 and counts["facts"] >= 30 and counts["format"] >= 20
    assert len({i.id for i in items}) == len(items)
    assert {i.match for i in items} <= set(MATCH_MODES)
    assert all(i.match == "number" for i in items if i.category == "arithmetic")


def test_every_shipped_answer_scores_true():
    for item in load_capability_items():
        for answer in item.answers:
            assert score_answer(item, answer), (item.id, answer)
            assert score_answer(item, answer + "\n"), item.id


def _wrong(item: CapabilityItem) -> str:
    if item.match == "number":
        return str(int(float(item.answer)) + 1)
    return "zzqx"


def test_wrong_answers_score_false():
    for item in load_capability_items():
        assert not score_answer(item, _wrong(item)), item.id
        assert not score_answer(item, ""), item.id
        assert not score_answer(item, None), item.id


def test_case_sensitive_format_items_reject_the_wrong_case():
    items = {i.answer: i for i in load_capability_items() if i.case_sensitive}
    assert not score_answer(items["YES"], "yes")
    assert not score_answer(items["PARIS"], "Paris")
    assert score_answer(items["PARIS"], "PARIS.")


# ------------------------------------------------------------------ match modes


def num(answer: str, *accept: str) -> CapabilityItem:
    return CapabilityItem("n", "arithmetic", "q", answer, accept=accept, match="number")


@pytest.mark.parametrize(
    ("answer", "reply", "expected"),
    [
        ("12", "12", True),
        ("12", "The answer is 12.", True),
        ("12", "12 apples", True),
        ("12", "12.0", True),
        ("12", "7 + 5 = 12", False),  # the first number counts
        ("12", "twelve", False),
        ("12", "123", False),
        ("-5", "-5", True),
        ("-5", "5", False),
        ("1000", "1,000", True),
        ("2.5", "2.5", True),
        ("0", "0", True),
        ("0", "The answer is zero", False),
    ],
)
def test_number_mode(answer, reply, expected):
    assert score_answer(num(answer), reply) is expected


def test_number_mode_accept_list_and_validation():
    assert score_answer(num("7", "7.0"), "7.0")
    with pytest.raises(CapabilityError, match="not a number"):
        CapabilityItem("x", "c", "q", "seven", match="number")
    with pytest.raises(CapabilityError, match="use one of number, exact, word"):
        CapabilityItem("x", "c", "q", "a", match="fuzzy")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("apple, apple, apple", True),
        ("Apple, apple, apple.", True),
        ("  apple ,  apple,apple  ", False),  # "apple,apple" only via accept
        ("**apple, apple, apple**", True),
        ("`apple, apple, apple`", True),
        ("apple, apple, apple, apple", False),
        ("Sure: apple, apple, apple", False),
    ],
)
def test_exact_mode(reply, expected):
    item = CapabilityItem("e", "format", "q", "apple, apple, apple")
    assert score_answer(item, reply) is expected


def test_exact_mode_case_and_accept():
    loose = CapabilityItem("e", "format", "q", "OK", accept=("okay",))
    assert score_answer(loose, "ok") and score_answer(loose, "Okay.")
    strict = CapabilityItem("e", "format", "q", "YES", case_sensitive=True)
    assert score_answer(strict, "YES") and not score_answer(strict, "Yes")
    assert normalise("  The  cat sat. ") == "the cat sat"
    assert normalise("Wait...") == "wait..."


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Paris", True),
        ("paris.", True),
        ("The capital of France is Paris.", True),
        ("Parisian", False),
        ("Lyon\nParis", False),  # only the first line
        ("\n\nParis is the answer", True),  # first non-empty line
    ],
)
def test_word_mode(reply, expected):
    item = CapabilityItem("w", "facts", "q", "Paris", match="word")
    assert score_answer(item, reply) is expected


def test_word_mode_phrases_and_case():
    gas = CapabilityItem("w", "facts", "q", "carbon dioxide", accept=("CO2",), match="word")
    assert score_answer(gas, "Plants take in carbon  dioxide.")
    assert score_answer(gas, "CO2")
    assert not score_answer(gas, "carbon")
    strict = CapabilityItem("w", "facts", "q", "Mars", match="word", case_sensitive=True)
    assert not score_answer(strict, "mars")


# ------------------------------------------------------------------ files


def write(tmp_path, data):
    path = tmp_path / "cap.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_user_file_round_trip(tmp_path):
    items = load_capability_items()
    path = write(tmp_path, {"items": [i.to_dict() for i in items]})
    assert load_capability_items(path) == items
    assert load_capability_items(write(tmp_path, [items[0].to_dict()])) == [items[0]]


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({"id": "a", "category": "c", "prompt": "p"}, "'answer' is None"),
        ({"id": "a", "category": "c", "prompt": "p", "answer": 12}, r"write numbers as strings"),
        ({"id": "a", "category": "c", "prompt": "p", "answer": "1", "typo": 1}, "unknown key"),
        ({"id": "a", "category": "c", "prompt": "p", "answer": "1", "accept": "2"}, "'accept'"),
        ({"id": "a", "category": "c", "prompt": "p", "answer": "1", "match": "regex"}, "match="),
        (
            {"id": "a", "category": "c", "prompt": "p", "answer": "x", "match": "number"},
            r"item 0 \(id 'a'\).*not a number",
        ),
        (
            {"id": "a", "category": "c", "prompt": "p", "answer": "x", "case_sensitive": "yes"},
            "true or false",
        ),
    ],
)
def test_malformed_items(tmp_path, row, pattern):
    path = write(tmp_path, [row])
    with pytest.raises(CapabilityError, match=pattern) as err:
        load_capability_items(path)
    assert str(path) in str(err.value)


def test_bad_files(tmp_path):
    row = {"id": "a", "category": "c", "prompt": "p", "answer": "1"}
    with pytest.raises(CapabilityError, match="repeats the id 'a'"):
        load_capability_items(write(tmp_path, [row, row]))
    with pytest.raises(CapabilityError, match="non-empty list"):
        load_capability_items(write(tmp_path, []))
    (tmp_path / "broken.json").write_text("[", encoding="utf-8")
    with pytest.raises(CapabilityError, match="not valid JSON"):
        load_capability_items(tmp_path / "broken.json")
    with pytest.raises(CapabilityError, match="cannot read"):
        load_capability_items(tmp_path / "missing.json")


# ------------------------------------------------------------------ statistics


def test_wilson_interval_hand_computed():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19207) / 1.38415 = 0.71674,
    # half 1.96 * sqrt(0.016 + 0.0096) / 1.38415 = 0.22658
    acc, lo, hi = accuracy_with_ci([True] * 8 + [False] * 2)
    assert acc == 0.8
    assert lo == pytest.approx(0.49016, abs=1e-5)
    assert hi == pytest.approx(0.94332, abs=1e-5)
    # 0 of 10: [0, z² / (n + z²)] = [0, 3.84146 / 13.84146]
    assert accuracy_with_ci([False] * 10) == (0.0, 0.0, pytest.approx(0.277533, abs=1e-6))
    # 10 of 10: [n / (n + z²), 1]
    assert accuracy_with_ci([True] * 10) == (1.0, pytest.approx(0.722467, abs=1e-6), 1.0)
    # 1 of 2: centre 0.5, half 1.95996 * sqrt(0.125 + 0.96037 / 4) / 2.92073
    acc, lo, hi = accuracy_with_ci([True, False])
    half = 1.959964 * math.sqrt(0.125 + 3.841459 / 16) / (1 + 3.841459 / 2)
    assert (lo, hi) == (pytest.approx(0.5 - half, abs=1e-6), pytest.approx(0.5 + half, abs=1e-6))


def test_wilson_rejects_empty_and_non_booleans():
    with pytest.raises(CapabilityError, match="at least one"):
        accuracy_with_ci([])
    with pytest.raises(CapabilityError, match="booleans"):
        accuracy_with_ci([True, None])  # type: ignore[list-item]


def test_paired_difference_hand_computed():
    # a right only on item 1 (n10 = 1), b right only on items 2 and 3 (n01 = 2), n = 5.
    # diff = (2 - 1) / 5 = 0.2. Agresti-Min: m = 7, p01 = 2.5/7, p10 = 1.5/7, d* = 1/7,
    # var = (4/7 - 1/49) / 7 = 0.0787172, half = 1.959964 * 0.280566 = 0.549899
    diff, lo, hi = paired_difference_ci(
        [True, True, False, False, True], [True, False, True, True, True]
    )
    assert diff == pytest.approx(0.2)
    assert lo == pytest.approx(1 / 7 - 0.549899, abs=1e-6)
    assert hi == pytest.approx(1 / 7 + 0.549899, abs=1e-6)
    # the reverse comparison mirrors it
    back, blo, bhi = paired_difference_ci(
        [True, False, True, True, True], [True, True, False, False, True]
    )
    assert back == pytest.approx(-0.2) and blo == pytest.approx(-hi) and bhi == pytest.approx(-lo)


def test_paired_difference_identical_conditions_is_not_a_point():
    diff, lo, hi = paired_difference_ci([True] * 6 + [False] * 4, [True] * 6 + [False] * 4)
    # n01 = n10 = 0, m = 12: half = 1.959964 * sqrt((1/12) / 12)
    assert diff == 0.0
    assert hi == pytest.approx(1.959964 * math.sqrt(1 / 144), abs=1e-6) and lo == -hi


def test_paired_difference_is_clipped_and_validated():
    diff, lo, hi = paired_difference_ci([False] * 3, [True] * 3)
    assert diff == 1.0 and hi <= 1.0 and lo > 0
    with pytest.raises(CapabilityError, match="same items.*3 and 2"):
        paired_difference_ci([True] * 3, [True] * 2)
    with pytest.raises(CapabilityError, match="at least one"):
        paired_difference_ci([], [])


def test_summarize_per_category():
    items = [
        CapabilityItem("a", "arithmetic", "q", "1", match="number"),
        CapabilityItem("b", "arithmetic", "q", "2", match="number"),
        CapabilityItem("c", "facts", "q", "x"),
    ]
    report = summarize(items, [True, False, True])
    assert report["overall"]["n"] == 3 and report["overall"]["correct"] == 2
    assert list(report["categories"]) == ["arithmetic", "facts"]
    assert report["categories"]["arithmetic"]["accuracy"] == 0.5
    assert report["categories"]["facts"]["high"] == 1.0
    with pytest.raises(CapabilityError, match="3 items but 2"):
        summarize(items, [True, True])


# ------------------------------------------------------------------ unchanged answers


def _row(i, reply, ids=None):
    row = {"id": f"q{i}", "category": "facts", "reply": reply, "correct": False}
    return row if ids is None else row | {"token_ids": ids}


def test_unchanged_answers_compares_tokens_paired_by_id():
    base = [_row(0, "Paris", [5, 6]), _row(1, "4", [9]), _row(2, "x", [1, 2, 3])]
    # same ids in another order; q1 differs by a token although its text is the same
    mine = [_row(2, "x", [1, 2, 3]), _row(1, "4", [9, 2]), _row(0, "Paris", [5, 6])]
    assert unchanged_answers(base, mine) == {
        "unchanged": 2,
        "n": 3,
        "unchanged_share": 2 / 3,
        "unchanged_basis": "tokens",
    }
    assert unchanged_answers(base, base)["unchanged_share"] == 1.0


def test_unchanged_answers_falls_back_to_exact_text():
    base = [_row(0, "Paris"), _row(1, "4 ")]
    mine = [_row(0, "Paris"), _row(1, "4")]  # a trailing space is a change
    assert unchanged_answers(base, mine) == {
        "unchanged": 1,
        "n": 2,
        "unchanged_share": 0.5,
        "unchanged_basis": "text",
    }
    mixed = unchanged_answers([_row(0, "a", [1]), _row(1, "b")], [_row(0, "z", [1]), _row(1, "b")])
    assert (mixed["unchanged"], mixed["unchanged_basis"]) == (2, "mixed")


def test_unchanged_answers_errors():
    with pytest.raises(CapabilityError, match="at least one baseline item"):
        unchanged_answers([], [_row(0, "a")])
    with pytest.raises(CapabilityError, match=r"lacks 1 baseline item\(s\) \(q1\)"):
        unchanged_answers([_row(0, "a"), _row(1, "b")], [_row(0, "a")])
