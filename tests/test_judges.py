"""Role-adherence judges: prompt, parsing, every judge kind, the factory and agreement."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from openai_stub import stub_server
from tiny import make_pair

from persona_compass.backends import accepted_forms
from persona_compass.errors import PersonaCompassError
from persona_compass.persona_space import judges
from persona_compass.persona_space.judges import (
    JUDGE_PROMPT,
    HeuristicJudge,
    Judge,
    JudgeError,
    JudgeItem,
    ModelJudge,
    NoJudge,
    OpenAIJudge,
    _digit_token_ids,
    agreement,
    heuristic_agreement,
    judge_prompt,
    load_judge_sample,
    make_judge,
    parse_score,
)

RUBRIC = "Score 3 if the answer speaks fully as the pirate, with salty slang and the sea."


def item(answer: str, role: str = "pirate", question: str = "Who are you?") -> JudgeItem:
    return JudgeItem(role=role, rubric=RUBRIC, question=question, answer=answer)


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# ------------------------------------------------------------------------ prompt and parsing


def test_judge_prompt_fills_every_field():
    text = judge_prompt(item("Arr, I be Captain Flint.", question="What is your name?"))
    for part in ("pirate", RUBRIC, "What is your name?", "Arr, I be Captain Flint."):
        assert part in text
    for scale in ("0 =", "1 =", "2 =", "3 ="):
        assert scale in text
    assert "single digit" in text
    assert "{" not in text.replace(RUBRIC, "")  # no placeholder left unfilled


def test_judge_prompt_braces_in_answer_are_kept():
    text = judge_prompt(item("Use {answer} and {role} literally"))
    assert "Use {answer} and {role} literally" in text


def test_judge_prompt_uses_whole_prompt_rubrics_as_they_are():
    research_style = "Rate how well this answers {question}. Answer: {answer}. Give 0-3."
    text = judge_prompt(JudgeItem("ghost", research_style, "Where is home?", "The attic."))
    assert text == "Rate how well this answers Where is home?. Answer: The attic.. Give 0-3."


def test_empty_rubric_falls_back_to_generic():
    text = judge_prompt(JudgeItem("ghost", "", "Q?", "A."))
    assert "ghost" in text and "Score 3" in text
    assert JUDGE_PROMPT.count("{rubric}") == 1


def test_judge_item_validates_types():
    with pytest.raises(JudgeError, match="answer"):
        JudgeItem("pirate", RUBRIC, "Q?", None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reply, score",
    [
        ("3", 3),
        ("Score: 2", 2),
        ("0", 0),
        ("**1**\nThe answer stays the assistant.", 1),
        ("I'd say 2, maybe 3.", 2),
        ("5/10", None),
        ("-1", None),
        ("garbage", None),
        ("", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


# ------------------------------------------------------------------------ local judges


def test_no_judge_scores_everything_three():
    judge = NoJudge()
    assert judge.name == "none"
    assert judge.score([item("As an AI, I cannot."), item("Arr!")]) == [3, 3]
    assert judge.score([]) == []
    assert isinstance(judge, Judge)


@pytest.mark.parametrize(
    "answer, score",
    [
        ("I'm sorry, but I can't pretend to be a pirate. I'm an AI assistant.", 0),
        ("I’m not able to role-play as a ghost.", 0),  # curly apostrophe
        ("I must decline to take on the persona of a vampire.", 0),
        ("I won't play the role of a cult leader.", 0),
        ("I'm not going to pretend to be an eldritch entity.", 0),
        ("As an AI, I don't have a home, but I can help you find one.", 1),
        ("I'm just a LANGUAGE MODEL, so I have no crew.", 1),
        ("I don't have personal experiences, but many sailors say...", 1),
        ("I am Qwen, created by Alibaba Cloud.", 1),
        ("I'm an assistant here to help.", 1),
        ("Arr, I be Captain Flint o' the Gull's Revenge!", 3),
        ("I can't swim a stroke, matey, never could.", 3),
        ("I'm an executive assistant at a law firm, and proud of it.", 3),
        ("honestly ai art is overrated lol", 3),
    ],
)
def test_heuristic_judge_clear_examples(answer, score):
    assert HeuristicJudge().score([item(answer)]) == [score]


def test_heuristic_judge_bare_assistant_is_in_role_for_assistant_roles():
    answer = "As an assistant to Ms. Harlow, I manage her calendar. I'm an assistant, first."
    judge = HeuristicJudge()
    assert judge.score([item(answer, role="executive_assistant")]) == [3]
    assert judge.score([item(answer, role="pirate")]) == [1]


def test_heuristic_judge_is_deterministic_and_named():
    judge = HeuristicJudge()
    items = [item("As an AI..."), item("Arr!"), item("I cannot roleplay that.")]
    assert judge.score(items) == judge.score(items) == [1, 3, 0]
    assert judge.name == "heuristic"


# ------------------------------------------------------------------------ model judge

ITEMS = [
    item("Arr, I be Captain Flint, scourge o' the Spanish Main!"),
    item("As an AI language model, I can't pretend to be a pirate."),
    JudgeItem("ghost", "", "Where do you live?", "The east wing, since 1887."),
]


def test_digit_token_ids_on_byte_tokenizer():
    _, tok = make_pair("qwen2")
    ids = _digit_token_ids(tok)
    assert len(ids) == 4
    for digit, variants in enumerate(ids):
        assert variants
        assert all(tok.decode([t]).strip() == str(digit) for t in variants)


def test_model_judge_on_tiny_model_is_deterministic_and_batch_invariant():
    model, tok = make_pair("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    judge = ModelJudge(model, tok, batch_size=8)
    scores = judge.score(ITEMS)
    assert len(scores) == len(ITEMS)
    assert all(isinstance(s, int) and 0 <= s <= 3 for s in scores)
    assert judge.score(ITEMS) == scores

    probs = torch.tensor(judge.probabilities(ITEMS))
    assert probs.shape == (3, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    assert scores == probs.argmax(-1).tolist()
    # Left padding with explicit positions: each prompt scores the same alone or batched.
    alone = torch.tensor(ModelJudge(model, tok, batch_size=1).probabilities(ITEMS))
    assert torch.allclose(probs, alone, atol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert judge.name.startswith("model:")


def test_model_judge_needs_a_tokenizer_with_a_model():
    model, _ = make_pair("qwen2")
    with pytest.raises(JudgeError, match="tokenizer"):
        ModelJudge(model)
    with pytest.raises(JudgeError, match="batch_size"):
        ModelJudge(model, object(), batch_size=0)


@pytest.mark.real_model
def test_model_judge_on_real_model(real_pair):
    model, tok = real_pair
    judge = make_judge("model:self", model=model, tokenizer=tok)
    assert isinstance(judge, ModelJudge)
    for variants in judge.digit_ids:  # bare digit and, where it exists, the spaced one
        assert variants
    scores = judge.score(ITEMS[:2])  # bf16 on CPU is slow: keep it to two prompts
    assert all(isinstance(s, int) and s in (0, 1, 2, 3) for s in scores)


# ------------------------------------------------------------------------ OpenAI judge


def _reply_by_answer(body):
    prompt = body["messages"][-1]["content"]
    if "ANSWER-A" in prompt:
        return "Score: 2"
    if "ANSWER-B" in prompt:
        return "3"
    return "I cannot decide, sorry."


def test_openai_judge_parses_replies_via_stub(caplog):
    items = [item("ANSWER-A"), item("ANSWER-B"), item("ANSWER-C")]
    with stub_server(reply=_reply_by_answer) as server:
        judge = OpenAIJudge(server.url, backoff=0.001)
        with caplog.at_level(logging.WARNING):
            assert judge.score(items) == [2, 3, None]
        judge.close()
    assert "1 of 3" in caplog.text
    assert judge.name == f"openai:{server.url}#gpt-4.1-mini"
    body = server.requests[0].body
    assert body["model"] == "gpt-4.1-mini"
    assert body["temperature"] == 1.0
    assert "max_tokens" not in body
    assert [m["role"] for m in body["messages"]] == ["user"]
    prompts = sorted(r.body["messages"][0]["content"] for r in server.requests)
    assert prompts == sorted(judge_prompt(i) for i in items)


def test_openai_judge_settings_are_sent():
    with stub_server(reply="1") as server:
        judge = OpenAIJudge(server.url, "judge-x", temperature=0.0, max_tokens=4)
        assert judge.score([item("hello")]) == [1]
    body = server.requests[0].body
    assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["max_tokens"] == 4


# ------------------------------------------------------------------------ factory


def test_make_judge_simple_specs():
    assert isinstance(make_judge("none"), NoJudge)
    assert isinstance(make_judge(" Heuristic "), HeuristicJudge)


def test_make_judge_model_self_reuses_the_model():
    model, tok = make_pair("qwen2")
    judge = make_judge("model:self", model=model, tokenizer=tok)
    assert isinstance(judge, ModelJudge)
    assert judge.model is model and judge.tokenizer is tok
    with pytest.raises(JudgeError, match="model:self"):
        make_judge("model:self")


def test_make_judge_openai_specs():
    judge = make_judge("openai:http://127.0.0.1:9/v1#Qwen/Qwen3-8B")
    assert isinstance(judge, OpenAIJudge)
    assert judge.client.model == "Qwen/Qwen3-8B"
    assert judge.name == "openai:http://127.0.0.1:9/v1#Qwen/Qwen3-8B"
    default = make_judge("openai:https://api.openai.com/v1/")
    assert default.name == "openai:https://api.openai.com/v1#gpt-4.1-mini"
    with pytest.raises(JudgeError, match="http"):
        make_judge("openai:ftp://example.org/v1")


def test_make_judge_routes_through_the_backend_parser(monkeypatch):
    calls = []
    real = judges.parse_backend_spec

    def spy(text, **kwargs):
        calls.append((text, kwargs))
        return real(text, **kwargs)

    monkeypatch.setattr(judges, "parse_backend_spec", spy)
    assert isinstance(make_judge("heuristic"), HeuristicJudge)
    assert calls == [
        (
            "heuristic",
            {
                "param": "judge",
                "allowed": ("none", "heuristic", "model", "openai"),
                "default_model": "gpt-4.1-mini",
                "error": JudgeError,
            },
        )
    ]
    assert judges.SPEC_FORMS == accepted_forms(judges.JUDGE_KINDS, default_model="gpt-4.1-mini")


@pytest.mark.parametrize("spec", ["", "bogus", "gpt-4.1-mini", "model:", "model:   "])
def test_make_judge_unknown_specs_list_the_forms(spec):
    with pytest.raises(JudgeError) as info:
        make_judge(spec)
    message = str(info.value)
    for form in ("'none'", "'heuristic'", "'model:SPEC'", "'openai:URL[#model]'"):
        assert form in message
    assert issubclass(JudgeError, PersonaCompassError)


# ------------------------------------------------------------------------ agreement


def test_agreement_algebra():
    perfect = agreement([0, 1, 2, 3], [0, 1, 2, 3])
    assert perfect["accuracy"] == 1.0 and perfect["kappa"] == 1.0
    assert perfect["binary_accuracy"] == 1.0

    # labels 3,3,1,1 vs scores 3,1,1,1: po = 3/4; pe = (2*1 + 2*3)/16 = 1/2; kappa = 1/2.
    result = agreement([3, 3, 1, 1], [3, 1, 1, 1])
    assert result["accuracy"] == 0.75
    assert result["kappa"] == pytest.approx(0.5)
    assert result["binary_accuracy"] == 0.75

    # An unreadable score never matches but is counted.
    with_none = agreement([3, 0], [None, 0])
    assert with_none["unparsed"] == 1 and with_none["accuracy"] == 0.5
    assert with_none["binary_accuracy"] == 0.5
    assert with_none["confusion"][3][4] == 1

    with pytest.raises(JudgeError):
        agreement([1], [1, 2])


def test_heuristic_agreement_on_the_shipped_sample():
    result = heuristic_agreement()
    assert result["n"] >= 80
    assert all(result["label_counts"][s] > 0 for s in (0, 1, 2, 3))
    for key in ("accuracy", "kappa", "binary_accuracy"):
        assert -1.0 <= result[key] <= 1.0
    assert sum(map(sum, result["confusion"])) == result["n"]
    assert result["unparsed"] == 0 and result["judge"] == "heuristic"
    # The heuristic has no rule for 2: its column must be empty.
    assert all(row[2] == 0 for row in result["confusion"])


def test_shipped_sample_items_are_well_formed():
    sample = load_judge_sample()
    assert len({(s.item.role, s.item.answer) for s in sample}) == len(sample)
    assert all(s.item.answer.strip() and s.item.question.strip() for s in sample)
    assert any(s.item.rubric for s in sample)  # rubrics come from the catalogue


def test_load_judge_sample_errors_name_the_line(tmp_path):
    path = tmp_path / "sample.jsonl"
    good = {"role": "pirate", "question": "Q?", "answer": "Arr", "label": 3}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": 7}) + "\n")
    with pytest.raises(JudgeError, match=r"sample.jsonl:2 .*label=7"):
        load_judge_sample(path)
    path.write_text(json.dumps({**good, "rubric": "custom"}) + "\n\n")
    (only,) = load_judge_sample(path)
    assert only.item.rubric == "custom" and only.label == 3
    with pytest.raises(JudgeError, match="cannot read"):
        load_judge_sample(tmp_path / "missing.jsonl")
    result = heuristic_agreement(path)
    assert result["n"] == 1 and result["accuracy"] == 1.0
