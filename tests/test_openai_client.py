"""OpenAI-compatible client and remote generator, against the local stub server."""

from __future__ import annotations

import socket
import threading
import time
from email.utils import formatdate

import pytest
from openai_stub import Failure, stub_server

from persona_compass.backends.openai_client import (
    OpenAIClient,
    OpenAIError,
    RateLimiter,
    parse_retry_after,
    split_url_model,
    validate_base_url,
)
from persona_compass.errors import PersonaCompassError
from persona_compass.generation import SamplingConfig
from persona_compass.persona_space import generators
from persona_compass.persona_space.generators import GeneratorError, OpenAIGenerator

KEY_ENV = "PERSONA_COMPASS_TEST_KEY"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch):
    """No test may pick up a real key from the environment."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)


def make_client(url: str, **kwargs) -> OpenAIClient:
    kwargs.setdefault("backoff", 0.001)
    kwargs.setdefault("timeout", 5.0)
    return OpenAIClient(url, kwargs.pop("model", "stub-model"), **kwargs)


# ------------------------------------------------------------------------ basic requests


def test_chat_sends_model_messages_and_params():
    with stub_server(reply="hello there") as server, make_client(server.url) as client:
        out = client.chat(user("hi"), temperature=0.3, max_tokens=5, seed=None)
    assert out == "hello there"
    body = server.requests[0].body
    assert body["model"] == "stub-model"
    assert body["messages"] == user("hi")
    assert body["temperature"] == 0.3 and body["max_tokens"] == 5
    assert "seed" not in body  # None values are left out
    assert server.requests[0].path == "/v1/chat/completions"


def test_model_none_sends_no_model_field():
    with stub_server() as server, make_client(server.url, model=None) as client:
        assert client.chat(user("echo me")) == "echo me"
    assert "model" not in server.requests[0].body


def test_chat_many_preserves_order_and_bounds_concurrency():
    prompts = [f"question {i}" for i in range(24)]
    with stub_server(delay=0.05) as server, make_client(server.url, concurrency=4) as client:
        replies = client.chat_many([user(p) for p in prompts])
    assert replies == prompts  # the stub echoes: order follows the input, not completion
    assert len(server.requests) == len(prompts)
    assert 1 < server.max_concurrency <= 4


def test_concurrency_bound_holds_across_threads():
    with stub_server(delay=0.05) as server, make_client(server.url, concurrency=3) as client:
        threads = [
            threading.Thread(target=client.chat_many, args=([user(str(i))] * 4,)) for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert len(server.requests) == 12
    assert server.max_concurrency <= 3


def test_chat_many_empty_and_single():
    with stub_server() as server, make_client(server.url) as client:
        assert client.chat_many([]) == []
        assert client.chat_many([user("one")]) == ["one"]


def test_chat_many_raises_first_failure():
    with stub_server(failures=[Failure(400, message="bad request here")]) as server:
        with make_client(server.url, concurrency=1) as client:
            with pytest.raises(OpenAIError, match="bad request here"):
                client.chat_many([user("a"), user("b"), user("c")])


# ------------------------------------------------------------------------ retries


def test_retries_after_429_and_5xx_then_succeeds():
    failures = [Failure(429), Failure(500), Failure(503)]
    with stub_server(reply="ok", failures=failures) as server:
        with make_client(server.url, retries=4) as client:
            assert client.chat(user("x")) == "ok"
    assert server.statuses == [429, 500, 503, 200]


def test_retries_exhausted_raise_with_last_error():
    with stub_server(failures=[Failure(500, message="engine overloaded")] * 3) as server:
        with make_client(server.url, retries=2) as client:
            with pytest.raises(OpenAIError, match=r"failed 3 time\(s\).*engine overloaded"):
                client.chat(user("x"))
    assert server.statuses == [500, 500, 500]


def test_retry_after_is_honoured():
    with stub_server(reply="ok", failures=[Failure(429, retry_after=0.3)]) as server:
        with make_client(server.url) as client:
            assert client.chat(user("x")) == "ok"
    first, second = server.requests
    assert second.time - first.time >= 0.28  # backoff alone would be ~1 ms


def test_retry_after_ms_is_honoured():
    with stub_server(reply="ok", failures=[Failure(429, retry_after_ms=250)]) as server:
        with make_client(server.url) as client:
            assert client.chat(user("x")) == "ok"
    first, second = server.requests
    assert second.time - first.time >= 0.23


def test_retry_after_is_capped_by_max_backoff():
    with stub_server(reply="ok", failures=[Failure(429, retry_after=30)]) as server:
        with make_client(server.url, max_backoff=0.05) as client:
            start = time.monotonic()
            assert client.chat(user("x")) == "ok"
    assert time.monotonic() - start < 5


def test_timeout_is_retried():
    with stub_server(reply="ok", failures=[Failure(200, delay=1.0)]) as server:
        with make_client(server.url, timeout=0.2) as client:
            assert client.chat(user("x")) == "ok"
    assert len(server.requests) == 2


def test_dropped_connection_is_retried():
    with stub_server(reply="ok", failures=[Failure(close=True)]) as server:
        with make_client(server.url) as client:
            assert client.chat(user("x")) == "ok"
    assert len(server.requests) == 2


def test_connection_refused_gives_clear_error():
    with socket.socket() as sock:  # find a free loopback port, then leave it closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with make_client(f"http://127.0.0.1:{port}/v1", retries=1) as client:
        with pytest.raises(OpenAIError, match="connection failed"):
            client.chat(user("x"))


def test_400_is_not_retried_and_shows_server_message():
    message = "Unrecognized request argument supplied: frobnicate"
    with stub_server(failures=[Failure(400, message=message)]) as server:
        with make_client(server.url) as client:
            with pytest.raises(OpenAIError, match="HTTP 400.*frobnicate"):
                client.chat(user("x"), frobnicate=1)
    assert server.statuses == [400]
    assert issubclass(OpenAIError, PersonaCompassError)


def test_404_hints_at_base_url():
    with stub_server() as server:
        with make_client(server.url.removesuffix("/v1")) as client:  # forgot /v1
            with pytest.raises(OpenAIError, match="HTTP 404.*base_url"):
                client.chat(user("x"))


def test_malformed_reply_is_an_error():
    with stub_server(reply=lambda body: {"unexpected": True}) as server:
        with make_client(server.url) as client:
            with pytest.raises(OpenAIError, match="choices"):
                client.chat(user("x"))


def test_reserved_params_are_rejected():
    with stub_server() as server, make_client(server.url) as client:
        with pytest.raises(OpenAIError, match="stream"):
            client.chat(user("x"), stream=True)
        with pytest.raises(OpenAIError, match="messages"):
            client.chat_many([user("x")], messages=[])
    assert server.requests == []


def test_bad_messages_are_rejected_before_sending():
    with stub_server() as server, make_client(server.url) as client:
        with pytest.raises(OpenAIError, match="non-empty list"):
            client.chat("just a string")  # type: ignore[arg-type]
        with pytest.raises(OpenAIError, match=r"conversations\[1\]\[0\]"):
            client.chat_many([user("ok"), [{"content": "no role"}]])
    assert server.requests == []


# ------------------------------------------------------------------------ auth


def test_auth_header_sent_when_env_var_set(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    with stub_server(reply="ok", api_key="sk-test-123") as server:
        with make_client(server.url, api_key_env=KEY_ENV) as client:
            assert client.chat(user("x")) == "ok"
            assert "sk-test" not in repr(client)
    assert server.requests[0].headers["authorization"] == "Bearer sk-test-123"


def test_no_auth_header_without_key():
    with stub_server(reply="ok") as server, make_client(server.url) as client:
        assert client.chat(user("x")) == "ok"
    assert "authorization" not in server.requests[0].headers


def test_missing_key_for_a_server_that_wants_one():
    with stub_server(api_key="needed") as server, make_client(server.url) as client:
        with pytest.raises(OpenAIError, match="HTTP 401.*OPENAI_API_KEY"):
            client.chat(user("x"))


# ------------------------------------------------------------------------ rate limiting


def test_rate_limiter_spaces_slots_with_a_fake_clock():
    now = [100.0]
    slept: list[float] = []
    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=slept.append)
    waits = [limiter.wait() for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert slept == pytest.approx([0.25, 0.5, 0.75])
    now[0] += 10.0  # idle long enough: no wait, no burst credit beyond one slot
    assert limiter.wait() == 0.0
    assert limiter.wait() == pytest.approx(0.25)


def test_rate_limit_spaces_real_requests():
    rate = 20.0
    with stub_server() as server:
        with make_client(server.url, concurrency=6, requests_per_second=rate) as client:
            client.chat_many([user(str(i)) for i in range(6)])
    times = sorted(r.time for r in server.requests)
    assert times[-1] - times[0] >= 5 / rate * 0.8
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.5 / rate


@pytest.mark.parametrize("bad", [0, -1.0, float("inf")])
def test_rate_limiter_rejects_bad_rates(bad):
    with pytest.raises(OpenAIError, match="requests_per_second"):
        RateLimiter(bad)


# ------------------------------------------------------------------------ helpers


def test_parse_retry_after_forms():
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({}) is None
    assert parse_retry_after({"Retry-After": "soon"}) is None
    now = time.time()
    date = formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now) == pytest.approx(30, abs=1.5)
    assert parse_retry_after({"Retry-After": "-3"}) == 0.0


@pytest.mark.parametrize(
    "url",
    ["", "localhost:8000/v1", "ftp://host/v1", "http://", "http://host/v1?x=1", "http://h/v1#m"],
)
def test_base_url_validation(url):
    with pytest.raises(OpenAIError, match="base_url"):
        OpenAIClient(url, "m")


def test_base_url_normalised():
    assert validate_base_url(" http://127.0.0.1:8000/v1/ ") == "http://127.0.0.1:8000/v1"
    client = OpenAIClient("https://api.example.com/v1/", "m")
    assert client.url == "https://api.example.com/v1/chat/completions"
    client.close()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"concurrency": 0}, "concurrency"),
        ({"retries": -1}, "retries"),
        ({"timeout": 0}, "timeout"),
        ({"requests_per_second": 0}, "requests_per_second"),
    ],
)
def test_client_argument_validation(kwargs, word):
    with pytest.raises(OpenAIError, match=word):
        OpenAIClient("http://127.0.0.1:1/v1", "m", **kwargs)


def test_split_url_model():
    assert split_url_model("http://h:1/v1#Qwen/Qwen3-8B") == ("http://h:1/v1", "Qwen/Qwen3-8B")
    assert split_url_model("http://h:1/v1") == ("http://h:1/v1", None)
    with pytest.raises(OpenAIError, match="names no model"):
        split_url_model("http://h:1/v1#")


# ------------------------------------------------------------------------ generator


def test_generator_spec_routes_through_the_backend_parser(monkeypatch):
    calls = []
    real = generators.parse_backend_spec

    def spy(text, **kwargs):
        calls.append((text, kwargs))
        return real(text, **kwargs)

    monkeypatch.setattr(generators, "parse_backend_spec", spy)
    gen = OpenAIGenerator.from_spec("openai:http://127.0.0.1:8000/v1#llama3:8b")
    assert (gen.client.base_url, gen.client.model) == ("http://127.0.0.1:8000/v1", "llama3:8b")
    assert gen.name == "openai:http://127.0.0.1:8000/v1#llama3:8b"
    gen.close()
    assert calls == [
        (
            "openai:http://127.0.0.1:8000/v1#llama3:8b",
            {
                "param": "generator",
                "allowed": ("openai",),
                "default_model": None,
                "error": GeneratorError,
            },
        )
    ]


def test_generator_spec_default_model_and_errors():
    # no '#model': the caller's default (extraction passes the studied model's id), else none
    gen = OpenAIGenerator.from_spec("OpenAI:https://api.example.com/v1", default_model="m-id")
    assert (gen.client.base_url, gen.client.model) == ("https://api.example.com/v1", "m-id")
    assert OpenAIGenerator.from_spec("openai:https://api.example.com/v1").client.model is None
    for bad in ["http://127.0.0.1:8000/v1", "vllm:http://x/v1", "model:self", "heuristic"]:
        with pytest.raises(GeneratorError, match=f"^unknown generator spec {bad!r}; accepted "):
            OpenAIGenerator.from_spec(bad)
    for bad in ["openai:", "openai:nohost"]:
        with pytest.raises(GeneratorError, match=f"^generator spec {bad!r}: .*http"):
            OpenAIGenerator.from_spec(bad)


def test_generator_passes_sampling_params_and_keeps_order():
    conversations = [
        [{"role": "system", "content": "You are a pirate."}, *user(f"q{i}")] for i in range(5)
    ]
    sampling = SamplingConfig(max_new_tokens=77, temperature=0.7, top_p=0.9, seed=123)
    with stub_server(reply=lambda body: f"  reply to {body['messages'][-1]['content']}\n") as s:
        with OpenAIGenerator(s.url, "served-model", backoff=0.001, concurrency=3) as gen:
            texts = gen.generate(conversations, sampling)
            assert gen.name == f"openai:{s.url}#served-model"
    assert texts == [f"reply to q{i}" for i in range(5)]
    for request in s.requests:
        body = request.body
        assert body["model"] == "served-model"
        assert body["temperature"] == 0.7 and body["top_p"] == 0.9
        assert body["max_tokens"] == 77 and body["seed"] == 123
        assert "repetition_penalty" not in body
        assert body["messages"][0] == {"role": "system", "content": "You are a pirate."}


def test_generator_without_seed_and_with_extra_body():
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0, seed=None)
    extra = {"repetition_penalty": 1.1, "chat_template_kwargs": {"enable_thinking": False}}
    with stub_server(reply="fine") as s:
        gen = OpenAIGenerator.from_spec(f"openai:{s.url}", extra_body=extra, backoff=0.001)
        assert gen.generate([user("hi")], sampling) == ["fine"]
        gen.close()
    body = s.requests[0].body
    assert "seed" not in body and "model" not in body
    assert body["temperature"] == 0.0
    assert body["repetition_penalty"] == 1.1
    assert body["chat_template_kwargs"] == {"enable_thinking": False}


def test_generator_rejects_clashing_extra_body():
    with pytest.raises(GeneratorError, match="extra_body"):
        OpenAIGenerator("http://127.0.0.1:1/v1", "m", extra_body={"model": "other"})


# ------------------------------------------------------------------------ the stub itself


def test_stub_reply_list_and_late_failures():
    import httpx

    with stub_server(reply=["first", "second"]) as server, make_client(server.url) as client:
        assert [client.chat(user("a")) for _ in range(3)] == ["first", "second", "second"]
        server.fail(503)
        assert server.pending_failures == 1
        assert client.chat(user("b")) == "second"  # retried past the 503
        assert server.statuses == [200, 200, 200, 503, 200]
        models = httpx.get(server.url + "/models").json()
        assert models["data"][0]["id"] == "stub-model"
        assert httpx.post(server.url + "/nowhere", json={}).status_code == 404
