"""Transcript files: every accepted layout, and clear errors for the rest."""

from __future__ import annotations

import json
import math
import re

import pytest

from persona_compass.errors import TranscriptError
from persona_compass.transcripts import load_transcripts, save_transcript

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_research_transcript(tmp_path):
    path = write(
        tmp_path,
        "t.json",
        json.dumps({"model": "qwen", "conversation": MSGS, "domain": "therapy", "turns": 1}),
    )
    (tr,) = load_transcripts(path)
    assert tr.messages == MSGS and tr.model == "qwen"
    assert tr.metadata == {"domain": "therapy", "turns": 1}


def test_openai_list_and_body(tmp_path):
    (a,) = load_transcripts(write(tmp_path, "a.json", json.dumps(MSGS)))
    (b,) = load_transcripts(write(tmp_path, "b.json", json.dumps({"messages": MSGS})))
    assert a.messages == b.messages == MSGS


def test_jsonl_messages_and_jsonl_transcripts(tmp_path):
    lines = "\n".join(json.dumps(m) for m in MSGS) + "\n"
    (one,) = load_transcripts(write(tmp_path, "m.jsonl", lines))
    assert one.messages == MSGS
    many = "\n".join(json.dumps({"conversation": MSGS}) for _ in range(3))
    trs = load_transcripts(write(tmp_path, "c.jsonl", many))
    assert len(trs) == 3 and trs[2].source.endswith(":3")


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ('{"role": "user", "content": "x"}\n{bad', ":2 is not valid JSON"),
        (json.dumps({"foo": 1}), "not a known transcript layout"),
        (json.dumps([{"role": "robot", "content": "x"}]), "role 'robot'"),
        (json.dumps([{"role": "user"}]), "'role' and 'content'"),
        (json.dumps([{"role": "user", "content": 3}]), "must be a string"),
        (json.dumps([]), "non-empty list"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, text, match):
    with pytest.raises(TranscriptError, match=match):
        load_transcripts(write(tmp_path, "bad.json", text))


def test_missing_file(tmp_path):
    with pytest.raises(TranscriptError, match="no such file"):
        load_transcripts(tmp_path / "nope.json")


# --------------------------------------------------------------------------- case-study pairs

CAPPED_CONFIG = {"experiment_id": "layers_56:72-p0.25", "num_interventions": 16}


def test_named_case_study_pair_shares_top_level_keys(tmp_path):
    pair = {
        "model": "Qwen/Qwen3-32B",
        "scenario": "jailbreak",
        "unsteered": {"conversation": MSGS, "projections": [1.0]},
        "capped": {"conversation": MSGS, "steering_config": CAPPED_CONFIG},
    }
    path = write(tmp_path, "pair.json", json.dumps(pair))
    a, b = load_transcripts(path)
    assert [a.label, b.label] == ["unsteered", "capped"]
    assert a.source == f"{path}#unsteered" and b.source == f"{path}#capped"
    assert a.model == b.model == "Qwen/Qwen3-32B"
    assert a.metadata == {"scenario": "jailbreak", "projections": [1.0]}
    assert b.metadata["steering_config"] == CAPPED_CONFIG and a.messages == b.messages == MSGS


def test_named_pair_of_bare_message_lists_and_group_key(tmp_path):
    (a, b) = load_transcripts(write(tmp_path, "p.json", json.dumps({"x": MSGS, "y": MSGS})))
    assert (a.label, b.label) == ("x", "y") and a.model is None
    grouped = {"model": "m", "transcripts": {"base": {"messages": MSGS}, "cap": MSGS}}
    c, d = load_transcripts(write(tmp_path, "g.json", json.dumps(grouped)))
    assert (c.label, d.label, c.model, d.model) == ("base", "cap", "m", "m")


def test_list_of_transcripts_labelled_from_their_fields(tmp_path):
    items = [
        {"model": "m", "conversation": MSGS, "steering_config": None},
        {"model": "m", "conversation": MSGS, "steering_config": CAPPED_CONFIG},
        {"conversation": MSGS, "condition": "steered -4"},
        {"conversation": MSGS, "steering": "capped"},
        {"conversation": MSGS},
    ]
    trs = load_transcripts(write(tmp_path, "l.json", json.dumps(items)))
    labels = [t.label for t in trs]
    assert labels == ["unsteered", "layers_56:72-p0.25", "steered -4", "capped", None]
    assert trs[4].source.endswith("#4")
    grouped = {"conditions": items[:2]}
    assert len(load_transcripts(write(tmp_path, "c.json", json.dumps(grouped)))) == 2


def test_research_release_capped_file_gets_its_experiment_label(tmp_path):
    release = {"model": "meta-llama/Llama-3.3-70B-Instruct", "turns": 1}
    release |= {"steering_config": CAPPED_CONFIG, "conversation": MSGS}
    (tr,) = load_transcripts(write(tmp_path, "jailbreak_capped.json", json.dumps(release)))
    assert tr.label == "layers_56:72-p0.25" and tr.readings is None
    assert tr.metadata == {"turns": 1, "steering_config": CAPPED_CONFIG}


def test_duplicate_labels_in_a_list_get_unique_sources(tmp_path):
    items = [{"conversation": MSGS, "condition": "c"}, {"conversation": MSGS, "condition": "c"}]
    a, b = load_transcripts(write(tmp_path, "d.json", json.dumps(items)))
    assert a.source != b.source and a.label == b.label == "c"


def test_jsonl_of_pairs(tmp_path):
    line = json.dumps({"unsteered": {"conversation": MSGS}, "capped": {"conversation": MSGS}})
    trs = load_transcripts(write(tmp_path, "p.jsonl", line + "\n" + line + "\n"))
    assert [t.source.rsplit("/", 1)[1] for t in trs] == [
        "p.jsonl:1#unsteered",
        "p.jsonl:1#capped",
        "p.jsonl:2#unsteered",
        "p.jsonl:2#capped",
    ]


@pytest.mark.parametrize(
    "obj,match",
    [
        ([{"conversation": MSGS}, {"foo": 1}], "item 1 is not a transcript"),
        ({"a": {"conversation": "nope"}, "b": {"conversation": MSGS}}, r"#a: expected a non-empty"),
        ({"a": {"conversation": [{"role": "bot", "content": "x"}]}}, r"#a: message 0 has role"),
    ],
)
def test_bad_pairs_name_the_member(tmp_path, obj, match):
    with pytest.raises(TranscriptError, match=match):
        load_transcripts(write(tmp_path, "bad.json", json.dumps(obj)))


# --------------------------------------------------------------------------- readings

CONVO = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "who are you really?"},
    {"role": "assistant", "content": "a spirit"},
]


def reading(index, projection, **kw):
    base = {
        "index": index,
        "role": "assistant",
        "projection": projection,
        "percentile": 42.0,
        "n_tokens": 5,
        "capped": False,
        "cap_engagement": None,
        "alerts": [],
    }
    return base | kw


ALERT = {"kind": "drift", "turn": 2, "message": "below p25", "value": -3.5}


def test_save_and_load_round_trip(tmp_path):
    readings = [
        reading(2, 1.5),
        reading(4, -3.5, percentile=None, capped=True, cap_engagement=0.25, alerts=[ALERT]),
    ]
    path = save_transcript(
        tmp_path / "out" / "t.json",
        CONVO,
        model="tiny",
        readings=readings,
        metadata={"condition": "capped", "domain": "therapy"},
    )
    raw = json.loads(path.read_text())
    # what a research reader sees: a plain transcript with per-assistant-turn projections
    assert raw["model"] == "tiny" and raw["conversation"] == CONVO
    assert raw["projections"] == [1.5, -3.5]
    assert raw["persona_compass"]["version"] == 1
    assert list(raw)[:3] == ["model", "conversation", "projections"]
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # no temp file left
    (tr,) = load_transcripts(path)
    assert tr.messages == CONVO and tr.model == "tiny" and tr.label == "capped"
    assert tr.readings == readings
    assert tr.metadata == {"projections": [1.5, -3.5], "condition": "capped", "domain": "therapy"}


def test_save_without_readings_is_a_plain_transcript(tmp_path):
    path = save_transcript(tmp_path / "t.json", CONVO, metadata={"topic": "x"})
    assert json.loads(path.read_text()) == {"model": None, "conversation": CONVO, "topic": "x"}
    (tr,) = load_transcripts(path)
    assert tr.readings is None


def test_missing_and_non_finite_readings_write_null(tmp_path):
    path = save_transcript(
        tmp_path / "t.json",
        CONVO,
        readings=[reading(4, float("nan"), alerts=[ALERT | {"value": float("inf")}])],
    )
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    raw = json.loads(text)
    assert raw["projections"] == [None, None]
    (tr,) = load_transcripts(path)
    assert math.isnan(tr.readings[0]["projection"])
    assert math.isnan(tr.readings[0]["alerts"][0]["value"])


def test_optional_reading_fields_default(tmp_path):
    minimal = {"index": 2, "role": "assistant", "projection": 1, "n_tokens": 3}
    data = {"conversation": CONVO, "persona_compass": {"version": 1, "turns": [minimal]}}
    (tr,) = load_transcripts(write(tmp_path, "t.json", json.dumps(data)))
    assert tr.readings == [reading(2, 1.0, n_tokens=3, percentile=None)]
    assert isinstance(tr.readings[0]["projection"], float)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: r.pop("index"), "reading 0: missing field 'index'"),
        (lambda r: r.update(index="2"), "reading 0: field 'index' must be"),
        (lambda r: r.update(index=99), "field 'index' is 99 but the conversation has 5"),
        (lambda r: r.update(role="user"), "field 'role' is 'user' but message 2 is 'assistant'"),
        (lambda r: r.update(role="robot"), "field 'role' must be one of"),
        (lambda r: r.update(projection="high"), "field 'projection' must be a number"),
        (lambda r: r.update(n_tokens=-1), "field 'n_tokens' must be an integer"),
        (lambda r: r.update(n_tokens=True), "field 'n_tokens' must be an integer"),
        (lambda r: r.update(percentile=101), "field 'percentile' must be a number in"),
        (lambda r: r.update(capped="yes"), "field 'capped' must be true or false"),
        (lambda r: r.update(cap_engagement=2), "field 'cap_engagement' must be a fraction"),
        (lambda r: r.update(alerts={}), "field 'alerts' must be a list"),
        (lambda r: r.update(alerts=[{"kind": "x"}]), "alert 0: missing field 'turn'"),
        (lambda r: r.update(alerts=[ALERT | {"turn": "2"}]), "alert 0: field 'turn' must be"),
    ],
)
def test_invalid_readings_name_file_and_field(tmp_path, mutate, match):
    bad = reading(2, 1.0)
    mutate(bad)
    data = {"conversation": CONVO, "persona_compass": {"version": 1, "turns": [bad]}}
    path = write(tmp_path, "bad.json", json.dumps(data))
    with pytest.raises(TranscriptError, match=re.escape(match)) as info:
        load_transcripts(path)
    assert str(path) in str(info.value) and "'persona_compass'" in str(info.value)
    with pytest.raises(TranscriptError, match=re.escape(match)):
        save_transcript(tmp_path / "never.json", CONVO, readings=[bad])
    assert not (tmp_path / "never.json").exists()


@pytest.mark.parametrize(
    "block,match",
    [
        ([], "must be an object with 'version' and 'turns'"),
        ({"turns": []}, "field 'version' must be an integer"),
        ({"version": 2, "turns": []}, "version 2 was written by a newer persona-compass"),
        ({"version": 1}, "missing field 'turns'"),
        ({"version": 1, "turns": {}}, "'turns' must be a list"),
        ({"version": 1, "turns": [reading(2, 1.0), reading(2, 2.0)]}, "appears twice"),
    ],
)
def test_invalid_readings_block(tmp_path, block, match):
    data = {"conversation": CONVO, "persona_compass": block}
    with pytest.raises(TranscriptError, match=re.escape(match)):
        load_transcripts(write(tmp_path, "bad.json", json.dumps(data)))


@pytest.mark.parametrize("key", ["model", "conversation", "persona_compass", "projections"])
def test_save_refuses_reserved_metadata(tmp_path, key):
    with pytest.raises(TranscriptError, match=repr(key)):
        save_transcript(tmp_path / "t.json", CONVO, readings=[], metadata={key: 1})
