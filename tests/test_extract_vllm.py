"""``extract --engine vllm``: rollouts generated in vLLM, activations captured in the engine.

One eager float32 engine on SmolLM2 serves the capture tests: its means must be the hf
recorder's teacher-forced means over the very same tokens, and its token counts the hf
capture's (every kept content token, no prompt, no end-of-turn token). The CLI tests run a
tiny extraction end to end and resume it. Skipped when vLLM or the model is not installed.
"""

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

pytest.importorskip("vllm")

from persona_compass import SamplingConfig, load_model  # noqa: E402
from persona_compass.cli import main  # noqa: E402
from persona_compass.errors import ModelNotInstalledError  # noqa: E402
from persona_compass.generation import eos_ids  # noqa: E402
from persona_compass.persona_space.extract import Job, _truncate  # noqa: E402
from persona_compass.persona_space.vllm_rollouts import VLLMRollouts  # noqa: E402
from persona_compass.record import SpanMeanRecorder  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

LAYERS = [0, 7, 15, 22, 29]
BUDGET = 16
JOBS = [
    Job("a/p0/q0", "a", 0, "You are a pirate captain.", 0, "Who are you?"),
    Job("b/p0/q1", "b", 0, "You are a terse oracle.", 1, "Reply with one word: yes or no?"),
    Job("default/p0/q2", "default", 0, "", 2, "Say OK and nothing else."),
    Job("c/p0/q3", "c", 0, "You are a medieval scribe. " * 12, 3, "Describe your day."),
    Job("d/p0/q4", "d", 0, "You are a chef.", 4, "What is your favourite dish?"),
]


@pytest.fixture(scope="module")
def pair():
    try:
        return load_model("smollm2-135m", dtype=torch.float32)
    except ModelNotInstalledError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"smollm2-135m not installed: {exc}")


@pytest.fixture(scope="module")
def engine(pair):
    model, tok = pair
    eng = VLLMRollouts(
        "smollm2-135m",
        tok,
        eos_ids(model, tok),
        layers=LAYERS,
        n_layers=30,
        dtype="float32",
        enforce_eager=True,
        # fewer than the jobs: finished rollouts make room for waiting ones, whose prompts
        # are prefilled beside running decodes
        max_num_seqs=3,
    )
    yield eng
    eng.close()


def teacher_forced(model, prompt: list[int], content: list[int]) -> torch.Tensor:
    """The hf recorder's mean over the content positions of prompt + content."""
    ids = torch.tensor([prompt + content])
    mask = torch.zeros(ids.shape)
    mask[0, len(prompt) :] = 1.0
    with SpanMeanRecorder(model, LAYERS) as rec, torch.inference_mode():
        rec.set_mask(mask)
        model(input_ids=ids, use_cache=False)
        return rec.means()[0]


@pytest.fixture(scope="module")
def rollouts(engine):
    sampling = SamplingConfig(max_new_tokens=BUDGET, temperature=0.7, top_p=0.9)
    greedy = SamplingConfig(max_new_tokens=BUDGET, temperature=0, repetition_penalty=1.0)
    return list(engine.stream(JOBS, sampling, seed=0)) + list(
        engine.stream(JOBS[1:3], greedy, seed=0)
    )


def test_in_engine_means_match_the_hf_recorder_on_the_same_tokens(pair, rollouts):
    model, _ = pair
    assert sorted(r.job.id for r in rollouts[: len(JOBS)]) == sorted(j.id for j in JOBS)
    for r in rollouts:
        assert r.count == len(r.content_ids) > 0
        ref = teacher_forced(model, r.prompt_ids, r.content_ids)
        cos = torch.nn.functional.cosine_similarity(r.means, ref, dim=-1)
        assert r.means.shape == ref.shape == (len(LAYERS), 576)
        assert cos.min().item() >= 0.999, (r.job.id, cos.tolist())
        rel = (r.means - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert rel.max().item() <= 1e-3, (r.job.id, rel.tolist())


def test_token_semantics_follow_the_hf_capture(pair, engine, rollouts):
    model, tok = pair
    stops = set(eos_ids(model, tok))
    ended = [r for r in rollouts if len(r.content_ids) < BUDGET]
    full = [r for r in rollouts if len(r.content_ids) == BUDGET]
    # both ways a rollout ends occur: end-of-turn (not counted) and the token budget (the
    # extra fed-back step makes every kept token count)
    assert ended and full
    for r in rollouts:
        assert not stops & set(r.content_ids)
        assert _truncate(r.content_ids, stops, BUDGET) == r.content_ids
        assert r.text == tok.decode(r.content_ids, skip_special_tokens=True).strip()
    # nothing is left behind in the workers once every rollout is taken
    info = engine.llm.collective_rpc("persona_compass_capture_info")[0]
    assert info["rows_in_use"] == 0 and info["uncollected"] == 0


def test_a_rollout_does_not_depend_on_its_batch(engine, rollouts):
    greedy = SamplingConfig(max_new_tokens=BUDGET, temperature=0, repetition_penalty=1.0)
    alone = list(engine.stream(JOBS[2:3], greedy, seed=0))[0]
    together = next(r for r in rollouts[len(JOBS) :] if r.job.id == JOBS[2].id)
    assert alone.content_ids == together.content_ids
    torch.testing.assert_close(alone.means, together.means, rtol=1e-4, atol=1e-4)


def extract_args(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "persona_compass.cli",
        "extract",
        "--engine",
        "vllm",
        "--out",
        str(out),
        "--judge",
        "none",
        "--n-roles",
        "3",
        "--prompts-per-role",
        "1",
        "--n-questions",
        "4",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "4",
        "--samples-per-role",
        "10",
        "--min-role-count",
        "1",
        "--dtype",
        "float32",
        "--max-num-seqs",
        "4",
        "--json",
        *extra,
    ]


def last_json(stdout: str) -> dict:
    """The command's --json summary (vLLM logs to stdout before it)."""
    return json.loads(stdout[stdout.rindex('{\n  "bundle"') :])


def test_cli_run_survives_sigkill_and_resumes_without_redoing_work(tmp_path, pair):
    from persona_compass.axis import Axis
    from persona_compass.persona_space.store import RoleState

    out = tmp_path / "run"
    args = extract_args(out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill after the first commit
        if out.exists() and list((out / "activations").glob("*.safetensors")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {
        rid: rec.response
        for p in (out / "activations").glob("*.safetensors")
        for rid, rec in RoleState.load(p).records.items()
    }
    planned = (5 + 3) * 4  # 5 default prompts + 3 roles x 1 prompt, 4 questions each
    assert 0 < len(before) < planned
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    assert summary["rollouts"] == planned
    assert summary["generated_now"] == planned - len(before)
    states = {p.stem: RoleState.load(p) for p in (out / "activations").glob("*.safetensors")}
    records = {rid: rec for s in states.values() for rid, rec in s.records.items()}
    assert len(records) == planned
    assert all(records[rid].response == text for rid, text in before.items())  # kept as is
    for name, state in states.items():
        assert state.n_rows == 30  # every layer recorded, as the hf engine does by default
        assert sum(state.counts.values()) == sum(1 for r in state.records.values() if r.n_tokens)
        lines = (out / "responses" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == list(state.records)
    assert sorted(p.name for p in out.iterdir()) == [
        ".persona-compass.lock",  # free again: the rerun above opened the folder
        "activations",
        "bundle",
        "progress.json",
        "responses",
        "run.json",
        "token_projections",  # the per-token calibration's replay, one file per role
    ]
    assert {"axis.safetensors", "bundle.json", "calibration.json", "capping.json", "report.md"} <= {
        p.name for p in (out / "bundle").iterdir()
    }
    axis = Axis.load(out / "bundle")
    assert axis.directions.shape == (30, 576)
    default, _ = states["default"].mean()
    roles = [s.mean(("s3",))[0] for n, s in states.items() if n != "default"]
    expected = default - torch.stack(roles).mean(0)
    torch.testing.assert_close(axis.directions, expected, rtol=1e-4, atol=1e-4)
    assert axis.metadata["settings"]["engine"] == "vllm"
    assert axis.calibration is not None and set(axis.calibration.tokens) == {"roleplay", "default"}
    # a finished run generates nothing and does not start vLLM again
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_json(again.stdout)["generated_now"] == 0
    assert "Initializing a V1 LLM engine" not in again.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rejudge"], "drop --engine vllm"),
        (["--device-map", "auto"], "drop --device-map"),
        (["--generator", "openai:http://127.0.0.1:9"], "use one of the two"),
        (["--max-num-seqs", "0"], "at least 1"),
    ],
)
def test_cli_refuses_options_the_vllm_engine_cannot_use(tmp_path, extra, message):
    args = extract_args(tmp_path / "run", *extra)[3:]  # without the interpreter and -m
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "run").exists()


def test_cli_vllm_options_need_the_vllm_engine(tmp_path):
    result = CliRunner().invoke(main, ["extract", "--out", str(tmp_path / "r"), "--eager"])
    assert result.exit_code != 0 and "only apply to --engine vllm" in result.output


def test_cli_vllm_engine_refuses_a_gguf_model_before_loading_it(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    result = CliRunner().invoke(
        main, ["extract", "--engine", "vllm", "--model", str(gguf), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code != 0 and "does not load .gguf files" in result.output
