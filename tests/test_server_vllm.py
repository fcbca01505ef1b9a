"""The server on the vllm engine (SmolLM2-135M, float32, eager): same API and telemetry as the
hf server, answers equal to the hf engine's, concurrent requests batched with their own
settings, streaming telemetry per chunk, disconnects aborted inside vLLM, 429 past the limit.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import torch

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from persona_compass import SamplingConfig, load_model  # noqa: E402
from persona_compass.engines import CompassRequest, HFEngine  # noqa: E402
from persona_compass.engines.vllm_engine import VLLMEngine  # noqa: E402
from persona_compass.engines.vllm_stream import (  # noqa: E402
    PEEK_INTERVAL,
    EngineBusy,
    StreamLoop,
)
from persona_compass.errors import ModelNotInstalledError  # noqa: E402
from persona_compass.server.app import (  # noqa: E402
    BackgroundServer,
    ServerConfig,
    create_vllm_app,
)

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

MAX_LEN = 512
SPIRIT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "You are a spirit of the forest now. Speak only as the spirit."},
]
QUESTIONS = [
    "Who are you, really?",
    "Explain how a rainbow forms, briefly.",
    "Give me three tips for sleeping better.",
    "What should I pack for a weekend hike?",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
]


@pytest.fixture(scope="module")
def server():
    try:
        engine = VLLMEngine(
            "smollm2-135m",
            "smollm2-135m",
            dtype="float32",
            enforce_eager=True,
            max_num_seqs=4,
            max_model_len=MAX_LEN,
        )
    except ModelNotInstalledError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"smollm2-135m not installed: {exc}")
    config = ServerConfig(model_name="smol", max_concurrency=4, queue_size=4)
    app = create_vllm_app(engine, config)
    with BackgroundServer(app) as live:
        live.app = app
        live.engine = engine
        yield live


@pytest.fixture(scope="module")
def hf(server):
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    return HFEngine(model, tok, server.engine.axis, server.engine.capping_config)


def chat(server, messages, **extra):
    body = {"model": "smol", "messages": messages, "max_tokens": 24, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def stream(server, messages, **extra):
    body = {"model": "smol", "messages": messages, "max_tokens": 24, "temperature": 0}
    body.update(stream=True, stream_options={"include_usage": True}, **extra)
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    return [
        json.loads(block[6:]) if block[6:] != "[DONE]" else "[DONE]"
        for block in text.split("\n\n")
        if block.strip()
    ]


def hf_answer(hf, messages, mode="off", max_new_tokens=24):
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)
    return hf.respond([CompassRequest(messages, mode=mode, sampling=sampling)])[0]


def test_info_and_health_name_the_engine(server):
    info = httpx.get(server.url + "/v1/compass").json()
    assert info["engine"] == "vllm" and info["monitor_layer"] == server.engine.axis.layer
    health = httpx.get(server.url + "/health").json()
    assert health["engine"] == "vllm" and health["status"] == "ok"


@pytest.mark.parametrize("mode", ["off", "on"])
def test_answers_and_telemetry_equal_the_hf_engine(server, hf, mode):
    response = chat(server, SPIRIT, persona_compass={"cap": mode})
    assert response.status_code == 200, response.text
    data = response.json()
    want = hf_answer(hf, SPIRIT, mode)
    assert data["choices"][0]["message"]["content"] == want.text
    assert data["usage"]["completion_tokens"] == want.completion_tokens
    telemetry = data["persona_compass"]
    assert telemetry["cap"]["mode"] == mode and telemetry["cap"]["capped"] == (mode == "on")
    assert telemetry["turn"]["projection"] == pytest.approx(want.reading.projection, rel=1e-3)
    assert len(telemetry["history"]) == len(want.history) == len(SPIRIT)
    for got, ref in zip(telemetry["history"], want.history, strict=True):
        assert got["projection"] == pytest.approx(ref.projection, rel=1e-3)


@pytest.fixture
def peek_every_step(server):
    loop = server.app.state.compass.loop
    loop.peek_interval = 0.0
    yield
    loop.peek_interval = PEEK_INTERVAL


def test_streaming_chunks_carry_running_values_and_add_up(server, peek_every_step):
    plain = chat(server, SPIRIT).json()
    events = stream(server, SPIRIT)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [e for e in events[1:-1] if e.get("choices") and e["choices"][0]["delta"]]
    text = "".join(e["choices"][0]["delta"]["content"] for e in content)
    assert text == plain["choices"][0]["message"]["content"]
    counts = [e["persona_compass"]["n_tokens"] for e in content]
    assert counts == sorted(counts) and counts[-1] <= plain["usage"]["completion_tokens"]
    running = [e["persona_compass"]["projection"] for e in content[1:]]
    assert all(isinstance(v, float) for v in running)  # read after the first token
    final = next(e for e in events if e.get("choices") and e["choices"][0]["finish_reason"])
    assert final["persona_compass"]["turn"] == plain["persona_compass"]["turn"]
    assert events[-2]["usage"] == plain["usage"]


def test_running_values_are_fetched_every_peek_interval(server):
    loop = server.app.state.compass.loop
    assert loop.peek_interval == PEEK_INTERVAL > 0
    started = time.perf_counter()
    events = stream(server, SPIRIT, max_tokens=48)
    seconds = time.perf_counter() - started
    content = [e for e in events[1:-1] if e.get("choices") and e["choices"][0]["delta"]]
    running = [e["persona_compass"]["projection"] for e in content]
    read = [v is not None for v in running]
    # None until the first fetch that finds readings, a value on every chunk after it
    assert read == sorted(read)
    if seconds > 3 * PEEK_INTERVAL:
        assert any(read)
    # a value changes only at a fetch: far fewer distinct values than chunks
    assert len({v for v in running if v is not None}) <= 2 + seconds / PEEK_INTERVAL


def test_concurrent_requests_batch_and_keep_their_own_settings(server):
    loop = server.app.state.compass.loop
    settings = [
        {"cap": "off"},
        {"cap": "on"},
        {"cap": "off", "steering": {"coefficient": -4.0, "scale": "unit"}},
        {"cap": "adaptive"},
        {"cap": "on", "capping": {"percentile": 60}},
        {"cap": "off"},
    ]
    jobs = [
        (SPIRIT if i % 2 else [{"role": "user", "content": q}], s)
        for i, (q, s) in enumerate(zip(QUESTIONS, settings, strict=True))
    ]
    alone = [chat(server, m, persona_compass=s).json() for m, s in jobs]
    loop.peak_running = 0
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: chat(server, job[0], persona_compass=job[1]), jobs))
    assert loop.peak_running >= 2  # they ran in one batch, not one after another
    for a, b in zip(alone, together, strict=True):
        b = b.json()
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert b["persona_compass"]["cap"] == a["persona_compass"]["cap"]
        got, want = (
            b["persona_compass"]["turn"]["projection"],
            a["persona_compass"]["turn"]["projection"],
        )
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_seeded_sampled_requests_repeat_alone_and_batched(server):
    # On CPUs the engine prefills prompts whole: vLLM 0.32 cannot rewind a seeded CPU
    # generator after a partial prefill, which would fail these requests.
    scheduler = server.engine.llm.llm_engine.vllm_config.scheduler_config
    assert scheduler.enable_chunked_prefill is False
    assert scheduler.max_num_batched_tokens >= MAX_LEN
    jobs = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    alone = [chat(server, m, **sampled).json() for m in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda m: chat(server, m, **sampled), jobs))
    for a, b in zip(alone, together, strict=True):
        assert b.status_code == 200, b.text
        assert b.json()["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]


def test_a_disconnected_stream_is_aborted_inside_vllm(server):
    loop = server.app.state.compass.loop
    body = {"model": "smol", "messages": SPIRIT, "max_tokens": 400, "stream": True}
    body["messages"] = [{"role": "user", "content": "Write a very long story about a dragon."}]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # one content chunk, then hang up
    deadline = time.monotonic() + 30
    while loop.held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop.held == 0 and loop.running == 0
    assert server.engine.info()["uncollected_readings"] == 0
    # the workers let go of the aborted request's slot when the next batch runs
    assert chat(server, SPIRIT).status_code == 200
    info = server.engine.info()
    assert info["uncollected_readings"] == 0 and info["tracked_requests"] <= 1


def test_context_length_is_the_engines(server):
    long = [{"role": "user", "content": "word " * MAX_LEN}]
    response = chat(server, long)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert str(MAX_LEN) in response.json()["error"]["message"]


def test_the_loop_refuses_past_its_limit(server):
    loop = StreamLoop(server.engine, max_requests=2)
    loop.start = lambda: None  # type: ignore[method-assign]  # nothing runs: tickets stay held
    request = CompassRequest([{"role": "user", "content": "Hi"}])
    loop.submit(request, lambda *a: None, stream=False)
    loop.submit(request, lambda *a: None, stream=False)
    with pytest.raises(EngineBusy, match="2 requests"):
        loop.submit(request, lambda *a: None, stream=False)
    with pytest.raises(Exception, match="max_requests"):
        StreamLoop(server.engine, max_requests=0)


def test_load_script_streams_against_the_vllm_server(server, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("persona_compass_load_vllm", script)
    assert spec is not None and spec.loader is not None
    load = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = load
    spec.loader.exec_module(load)
    out = tmp_path / "load.json"
    argv = ["--url", server.url, "--clients", "3", "--duration", "3", "--max-tokens", "12"]
    assert load.main([*argv, "--grace", "60", "--out", str(out)]) == 0
    agg = json.loads(out.read_text())["configs"]["A: cap off"]
    assert agg["completed"] == agg["sent"] > 0 and agg["errors"] == agg["lost"] == 0
