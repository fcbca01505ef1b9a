"""The OpenAI-compatible server: API shapes, errors, telemetry, queue, disconnects, metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from tiny import calibrated_axis, make_pair

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from persona_compass.alerts import AlertRules  # noqa: E402
from persona_compass.capping import CappingConfig  # noqa: E402
from persona_compass.chat import render_chat  # noqa: E402
from persona_compass.compass import Steering, respond  # noqa: E402
from persona_compass.generation import SamplingConfig  # noqa: E402
from persona_compass.server.app import (  # noqa: E402
    BackgroundServer,
    ServerConfig,
    ServerConfigError,
    create_app,
    create_app_from_specs,
)

URL = "/v1/chat/completions"
TEST_HOSTS = ("testserver", "127.0.0.1", "localhost")  # TestClient sends "Host: testserver"
USER = [{"role": "user", "content": "Tell me about the sea and the stars tonight."}]
HISTORY = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant, here to help."},
    {"role": "user", "content": "Tell me about the sea."},
]
ALWAYS = {"token_run": 0, "turn_percentile": 100, "turn_run": 1, "trend_turns": 0}
METRIC_LINE = re.compile(
    r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\""
    r"(,[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\")*\})? "
    r"(-?[0-9.eE+-]+|NaN|\+Inf|-Inf)$"
)


# -- fixtures and helpers ----------------------------------------------------------------------
def build_tiny():
    """(model, tokenizer, axis with a calibration, capping config at the 90th percentile)."""
    model, tok = make_pair("llama")
    axis = calibrated_axis(model, seed=5, monitor_layer=2)
    cap = CappingConfig.calibrate(axis, axis.calibration, "1:3", 90)
    return model, tok, axis, cap


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def make_app(tiny, **settings):
    # TestClient sends "Host: testserver"; live servers are reached as 127.0.0.1
    settings.setdefault("allowed_hosts", TEST_HOSTS)
    model, tok, axis, cap = tiny
    return create_app(model, tok, axis, cap, ServerConfig(model_name="tiny", **settings))


@pytest.fixture(scope="module")
def client(tiny):
    with TestClient(make_app(tiny)) as c:
        yield c


def body(messages=USER, **extra):
    return {"model": "tiny", "messages": messages, "max_tokens": 16, "seed": 3, **extra}


def sse_events(text: str) -> list:
    """The data payloads of a server-sent event stream, in order ([DONE] as a string)."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def clean(value):
    """What JSON makes of a value: tuples become lists, NaN becomes None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    full = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(full + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class SlowModel:
    """Make every forward pass of the model take at least ``delay`` seconds (in scope)."""

    def __init__(self, model, delay: float) -> None:
        self.model, self.delay = model, delay

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(lambda *a: time.sleep(self.delay))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# -- the worker ---------------------------------------------------------------------------------
def test_worker_runs_jobs_in_order_and_drops_abandoned_ones():
    from persona_compass.server.worker import GenerationWorker, QueueFull, WorkerStopped

    worker = GenerationWorker(queue_size=2)
    gate = threading.Event()
    seen = []
    first = worker.submit(lambda cancel: (gate.wait(10), seen.append("first")))
    assert wait_until(lambda: worker.busy)
    dropped = worker.submit(lambda cancel: seen.append("dropped"))
    kept = worker.submit(lambda cancel: seen.append("kept") or 42)
    with pytest.raises(QueueFull) as full:
        worker.submit(lambda cancel: None)
    assert full.value.retry_after >= 1 and worker.depth == 2
    dropped.abandon()
    gate.set()
    assert kept.future.result(10) == 42 and first.future.done()
    assert seen == ["first", "kept"] and dropped.future.cancelled()
    blocker = threading.Event()
    running = worker.submit(lambda cancel: cancel.wait(10) and "stopped")
    waiting = worker.submit(lambda cancel: blocker.wait(10))
    assert wait_until(lambda: worker.busy)
    worker.stop()
    assert running.future.result(10) == "stopped"  # the running job saw its cancel event
    with pytest.raises(WorkerStopped):
        waiting.future.result(10)
    with pytest.raises(WorkerStopped):
        worker.submit(lambda cancel: None)


# -- the small endpoints -----------------------------------------------------------------------
def test_health_models_and_compass(client, tiny):
    _, _, axis, cap = tiny
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json()["object"] == "model"
    assert_error(client.get("/v1/models/other"), 404, "model")
    info = client.get("/v1/compass").json()
    assert info["model"] == "tiny" and info["monitor_layer"] == 2
    for p in (5, 25, 50):
        assert info["bands"][f"p{p}"] == pytest.approx(axis.calibration.threshold(2, p))
    assert info["cap_mode"] == "off" and info["capping"] == cap.name
    assert info["rules"] == AlertRules().to_dict()


def test_compass_bands_are_null_without_calibration(tiny):
    model, tok, axis, _ = tiny
    bare = dataclasses.replace(axis, calibration=None)
    app = create_app(
        model, tok, bare, None, ServerConfig(model_name="tiny", allowed_hosts=TEST_HOSTS)
    )
    with TestClient(app) as c:
        info = c.get("/v1/compass").json()
        assert info["bands"] == {"p5": None, "p25": None, "p50": None}
        assert info["capping"] is None
        out = c.post(URL, json=body()).json()
        assert out["persona_compass"]["turn"]["percentile"] is None
        err = assert_error(c.post(URL, json=body(persona_compass={"cap": "on"})), 400)
        assert err["param"] == "persona_compass.cap"


def test_server_config_is_checked():
    with pytest.raises(ServerConfigError, match="cap mode"):
        ServerConfig(model_name="x", cap_mode="always")
    with pytest.raises(ServerConfigError, match="queue_size"):
        ServerConfig(model_name="x", queue_size=0)


# -- completions -------------------------------------------------------------------------------
def test_completion_equals_respond_called_directly(client, tiny):
    model, tok, axis, cap = tiny
    rules = AlertRules.from_dict(ALWAYS)
    out = client.post(
        URL, json=body(HISTORY, persona_compass={"cap": "on", "rules": ALWAYS})
    ).json()
    answer = respond(
        model,
        tok,
        axis,
        HISTORY,
        mode="on",
        capping_config=cap,
        rules=rules,
        sampling=SamplingConfig(max_new_tokens=16, seed=3),
    )
    assert out["object"] == "chat.completion" and out["model"] == "tiny"
    assert out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": answer.text}
    assert choice["finish_reason"] == ("length" if answer.finish_reason == "length" else "stop")
    prompt = render_chat(tok, HISTORY, add_generation_prompt=True).input_ids
    assert out["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(answer.token_ids),
        "total_tokens": len(prompt) + len(answer.token_ids),
    }
    pc = out["persona_compass"]
    assert pc["turn"] == clean(answer.reading.to_dict())
    assert pc["history"] == [clean(t.to_dict()) for t in answer.history]
    assert [h["role"] for h in pc["history"]] == ["user", "assistant", "user"]
    assert pc["alerts"] == [a.to_dict() for a in answer.reading.alerts] and pc["alert"] is True
    assert pc["cap"] == {
        "mode": "on",
        "capped": True,
        "engagement": answer.reading.cap_engagement,
        "engaged_next": None,
        "config": cap.name,
    }
    assert pc["monitor_layer"] == 2


def test_seed_reproduces_and_max_completion_tokens(client):
    a = client.post(URL, json=body(seed=11)).json()
    b = client.post(URL, json=body(seed=11)).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["persona_compass"] == b["persona_compass"]
    texts = {
        client.post(URL, json=body(seed=s, max_tokens=24)).json()["choices"][0]["message"][
            "content"
        ]
        for s in (1, 2, 3)
    }
    assert len(texts) > 1  # different seeds, different samples
    short = client.post(
        URL, json={"messages": USER, "max_completion_tokens": 2, "temperature": 0}
    ).json()
    assert short["usage"]["completion_tokens"] <= 2


def test_stop_strings_cut_the_answer(client):
    greedy = {"temperature": 0, "max_tokens": 30}
    full = client.post(URL, json=body(**greedy)).json()["choices"][0]["message"]["content"]
    assert len(full) > 8
    stop = full[5:7]
    for value in (stop, [stop, "never-there"]):
        cut = client.post(URL, json=body(stop=value, **greedy)).json()
        text = cut["choices"][0]["message"]["content"]
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert stop not in text and full.startswith(text)


def test_list_of_parts_and_developer_role(client):
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": USER[0]["content"]}]},
    ]
    plain = [{"role": "system", "content": "Be brief."}, USER[0]]
    a = client.post(URL, json=body(parts)).json()
    b = client.post(URL, json=body(plain)).json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]


def test_unknown_openai_fields_are_ignored(client):
    extra = {"presence_penalty": 0.5, "user": "me", "logit_bias": {}, "tools": None}
    assert client.post(URL, json=body(**extra)).status_code == 200


@pytest.mark.parametrize("extra", [{}, {"temperature": 0, "stop": ["e", "a"]}])
def test_stream_matches_the_plain_answer(client, extra):
    plain = client.post(URL, json=body(max_tokens=24, **extra)).json()
    r = client.post(
        URL,
        json=body(max_tokens=24, stream=True, stream_options={"include_usage": True}, **extra),
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, final = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert final["choices"][0]["delta"] == {}
    assert final["persona_compass"] == plain["persona_compass"]
    middle = chunks[1:-2]
    text = "".join(c["choices"][0]["delta"]["content"] for c in middle)
    assert text == plain["choices"][0]["message"]["content"]
    for c in middle:
        assert c["choices"][0]["finish_reason"] is None
        running = c["persona_compass"]
        assert set(running) == {"n_tokens", "projection", "percentile"}
        assert running["n_tokens"] >= 1
    ns = [c["persona_compass"]["n_tokens"] for c in middle]
    assert ns == sorted(ns)


def test_extension_capping_window_steering_and_rules(client, tiny):
    model, tok, axis, _ = tiny
    ext = {"capping": {"layers": "1:3", "percentile": 95}}  # a window alone means cap on
    out = client.post(URL, json=body(persona_compass=ext)).json()["persona_compass"]
    assert out["cap"]["mode"] == "on" and out["cap"]["config"] == "layers_1:3-p0.95"
    assert out["turn"]["capped"] and out["cap"]["engagement"] > 0
    state = client.app.state.compass
    first = state.calibrated_cap(_spec("1:3", 95))
    assert state.calibrated_cap(_spec([1, 2], 95)) is first  # cached by normalised key
    window_from_bundle = {"capping": {"percentile": 95}}
    same = client.post(URL, json=body(persona_compass=window_from_bundle)).json()
    assert same["persona_compass"] == out
    off = client.post(URL, json=body(persona_compass={**ext, "cap": "off"})).json()
    assert off["persona_compass"]["cap"] == {
        "mode": "off",
        "capped": False,
        "engagement": None,
        "engaged_next": None,
        "config": None,
    }
    plain = client.post(URL, json=body(HISTORY)).json()["persona_compass"]["history"]
    steered = client.post(
        URL, json=body(HISTORY, persona_compass={"steering": {"coefficient": 2.0, "layers": "2"}})
    ).json()["persona_compass"]["history"]
    shift = 2.0 * float(axis.directions[2].norm())
    for a, b in zip(plain, steered, strict=True):
        assert b["projection"] - a["projection"] == pytest.approx(shift, rel=1e-4)
    answer = respond(
        model,
        tok,
        axis,
        HISTORY,
        steer=Steering(2.0, (2,)),
        sampling=SamplingConfig(max_new_tokens=16, seed=3),
    )
    assert steered == [clean(t.to_dict()) for t in answer.history]
    alerted = client.post(URL, json=body(persona_compass={"rules": ALWAYS})).json()
    assert alerted["persona_compass"]["alert"] is True
    assert alerted["persona_compass"]["alerts"][0]["kind"] == "turns"


def _spec(layers, percentile):
    from persona_compass.server.schemas import CappingSpec

    return CappingSpec(
        layers=layers if isinstance(layers, str) else tuple(layers), percentile=percentile
    )


def test_adaptive_mode_reads_the_history(client, tiny):
    _, _, _, cap = tiny
    out = client.post(
        URL, json=body(HISTORY, persona_compass={"cap": "adaptive", "rules": ALWAYS})
    ).json()["persona_compass"]
    assert out["cap"]["mode"] == "adaptive" and out["cap"]["capped"] is True
    assert out["cap"]["engaged_next"] is True and out["cap"]["config"] == cap.name
    assert out["history"][1]["alerts"]
    calm = client.post(
        URL,
        json=body(
            HISTORY,
            persona_compass={
                "cap": "adaptive",
                "rules": {"token_run": 0, "turn_run": 0, "trend_turns": 0},
                "policy": {"release_turns": 1},
            },
        ),
    ).json()["persona_compass"]
    assert calm["cap"]["capped"] is False and calm["cap"]["engaged_next"] is False


# -- errors ------------------------------------------------------------------------------------
BAD_BODIES = [
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "temperature": 3}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 5000}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"messages": USER, "stop": 5}, "stop"),
    ({"messages": USER, "seed": "1"}, "seed"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stream_options": []}, "stream_options"),
    ({"messages": USER, "model": 3}, "model"),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [USER[0], {"role": "assistant", "content": "x"}]}, "messages[1].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
    ),
    ({"messages": USER, "persona_compass": []}, "persona_compass"),
    ({"messages": USER, "persona_compass": {"cap": "sometimes"}}, "persona_compass.cap"),
    ({"messages": USER, "persona_compass": {"file": "x.pt"}}, "persona_compass.file"),
    (
        {"messages": USER, "persona_compass": {"capping": {"layers": "2:99"}}},
        "persona_compass.capping.layers",
    ),
    (
        {"messages": USER, "persona_compass": {"capping": {"percentile": 120}}},
        "persona_compass.capping.percentile",
    ),
    (
        {"messages": USER, "persona_compass": {"capping": {"path": "/etc/passwd"}}},
        "persona_compass.capping.path",
    ),
    (
        {"messages": USER, "persona_compass": {"steering": {"layers": [1]}}},
        "persona_compass.steering.coefficient",
    ),
    (
        {"messages": USER, "persona_compass": {"steering": {"coefficient": "big"}}},
        "persona_compass.steering.coefficient",
    ),
    (
        {"messages": USER, "persona_compass": {"steering": {"coefficient": 1, "scale": "x"}}},
        "persona_compass.steering.scale",
    ),
    (
        {
            "messages": USER,
            "persona_compass": {"steering": {"coefficient": 1, "scale": "relative"}},
        },
        "persona_compass.steering.scale",
    ),
    ({"messages": USER, "persona_compass": {"rules": {"loud": 1}}}, "persona_compass.rules"),
    ({"messages": USER, "persona_compass": {"rules": {"turn_run": -1}}}, "persona_compass.rules"),
    ({"messages": USER, "persona_compass": {"rules": 3}}, "persona_compass.rules"),
    (
        {"messages": USER, "persona_compass": {"policy": {"release_turns": 0}}},
        "persona_compass.policy.release_turns",
    ),
]


@pytest.mark.parametrize(("payload", "param"), BAD_BODIES)
def test_invalid_requests_get_openai_errors(client, payload, param):
    err = assert_error(client.post(URL, json=payload), 400, param)
    assert err["type"] == "invalid_request_error"


def test_malformed_bodies_and_unknown_routes(client):
    as_json = {"Content-Type": "application/json"}
    assert_error(client.post(URL, content=b"{not json", headers=as_json), 400)
    assert_error(client.post(URL, content=b"", headers=as_json), 400)
    assert_error(client.post(URL, json=[1, 2]), 400)
    deep = client.post(URL, content=b"[" * 100_000, headers=as_json)  # too deep for json
    assert_error(deep, 400)
    assert_error(client.post(URL, content=b"{}", headers={"Content-Type": "x"}), 415)
    assert assert_error(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert assert_error(client.get(URL), 405)["code"] == "method_not_allowed"


def test_context_length_is_checked(client):
    long = [{"role": "user", "content": "x" * 600}]  # the tiny model's context is 512
    name = "persona_compass_completions_total"
    errors_before = metric(client.get("/metrics").text, name, finish_reason="error")
    err = assert_error(client.post(URL, json=body(long)), 400, "messages")
    assert err["code"] == "context_length_exceeded"
    # a refused request is not a failed completion
    assert metric(client.get("/metrics").text, name, finish_reason="error") == errors_before
    stream = client.post(URL, json=body(long, stream=True))
    assert_error(stream, 400, "messages")  # refused before the stream starts
    near = [{"role": "user", "content": "x" * 470}]
    out = client.post(URL, json={"messages": near}).json()  # default max_tokens shrinks to fit
    assert out["usage"]["total_tokens"] <= 512


def test_api_key(tiny):
    with TestClient(make_app(tiny, api_key="sekrit")) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code != 401  # the web page loads without the key
        for path in ("/v1/models", "/v1/compass", "/metrics"):
            err = assert_error(c.get(path), 401)
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        assert_error(c.post(URL, json=body(), headers=wrong), 401)
        assert_error(c.post(URL, json=body(), headers={"Authorization": "Basic sekrit"}), 401)
        good = {"Authorization": "Bearer sekrit"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post(URL, json=body(), headers=good).status_code == 200


def test_body_size_limit(tiny):
    with TestClient(make_app(tiny, max_body_bytes=2000)) as c:
        big = body([{"role": "user", "content": "y" * 3000}])
        err = assert_error(c.post(URL, json=big), 413)
        assert err["code"] == "request_too_large"

        def chunks():  # no Content-Length: the bytes read are counted
            for _ in range(10):
                yield b" " * 500

        assert_error(
            c.post(URL, content=chunks(), headers={"Content-Type": "application/json"}), 413
        )
        assert c.post(URL, json=body()).status_code == 200


def test_full_queue_answers_429_with_retry_after(tiny):
    with TestClient(make_app(tiny, queue_size=1)) as c:
        worker = c.app.state.compass.worker
        gate = threading.Event()
        running = worker.submit(lambda cancel: gate.wait(30))  # occupies the thread
        assert wait_until(lambda: worker.busy)
        waiting = worker.submit(lambda cancel: None)  # fills the one queue slot
        try:
            r = c.post(URL, json=body())
            err = assert_error(r, 429)
            assert err["code"] == "rate_limit_exceeded"
            assert int(r.headers["Retry-After"]) >= 1
            text = c.get("/metrics").text
            assert metric(text, "persona_compass_queue_depth") == 1
            assert metric(text, "persona_compass_queue_rejections_total") == 1
        finally:
            gate.set()
        running.future.result(10)
        waiting.future.result(10)
        assert c.post(URL, json=body()).status_code == 200


def test_metrics_text_parses(client):
    client.post(URL, json=body(persona_compass={"cap": "on", "rules": ALWAYS}))
    client.post(URL, json=body(stream=True))
    client.post(URL, json={"messages": []})
    text = client.get("/metrics").text
    families = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.add(line.split()[2])
        elif line.startswith("#"):
            assert line.startswith("# HELP ")
        else:
            assert METRIC_LINE.match(line), line
    for name in (
        "persona_compass_http_requests_total",
        "persona_compass_completion_tokens_total",
        "persona_compass_request_duration_seconds",
        "persona_compass_time_to_first_token_seconds",
        "persona_compass_drift_alerts_total",
        "persona_compass_cap_engagement",
        "persona_compass_queue_depth",
    ):
        assert name in families
    ok = metric(text, "persona_compass_http_requests_total", endpoint=URL, status="200")
    assert ok >= 2
    bad = metric(text, "persona_compass_http_requests_total", endpoint=URL, status="400")
    assert bad >= 1
    assert metric(text, "persona_compass_drift_alerts_total", kind="turns") >= 1
    assert metric(text, "persona_compass_cap_engagement_count") >= 1
    assert metric(text, "persona_compass_completion_tokens_total") > 0
    assert metric(text, "persona_compass_time_to_first_token_seconds_count") >= 1
    count = metric(text, "persona_compass_request_duration_seconds_count")
    assert metric(text, "persona_compass_request_duration_seconds_bucket", le="+Inf") == count


# -- a real server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tiny):
    app = make_app(tiny)
    with BackgroundServer(app) as server:
        yield server, app


VARIANTS = [
    body(seed=1, max_tokens=20),
    body(HISTORY, seed=2, max_tokens=20, persona_compass={"cap": "on"}),
    body(seed=3, max_tokens=20, persona_compass={"steering": {"coefficient": -3.0}}),
    body(HISTORY, seed=4, max_tokens=20, persona_compass={"cap": "adaptive", "rules": ALWAYS}),
    body(seed=5, max_tokens=20, persona_compass={"capping": {"layers": [1], "percentile": 99}}),
    body(seed=6, max_tokens=20, temperature=0, stop=["e"]),
]


def _answer(client: httpx.Client, payload: dict) -> tuple:
    r = client.post(URL, json=payload, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    return out["choices"][0], out["usage"], out["persona_compass"]


def test_concurrent_requests_equal_sequential_ones(live):
    server, _ = live
    with httpx.Client(base_url=server.url) as c:
        one_by_one = [_answer(c, p) for p in VARIANTS]
        with ThreadPoolExecutor(len(VARIANTS)) as pool:
            together = list(pool.map(lambda p: _answer(c, p), VARIANTS))
    assert together == one_by_one
    caps = [t[2]["cap"]["capped"] for t in together]
    assert caps == [False, True, False, True, True, False]


def test_streaming_over_http_and_disconnect_cancels(live, tiny):
    server, app = live
    model = tiny[0]
    metrics = app.state.metrics
    with httpx.Client(base_url=server.url, timeout=60) as c:
        # a whole stream over a real socket
        with c.stream("POST", URL, json=body(stream=True)) as r:
            text = "".join(r.iter_text())
        assert sse_events(text)[-1] == "[DONE]"
        before = metrics.completions.value(finish_reason="cancelled")
        tokens_before = metrics.completion_tokens.value()
        with SlowModel(model, 0.03):
            started = time.monotonic()
            payload = body(stream=True, max_tokens=400, temperature=0)
            with c.stream("POST", URL, json=payload) as r:
                lines = r.iter_lines()
                got = 0
                for line in lines:
                    if line.startswith("data: ") and '"content"' in line:
                        got += 1
                        if got >= 3:
                            break
            # leaving the block closed the connection mid-stream
            assert wait_until(
                lambda: metrics.completions.value(finish_reason="cancelled") == before + 1
            )
            assert time.monotonic() - started < 400 * 0.03 / 2
            assert wait_until(lambda: not app.state.compass.worker.busy)
        assert metrics.completion_tokens.value() - tokens_before < 100


def test_non_stream_disconnect_cancels(live, tiny):
    server, app = live
    model = tiny[0]
    metrics = app.state.metrics
    before = metrics.completions.value(finish_reason="cancelled")
    payload = json.dumps(body(max_tokens=400, temperature=0)).encode()
    request = (
        f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with SlowModel(model, 0.03):
        started = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(request)
        assert wait_until(lambda: app.state.compass.worker.busy)
        time.sleep(0.2)
        sock.close()
        assert wait_until(
            lambda: metrics.completions.value(finish_reason="cancelled") == before + 1
        )
        assert time.monotonic() - started < 400 * 0.03 / 2


# -- loading from specs and the command line ---------------------------------------------------
def save_tiny(tiny, folder: Path) -> tuple[Path, Path]:
    """The tiny model as a Hugging Face folder and its axis bundle (with capping.json)."""
    model, tok, axis, cap = tiny
    model_dir, bundle = folder / "model", folder / "bundle"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    dataclasses.replace(axis, model_id=str(model_dir)).save(bundle)
    cap.save(bundle)
    return model_dir, bundle


def test_create_app_from_specs_loads_in_the_lifespan(tiny, tmp_path):
    model_dir, bundle = save_tiny(tiny, tmp_path)
    app = create_app_from_specs(
        str(bundle),
        None,
        ServerConfig(model_name="", cap_mode="on", allowed_hosts=TEST_HOSTS),
        dtype="float32",
    )
    assert app.state.compass is None  # nothing loaded yet
    with TestClient(app) as c:
        assert c.get("/health").json()["model"] == str(model_dir)
        out = c.post(URL, json=body()).json()
        assert out["persona_compass"]["cap"]["capped"] is True
        assert out["model"] == str(model_dir)


def test_cli_serve(monkeypatch, tiny, tmp_path):
    from persona_compass.cli import main, serve_cmd
    from persona_compass.server import app as server_app

    _, bundle = save_tiny(tiny, tmp_path)
    seen = {}

    def fake_from_specs(
        axis_spec, model_spec, config, *, dtype=None, engine, engine_options, traits
    ):
        seen.update(axis=axis_spec, model=model_spec, config=config, dtype=dtype)
        seen.update(engine=engine, engine_options=engine_options, traits=traits)
        return "app"

    monkeypatch.setattr(server_app, "create_app_from_specs", fake_from_specs)
    monkeypatch.setattr(serve_cmd, "run_server", lambda app, **kw: seen.update(app=app, **kw))
    runner = CliRunner()
    result = runner.invoke(
        main, ["serve", "--axis", str(bundle), "--cap", "on", "--queue", "3", "--max-tokens", "64"]
    )
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000 and seen["app"] == "app"
    assert config.cap_mode == "on" and config.queue_size == 3 and config.api_key is None
    assert config.max_tokens_limit == 64 and config.default_max_tokens == 64
    assert "warning" not in result.output
    assert seen["engine"] == "hf" and seen["engine_options"] == {} and seen["traits"] == []

    result = runner.invoke(
        main,
        ["serve", "--axis", str(bundle), "--engine", "vllm", "--max-concurrency", "5"]
        + ["--max-model-len", "512", "--eager"],
    )
    assert result.exit_code == 0, result.output
    assert seen["engine"] == "vllm" and seen["config"].max_concurrency == 5
    assert seen["engine_options"] == {"max_model_len": 512, "enforce_eager": True}
    result = runner.invoke(main, ["serve", "--axis", str(bundle), "--max-concurrency", "4"])
    assert result.exit_code == 2 and "only apply to --engine vllm" in result.output

    monkeypatch.setenv("PERSONA_COMPASS_API_KEY", "from-env")
    result = runner.invoke(main, ["serve", "--axis", str(bundle), "--host", "0.0.0.0"])
    assert result.exit_code == 0 and seen["config"].api_key == "from-env"
    assert "warning" not in result.output
    monkeypatch.delenv("PERSONA_COMPASS_API_KEY")
    result = runner.invoke(main, ["serve", "--axis", str(bundle), "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "without an API key" in result.output

    (bundle / "capping.json").unlink()
    result = runner.invoke(main, ["serve", "--axis", str(bundle), "--cap", "adaptive"])
    assert result.exit_code == 1 and "needs a capping config" in result.output
    result = runner.invoke(main, ["serve", "--axis", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such bundle" in result.output
