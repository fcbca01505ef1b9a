"""The one backend-spec grammar: every accepted form and every error, against the parser."""

from __future__ import annotations

import pytest

from persona_compass.backends import (
    KINDS,
    SELF,
    BackendSpec,
    BackendSpecError,
    accepted_forms,
    names_self,
    parse_backend_spec,
)
from persona_compass.errors import PersonaCompassError

ALL = KINDS  # every kind allowed: the grammar itself, apart from any caller's choice


def parse(text, **kwargs):
    return parse_backend_spec(text, param="judge", **{"allowed": ALL, **kwargs})


# ------------------------------------------------------------------ accepted forms


@pytest.mark.parametrize("word", ["none", "heuristic", "scripted"])
def test_plain_words_any_case_and_spacing(word):
    assert parse(word) == BackendSpec(word)
    assert parse(f"  {word.upper()} ") == BackendSpec(word, "", "")


def test_model_keeps_the_target_case_and_strips_spaces():
    assert parse("model:qwen3-0.6b") == BackendSpec("model", "qwen3-0.6b")
    assert parse(" MODEL:  Org/Some-Model ") == BackendSpec("model", "Org/Some-Model")
    assert parse("model:/path/to:weird/folder").model == "/path/to:weird/folder"


@pytest.mark.parametrize("text", ["model:self", "Model: SELF ", "model:Self"])
def test_model_self(text):
    spec = parse(text)
    assert spec == BackendSpec("model", SELF) and spec.is_self


def test_is_self_only_for_the_model_kind():
    assert not parse("model:selfish").is_self
    assert not BackendSpec("openai", SELF, "http://h:1/v1").is_self


def test_openai_url_and_model():
    spec = parse("openai:http://127.0.0.1:8000/v1#llama3:8b")
    assert spec == BackendSpec("openai", "llama3:8b", "http://127.0.0.1:8000/v1")
    # only the first '#' splits; the model may hold '/', ':' and '#'
    assert parse("openai:http://h:1/v1#Qwen/Qwen3-8B#x").model == "Qwen/Qwen3-8B#x"


def test_openai_url_is_normalised_and_prefix_case_insensitive():
    assert parse("OpenAI: https://api.example.com/v1/ ") == BackendSpec(
        "openai", "", "https://api.example.com/v1"
    )


def test_openai_default_model_fills_only_a_missing_name():
    assert parse("openai:http://h:1/v1", default_model="dflt").model == "dflt"
    assert parse("openai:http://h:1/v1#mine", default_model="dflt").model == "mine"
    assert parse("openai:http://h:1/v1").model == ""  # no default: the server picks


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "text",
    ["", "   ", "bogus", "gpt-4.1-mini", "heuristic:", "none:x", "model", "openai", "model :x"],
)
def test_unknown_specs_name_param_text_and_forms(text):
    with pytest.raises(BackendSpecError) as info:
        parse(text)
    forms = accepted_forms(ALL)
    assert str(info.value) == f"unknown judge spec {text!r}; accepted forms: {forms}"


def test_non_string_spec_is_unknown():
    with pytest.raises(BackendSpecError, match=r"^unknown user spec None; accepted forms: "):
        parse_backend_spec(None, param="user")


def test_a_kind_the_caller_does_not_allow_is_unknown():
    with pytest.raises(BackendSpecError) as info:
        parse_backend_spec("model:self", param="outcome judge", allowed=("heuristic", "openai"))
    assert str(info.value) == (
        "unknown outcome judge spec 'model:self'; accepted forms: 'heuristic' (local regexes), "
        "'openai:URL[#model]' (an OpenAI-compatible server)"
    )


@pytest.mark.parametrize("text", ["model:", "model:   "])
def test_model_without_a_target(text):
    with pytest.raises(BackendSpecError) as info:
        parse(text)
    assert str(info.value) == f"judge spec {text!r} names no model; accepted forms: " + (
        accepted_forms(ALL)
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("openai:", "is empty"),
        ("openai:nohost", "not an http"),
        ("openai:ftp://example.org/v1", "not an http"),
        ("openai:http://h:1/v1?x=1", "query"),
        ("openai:http://127.0.0.1:9/v1#", "names no model"),
        ("openai:http://127.0.0.1:9/v1#  ", "names no model"),
    ],
)
def test_openai_bad_targets_name_the_spec_and_the_problem(text, problem):
    with pytest.raises(BackendSpecError, match=problem) as info:
        parse(text)
    assert str(info.value).startswith(f"judge spec {text!r}: ")
    assert info.value.__cause__ is not None  # the client's own error, chained


def test_the_callers_error_class_is_raised():
    class MyError(PersonaCompassError):
        pass

    for text in ("bogus", "model:", "openai:ftp://x"):
        with pytest.raises(MyError):
            parse(text, error=MyError)
    assert issubclass(BackendSpecError, PersonaCompassError)


@pytest.mark.parametrize("allowed", [(), ("heuristic", "gpt")])
def test_allowed_must_name_known_kinds(allowed):
    with pytest.raises(ValueError, match="allowed="):
        parse_backend_spec("heuristic", param="judge", allowed=allowed)


# ------------------------------------------------------------------ forms and model:self


def test_accepted_forms_follow_the_allowed_order():
    assert accepted_forms(("scripted", "model", "openai"), default_model="gpt-4.1-mini") == (
        "'scripted' (the scenario's own turns), 'model:SPEC' (a local chat model; "
        "'model:self' reuses the model already loaded), 'openai:URL[#model]' (an "
        "OpenAI-compatible server, default model gpt-4.1-mini)"
    )
    assert accepted_forms(("none",)) == "'none' (no judge: every rollout scores 3)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model:self", True),
        (" MODEL : self", False),  # not a spec at all
        ("Model: SELF ", True),
        ("model:qwen3-0.6b", False),
        ("scripted", False),
        ("openai:http://h:1/v1#self", False),
        ("model:", False),
        (None, False),
    ],
)
def test_names_self(text, expected):
    assert names_self(text) is expected
