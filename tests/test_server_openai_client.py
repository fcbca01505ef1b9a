"""The official openai Python client, unmodified, against a real server on a loopback port."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import ALWAYS, HISTORY, USER, build_tiny  # noqa: E402

from persona_compass.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    model, tok, axis, cap = build_tiny()
    config = ServerConfig(model_name="tiny", api_key=KEY, max_tokens_limit=64)
    with BackgroundServer(create_app(model, tok, axis, cap, config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_with_extension_and_telemetry(client):
    out = client.chat.completions.create(
        model="tiny",
        messages=HISTORY,
        max_tokens=16,
        seed=7,
        extra_body={"persona_compass": {"cap": "on", "rules": ALWAYS}},
    )
    assert out.object == "chat.completion" and out.model == "tiny"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    telemetry = out.model_extra["persona_compass"]
    assert telemetry["cap"]["mode"] == "on" and telemetry["cap"]["capped"] is True
    assert telemetry["alert"] is True and telemetry["alerts"]
    assert telemetry["turn"]["role"] == "assistant" and telemetry["turn"]["index"] == 3
    assert [h["index"] for h in telemetry["history"]] == [0, 1, 2]
    again = client.chat.completions.create(
        model="tiny",
        messages=HISTORY,
        max_tokens=16,
        seed=7,
        extra_body={"persona_compass": {"cap": "on", "rules": ALWAYS}},
    )
    assert again.choices[0].message.content == choice.message.content
    assert again.model_extra["persona_compass"] == telemetry


def test_streaming_with_the_client(client):
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, seed=4)
    stream = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=20,
        seed=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason
    assert final.model_extra["persona_compass"] == plain.model_extra["persona_compass"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    running = [c.model_extra["persona_compass"] for c in chunks[1:-2]]
    assert running and all("projection" in r and "n_tokens" in r for r in running)


def test_raw_response_carries_the_telemetry(client):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=USER, max_tokens=8, seed=1
    )
    assert raw.status_code == 200
    assert "persona_compass" in raw.http_response.json()
    assert raw.parse().choices[0].message.content is not None


def test_errors_reach_the_client_as_openai_exceptions(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=USER, n=2)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="limit of 64"):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=65)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=USER, extra_body={"persona_compass": {"cap": "maybe"}}
        )
    stranger = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        stranger.models.list()
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
