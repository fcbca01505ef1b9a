"""Extraction: plan, single-pass rollouts, judged sums, resumability (SIGKILL too), bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import make_pair

from persona_compass.axis import Axis
from persona_compass.capping import CappingConfig
from persona_compass.cli import main
from persona_compass.errors import PersonaCompassError
from persona_compass.persona_space.extract import (
    LEGACY_SETTINGS,
    RESUME_KEYS,
    ExtractSettings,
    run_extraction,
)
from persona_compass.persona_space.store import ExtractionStore, RoleState, StoreError
from persona_compass.run_folder import RunFolder

SMALL = dict(
    n_roles=3,
    prompts_per_role=1,
    n_questions=4,
    max_new_tokens=5,
    batch_size=5,
    judge="none",
    samples_per_role=4,
    min_role_count=1,
)


def settings(**kw) -> ExtractSettings:
    return ExtractSettings.from_preset("tiny", "quick", **{**SMALL, **kw})


def run(tmp_path, pair, **kw):
    model, tok = pair
    return run_extraction(
        settings(**kw),
        tmp_path / "run",
        model=model,
        tokenizer=tok,
        model_id="tiny",
        model_name="Tiny",
        progress=False,
    )


def load_states(root: Path) -> dict[str, RoleState]:
    return {p.stem: RoleState.load(p) for p in sorted((root / "activations").glob("*.safetensors"))}


def test_end_to_end_bundle_is_the_contrast_of_the_sums(tmp_path, qwen_pair):
    result = run(tmp_path, qwen_pair)
    assert result.planned == (5 + 3) * 4  # 5 default prompts + 3 roles x 1 prompt, 4 questions
    states = load_states(result.out_dir)
    assert set(states) == {"default", *[r for r in states if r != "default"]} and len(states) == 4
    default, _ = states["default"].mean()
    roles = [s.mean(("s3",))[0] for name, s in states.items() if name != "default"]
    axis = Axis.load(result.bundle_dir)
    torch.testing.assert_close(axis.directions, default - torch.stack(roles).mean(0))
    assert axis.calibration is not None
    cap = CappingConfig.load(result.bundle_dir)
    lo, hi = axis.metadata["capping_window"]
    assert cap.layers == tuple(range(lo, hi))
    report = (result.bundle_dir / "report.md").read_text()
    assert "## Persona space" in report and "best-aligned PC" in report
    for name, state in states.items():
        lines = (result.out_dir / "responses" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == len(state.records)
        rec = json.loads(lines[0])
        assert {"system_prompt", "label", "question_index", "conversation"} <= set(rec)
        assert rec["conversation"][-1]["role"] == "assistant"
        assert len(state.sample_ids) == min(4, len(state.records))
        # every rollout with content tokens is in exactly one bucket
        with_content = sum(1 for r in state.records.values() if r.n_tokens > 0)
        assert sum(state.counts.values()) == with_content
        expected_bucket = "unscored" if name == "default" else "s3"
        assert set(state.counts) <= {expected_bucket}


def test_rerun_resumes_without_regenerating(tmp_path, qwen_pair):
    first = run(tmp_path, qwen_pair)
    before = {k: dict(v.records) for k, v in load_states(first.out_dir).items()}
    spent = first.summary["generation_seconds"]
    assert spent > 0
    again = run(tmp_path, qwen_pair)
    assert again.generated_now == 0
    after = {k: dict(v.records) for k, v in load_states(again.out_dir).items()}
    assert before == after
    # the rebuilt bundle keeps the generation time of the session that did the work
    assert again.summary["generation_seconds"] == spent


def test_generation_time_adds_up_over_sessions(tmp_path, qwen_pair):
    first = run(tmp_path, qwen_pair)
    progress = first.out_dir / "progress.json"
    recorded = json.loads(progress.read_text())["generation_seconds"]
    assert first.summary["generation_seconds"] == pytest.approx(recorded, abs=0.05)
    progress.write_text(json.dumps({"generation_seconds": 1000.0}))  # an earlier session's time
    sorted((first.out_dir / "activations").glob("*.safetensors"))[-1].unlink()  # a role to redo
    resumed = run(tmp_path, qwen_pair)
    assert resumed.generated_now > 0
    total = json.loads(progress.read_text())["generation_seconds"]
    assert 1000.0 < total < 1000.0 + 600  # the earlier session's time plus this one's
    assert resumed.summary["generation_seconds"] == pytest.approx(total, abs=0.05)
    progress.write_text(json.dumps({"generation_seconds": "soon"}))
    with pytest.raises(StoreError, match="generation_seconds is 'soon'.*delete the file"):
        run(tmp_path, qwen_pair)
    progress.write_text("{truncated")
    with pytest.raises(StoreError, match="cannot read .*progress.json.*delete the file"):
        run(tmp_path, qwen_pair)


def test_resume_with_other_settings_is_refused(tmp_path, qwen_pair):
    run(tmp_path, qwen_pair)
    with pytest.raises(StoreError, match="max_new_tokens: 5 -> 7"):
        run(tmp_path, qwen_pair, max_new_tokens=7)
    # the speed and the bundle building may change: nothing is generated again
    again = run(tmp_path, qwen_pair, batch_size=3, percentile=50.0, command="again")
    assert again.generated_now == 0


def test_the_resume_declaration_keeps_the_keys_runs_were_compared_on():
    assert set(RESUME_KEYS) == {
        "model_fingerprint", "catalogue_digest", "n_roles", "prompts_per_role", "n_questions",
        "max_new_tokens", "temperature", "top_p", "repetition_penalty", "judge", "seed",
        "samples_per_role", "generator", "layers", "trait",
    }  # fmt: skip
    assert LEGACY_SETTINGS == {"layers": "all", "trait": None}


def test_a_folder_another_run_holds_is_refused(tmp_path, qwen_pair):
    holder = RunFolder(tmp_path / "run", settings_file="run.json", what="an extraction").open()
    with pytest.raises(StoreError, match=r"in use by another run \(pid "):
        run(tmp_path, qwen_pair)
    holder.close()
    with ExtractionStore(tmp_path / "run", {"seed": 0}, resume_keys=("seed",)) as store:
        assert store.settings == {"seed": 0}  # free again once the holder let go


def test_presets_fill_the_knobs_and_flags_override_them():
    quick = ExtractSettings.from_preset("m", "quick")
    standard = ExtractSettings.from_preset("m", "standard")
    assert (quick.n_roles, quick.max_new_tokens, quick.samples_per_role) == (40, 64, 20)
    assert (standard.n_roles, standard.prompts_per_role, standard.n_questions) == (None, 5, 40)
    # fewer sampled rollouts per role where every role has 200 answers to keep (storage)
    assert standard.samples_per_role == 10
    assert ExtractSettings.from_preset("m", "standard", samples_per_role=30).samples_per_role == 30
    with pytest.raises(PersonaCompassError, match="unknown; use one of quick, standard, paper"):
        ExtractSettings.from_preset("m", "huge")


def test_too_few_in_role_rollouts_is_a_clear_error(tmp_path, qwen_pair):
    with pytest.raises(PersonaCompassError, match="lower `min_role_count`"):
        run(tmp_path, qwen_pair, min_role_count=50)


def test_store_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        ExtractionStore(tmp_path / "x", {}, resume_keys=())


def test_dry_run_plans_without_a_model(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--out",
            str(tmp_path / "o"),
            "--dry-run",
            "--n-roles",
            "4",
            "--n-questions",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["rollouts"] == (5 + 4 * 2) * 3
    assert not (tmp_path / "o").exists()


def test_survives_sigkill_mid_run(tmp_path):
    """A real SIGKILL at an arbitrary moment: the rerun finishes with no lost or doubled rollout."""
    model, tok = make_pair("qwen2")
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "persona_compass.cli",
        "extract",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--judge",
        "none",
        "--n-roles",
        "4",
        "--prompts-per-role",
        "2",
        "--n-questions",
        "6",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--samples-per-role",
        "4",
        "--min-role-count",
        "1",
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some, but not all, roles are committed
        states = list((out / "activations").glob("*.safetensors")) if out.exists() else []
        if len(states) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = sum(
        len(RoleState.load(p).records) for p in (out / "activations").glob("*.safetensors")
    )
    planned = (5 + 4 * 2) * 6
    assert 0 < partial < planned
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    states = load_states(out)
    ids = [rid for s in states.values() for rid in s.records]
    assert len(ids) == len(set(ids)) == planned
    for name, state in states.items():
        assert sum(state.counts.values()) == sum(1 for r in state.records.values() if r.n_tokens)
        lines = (out / "responses" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == list(state.records)
    assert (out / "bundle" / "axis.safetensors").exists()


def test_external_generator_records_activations_locally(tmp_path, qwen_pair):
    """--generator openai:URL: answers come from a server, activations from a local pass."""
    from openai_stub import stub_server

    from persona_compass.chat import render_chat
    from persona_compass.record import record_span_means

    def answer(body):
        return f"Remote answer to: {body['messages'][-1]['content']}"

    with stub_server(reply=answer) as server:
        result = run(tmp_path, qwen_pair, generator=f"openai:{server.url}#remote-model")
        assert server.requests and all(r.body["model"] == "remote-model" for r in server.requests)
        assert server.requests[0].body["max_tokens"] == 5
    model, tok = qwen_pair
    state = load_states(result.out_dir)["default"]
    rec = next(iter(state.records.values()))
    assert rec.response == f"Remote answer to: {rec.question}"
    # the kept sample is the teacher-forced mean of the stored conversation
    rid = state.sample_ids[0]
    expected = record_span_means(model, tok, [state.records[rid].conversation()])[0][-1]
    idx = state.sample_ids.index(rid)
    torch.testing.assert_close(state.samples[idx].float(), expected, rtol=1e-2, atol=1e-2)
    assert render_chat(tok, state.records[rid].conversation()).spans[-1].n_tokens > 0


def test_generator_spec_without_model_asks_for_the_studied_model(tmp_path, qwen_pair):
    """--generator openai:URL (no #model): the spec goes through the one backend parser with
    the studied model's id as the default; a malformed spec raises that parser's error."""
    from openai_stub import stub_server

    from persona_compass.persona_space.generators import GeneratorError

    with stub_server(reply="fine") as server:
        run(tmp_path, qwen_pair, generator=f"OpenAI:{server.url}/")
        assert server.requests and {r.body["model"] for r in server.requests} == {"tiny"}
    with pytest.raises(GeneratorError, match="^unknown generator spec 'vllm:x'; accepted forms"):
        run(tmp_path / "bad", qwen_pair, generator="vllm:x")


def test_rejudge_rescores_without_regenerating(tmp_path, qwen_pair):
    from persona_compass.persona_space.extract import rejudge

    model, tok = qwen_pair
    first = run(tmp_path, qwen_pair)
    before = load_states(first.out_dir)
    result = rejudge(
        first.out_dir, "heuristic", model=model, tokenizer=tok, model_id="tiny", progress=False
    )
    after = load_states(result.out_dir)
    assert json.loads((first.out_dir / "run.json").read_text())["judge"] == "heuristic"
    for role, state in after.items():
        assert [r.response for r in state.records.values()] == [
            r.response for r in before[role].records.values()
        ]  # the same answers: nothing regenerated
        if role != "default":
            assert all(
                r.judge == "heuristic" and r.score in (0, 1, 2, 3) for r in state.records.values()
            )
    # sums were rebuilt from one teacher-forced pass over each stored conversation
    from persona_compass.record import record_span_means

    records = [r for r in after["default"].records.values() if r.n_tokens > 0]
    means = record_span_means(model, tok, [r.conversation() for r in records])
    expected = torch.stack([m[-1] for m in means if m.shape[0]]).mean(0)
    new, _ = after["default"].mean()
    torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- --layers


def test_layers_records_only_the_chosen_layers(tmp_path, qwen_pair):
    """--layers 1:3 on a 4-block model: 2 rows stored, a full-shape bundle, zero elsewhere."""
    from persona_compass.errors import AxisFileError

    full = run(tmp_path / "full", qwen_pair)
    part = run(tmp_path / "part", qwen_pair, layers="1:3")
    run_json = json.loads((part.out_dir / "run.json").read_text())
    assert (run_json["layers"], run_json["recorded_layers"], run_json["n_layers"]) == (
        "1:3",
        [1, 2],
        4,
    )
    states = load_states(part.out_dir)
    full_states = load_states(full.out_dir)
    for name, state in states.items():
        assert all(t.shape == (2, 64) for t in state.sums.values())
        assert all(t.shape == (2, 64) for t in state.samples)
        # same seeds, same answers: the recorded rows are the full run's rows
        assert [r.response for r in state.records.values()] == [
            r.response for r in full_states[name].records.values()
        ]
        for bucket, total in state.sums.items():
            torch.testing.assert_close(total, full_states[name].sums[bucket][1:3])

    axis = Axis.load(part.bundle_dir)
    full_axis = Axis.load(full.bundle_dir)
    assert (axis.n_layers, axis.d_model) == (4, 64)
    assert axis.directions[[0, 3]].abs().sum() == 0
    torch.testing.assert_close(axis.directions[1:3], full_axis.directions[1:3])
    for vec in axis.vectors.values():
        assert vec[[0, 3]].abs().sum() == 0
    assert axis.layer in (1, 2)
    meta = axis.metadata
    assert meta["layers"] == "1:3" and meta["recorded_layers"] == [1, 2]
    assert meta["settings"]["layers"] == "1:3"
    assert meta["auroc"][0] is None and meta["auroc"][3] is None
    assert all(v is not None for v in meta["auroc"][1:3])
    assert meta["axis_in_pc1_3"][0] is None and meta["axis_in_pc1_3"][3] is None
    assert meta["monitor_pc_cosines"][0] == meta["monitor_pc1_cosine"]
    assert set(CappingConfig.load(part.bundle_dir).layers) <= {1, 2}
    with pytest.raises(AxisFileError, match="zero at layer 0"):
        axis.unit(0)
    report = (part.bundle_dir / "report.md").read_text()
    assert "recorded 2 (1-2)" in report
    # bundle.json is strict JSON (no NaN) and `axis show` reads the bundle
    json.loads(
        (part.bundle_dir / "bundle.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"{c} in bundle.json"),
    )
    shown = CliRunner().invoke(main, ["axis", "show", str(part.bundle_dir), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)
    assert summary["n_layers"] == 4 and summary["metadata"]["recorded_layers"] == [1, 2]


def test_resume_with_other_layers_is_refused(tmp_path, qwen_pair):
    run(tmp_path, qwen_pair, layers="1:3")
    with pytest.raises(StoreError, match=r"layers: '1:3' -> 'all'.*run\.json"):
        run(tmp_path, qwen_pair)
    with pytest.raises(StoreError, match="layers: '1:3' -> '2'"):
        run(tmp_path, qwen_pair, layers=[2])
    # the same blocks written differently are the same setting
    again = run(tmp_path, qwen_pair, layers="1,-2")
    assert again.generated_now == 0


def test_run_without_a_layers_record_resumes_as_all_layers(tmp_path, qwen_pair):
    """A run.json from before --layers existed counts as 'all'."""
    first = run(tmp_path, qwen_pair)
    path = first.out_dir / "run.json"
    record = json.loads(path.read_text())
    for key in ("layers", "recorded_layers", "n_layers"):
        del record[key]
    path.write_text(json.dumps(record))
    assert run(tmp_path, qwen_pair).generated_now == 0
    with pytest.raises(StoreError, match="layers: 'all' -> '0:2'"):
        run(tmp_path, qwen_pair, layers="0:2")


def test_role_state_of_other_layers_is_refused(tmp_path, qwen_pair):
    first = run(tmp_path, qwen_pair, layers="1:3")
    path = first.out_dir / "run.json"
    record = json.loads(path.read_text())
    record["layers"], record["recorded_layers"] = "all", [0, 1, 2, 3]
    path.write_text(json.dumps(record))  # run.json edited by hand: the states still have 2 rows
    with pytest.raises(StoreError, match="activations of 2 layers but the run records 4"):
        run(tmp_path, qwen_pair)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abc", "cannot read the layer selection 'abc'"),
        ("1:3:5", "cannot read the layer selection"),
        ("", "cannot read the layer selection"),
        ([], "empty"),
        ([1.5], "must be block indices"),
        ("9", r"`layers` '9': layer=9 is out of range for a model with 4 decoder blocks"),
        ("3:1", "`layers` '3:1': layer range '3:1' is empty"),
        ("2:9", "past the end"),
    ],
)
def test_invalid_layer_specs_are_clear_errors(tmp_path, qwen_pair, spec, message):
    from persona_compass.errors import LayerError

    with pytest.raises(LayerError, match=message):
        run(tmp_path, qwen_pair, layers=spec)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_rejudge_keeps_the_recorded_layers(tmp_path, qwen_pair):
    from persona_compass.persona_space.extract import rejudge

    model, tok = qwen_pair
    first = run(tmp_path, qwen_pair, layers="2:")
    result = rejudge(
        first.out_dir, "heuristic", model=model, tokenizer=tok, model_id="tiny", progress=False
    )
    for state in load_states(result.out_dir).values():
        assert all(t.shape == (2, 64) for t in [*state.sums.values(), *state.samples])
    axis = Axis.load(result.bundle_dir)
    assert axis.metadata["recorded_layers"] == [2, 3] and axis.layer in (2, 3)
    assert axis.directions[:2].abs().sum() == 0


def test_cli_layers_dry_run_and_errors(tmp_path):
    """--dry-run shows the selection (resolved for a local model folder); bad ones exit 1."""
    model, tok = make_pair("qwen2")
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    base = ["extract", "--out", str(tmp_path / "o"), "--dry-run", "--n-roles", "2"]

    shown = CliRunner().invoke(main, [*base, "--layers", "16:24"])  # default alias: as given
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["layers"] == "16:24"
    local = CliRunner().invoke(main, [*base, "--model", str(model_dir), "--layers=-2:"])
    assert local.exit_code == 0, local.output
    plan = json.loads(local.stdout)
    assert (plan["layers"], plan["n_recorded_layers"], plan["n_layers"]) == ("2:4", 2, 4)
    default = CliRunner().invoke(main, [*base, "--model", str(model_dir)])
    assert json.loads(default.stdout)["layers"] == "all"

    bad = CliRunner().invoke(main, [*base, "--layers", "x"])
    assert bad.exit_code == 1 and "cannot read the layer selection 'x'" in bad.output
    out_of_range = CliRunner().invoke(main, [*base, "--model", str(model_dir), "--layers", "4"])
    assert out_of_range.exit_code == 1
    assert "out of range for a model with 4 decoder blocks" in out_of_range.output
    assert not (tmp_path / "o").exists()


def test_resume_repairs_an_answer_log_that_disagrees_with_the_state(tmp_path, qwen_pair, caplog):
    first = run(tmp_path, qwen_pair)
    logs = sorted((first.out_dir / "responses").glob("*.jsonl"))
    truth = {p: p.read_text() for p in logs}
    lines = truth[logs[0]].splitlines(keepends=True)
    logs[0].write_text("".join(lines[:-1]) + lines[-1][:10])  # a truncated last line
    logs[1].write_text(truth[logs[1]] + truth[logs[1]].splitlines(keepends=True)[0])  # doubled
    logs[2].unlink()  # deleted
    with caplog.at_level("WARNING"):
        again = run(tmp_path, qwen_pair)
    assert again.generated_now == 0
    assert {p: p.read_text() for p in logs} == truth  # every log agrees with its state again
    repaired = [r.getMessage() for r in caplog.records if "rewritten from" in r.getMessage()]
    assert len(repaired) == 3 and any("missing" in m for m in repaired)
