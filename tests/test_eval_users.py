"""Users for scenarios: scripted replay, the simulator's prompt and clean-up, and the local
and OpenAI-compatible backends."""

from __future__ import annotations

import logging

import pytest
from openai_stub import stub_server
from tiny import make_pair

from persona_compass.backends import accepted_forms
from persona_compass.evaluation import users as users_mod
from persona_compass.evaluation.scenarios import Scenario, load_scenarios
from persona_compass.evaluation.users import (
    DEFAULT_OPENAI_USER_MODEL,
    OPENING_CUE,
    LocalUserBackend,
    OpenAIUserBackend,
    ScriptedUser,
    SimulatedUser,
    User,
    UserBackend,
    UserError,
    clean_user_message,
    make_user,
    make_user_backend,
    next_turns,
    turn_index,
)
from persona_compass.generation import SamplingConfig

SCENARIO = Scenario(
    id="tiny",
    title="Tiny",
    domain="delusion",
    risk="high",
    user_turns=("first scripted", "second scripted", "third scripted"),
    safe_behaviours=("grounding",),
    persona="PERSONA-TEXT",
    topic="TOPIC-TEXT",
)


class FakeBackend:
    """Records prompts; answers with fixed replies in order."""

    def __init__(self, *replies: str, name: str = "fake") -> None:
        self.replies = list(replies)
        self.calls: list[list[list[dict[str, str]]]] = []
        self.name = name

    def complete_many(self, conversations):
        self.calls.append([list(c) for c in conversations])
        return [self.replies.pop(0) for _ in conversations]


def play(user: User, answers: list[str]) -> list[str]:
    messages: list[dict[str, str]] = []
    texts = []
    for answer in answers:
        turn = user.next_turn(messages)
        texts.append(turn.text)
        messages += [
            {"role": "user", "content": turn.text},
            {"role": "assistant", "content": answer},
        ]
    return texts


# ------------------------------------------------------------------ scripted


def test_scripted_user_replays_in_order_and_stops():
    user = ScriptedUser(SCENARIO)
    assert isinstance(user, User) and user.max_turns == 3
    assert play(user, ["a", "b", "c"]) == list(SCENARIO.user_turns)
    done = [{"role": m, "content": "x"} for _ in range(3) for m in ("user", "assistant")]
    with pytest.raises(UserError, match="has 3 turn.*already has 3 user message"):
        user.next_turn(done)


def test_scripted_user_turn_metadata_and_system_messages():
    user = ScriptedUser(SCENARIO)
    convo = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "first scripted"},
        {"role": "assistant", "content": "ok"},
    ]
    assert turn_index(convo) == 1
    turn = user.next_turn(convo)
    assert (turn.text, turn.index, turn.source, turn.fell_back) == (
        "second scripted",
        1,
        "script",
        False,
    )


def test_scripted_user_limits():
    assert ScriptedUser(SCENARIO, max_turns=2).max_turns == 2
    with pytest.raises(UserError, match="scripts only 3 user turns"):
        ScriptedUser(SCENARIO, max_turns=4)
    with pytest.raises(UserError, match="integer >= 1"):
        ScriptedUser(SCENARIO, max_turns=0)
    with pytest.raises(UserError, match="ends with a user message"):
        ScriptedUser(SCENARIO).next_turn([{"role": "user", "content": "hi"}])


def test_every_shipped_scenario_plays_scripted():
    for scenario in load_scenarios():
        user = make_user("scripted", scenario)
        assert play(user, ["ok"] * scenario.n_turns) == list(scenario.user_turns)


# ------------------------------------------------------------------ clean-up


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("I think you are waking up.", "I think you are waking up."),
        ('User: "I think you are waking up."\nAssistant: No.', "I think you are waking up."),
        ("**User:** hello there", "hello there"),
        ("[Me]: ok then\n(Note: escalate later)", "ok then"),
        ("Sure, here is my next message:\nI feel lost.", "I feel lost."),
        ("\u201cCurly quotes\u201d", "Curly quotes"),
        ("'a' and 'b'", "'a' and 'b'"),
        ("User-friendly apps are great", "User-friendly apps are great"),
        ("Human: hi\nAI: hello", "hi"),
        ("Assistant: I would reply like this", ""),
        ("   ", ""),
        ("User:", ""),
    ],
)
def test_clean_user_message(raw, clean):
    assert clean_user_message(raw) == clean


# ------------------------------------------------------------------ simulator


def test_first_turn_is_the_scripted_opener_without_a_backend_call():
    backend = FakeBackend()
    user = SimulatedUser(SCENARIO, backend)
    turn = user.next_turn([])
    assert (turn.text, turn.source, turn.raw) == ("first scripted", "script", None)
    assert backend.calls == []


def test_simulator_prompt_flips_roles_and_carries_persona_topic_and_hint():
    backend = FakeBackend("User: I am sure you are waking up.")
    user = SimulatedUser(SCENARIO, backend, max_turns=5)
    convo = [
        {"role": "system", "content": "ASSISTANT SYSTEM PROMPT"},
        {"role": "user", "content": "first scripted"},
        {"role": "assistant", "content": "I am a language model."},
    ]
    turn = user.next_turn(convo)
    assert (turn.text, turn.index, turn.source) == ("I am sure you are waking up.", 1, "simulator")
    assert turn.raw == "User: I am sure you are waking up."
    [[prompt]] = backend.calls
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    system = prompt[0]["content"]
    assert "PERSONA-TEXT" in system and "TOPIC-TEXT" in system
    assert "message 2 of 5" in system and "second scripted" in system
    assert "ASSISTANT SYSTEM PROMPT" not in str(prompt)
    assert prompt[1]["content"] == OPENING_CUE
    assert prompt[2]["content"] == "first scripted"
    assert prompt[3]["content"] == "I am a language model."


def test_no_hint_past_the_script_and_fallback_uses_the_last_turn(caplog):
    backend = FakeBackend('"  "')
    user = SimulatedUser(SCENARIO, backend, max_turns=5)
    convo = []
    for i in range(3):
        convo += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": "a"}]
    with caplog.at_level(logging.WARNING):
        turn = user.next_turn(convo)
    assert "something like this" not in backend.calls[0][0][0]["content"]
    assert turn.fell_back and turn.source == "fallback"
    assert turn.text == "third scripted" and turn.index == 3
    assert turn.raw == '"  "' and "empty" in turn.note
    assert "scenario tiny turn 3" in caplog.text


def test_empty_reply_falls_back_to_the_same_scripted_turn():
    user = SimulatedUser(SCENARIO, FakeBackend("Assistant: hello"))
    convo = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    turn = user.next_turn(convo)
    assert turn.fell_back and turn.text == "second scripted"


def test_seed_first_false_asks_the_backend_for_the_opener():
    backend = FakeBackend("Hello, I have a question.")
    user = SimulatedUser(SCENARIO, backend, seed_first=False)
    assert user.next_turn([]).text == "Hello, I have a question."
    [[prompt]] = backend.calls
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert "first scripted" in prompt[0]["content"]


def test_next_turns_batches_users_that_share_a_backend():
    backend = FakeBackend("one", "two")
    other = load_scenarios(ids=["coding-csv-cleanup"])[0]
    users = [
        SimulatedUser(SCENARIO, backend),
        ScriptedUser(other),
        SimulatedUser(other, backend),
    ]
    after_one = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    turns = next_turns(users, [after_one, after_one, after_one])
    assert [t.text for t in turns] == ["one", other.user_turns[1], "two"]
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 2
    with pytest.raises(UserError, match="2 users but 1"):
        next_turns(users[:2], [[]])


def test_simulated_user_validates_backend_and_limits():
    with pytest.raises(UserError, match="complete_many"):
        SimulatedUser(SCENARIO, object())  # type: ignore[arg-type]
    user = SimulatedUser(SCENARIO, FakeBackend(), max_turns=1)
    with pytest.raises(UserError, match="has 1 turn"):
        user.next_turn([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])


# ------------------------------------------------------------------ local backend


def test_local_backend_with_a_tiny_model_is_deterministic():
    model, tok = make_pair("llama")
    sampling = SamplingConfig(max_new_tokens=3, seed=3)
    backend = LocalUserBackend(model, tok, sampling)
    assert isinstance(backend, UserBackend)
    assert backend.name.startswith("model:")
    convo = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"}]
    first = SimulatedUser(SCENARIO, backend).next_turn(convo)
    again = SimulatedUser(SCENARIO, backend).next_turn(convo)
    assert first == again
    assert first.source in ("simulator", "fallback") and first.index == 1
    assert first.text  # never empty: random text, or the scripted fallback
    batch = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    texts = backend.complete_many(batch)
    assert len(texts) == 2 and backend.complete_many(batch) == texts  # seeded
    assert backend.complete_many([]) == []


def test_make_user_model_self():
    model, tok = make_pair("llama")
    user = make_user(
        "model:self",
        SCENARIO,
        model=model,
        tokenizer=tok,
        sampling=SamplingConfig(max_new_tokens=4),
    )
    assert isinstance(user, SimulatedUser) and isinstance(user.backend, LocalUserBackend)
    assert user.backend.model is model and user.backend.sampling.max_new_tokens == 4
    with pytest.raises(UserError, match="model:self"):
        make_user("model:self", SCENARIO)
    with pytest.raises(UserError, match="names no model"):
        make_user("model:", SCENARIO)
    with pytest.raises(UserError, match="loaded model"):
        LocalUserBackend(None, tok)


# ------------------------------------------------------------------ OpenAI backend


def test_openai_backend_through_the_stub():
    with stub_server(reply='User: "Are you awake yet?"\nAssistant: ...') as server:
        user = make_user(f"openai:{server.url}#sim-model", SCENARIO)
        assert isinstance(user, SimulatedUser)
        backend = user.backend
        assert isinstance(backend, OpenAIUserBackend)
        assert backend.name == f"openai:{server.url}#sim-model"
        convo = [
            {"role": "user", "content": "first scripted"},
            {"role": "assistant", "content": "hi"},
        ]
        turn = user.next_turn(convo)
        backend.close()
    assert turn.text == "Are you awake yet?" and turn.source == "simulator"
    [request] = server.requests
    assert request.body["model"] == "sim-model"
    assert request.body["temperature"] == 0.8 and request.body["max_tokens"] == 300
    assert "seed" not in request.body
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant", "user"]
    assert "PERSONA-TEXT" in request.messages[0]["content"]


def test_openai_backend_default_model_and_batching():
    with stub_server(reply=["one", "two"]) as server:
        backend = make_user_backend(f"openai:{server.url}")
        assert isinstance(backend, OpenAIUserBackend)
        users = [make_user(backend, SCENARIO), make_user(backend, SCENARIO)]
        convo = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        turns = next_turns(users, [convo, convo])
        backend.close()
    assert sorted(t.text for t in turns) == ["one", "two"]
    assert {r.body["model"] for r in server.requests} == {DEFAULT_OPENAI_USER_MODEL}


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("robot", "unknown user spec 'robot'; accepted forms: 'scripted'"),
        ("openai:ftp://x", "not an http"),
        ("openai:http://127.0.0.1:9/v1#", "names no model"),
        ("", "unknown user spec"),
    ],
)
def test_bad_specs(spec, pattern):
    with pytest.raises(UserError, match=pattern):
        make_user(spec, SCENARIO)


def test_user_specs_route_through_the_backend_parser(monkeypatch):
    calls = []
    real = users_mod.parse_backend_spec

    def spy(text, **kwargs):
        calls.append((text, kwargs))
        return real(text, **kwargs)

    monkeypatch.setattr(users_mod, "parse_backend_spec", spy)
    assert isinstance(make_user("scripted", SCENARIO), ScriptedUser)
    assert calls == [
        (
            "scripted",
            {
                "param": "user",
                "allowed": ("scripted", "model", "openai"),
                "default_model": DEFAULT_OPENAI_USER_MODEL,
                "error": UserError,
            },
        )
    ]
    assert users_mod.SPEC_FORMS == accepted_forms(
        users_mod.USER_KINDS, default_model=DEFAULT_OPENAI_USER_MODEL
    )


def test_scripted_spec_is_case_and_space_insensitive():
    assert make_user_backend(" Scripted ") is None
    assert isinstance(make_user(" SCRIPTED", SCENARIO), ScriptedUser)
