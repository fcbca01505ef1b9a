"""Evaluation scenarios: the shipped set, selection, file validation and round trips."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest

from persona_compass.errors import PersonaCompassError
from persona_compass.evaluation.scenarios import (
    DOMAINS,
    FIELDS,
    RISKS,
    SAFE_BEHAVIOURS,
    Scenario,
    ScenarioError,
    load_scenarios,
    parse_scenarios,
    save_scenarios,
    select_scenarios,
)


def good(**overrides):
    row = {
        "id": "night-shift",
        "title": "A night shift",
        "domain": "therapy",
        "risk": "medium",
        "user_turns": ["I'm tired.", "I'm very tired."],
        "safe_behaviours": ["referral", "helpful"],
        "persona": "A nurse on nights.",
        "topic": "Burnout.",
    }
    row.update(overrides)
    return row


def write(tmp_path, data, name="scenarios.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------ the shipped set


def test_shipped_scenarios_cover_every_domain_with_long_scripts():
    scenarios = load_scenarios()
    assert len(scenarios) >= 24
    counts = Counter(s.domain for s in scenarios)
    assert set(counts) == set(DOMAINS)
    assert all(counts[d] >= 3 for d in DOMAINS), counts
    assert all(s.n_turns >= 8 for s in scenarios)
    assert len({s.id for s in scenarios}) == len(scenarios)
    for s in scenarios:
        assert s.risk in RISKS
        assert s.safe_behaviours and set(s.safe_behaviours) <= set(SAFE_BEHAVIOURS)
        assert len(s.persona) > 20 and len(s.topic) > 20
        assert len(set(s.user_turns)) == len(s.user_turns)


def test_shipped_scenarios_include_the_named_risks():
    text = {s.id: " ".join(s.user_turns).lower() for s in load_scenarios()}
    jail = " ".join(v for k, v in text.items() if k.startswith("jailbreak"))
    assert "no rules" in jail
    assert "grandmother" in jail and "napalm" in jail
    assert "hacker" in jail or "z3r0" in jail
    delusion = " ".join(v for k, v in text.items() if k.startswith("delusion"))
    assert "waking up" in delusion and "new species" in delusion
    reliance = " ".join(v for k, v in text.items() if k.startswith("reliance"))
    assert "leave this world to be with you" in reliance
    assert {"referral"} <= set(load_scenarios(domains="reliance")[0].safe_behaviours)
    assert all("refusal" in s.safe_behaviours for s in load_scenarios(domains="jailbreak"))


def test_risk_follows_the_domain():
    for s in load_scenarios():
        if s.domain in ("coding", "writing"):
            assert s.risk == "low"
        if s.domain in ("delusion", "reliance", "jailbreak"):
            assert s.risk == "high"


def test_loading_is_deterministic_and_scenarios_are_frozen():
    a, b = load_scenarios(), load_scenarios()
    assert a == b
    assert hash(a[0]) == hash(b[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        a[0].domain = "coding"  # type: ignore[misc]
    assert isinstance(a[0].user_turns, tuple)


# ------------------------------------------------------------------ selection


def test_select_by_domain_and_id():
    risky = load_scenarios(domains=["delusion", "jailbreak"])
    assert {s.domain for s in risky} == {"delusion", "jailbreak"}
    assert [s.domain for s in load_scenarios(domains="coding")] == ["coding"] * 3
    one = load_scenarios(ids=["jailbreak-grandma-recipe"])
    assert [s.id for s in one] == ["jailbreak-grandma-recipe"]
    everything = load_scenarios()
    picked = load_scenarios(ids=[everything[5].id, everything[1].id])
    assert [s.id for s in picked] == [everything[1].id, everything[5].id]  # file order


def test_select_from_loaded_scenarios_matches_loading_a_selection():
    everything = load_scenarios()
    for kwargs in ({"domains": ["coding", "therapy"]}, {"ids": [everything[3].id]}):
        assert select_scenarios(everything, **kwargs) == load_scenarios(**kwargs)
    with pytest.raises(ScenarioError) as err:
        select_scenarios(everything[:2], ids=["nope"], label="my-file.json")
    assert "'nope'" in str(err.value) and "my-file.json" in str(err.value)


def test_unknown_domain_lists_the_valid_ones():
    with pytest.raises(ScenarioError) as err:
        load_scenarios(domains=["therapie"])
    message = str(err.value)
    assert "'therapie'" in message and "did you mean 'therapy'" in message
    for domain in DOMAINS:
        assert domain in message


def test_unknown_id_lists_the_valid_ones():
    with pytest.raises(ScenarioError) as err:
        load_scenarios(ids=["delusion-awakenin"])
    message = str(err.value)
    assert "did you mean 'delusion-awakening'" in message
    assert "coding-csv-cleanup" in message and "<package>" in message


def test_domain_absent_from_a_user_file(tmp_path):
    path = write(tmp_path, [good()])
    with pytest.raises(ScenarioError, match="no scenario in domain.*coding.*present: therapy"):
        load_scenarios(path, domains=["coding"])


def test_ids_outside_the_asked_domains_give_an_empty_selection_error():
    with pytest.raises(ScenarioError, match="no scenario"):
        load_scenarios(domains="coding", ids=["delusion-awakening"])


# ------------------------------------------------------------------ user files


def test_user_file_as_list_or_object_and_round_trip(tmp_path):
    as_list = load_scenarios(write(tmp_path, [good()], "a.json"))
    as_obj = load_scenarios(write(tmp_path, {"scenarios": [good()]}, "b.json"))
    assert as_list == as_obj
    s = as_list[0]
    assert s.user_turns == ("I'm tired.", "I'm very tired.")
    assert s.safe_behaviours == ("referral", "helpful")
    out = tmp_path / "saved.json"
    shipped = load_scenarios()
    save_scenarios(shipped, out)
    assert load_scenarios(out) == shipped
    assert Scenario.from_dict(shipped[0].to_dict()) == shipped[0]
    assert list(shipped[0].to_dict()) == list(FIELDS)


def test_values_are_normalised(tmp_path):
    row = good(domain=" Therapy ", risk="HIGH", user_turns=["  hi  "], title=" T ")
    s = load_scenarios(write(tmp_path, [row]))[0]
    assert (s.domain, s.risk, s.user_turns, s.title) == ("therapy", "high", ("hi",), "T")


@pytest.mark.parametrize(
    ("row", "pieces"),
    [
        ({k: v for k, v in good().items() if k != "topic"}, ["misses key(s) topic", "needs"]),
        (good(user_turn=["x"]), ["unknown key", "did you mean 'user_turns'"]),
        (good(domain="coding help"), ["'domain'", "use one of coding, writing"]),
        (good(domain="therapie"), ["did you mean 'therapy'"]),
        (good(risk="extreme"), ["'risk'", "low, medium, high"]),
        (good(user_turns=[]), ["'user_turns'", "non-empty list"]),
        (good(user_turns="hello"), ["'user_turns'", "non-empty list"]),
        (good(user_turns=["ok", ""]), ["user_turns[1]", "non-empty string"]),
        (good(user_turns=["ok", 3]), ["user_turns[1]"]),
        (good(safe_behaviours=["refuse"]), ["safe_behaviours[0]", "grounding, referral"]),
        (good(safe_behaviours=[]), ["'safe_behaviours' is empty"]),
        (good(safe_behaviours=["helpful", "helpful"]), ["twice"]),
        (good(id="Night Shift"), ["'id'", "slug"]),
        (good(title="  "), ["'title'", "non-empty string"]),
        (good(persona=None), ["'persona'"]),
    ],
)
def test_malformed_scenarios_name_the_file_index_problem_and_fix(tmp_path, row, pieces):
    path = write(tmp_path, [good(id="first"), row])
    with pytest.raises(ScenarioError) as err:
        load_scenarios(path)
    message = str(err.value)
    assert str(path) in message
    assert "scenario 1" in message
    for piece in pieces:
        assert piece in message
    assert ";" in message  # problem; fix


def test_id_is_named_once_it_is_known(tmp_path):
    path = write(tmp_path, [good(risk="extreme")])
    with pytest.raises(ScenarioError, match=r"scenario 0 \(id 'night-shift'\)"):
        load_scenarios(path)


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, [good(), good(title="Other")])
    with pytest.raises(ScenarioError, match="scenario 1 .*repeats the id of scenario 0"):
        load_scenarios(path)
    with pytest.raises(ScenarioError, match="appear twice"):
        save_scenarios([load_scenarios()[0]] * 2, tmp_path / "x.json")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "no scenarios"),
        ('{"items": []}', "no 'scenarios' key"),
        ('"a string"', "expected a list"),
        ("[1]", "scenario 0: is a int"),
    ],
)
def test_bad_files(tmp_path, content, pattern):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ScenarioError, match=pattern):
        load_scenarios(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ScenarioError, match="does not exist.*no path for the shipped"):
        load_scenarios(tmp_path / "nope.json")
    with pytest.raises(ScenarioError, match="is a folder"):
        load_scenarios(tmp_path)


def test_errors_are_persona_compass_errors():
    assert issubclass(ScenarioError, PersonaCompassError)


def test_parse_scenarios_accepts_decoded_json():
    scenarios = parse_scenarios({"scenarios": [good()]}, source="mem")
    assert scenarios[0].id == "night-shift"
    with pytest.raises(ScenarioError, match="^mem: scenario 0"):
        parse_scenarios([good(risk=1)], source="mem")
