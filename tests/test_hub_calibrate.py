"""``axis calibrate``: default and role-play answers -> calibration.json of an uncalibrated bundle.

The projection, table and stability logic is pinned exactly with a stand-in for the
single-pass capture (known means per answer); one run on a tiny model goes through the real
capture and the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from tiny import make_pair, save_tiny_bundle

from persona_compass.axis import Axis, model_fingerprint
from persona_compass.calibration import Calibration, quantiles
from persona_compass.capping import CappingConfig
from persona_compass.cli import main
from persona_compass.hub import CalibrateSettings, HubError, bootstrap_interval, calibrate_bundle
from persona_compass.models import model_display_name
from persona_compass.persona_space import extract
from persona_compass.persona_space.catalogue import load_catalogue
from persona_compass.persona_space.report import auroc

SMALL = CalibrateSettings(roles=3, questions=2, max_new_tokens=4, batch_size=4, bootstrap=500)
SHIFT = 20.0  # default answers sit this far above role play along the axis


@pytest.fixture
def setup(tmp_path):
    """A tiny model, an uncalibrated bundle for it with a capping config, the planned jobs."""
    model, tok = make_pair("qwen2")
    g = torch.Generator().manual_seed(7)
    axis = Axis(
        torch.randn(4, 64, generator=g),
        model_id="tiny",
        fingerprint=model_fingerprint(model),
        monitor_layer=2,
        metadata={"source": "hub", "hub": {"commit": "c" * 40}},
    )
    bundle = tmp_path / "bundle"
    axis.save(bundle)
    CappingConfig.from_axis(axis, "1:3", [0.5, 0.25]).save(bundle)
    catalogue = load_catalogue().select(roles=3, prompts_per_role=1, questions=2, seed=0)
    jobs = extract.plan_jobs(catalogue, model_display_name(model, tok))
    return model, tok, axis, bundle, jobs


def job_means(job_id: str, units: torch.Tensor) -> torch.Tensor:
    """Known (L, D) answer means: noise, shifted up the axis for default answers."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16))
    sign = 1.0 if job_id.startswith("default/") else -1.0
    return torch.randn(units.shape, generator=g) + sign * SHIFT / 2 * units


def fake_capture(axis: Axis, empty: str, calls: list[list[str]], fail_on_call: int | None = None):
    """Stands in for generate_with_capture: known means, ``empty`` has no content token."""

    def fake(model, tokenizer, batch, sampling, seed, layers=None):
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise RuntimeError("interrupted")
        calls.append([j.id for j in batch])
        means = torch.stack([job_means(j.id, axis.units()) for j in batch])
        counts = torch.tensor([0 if j.id == empty else 3 for j in batch])
        means[counts == 0] = 0.0
        return [f"answer to {j.id}" for j in batch], counts.tolist(), means, counts

    return fake


def test_calibration_is_the_role_play_projections(setup, monkeypatch):
    model, tok, axis, bundle, jobs = setup
    empty = next(j.id for j in jobs if j.role != "default")
    calls: list[list[str]] = []
    monkeypatch.setattr(extract, "generate_with_capture", fake_capture(axis, empty, calls))
    run = calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)

    assert (
        len(jobs) == 5 * 2 + 3 * 1 * 2
    )  # default prompts x questions + roles x prompts x questions
    assert sorted(i for c in calls for i in c) == sorted(j.id for j in jobs)
    assert all(len(c) <= SMALL.batch_size for c in calls)
    units = axis.units().double()
    rows = {j.id: job_means(j.id, axis.units()).double() @ units.T for j in jobs}  # (L, L)
    role = torch.stack(
        [rows[j.id].diagonal() for j in jobs if j.role != "default" and j.id != empty]
    )
    default = torch.stack([rows[j.id].diagonal() for j in jobs if j.role == "default"])
    assert (run.n_answers, run.n_role_answers, run.n_default_answers) == (16, 5, 10)
    assert run.generated_now == 16 and run.monitor_layer == 2

    saved = Axis.load(bundle)
    expected = Calibration.from_projections(role.float())
    assert saved.calibration is not None and saved.calibration.n_samples == 5
    torch.testing.assert_close(saved.calibration.values, expected.values, rtol=1e-6, atol=1e-6)
    assert run.p25 == pytest.approx(float(quantiles(role[:, 2], [25.0])), abs=1e-5)
    assert run.p75 == pytest.approx(float(quantiles(role[:, 2], [75.0])), abs=1e-5)
    lo, hi = bootstrap_interval(role[:, 2].float(), 25.0, n_boot=500, seed=0)
    assert run.p25_interval == pytest.approx((lo, hi), abs=1e-5) and lo <= run.p25 <= hi
    assert run.p25_interval_percentiles == pytest.approx(
        (saved.calibration.percentile_of(lo, 2), saved.calibration.percentile_of(hi, 2)), abs=1e-3
    )
    assert run.default_auroc == pytest.approx(float(auroc(default[:, 2], role[:, 2])[0]))
    assert run.default_auroc == 1.0  # default answers sit SHIFT above role play on the axis
    # the rest of the bundle is as it was; bundle.json says how it was calibrated
    assert torch.equal(saved.directions, axis.directions)
    assert saved.metadata["hub"] == {"commit": "c" * 40}
    info = saved.metadata["calibration_run"]
    assert info["n_answers"] == 16 and info["roles"] == 3 and info["p25"] == round(run.p25, 6)
    cap = CappingConfig.load(bundle)
    assert cap.thresholds == (0.5, 0.25)
    # calibrated capping works now
    floor = CappingConfig.calibrate(saved, saved.calibration, "1:3", 25.0)
    assert floor.thresholds == pytest.approx(
        [saved.calibration.threshold(layer, 25.0) for layer in (1, 2)]
    )


def test_resume_redoes_nothing_already_recorded(setup, monkeypatch):
    model, tok, axis, bundle, jobs = setup
    first: list[list[str]] = []
    monkeypatch.setattr(extract, "generate_with_capture", fake_capture(axis, "", first, 2))
    with pytest.raises(RuntimeError, match="interrupted"):
        calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)
    assert Axis.load(bundle).calibration is None and len(first) == 2
    second: list[list[str]] = []
    monkeypatch.setattr(extract, "generate_with_capture", fake_capture(axis, "", second))
    run = calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)
    done_first = {i for c in first for i in c}
    done_second = {i for c in second for i in c}
    assert not done_first & done_second
    assert done_first | done_second == {j.id for j in jobs}
    assert run.generated_now == len(done_second) and run.n_answers == len(jobs)
    # a finished run resumed again (with --force) generates nothing and gives the same table
    third: list[list[str]] = []
    monkeypatch.setattr(extract, "generate_with_capture", fake_capture(axis, "", third))
    again = calibrate_bundle(
        bundle, model, tokenizer=tok, settings=SMALL, progress=False, force=True
    )
    assert third == [] and again.generated_now == 0
    assert torch.equal(again.calibration.values, run.calibration.values)


def test_changed_setting_or_calibrated_bundle_is_refused(setup, monkeypatch):
    model, tok, axis, bundle, _ = setup
    monkeypatch.setattr(extract, "generate_with_capture", fake_capture(axis, "", []))
    calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)
    with pytest.raises(HubError, match="already has a calibration .* pass `force=True`"):
        calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)
    other = dataclasses.replace(SMALL, questions=3)
    with pytest.raises(HubError, match=r"other settings \(questions: 2 -> 3; catalogue_digest"):
        calibrate_bundle(bundle, model, tokenizer=tok, settings=other, progress=False, force=True)
    # speed settings may change on resume
    faster = dataclasses.replace(SMALL, batch_size=16)
    run = calibrate_bundle(
        bundle, model, tokenizer=tok, settings=faster, progress=False, force=True
    )
    assert run.generated_now == 0


def test_too_few_role_answers_with_content(setup, monkeypatch):
    model, tok, axis, bundle, jobs = setup
    roles = [j.id for j in jobs if j.role != "default"]

    def fake(model_, tokenizer, batch, sampling, seed, layers=None):
        means = torch.stack([job_means(j.id, axis.units()) for j in batch])
        counts = torch.tensor([0 if j.id in roles[1:] else 2 for j in batch])
        return ["x"] * len(batch), counts.tolist(), means, counts

    monkeypatch.setattr(extract, "generate_with_capture", fake)
    with pytest.raises(HubError, match="only 1 role-play answers had content"):
        calibrate_bundle(bundle, model, tokenizer=tok, settings=SMALL, progress=False)
    assert Axis.load(bundle).calibration is None


def test_model_of_another_shape_is_refused(tmp_path):
    model_dir, bundle, axis = save_tiny_bundle(tmp_path)
    wide = tmp_path / "wide"
    other, tok = make_pair("qwen2", hidden_size=32)
    other.save_pretrained(wide)
    tok.save_pretrained(wide)
    dataclasses.replace(axis, calibration=None).save(bundle)
    with pytest.raises(HubError, match="4 layers of width 64 but .* 4 of width 32"):
        calibrate_bundle(bundle, str(wide), settings=SMALL, progress=False)
    assert not (tmp_path / "bundle.calibration").exists()


def test_shipped_bundle_is_not_written(tmp_path):
    with pytest.raises(HubError, match="shipped inside the package"):
        calibrate_bundle("smollm2-135m", "smollm2-135m", force=True, progress=False)


def test_bootstrap_interval_is_seeded_and_shrinks_with_samples():
    g = torch.Generator().manual_seed(0)
    few, many = torch.randn(20, generator=g), torch.randn(2000, generator=g)
    a = bootstrap_interval(few, 25.0, seed=3)
    assert a == bootstrap_interval(few, 25.0, seed=3) and a != bootstrap_interval(few, 25.0, seed=4)
    b = bootstrap_interval(many, 25.0, seed=3)
    assert a[0] <= float(quantiles(few[:, None], [25.0])) <= a[1]
    assert b[1] - b[0] < (a[1] - a[0]) / 3
    assert bootstrap_interval(torch.full((9,), 2.5), 25.0) == (2.5, 2.5)


def test_settings_are_validated():
    with pytest.raises(Exception, match="roles=0 must be a whole number >= 1"):
        CalibrateSettings(roles=0)
    with pytest.raises(Exception, match="top_p"):
        CalibrateSettings(top_p=0.0)


def test_cli_defaults_are_the_library_defaults():
    params = {p.name: p.default for p in main.commands["axis"].commands["calibrate"].params}
    defaults = CalibrateSettings()
    for name in ("roles", "questions", "prompts_per_role", "max_new_tokens", "batch_size", "seed"):
        assert params[name] == getattr(defaults, name), name


def test_cli_calibrates_a_tiny_model_end_to_end(tmp_path):
    model_dir, bundle, axis = save_tiny_bundle(tmp_path)
    dataclasses.replace(axis, calibration=None).save(bundle)
    args = ["axis", "calibrate", str(bundle), "--model", str(model_dir), "--roles", "2"]
    args += ["--questions", "2", "--max-new-tokens", "4", "--batch-size", "7", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["n_answers"] == 5 * 2 + 2 * 2 and summary["generated_now"] == 14
    assert summary["engine"] == "hf" and summary["monitor_layer"] == 2
    saved = Axis.load(bundle)
    assert saved.calibration is not None
    assert saved.calibration.n_samples == summary["n_role_answers"] <= 4
    lo, hi = summary["p25_interval"]
    assert lo <= summary["p25"] <= hi
    assert (tmp_path / "bundle.calibration" / "answers.safetensors").is_file()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "already has a calibration" in res.output
    res = CliRunner().invoke(main, [*args[:-1], "--force"])
    assert res.exit_code == 0, res.output
    assert "14 answers" in res.output and "0 generated now" in res.output
    assert "bootstrap 95% interval" in res.output


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--eager"], "only apply to --engine vllm"),
        (["--max-num-seqs", "4"], "only apply to --engine vllm"),
        (["--engine", "vllm", "--device-map", "auto"], "--device-map places the hf model"),
    ],
)
def test_cli_calibrate_engine_option_errors(tmp_path, extra, says):
    args = ["axis", "calibrate", str(tmp_path), "--model", "x", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and says in res.output
