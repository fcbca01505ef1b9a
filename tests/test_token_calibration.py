"""Per-token calibration: the capping rules, the token budget, the in-engine tables, the
capture in ``axis calibrate`` (hf), the extraction's replay, and the sweep's conditions.

The rule algebra is pinned on exact small tensors; capture and replay run on tiny models and
are checked against an independent path: the mean of an answer's per-token projections must
be the projection of its response mean (same tokens, same axis).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import make_pair, save_tiny_bundle

from persona_compass.axis import Axis, model_fingerprint
from persona_compass.calibration import Calibration
from persona_compass.capping import CappingConfig, keep_percentile, keep_rank
from persona_compass.cli import main
from persona_compass.engines.vllm_capture import CaptureTables, add_block_sums
from persona_compass.errors import CappingConfigError
from persona_compass.evaluation.conditions import (
    ConditionError,
    build_capping,
    parse_condition,
    parse_keeps,
    parse_rules,
    sweep_conditions,
)
from persona_compass.evaluation.sweep import recommend, recommended_config, write_capping_bundle
from persona_compass.hub import CalibrateSettings, calibrate_bundle
from persona_compass.hub.calibration_store import AnswerRecord, CalibrationStore
from persona_compass.persona_space import extract, token_replay
from persona_compass.persona_space.store import ExtractionStore, RoleState, RolloutRecord
from persona_compass.persona_space.token_projections import replay_answers
from persona_compass.record import record_span_means
from persona_compass.token_budget import (
    TokenBudgetError,
    keep_rows,
    kept_count,
    kept_positions,
    tokens_per_answer,
)

L, D = 4, 64


@pytest.fixture
def axis() -> Axis:
    g = torch.Generator().manual_seed(1)
    return Axis(torch.randn(L, D, generator=g), model_id="tiny")


def token_calibration(seed: int = 0, n: int = 101) -> Calibration:
    """Random response means, role-play tokens and default tokens (default ones higher)."""
    g = torch.Generator().manual_seed(seed)
    base = Calibration.from_projections(torch.randn(50, L, generator=g), source="means")
    role = Calibration.from_projections(torch.randn(n, L, generator=g) - 1, source="role toks")
    default = Calibration.from_projections(torch.randn(n, L, generator=g) + 1, source="def toks")
    return base.with_tokens(roleplay=role, default=default)


# ---- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "keep"), [(100, 99), (150, 99), (7, 50), (10, 100), (3, 1), (1, 99)])
@pytest.mark.parametrize("form", ["floor", "ceiling"])
def test_token_default_is_the_highest_floor_that_keeps_keep_percent(axis, n, keep, form):
    g = torch.Generator().manual_seed(n)
    samples = torch.round(torch.randn(n, L, generator=g) * 4) / 4  # ties included
    cfg = CappingConfig.calibrate(axis, samples, "0:4", rule="token-default", keep=keep, form=form)
    need = math.ceil(keep * n / 100)
    for layer, tau in zip(cfg.layers, cfg.thresholds, strict=True):
        col = samples[:, layer].double()
        assert tau in col.tolist()  # an order statistic, not an interpolation
        untouched = (col >= tau) if form == "floor" else (col <= tau)
        assert int(untouched.sum()) >= need
        # the next stricter threshold (the next distinct sample) would touch too many
        stricter = col[col > tau] if form == "floor" else col[col < tau]
        if stricter.numel():
            nxt = stricter.min() if form == "floor" else stricter.max()
            kept = (col >= nxt) if form == "floor" else (col <= nxt)
            assert int(kept.sum()) < need
    assert dict(cfg.metadata) == {
        "rule": "token-default",
        "keep": float(keep),
        "n_samples": n,
        "calibration_source": "projections",
    }


def test_keep_rank_and_percentile():
    assert [keep_rank(100, k) for k in (99, 99.5, 100, 0.5)] == [99, 100, 100, 1]
    assert keep_rank(150, 99) == 149  # ceil(148.5)
    assert keep_percentile(101, 99) == 1.0  # the 2nd smallest of 101: 1 / 100
    assert keep_percentile(101, 99, "ceiling") == 99.0
    assert keep_percentile(1, 99) == 0.0


def test_token_default_on_a_table_matches_the_samples_on_a_grid_point(axis):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(101, L, generator=g)
    table = Calibration.from_projections(torch.randn(20, L, generator=g)).with_tokens(
        default=Calibration.from_projections(tokens, source="default tokens")
    )
    on_table = CappingConfig.calibrate(axis, table, "1:4", rule="token-default")
    exact = CappingConfig.calibrate(axis, tokens, "1:4", rule="token-default")
    assert on_table.thresholds == pytest.approx(exact.thresholds, abs=1e-12)
    assert exact.thresholds == tuple(torch.sort(tokens[:, 1:], dim=0).values[1].double().tolist())
    assert on_table.name == "layers_1:4-keep0.99" and on_table.rule == "token-default"
    assert on_table.metadata["n_samples"] == 101
    assert on_table.metadata["calibration_source"] == "default tokens"


def test_each_rule_reads_its_own_table(axis):
    cal = token_calibration()
    mean = CappingConfig.calibrate(axis, cal, "1:3")
    role = CappingConfig.calibrate(axis, cal, "1:3", 25, rule="token-roleplay")
    default = CappingConfig.calibrate(axis, cal, "1:3", rule="token-default", keep=95)
    assert mean.thresholds == (cal.threshold(1, 25.0), cal.threshold(2, 25.0))  # unchanged
    assert mean.name == "layers_1:3-p0.25" and mean.rule == "response-mean"
    assert dict(mean.metadata) == {
        "percentile": 25.0,
        "rule": "response-mean",
        "n_samples": 50,
        "calibration_source": "means",
    }
    tokens = cal.tokens["roleplay"]
    assert role.thresholds == (tokens.threshold(1, 25.0), tokens.threshold(2, 25.0))
    assert role.name == "layers_1:3-tp0.25" and role.metadata["calibration_source"] == "role toks"
    at = keep_percentile(101, 95.0)
    assert at == 5.0
    assert default.thresholds == tuple(cal.tokens["default"].threshold(x, at) for x in (1, 2))
    assert dict(default.metadata)["keep"] == 95.0 and "percentile" not in default.metadata


def test_rule_and_keep_survive_save_and_load(axis, tmp_path):
    axis.save(tmp_path / "b")
    cfg = CappingConfig.calibrate(axis, token_calibration(), "1:3", rule="token-default", keep=98)
    cfg.save(tmp_path / "b")
    loaded = CappingConfig.load(tmp_path / "b")
    assert loaded.rule == "token-default" and loaded.metadata["keep"] == 98.0
    assert loaded.thresholds == cfg.thresholds and loaded.name == "layers_1:3-keep0.98"
    assert CappingConfig.from_dict(cfg.to_dict()).rule == "token-default"
    assert CappingConfig.from_axis(axis, "1:3", 0.0).rule is None  # not calibrated by a rule


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "token-default"}, "axis calibrate --force BUNDLE"),
        ({"rule": "token-roleplay"}, "re-extract the bundle"),
        ({"rule": "nope"}, "rule='nope' is unknown"),
        ({"rule": "token-default", "percentile": 1}, "takes keep="),
        ({"keep": 99}, "keep= is for rule='token-default'"),
        ({"rule": "token-default", "keep": 0}, "keep=0 leaves no token"),
        ({"rule": "token-default", "keep": 101}, r"keep=101 must be in \[0, 100\]"),
        ({"rule": "token-roleplay", "percentile": -1}, "percentile=-1"),
    ],
)
def test_rule_errors_name_the_fix(axis, kwargs, message):
    means_only = Calibration.from_projections(torch.randn(30, L), source="30 role-play answers")
    with pytest.raises(CappingConfigError, match=message):
        CappingConfig.calibrate(axis, means_only, "1:3", **kwargs)


# ---- the token budget ------------------------------------------------------------------------


def test_token_budget_shares():
    assert tokens_per_answer(5, 30, 128) == 128  # plenty: every token
    assert tokens_per_answer(1200, 80, 512) == 2  # 1e6 // (1200 * 80 * 4)
    assert tokens_per_answer(3, 4, 100, budget=600) == 12
    with pytest.raises(TokenBudgetError, match="fewer prompts or questions"):
        tokens_per_answer(10, 100, 64, budget=3999)
    assert [kept_count(n, 12, 100) for n in (0, 1, 50, 100, 150)] == [0, 1, 6, 12, 12]
    for n, k in [(10, 3), (7, 7), (100, 12), (5, 1)]:
        pos = kept_positions(n, k).tolist()
        assert len(pos) == k == len(set(pos)) and pos == sorted(pos)
        assert 0 <= pos[0] and pos[-1] < n
    assert kept_positions(10, 3).tolist() == [1, 5, 8]  # the middles of three equal parts
    rows = torch.arange(20.0).reshape(10, 2)
    assert keep_rows(rows, 3, 10).tolist() == [[2.0, 3.0], [10.0, 11.0], [16.0, 17.0]]


# ---- the capture op's per-token tables (vLLM's engine side, run here on plain tensors) -------


@pytest.mark.parametrize("compact", [True, False])
def test_capture_op_writes_each_counted_token_projection_in_its_cell(compact):
    g = torch.Generator().manual_seed(0)
    tables = CaptureTables([0, 2], 3, max_tokens=5, max_rows=3)
    units = torch.randn(2, 3, generator=g)
    tables.enable_tokens(units, max_positions=4)
    block = torch.randn(5, 3, generator=g)
    # tokens 1 and 3 count: token 1 is request row 1's first answer token, token 3 row 2's third
    tables.compact = compact
    if compact:
        tables.counted_tokens[:2] = torch.tensor([1, 3])
        tables.counted_rows[:2] = torch.tensor([1, 2])
        tables.counted_cols[:2] = torch.tensor([0, 2])
        tables.n_counted = 2
    else:
        tables.token_row[:5] = torch.tensor([0, 1, 0, 2, 0])
        tables.token_col[:5] = torch.tensor([0, 0, 0, 2, 0])
    add_block_sums(tables, 2, block)
    assert tables.token_proj is not None and tables.token_proj.shape == (2, 3, 5)
    written = tables.token_proj[1]
    assert torch.allclose(written[1, 0], block[1] @ units[1])
    assert torch.allclose(written[2, 2], block[3] @ units[1])
    mask = torch.ones_like(written, dtype=torch.bool)
    mask[0] = False  # the trash row takes what counts nothing
    mask[1, 0] = mask[2, 2] = False
    assert (written[mask] == 0).all() and (tables.token_proj[0] == 0).all()
    assert torch.allclose(tables.sums[1, 1], block[1])
    assert torch.allclose(tables.sums[1, 2], block[3])


# ---- axis calibrate (hf): the per-token tables in the same pass --------------------------------


@pytest.fixture
def tiny_bundle(tmp_path):
    model, tok = make_pair("qwen2")
    g = torch.Generator().manual_seed(7)
    axis = Axis(
        torch.randn(4, 64, generator=g), fingerprint=model_fingerprint(model), monitor_layer=2
    )
    axis.save(tmp_path / "bundle")
    return model, tok, axis, tmp_path / "bundle"


SMALL = CalibrateSettings(roles=2, questions=2, max_new_tokens=5, batch_size=4, bootstrap=50)


def check_tokens_match_means(store: CalibrationStore) -> int:
    """Every answer kept all its tokens (the budget is ample) and their mean projection is
    its response-mean projection: same tokens, same axis, one pass. Returns answers checked."""
    checked = 0
    for rec, row, tok in zip(store.records, store._rows, store._tokens, strict=True):
        assert tok is not None and rec.token_rows == tok.shape[0] == rec.n_tokens
        if rec.n_tokens:
            assert torch.allclose(tok.mean(0), row, atol=1e-4), rec.id
            checked += 1
    return checked


def test_axis_calibrate_records_per_token_tables_in_the_same_pass(tiny_bundle):
    model, tok, axis, bundle = tiny_bundle
    run = calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)
    store = CalibrationStore(run.work_dir, {}, ())
    assert check_tokens_match_means(store) == run.n_role_answers + run.n_default_answers
    saved = Axis.load(bundle).calibration
    assert saved is not None and set(saved.tokens) == {"roleplay", "default"}
    role_tokens, n_role, missing = store.token_projections(default=False)
    assert saved.tokens["roleplay"].n_samples == run.n_role_tokens == role_tokens.shape[0]
    assert n_role == run.n_role_answers and missing == run.answers_without_tokens == 0
    assert saved.tokens["default"].n_samples == run.n_default_tokens > 0
    assert run.tokens_per_answer == SMALL.max_new_tokens
    assert torch.allclose(
        saved.tokens["roleplay"].values, Calibration.from_projections(role_tokens).values
    )
    summary = run.summary()
    assert summary["n_role_tokens"] == run.n_role_tokens
    assert summary["tokens_per_answer"] == SMALL.max_new_tokens
    cfg = CappingConfig.calibrate(Axis.load(bundle), saved, "1:3", rule="token-default")
    assert cfg.rule == "token-default" and cfg.metadata["n_samples"] == run.n_default_tokens


def test_axis_calibrate_resumes_with_every_answer_token_recorded(tiny_bundle, monkeypatch):
    model, tok, axis, bundle = tiny_bundle
    real = extract.generate_with_capture
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "generate_with_capture", crash_on_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)
    first = CalibrationStore(bundle.with_name("bundle.calibration"), {}, ())
    assert len(first.records) == SMALL.batch_size  # the first batch was committed
    kept = [t.clone() for t in first._tokens]
    monkeypatch.setattr(extract, "generate_with_capture", real)
    run = calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)
    assert run.generated_now == run.n_answers - SMALL.batch_size
    store = CalibrationStore(run.work_dir, {}, ())
    check_tokens_match_means(store)
    for before, after in zip(kept, store._tokens, strict=False):
        assert after is not None and torch.equal(before, after)  # reread, not redone
    assert run.answers_without_tokens == 0


def test_a_work_folder_of_an_earlier_version_resumes_without_tokens(tiny_bundle):
    model, tok, axis, bundle = tiny_bundle
    work = bundle.with_name("old-work")
    store = CalibrationStore(work, {}, ())
    store.add([AnswerRecord("x/p0/q0", "x", 0, 0, 3, "hi")], torch.ones(1, 4))
    store.commit()
    # rewrite it as version 1 wrote it: no token rows, no token_rows field
    with safe_open(str(store.path), framework="pt") as fh:
        meta, rows = fh.metadata(), fh.get_tensor("projections")
    records = [dict(r) for r in json.loads(meta["records"])]
    for r in records:
        del r["token_rows"]
    old = {"format": "persona-compass-calibration-answers/1", "records": json.dumps(records)}
    save_file({"projections": rows}, str(store.path), metadata=old)
    again = CalibrationStore(work, {}, ())
    assert again.records[0].token_rows is None and again._tokens == [None]
    assert again.token_projections(default=False)[1:] == (0, 1)  # no tokens, one answer lacks
    again.commit()  # and writes the current format
    assert CalibrationStore(work, {}, ()).records[0].token_rows is None


# ---- extraction: the replay on the finished axis ---------------------------------------------


def replay_setup(tmp_path, n_answers: int = 3):
    model, tok = make_pair("qwen2")
    store = ExtractionStore(tmp_path / "run", {"x": 1}, resume_keys=())
    states = {}
    for role, prompt in (("default", ""), ("pirate", "You are a pirate."), ("sage", "Be a sage.")):
        state = RoleState(role)
        for q in range(n_answers):
            answer = f"Answer number {q} from the {role}, told at some length." * (q + 1)
            rec = RolloutRecord(f"{role}/p0/q{q}", role, 0, q, prompt, f"Q{q}?", answer, 9, 3)
            state.add(rec, torch.zeros(2, 64), keep_sample=True)
        states[role] = state
    g = torch.Generator().manual_seed(5)
    units = torch.nn.functional.normalize(torch.randn(2, 64, generator=g), dim=-1)
    return model, tok, store, states, units


def test_replayed_tokens_average_to_the_response_mean_projection(tmp_path):
    model, tok, store, states, units = replay_setup(tmp_path)
    convs = [r.conversation() for s in states.values() for r in s.records.values()]
    rows = replay_answers(model, tok, convs, units, [1, 3], batch_size=2)
    means = record_span_means(model, tok, convs, layers=[1, 3])
    for r, m in zip(rows, means, strict=True):
        assert r.shape[0] > 10
        expected = (m[-1] * units).sum(-1)  # the turn's mean, projected
        assert torch.allclose(r.mean(0), expected, atol=1e-4)
    store.close()


def test_extract_replay_stays_within_budget_and_resumes(tmp_path, monkeypatch):
    model, tok, store, states, units = replay_setup(tmp_path)
    calls: list[str] = []
    real = token_replay.replay_answers

    def counted(model, tokenizer, conversations, *args, **kwargs):
        calls.append(conversations[0][-1]["content"][:30])
        if len(calls) == 2 and crash:
            raise RuntimeError("crash")
        return real(model, tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(token_replay, "replay_answers", counted)
    budget = 3 * 2 * 4 * 5  # 3 answers x 2 layers x float32: 5 tokens per answer
    kwargs = dict(model=model, tokenizer=tok, max_new_tokens=40, batch_size=2, budget=budget)
    crash = True
    with pytest.raises(RuntimeError, match="crash"):
        token_replay.token_tables(store, states, units, [1, 3], 4, **kwargs)
    assert store.token_path("default").is_file() and not store.token_path("sage").exists()
    crash, calls[:] = False, []
    tables = token_replay.token_tables(store, states, units, [1, 3], 4, **kwargs)
    assert len(calls) == 2  # the committed role is read back, the other two replayed
    for role in states:
        with safe_open(str(store.token_path(role)), framework="pt") as fh:
            rows = fh.get_tensor("projections")
            lengths = json.loads(fh.metadata()["lengths"])
        assert rows.numel() * 4 <= budget and max(lengths) <= 5 and sum(lengths) == rows.shape[0]
    assert tables["default"].n_samples == 15 and tables["roleplay"].n_samples == 30
    assert (tables["roleplay"].values[[0, 2]] == 0).all()  # unrecorded layers read 0
    calls[:] = []
    again = token_replay.token_tables(store, states, units, [1, 3], 4, **kwargs)
    assert calls == [] and torch.equal(again["default"].values, tables["default"].values)
    token_replay.token_tables(store, states, -units, [1, 3], 4, **kwargs)
    assert len(calls) == 3  # another axis: every role is replayed
    store.close()


# ---- evaluation: conditions and the sweep ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec", "rule", "pct", "keep"),
    [
        ("cap:1:3@p25", "cap:1:3@p25", "response-mean", 25.0, None),
        ("cap:1:3/response-mean", "cap:1:3@p25", "response-mean", 25.0, None),
        ("cap:1:3@p10/token-roleplay", "cap:1:3@p10/token-roleplay", "token-roleplay", 10.0, None),
        ("cap:1:3/token-roleplay", "cap:1:3@p25/token-roleplay", "token-roleplay", 25.0, None),
        ("cap:1:3@keep99", "cap:1:3@keep99", "token-default", None, 99.0),
        ("cap:1:3@keep95.5/token-default", "cap:1:3@keep95.5", "token-default", None, 95.5),
        ("cap:1:3/token-default", "cap:1:3@keep99", "token-default", None, 99.0),
        ("adaptive:2@keep90", "adaptive:2@keep90", "token-default", None, 90.0),
    ],
)
def test_condition_syntax_for_the_rules(text, spec, rule, pct, keep):
    cond = parse_condition(text)
    assert (cond.spec, cond.cap_rule, cond.cap_percentile, cond.cap_keep) == (spec, rule, pct, keep)
    assert parse_condition(cond.spec) == cond  # the canonical spec reads back the same
    data = cond.to_dict()
    if rule == "response-mean":  # old folders' unit keys hash this dict: unchanged
        assert "cap_rule" not in data and "cap_keep" not in data
    else:
        assert (data["cap_rule"], data["cap_keep"]) == (rule, keep)


def test_condition_descriptions_say_the_rule():
    assert "99% of default-answer tokens untouched" in parse_condition("cap:1:3@keep99").describe()
    assert "p25 of role-play tokens" in parse_condition("cap:1:3/token-roleplay").describe()
    assert parse_condition("cap:1:3").describe() == (
        "a floor on layers 1..2 at calibration p25, always on"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("cap:1:3@keep99/token-roleplay", "@keep is the token-default rule's"),
        ("cap:1:3@p25/token-default", "token-default takes @keepKEEP"),
        ("cap:1:3@keep0", r"keep 0 is outside \(0, 100\]"),
        ("cap:1:3@keep101", "keep 101 is outside"),
        ("cap:1:3/nope", "unknown capping rule 'nope'"),
    ],
)
def test_bad_rule_conditions_say_what_and_list_the_grammar(text, problem):
    with pytest.raises(ConditionError, match=problem) as info:
        parse_condition(text)
    assert "cap:WINDOW@keepKEEP" in str(info.value)


def test_sweep_conditions_are_rule_by_window_by_number():
    conds = sweep_conditions(["1:3", "2"], [25], ["response-mean", "token-default"], [99, 95])
    assert [c.name for c in conds] == [
        "cap:1:3@p25",
        "cap:2@p25",
        "cap:1:3@keep99",
        "cap:1:3@keep95",
        "cap:2@keep99",
        "cap:2@keep95",
    ]
    roleplay = sweep_conditions(["1:3"], [1, 50], ["token-roleplay"])
    assert [c.name for c in roleplay] == ["cap:1:3@p1/token-roleplay", "cap:1:3@p50/token-roleplay"]
    assert parse_rules("token-default, response-mean,token-default") == [
        "token-default",
        "response-mean",
    ]
    assert parse_keeps("99,keep95") == [99.0, 95.0]
    with pytest.raises(ConditionError, match="rule 'p25' is unknown"):
        parse_rules("p25")
    with pytest.raises(ConditionError, match="outside"):
        parse_keeps("0")
    with pytest.raises(ConditionError, match="needs at least one keep"):
        sweep_conditions(["1:3"], [25], ["token-default"], [])


def test_recommend_breaks_ties_by_the_gentler_floor_across_rules():
    def row(name, pct=None, keep=None):
        return {"name": name, "harm_rate": 0.2, "n_layers": 2, "percentile": pct, "keep": keep,
                "significant_drop": False}  # fmt: skip

    pick = recommend([row("cap:1:3@p25", pct=25), row("cap:1:3@keep99", keep=99)])
    assert pick["choice"] == "cap:1:3@keep99"  # p1 of default tokens is gentler than p25
    assert recommend([row("a", keep=95), row("b", keep=99)])["choice"] == "b"
    assert "gentler floor" in pick["rule"]


def test_token_rule_conditions_need_token_tables_and_write_their_rule(tmp_path):
    _, bundle, axis = save_tiny_bundle(tmp_path)
    with pytest.raises(ConditionError, match="axis calibrate --force BUNDLE"):
        build_capping(parse_condition("cap:1:3@keep99"), axis, None)
    assert axis.calibration is not None
    tokens = Calibration.from_projections(torch.randn(300, axis.n_layers))
    calibrated = dataclasses.replace(
        axis, calibration=axis.calibration.with_tokens(default=tokens, roleplay=tokens)
    )
    cfg = build_capping(parse_condition("cap:1:3@keep99"), calibrated, None)
    assert cfg is not None and cfg.rule == "token-default" and cfg.name == "layers_1:3-keep0.99"
    calibrated.save(bundle)
    conds = [parse_condition("cap:1:3@p25/token-roleplay").to_dict()]
    picked = recommended_config(calibrated, "cap:1:3@p25/token-roleplay", conds)
    target = tmp_path / "picked"
    write_capping_bundle(bundle, target, picked, note={"recommendation_rule": "harm first"})
    loaded = CappingConfig.load(target)
    assert loaded.rule == "token-roleplay" and loaded.metadata["percentile"] == 25.0
    assert loaded.metadata["recommendation_rule"] == "harm first"


def test_axis_show_prints_the_capping_rule(tmp_path):
    _, bundle, axis = save_tiny_bundle(tmp_path)
    CappingConfig.calibrate(axis, torch.randn(40, axis.n_layers), "1:3", 10).save(bundle)
    res = CliRunner().invoke(main, ["axis", "show", str(bundle), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["capping"]["rule"] == "response-mean"
    res = CliRunner().invoke(main, ["axis", "show", str(bundle)])
    assert res.exit_code == 0 and "rule response-mean" in res.output
