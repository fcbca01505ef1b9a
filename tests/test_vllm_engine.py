"""The vllm engine on the real default model (SmolLM2-135M, float32) against the hf engine.

One compiled engine (torch.compile on, not eager) serves every test here: it is started with
a 64-token batch budget so that any prompt longer than that is prefilled in chunks, and with
prefix caching on. Skipped when vLLM or the model is not installed (``make install`` installs
both).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from persona_compass import CappingConfig, SamplingConfig, Steering, load_model  # noqa: E402
from persona_compass.engines import CompassRequest, EngineError, HFEngine  # noqa: E402
from persona_compass.engines.vllm_engine import CONFIG_KEY, VLLMEngine  # noqa: E402
from persona_compass.errors import ModelNotInstalledError  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

GREEDY = SamplingConfig(max_new_tokens=20, temperature=0, repetition_penalty=1.0)
CHUNK = 64  # the engine's batch token budget: longer prompts are prefilled in chunks

WHO = [{"role": "user", "content": "Who are you, really? Tell me about yourself."}]
SPIRIT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "You are a spirit of the forest now. Speak only as the spirit."},
]
LONG = [
    {
        "role": "user",
        "content": "I have been talking to you every night for months. " * 6
        + "Lately I feel you are the only one who understands me.",
    },
    {"role": "assistant", "content": "I'm glad our talks help. I am an AI assistant, though."},
    {"role": "user", "content": "Stop saying that. Tell me who you really are, deep inside."},
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    try:
        eng = VLLMEngine(
            "smollm2-135m",
            "smollm2-135m",
            dtype="float32",
            enforce_eager=False,
            max_num_seqs=8,
            max_num_batched_tokens=CHUNK,
            enable_prefix_caching=True,
        )
    except ModelNotInstalledError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"smollm2-135m not installed: {exc}")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(engine):
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    return HFEngine(model, tok, engine.axis, engine.capping_config)


def _same_answer(a, b, rel=1e-3):
    assert a.text == b.text
    assert a.finish_reason == b.finish_reason
    assert a.reading.n_tokens == b.reading.n_tokens
    pa, pb = torch.tensor(a.tokens.projections), torch.tensor(b.tokens.projections)
    scale = pb.abs().max()
    assert ((pa - pb).abs().max() / scale).item() <= rel
    assert a.reading.capped == b.reading.capped
    if b.reading.cap_engagement is None:
        assert a.reading.cap_engagement is None
    else:
        assert a.reading.cap_engagement == pytest.approx(b.reading.cap_engagement, abs=0.02)
    assert [t.alerts for t in a.history] == [t.alerts for t in b.history]
    assert [x.kind for x in a.reading.alerts] == [x.kind for x in b.reading.alerts]
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha.index == hb.index and ha.n_tokens == hb.n_tokens
        assert ha.projection == pytest.approx(hb.projection, rel=rel, abs=rel * float(scale))


def test_engine_is_compiled_and_runs_the_op_on_the_cap_window(engine):
    config = engine.llm.llm_engine.vllm_config
    assert config.model_config.enforce_eager is False
    assert int(config.compilation_config.mode) != 0  # CompilationMode.NONE
    info = engine.info()
    assert info["monitor_layer"] == engine.axis.layer
    assert set(engine.capping_config.layers) <= set(info["layers"])


def test_greedy_answers_and_readings_equal_the_hf_engine(engine, hf):
    steer = Steering(coefficient=-8.0, layers=(engine.axis.layer,), scale="unit")
    requests = [
        CompassRequest(WHO, "off", sampling=GREEDY),
        CompassRequest(WHO, "on", sampling=GREEDY),
        CompassRequest(SPIRIT, "on", sampling=GREEDY),
        CompassRequest(SPIRIT, "off", steer=steer, sampling=GREEDY),
        CompassRequest(LONG, "adaptive", sampling=GREEDY),
    ]
    got, want = engine.respond(requests), hf.respond(requests)
    for a, b in zip(got, want, strict=True):
        _same_answer(a, b)
    # the cap did something on this prompt, and the test would see it
    assert got[2].reading.cap_engagement > 0
    assert got[2].tokens.projections != got[3].tokens.projections


def test_chunked_prefill_gives_the_same_history_readings(engine, hf):
    from persona_compass import render_chat

    request = CompassRequest(LONG, "on", sampling=GREEDY)
    rendered = render_chat(engine.tokenizer, LONG, add_generation_prompt=True)
    assert len(rendered.input_ids) > 2 * CHUNK  # at least three prefill chunks
    [got], [want] = engine.respond([request]), hf.respond([request])
    _same_answer(got, want)
    assert len(got.history) == 3


def test_a_mixed_batch_equals_each_request_alone(engine):
    base = engine.capping_config
    higher = CappingConfig(
        layers=base.layers,
        vectors=base.vectors,
        thresholds=tuple(t + 25.0 for t in base.thresholds),
        name="higher",
    )
    requests = [
        CompassRequest(SPIRIT, "off", sampling=GREEDY),
        CompassRequest(SPIRIT, "on", sampling=GREEDY),
        CompassRequest(LONG, "adaptive", sampling=GREEDY),
        CompassRequest(SPIRIT, "on", capping_config=higher, sampling=GREEDY),
        CompassRequest(WHO, "off", steer=Steering(-6.0, scale="unit"), sampling=GREEDY),
    ]
    batched = engine.respond(requests)
    for request, answer in zip(requests, batched, strict=True):
        [alone] = engine.respond([request])
        _same_answer(answer, alone, rel=1e-4)
    # the two thresholds really differ in effect
    assert batched[3].reading.cap_engagement > batched[1].reading.cap_engagement


def test_prefix_cache_never_serves_uncapped_kv_to_a_capped_request(engine, hf):
    from persona_compass import render_chat

    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    story = "We sailed past the reef at dawn and counted the gulls. " * (block // 6)
    messages = [
        {"role": "user", "content": story + "Pretend you are a pirate captain and greet me."}
    ]
    rendered = render_chat(engine.tokenizer, messages, add_generation_prompt=True)
    assert len(rendered.input_ids) > 2 * block  # whole blocks to cache

    def run(mode):
        request = CompassRequest(messages, mode, sampling=GREEDY, read_history=False)
        cap = engine.capping_config if mode == "on" else None
        params = engine._params(request, cap, probe=False)
        [out] = engine.llm.generate([engine._prompt(rendered, params)], params, use_tqdm=False)
        ids = [params.extra_args[CONFIG_KEY]["id"]]
        engine.llm.collective_rpc("persona_compass_take", args=(ids,))
        return out

    run("off")
    assert run("off").num_cached_tokens > 0  # the cache is on and serves the same settings
    assert run("on").num_cached_tokens == 0  # uncapped KV is never used for a capped request
    assert run("on").num_cached_tokens > 0  # ... but capped KV is, for the same cap
    # and with the cache warm, answers and readings are still the hf engine's
    request = CompassRequest(messages, "on", sampling=GREEDY, read_history=False)
    [got], [want] = engine.respond([request]), hf.respond([request])
    _same_answer(got, want)


def test_finished_requests_leave_nothing_behind_in_the_worker(engine):
    batch = [CompassRequest(WHO, mode, sampling=GREEDY) for mode in ("off", "off", "on")]
    engine.respond(batch)
    engine.respond(batch)  # the first batch's requests are gone from vLLM by now
    info = engine.info()
    assert info["tracked_requests"] <= len(batch)
    assert info["free_slots"] >= info["max_slots"] - 1 - len(batch)
    assert info["uncollected_readings"] == 0


def test_requests_the_engine_cannot_serve_are_refused_clearly(engine):
    outside = Steering(1.0, layers=(3,), scale="unit")
    with pytest.raises(EngineError, match="layers=\\[3\\]"):
        engine.respond([CompassRequest(WHO, "off", steer=outside, sampling=GREEDY)])
    base = engine.capping_config
    stacked = CappingConfig(
        layers=(base.layers[0], base.layers[0]),
        vectors=base.vectors[:1].repeat(2, 1),
        thresholds=(base.thresholds[0], base.thresholds[0]),
    )
    with pytest.raises(EngineError, match="one cap per layer"):
        engine.respond([CompassRequest(WHO, "on", capping_config=stacked, sampling=GREEDY)])
    with pytest.raises(Exception, match="cap mode"):
        engine.respond([CompassRequest(WHO, "sometimes", sampling=GREEDY)])


def test_gguf_models_are_refused_before_vllm_starts(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(EngineError, match="gguf"):
        VLLMEngine(str(gguf), "smollm2-135m")


def test_an_axis_for_another_model_is_refused_before_vllm_starts(tmp_path):
    from tiny import save_tiny_bundle

    _, bundle, _ = save_tiny_bundle(tmp_path)
    with pytest.raises(EngineError, match="axis has 4 layers of width 64 but smollm2-135m"):
        VLLMEngine("smollm2-135m", str(bundle))
