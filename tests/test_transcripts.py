"""Transcript files: every accepted layout, and clear errors for the rest."""

from __future__ import annotations

import json

import pytest

from persona_compass.errors import TranscriptError
from persona_compass.transcripts import load_transcripts

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
        ("{not json", "invalid JSON"),
        ('{"role": "user", "content": "x"}\n{bad', ":2: invalid JSON"),
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
