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
from persona_compass.persona_space.extract import ExtractSettings, run_extraction
from persona_compass.persona_space.store import ExtractionStore, RoleState, StoreError

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
    assert (result.bundle_dir / "report.md").exists()
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
    again = run(tmp_path, qwen_pair)
    assert again.generated_now == 0
    after = {k: dict(v.records) for k, v in load_states(again.out_dir).items()}
    assert before == after


def test_resume_with_other_settings_is_refused(tmp_path, qwen_pair):
    run(tmp_path, qwen_pair)
    with pytest.raises(StoreError, match="max_new_tokens: 5 -> 7"):
        run(tmp_path, qwen_pair, max_new_tokens=7)


def test_too_few_in_role_rollouts_is_a_clear_error(tmp_path, qwen_pair):
    with pytest.raises(PersonaCompassError, match="min-role-count"):
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
