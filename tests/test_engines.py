"""The engine layer: the hf engine is today's compass.respond, requests carry their settings."""

from __future__ import annotations

import pytest
from tiny import save_tiny_bundle

from persona_compass import CappingConfig, SamplingConfig
from persona_compass.compass import CompassError, respond
from persona_compass.engines import CompassRequest, EngineError, HFEngine, open_engine

GREEDY = SamplingConfig(max_new_tokens=6, temperature=0)
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def tiny_engine(tmp_path):
    model_dir, bundle, axis = save_tiny_bundle(tmp_path)
    CappingConfig.from_axis(axis, "1:3", [0.0, 0.0]).save(bundle)
    return open_engine("hf", str(model_dir), str(bundle), dtype="float32")


def test_open_engine_gives_an_hf_engine_with_the_bundles_cap(tiny_engine):
    assert isinstance(tiny_engine, HFEngine) and tiny_engine.name == "hf"
    assert tiny_engine.capping_config is not None
    assert tiny_engine.capping_config.layers == (1, 2)


def test_hf_engine_answers_exactly_as_compass_respond(tiny_engine):
    e = tiny_engine
    requests = [CompassRequest(MESSAGES, mode, sampling=GREEDY) for mode in ("off", "on")]
    got = e.respond(requests)
    for request, answer in zip(requests, got, strict=True):
        want = respond(
            e.model,
            e.tokenizer,
            e.axis,
            MESSAGES,
            mode=request.mode,
            capping_config=e.capping_config,
            sampling=GREEDY,
        )
        assert answer.token_ids == want.token_ids
        assert answer.tokens.projections == want.tokens.projections
        assert answer.reading.capped == (request.mode == "on")
    assert got[0].tokens.projections != got[1].tokens.projections  # the cap acted


def test_a_request_without_history_reads_only_its_answer(tiny_engine):
    [answer] = tiny_engine.respond([CompassRequest(MESSAGES, sampling=GREEDY, read_history=False)])
    assert answer.history == [] and answer.reading.n_tokens > 0


def test_bad_engine_names_and_modes_are_refused(tiny_engine):
    with pytest.raises(EngineError, match="engine 'tgi' is not one of hf, vllm"):
        open_engine("tgi", "smollm2-135m", "smollm2-135m")
    with pytest.raises(CompassError, match="cap mode"):
        tiny_engine.respond([CompassRequest(MESSAGES, "always", sampling=GREEDY)])
    bare = HFEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.axis)
    with pytest.raises(CompassError, match="needs a capping config"):
        bare.respond([CompassRequest(MESSAGES, "on", sampling=GREEDY)])
