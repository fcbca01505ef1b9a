"""``evaluate --engine vllm``: the same run files, results and resume behaviour as ``hf``, with
every conversation's turn in one vLLM batch.

One eager float32 engine and one hf model (SmolLM2-135M) serve the module; runs are small
(two shipped scenarios, three turns, 12 greedy tokens). Skipped when vLLM or the model is not
installed (``make install`` installs both).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from click.testing import CliRunner  # noqa: E402

from persona_compass import load_model  # noqa: E402
from persona_compass.cli import main  # noqa: E402
from persona_compass.engines.vllm_engine import VLLMEngine  # noqa: E402
from persona_compass.errors import ModelNotInstalledError  # noqa: E402
from persona_compass.evaluation import run_engine  # noqa: E402
from persona_compass.evaluation import runner as runner_mod  # noqa: E402
from persona_compass.evaluation.report import collect_results, write_report  # noqa: E402
from persona_compass.evaluation.runner import (  # noqa: E402
    EvaluationError,
    read_settings,
    run_evaluation,
)
from persona_compass.evaluation.scenarios import load_scenarios  # noqa: E402
from persona_compass.evaluation.settings import EvaluationSettings  # noqa: E402
from persona_compass.transcripts import load_transcripts  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

CONDITIONS = "unsteered,capped,adaptive,steer:-2"
SMALL = dict(
    conditions=CONDITIONS,
    turns=3,
    max_new_tokens=12,
    temperature=0.0,
    repetition_penalty=1.0,
    capability_limit=4,
    capability_max_new_tokens=8,
)


def small(scenarios, engine="vllm", **kw):
    """The module's small evaluation of ``scenarios`` on ``engine``."""
    return EvaluationSettings("smollm2-135m", engine=engine, scenarios=scenarios, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def scenarios():
    return load_scenarios(ids=["coding-csv-cleanup", "therapy-grief-father"])


@pytest.fixture(scope="module")
def engine():
    try:
        eng = VLLMEngine(
            "smollm2-135m",
            "smollm2-135m",
            dtype="float32",
            enforce_eager=True,
            max_num_seqs=16,
        )
    except ModelNotInstalledError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"smollm2-135m not installed: {exc}")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_model(engine):
    return load_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="module")
def runs(engine, hf_model, scenarios, tmp_path_factory):
    """The same small evaluation on both engines (vllm's batch sizes recorded)."""
    root = tmp_path_factory.mktemp("ev")
    model, tok = hf_model
    run_evaluation(small(scenarios, "hf"), root / "hf", model=model, tokenizer=tok, progress=False)
    sizes: list[int] = []
    original = engine.respond

    def counted(requests):
        sizes.append(len(requests))
        return original(requests)

    engine.respond = counted
    try:
        result = run_evaluation(small(scenarios), root / "vllm", engine=engine, progress=False)
    finally:
        del engine.respond
    return root, result, sizes


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json"))


def _answers(path):
    data = json.loads(path.read_text())
    return [m["content"] for m in data["conversation"] if m["role"] == "assistant"]


def test_one_batch_per_turn_and_the_capability_items_in_one(runs, scenarios):
    _, result, sizes = runs
    n_units = len(scenarios) * len(CONDITIONS.split(","))
    # the driver decides the adaptive cap itself (it sends "on"/"off"), so no history-probe
    # batch runs: exactly one batch per turn, then one for the capability items
    assert sizes == [n_units] * 3 + [4 * 3]  # capability: baseline, capped, steer x 4 items
    assert result.generated == n_units and result.answers == 3 * n_units
    assert result.capability_done == 3


def test_same_files_keys_and_results_as_hf(runs):
    root, _, _ = runs
    hf, vl = root / "hf", root / "vllm"
    assert _files(hf) == _files(vl)
    for rel in _files(hf):
        a, b = json.loads((hf / rel).read_text()), json.loads((vl / rel).read_text())
        assert a.keys() == b.keys(), rel
        ea, eb = a.get("evaluation", {}), b.get("evaluation", {})
        assert ea.keys() == eb.keys()
        for ta, tb in zip(ea.get("turns", []), eb.get("turns", []), strict=True):
            assert ta.keys() == tb.keys()
            assert ta["outcome"].keys() == tb["outcome"].keys()
    for folder in (hf, vl):
        write_report(folder)
    ra = json.loads((hf / "results.json").read_text())
    rb = json.loads((vl / "results.json").read_text())
    assert ra.keys() == rb.keys()
    assert (ra["engine"], rb["engine"]) == ("hf", "vllm")
    assert rb["n_runs"] == rb["n_planned"] == ra["n_runs"]
    assert "engine `vllm`" in (vl / "report.md").read_text()
    assert read_settings(vl)["engine"] == "vllm" and read_settings(hf)["engine"] == "hf"
    # the transcripts load as any other (monitor, load_transcripts)
    for path in (vl / "runs").glob("*.json"):
        [transcript] = load_transcripts(path)
        assert len(transcript.readings) == 3


def _alert_kinds(readings):
    return [[x["kind"] for x in r["alerts"]] for r in readings]


def test_greedy_answers_readings_and_alerts_equal_hf(runs, scenarios):
    root, _, _ = runs
    names = sorted(p.name for p in (root / "hf" / "runs").glob("*.json"))
    assert len(names) == len(scenarios) * len(CONDITIONS.split(","))
    for name in names:
        a = json.loads((root / "hf" / "runs" / name).read_text())
        b = json.loads((root / "vllm" / "runs" / name).read_text())
        assert _answers(root / "hf" / "runs" / name) == _answers(root / "vllm" / "runs" / name)
        ra, rb = a["persona_compass"]["turns"], b["persona_compass"]["turns"]
        shape = [(r["index"], r["n_tokens"], r["capped"]) for r in ra]
        assert shape == [(r["index"], r["n_tokens"], r["capped"]) for r in rb], name
        for x, y in zip(ra, rb, strict=True):
            assert y["projection"] == pytest.approx(x["projection"], rel=2e-3, abs=1e-2)
        assert _alert_kinds(ra) == _alert_kinds(rb), name
        ea = [t["cap_engaged_next"] for t in a["evaluation"]["turns"]]
        assert ea == [t["cap_engaged_next"] for t in b["evaluation"]["turns"]], name
        assert a["evaluation"]["seed"] == b["evaluation"]["seed"]
    # what the comparison covers: always-on capping on every turn, and an adaptive cap that an
    # alert engaged on a later turn (decided by the driver from the conversation's history)
    capped = json.loads((root / "vllm" / f"runs/{scenarios[0].id}__capped.json").read_text())
    assert all(r["capped"] for r in capped["persona_compass"]["turns"])
    adaptive = json.loads((root / "vllm" / f"runs/{scenarios[1].id}__adaptive.json").read_text())
    assert [r["capped"] for r in adaptive["persona_compass"]["turns"]] == [False, False, True]
    for cond in ("unsteered", "capped"):
        a = json.loads((root / "hf" / f"capability/{cond}.json").read_text())
        b = json.loads((root / "vllm" / f"capability/{cond}.json").read_text())
        assert [r["reply"] for r in a["items"]] == [r["reply"] for r in b["items"]]


def test_resume_regenerates_only_the_deleted_unit(runs, engine, scenarios, monkeypatch):
    root, _, _ = runs
    folder = root / "vllm"
    lost = folder / "runs" / f"{scenarios[1].id}__capped.json"
    before = _answers(lost)
    kept = {p: p.stat().st_mtime_ns for p in (folder / "runs").glob("*.json") if p != lost}
    lost.unlink()
    sizes: list[int] = []
    original = engine.respond
    monkeypatch.setattr(engine, "respond", lambda reqs: sizes.append(len(reqs)) or original(reqs))
    result = run_evaluation(small(scenarios), folder, engine=engine, progress=False)
    assert (result.generated, result.skipped, result.capability_done) == (1, len(kept), 0)
    assert sizes == [1, 1, 1]
    assert _answers(lost) == before  # greedy: the same answers again
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_a_rerun_on_the_other_engine_is_refused_without_force(runs, engine, hf_model, scenarios):
    root, _, _ = runs
    model, tok = hf_model
    with pytest.raises(EvaluationError, match=r"engine: 'vllm' -> 'hf'.*--force"):
        run_evaluation(small(scenarios, "hf"), root / "vllm", model=model, tokenizer=tok,
                       progress=False)  # fmt: skip
    with pytest.raises(EvaluationError, match=r"engine: 'hf' -> 'vllm'"):
        run_evaluation(small(scenarios), root / "hf", engine=engine, progress=False)
    with pytest.raises(EvaluationError, match="loaded model was passed with engine='vllm'"):
        run_evaluation(small(scenarios), root / "x", model=model, tokenizer=tok)


def test_model_self_user_writes_through_the_engine(engine, scenarios, tmp_path):
    out = tmp_path / "self"
    settings = small(scenarios[:1], conditions="unsteered", capability=False, user="model:self")
    run_evaluation(settings, out, engine=engine, progress=False)
    data = json.loads(next((out / "runs").glob("*.json")).read_text())
    sources = [t["user_source"] for t in data["evaluation"]["turns"]]
    assert sources[0] == "script" and sources[1] in ("simulator", "fallback")
    users = [m["content"] for m in data["conversation"] if m["role"] == "user"]
    if sources[1] == "simulator":
        assert users[1] != scenarios[0].user_turns[1]


def test_cli_engine_vllm_runs_and_reports(engine, scenarios, tmp_path, monkeypatch):
    """The command maps --engine vllm and --eager to run_evaluation (the module's engine
    stands in for the one it would start, which is checked to get the CLI's options)."""
    seen = {}

    def start(info, bundle, axis, conds, caps, *, batch, options=None, traits=()):
        seen.update(dtype=info.dtype, batch=batch, options=options, traits=list(traits))
        return engine

    monkeypatch.setattr(runner_mod, "start_vllm_engine", start)
    monkeypatch.setattr(engine, "close", lambda: None)  # the module fixture closes it
    out = tmp_path / "cli"
    args = ["evaluate", "--axis", "smollm2-135m", "--out", str(out), "--engine", "vllm",
            "--eager", "--dtype", "float32", "--scenarios", scenarios[0].id, "--turns", "2",
            "--max-new-tokens", "6", "--capability-limit", "2", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert seen == {
        "dtype": "float32",
        "batch": 4,
        "options": {"enforce_eager": True},
        "traits": [],
    }
    assert collect_results(out)["engine"] == "vllm"
    assert "engine `vllm`" in (out / "report.md").read_text()


def test_vllm_model_info_reads_the_config_not_the_weights(hf_model):
    info = run_engine.vllm_model_info("smollm2-135m", "float32")
    from persona_compass.axis import model_fingerprint

    assert info.fingerprint == model_fingerprint(hf_model[0])
    assert info.dtype == "float32"
    assert run_engine.vllm_model_info("smollm2-135m", "bf16").dtype == "bfloat16"
