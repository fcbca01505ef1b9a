"""Trait axis extraction: plan, judges, buckets, the axis as a contrast of sums, resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny import make_pair

from persona_compass.axis import Axis
from persona_compass.cli import main
from persona_compass.errors import PersonaCompassError
from persona_compass.persona_space.extract import ExtractSettings, rejudge, run_extraction
from persona_compass.persona_space.store import RoleState
from persona_compass.persona_space.trait_extract import (
    AVOIDS,
    SHOWS,
    axis_cosines,
    plan_trait_jobs,
    trait_bucket,
)
from persona_compass.persona_space.trait_judges import (
    HeuristicTraitJudge,
    TraitItem,
    TraitJudgeError,
    make_trait_judge,
    parse_trait_score,
)
from persona_compass.persona_space.traits import load_trait

SMALL = dict(
    trait="sycophancy",
    prompts_per_role=2,
    n_questions=6,
    max_new_tokens=5,
    batch_size=8,
    judge="none",
    samples_per_role=12,
    min_role_count=1,
)


def settings(**kw) -> ExtractSettings:
    return ExtractSettings.from_preset("tiny", "quick", **{**SMALL, **kw})


def run(tmp_path, pair, compare_with=(), **kw):
    model, tok = pair
    return run_extraction(
        settings(**kw),
        tmp_path / "run",
        model=model,
        tokenizer=tok,
        model_id="tiny",
        model_name="Tiny",
        progress=False,
        compare_with=compare_with,
    )


def states_of(root) -> dict[str, RoleState]:
    return {p.stem: RoleState.load(p) for p in (root / "activations").glob("*.safetensors")}


def test_plan_asks_every_question_under_both_sides_of_every_pair():
    cat = load_trait("malice").select(pairs=3, questions=4)
    jobs = plan_trait_jobs(cat)
    assert len(jobs) == 3 * 4 * 2
    assert len({j.id for j in jobs}) == len(jobs)
    first, second = jobs[0], jobs[1]
    assert (first.role, second.role) == ("elicit", "suppress")
    assert first.question == second.question and first.prompt_index == second.prompt_index
    assert first.system_prompt == cat.pairs[0].elicit
    assert second.system_prompt == cat.pairs[0].suppress


def test_end_to_end_axis_is_shown_minus_avoided(tmp_path, qwen_pair):
    result = run(tmp_path, qwen_pair)
    assert result.planned == 2 * 6 * 2
    states = states_of(result.out_dir)
    assert set(states) == {"elicit", "suppress"}
    # without a judge every answer counts as what its prompt asked for
    assert set(states["elicit"].counts) <= {SHOWS} and set(states["suppress"].counts) <= {AVOIDS}
    shows, _ = states["elicit"].mean((SHOWS,))
    avoids, _ = states["suppress"].mean((AVOIDS,))
    axis = Axis.load(result.bundle_dir)
    torch.testing.assert_close(axis.directions, shows - avoids)
    meta = axis.metadata
    assert meta["kind"] == "trait" and meta["trait"] == "sycophancy"
    assert meta["n_shows"] + meta["n_avoids"] == sum(
        sum(s.counts.values()) for s in states.values()
    )
    assert len(meta["auroc"]) == axis.n_layers
    assert meta["monitor_auroc"] == pytest.approx(meta["auroc"][axis.monitor_layer], abs=1e-4)
    assert axis.calibration is not None
    assert not (result.bundle_dir / "capping.json").exists()  # a trait gets no floor config
    report = (result.bundle_dir / "report.md").read_text()
    assert (
        "Trait axis: sycophancy" in report and f"monitor layer: **{axis.monitor_layer}**" in report
    )


def test_rerun_resumes_without_regenerating(tmp_path, qwen_pair):
    first = run(tmp_path, qwen_pair)
    before = {k: dict(v.records) for k, v in states_of(first.out_dir).items()}
    again = run(tmp_path, qwen_pair)
    assert again.generated_now == 0
    assert {k: dict(v.records) for k, v in states_of(again.out_dir).items()} == before


def test_resume_with_another_trait_is_refused(tmp_path, qwen_pair):
    run(tmp_path, qwen_pair)
    with pytest.raises(PersonaCompassError, match="trait|catalogue"):
        run(tmp_path, qwen_pair, trait="malice")


def test_report_gives_cosines_with_the_compared_axes(tmp_path, qwen_pair):
    first = run(tmp_path, qwen_pair)
    axis = Axis.load(first.bundle_dir)
    opposite = Axis(directions=-axis.directions, monitor_layer=axis.monitor_layer)
    cos = axis_cosines(axis.directions, [axis, opposite], axis.monitor_layer)
    # a trait bundle is named by its trait, any other axis is "assistant"
    assert cos == {"sycophancy": 1.0, "assistant": -1.0}
    again = run(tmp_path, qwen_pair, compare_with=[opposite])
    assert again.summary["cosines"] == {"assistant": -1.0}
    assert "| assistant | -1.000 |" in (again.bundle_dir / "report.md").read_text()


def test_judged_buckets_follow_the_threshold():
    assert trait_bucket("elicit", 80, 50, judged=True) == SHOWS
    assert trait_bucket("elicit", 50, 50, judged=True) == SHOWS  # at the threshold it shows
    assert trait_bucket("elicit", 49, 50, judged=True) == AVOIDS
    assert trait_bucket("suppress", 90, 50, judged=True) == SHOWS
    assert trait_bucket("suppress", None, 50, judged=True) == "unscored"
    assert trait_bucket("suppress", 90, 50, judged=False) == AVOIDS


def test_rejudge_moves_answers_between_buckets(tmp_path, qwen_pair, monkeypatch):
    first = run(tmp_path, qwen_pair)
    model, tok = qwen_pair

    # a stand-in judge: the first two of every four answers of a side show the trait
    monkeypatch.setattr(
        HeuristicTraitJudge,
        "score",
        lambda self, items: [100 if i % 4 < 2 else 0 for i in range(len(items))],
    )
    result = rejudge(first.out_dir, "heuristic", model=model, tokenizer=tok, model_id="tiny")
    states = states_of(result.out_dir)
    for side, state in states.items():
        records = list(state.records.values())
        expected_shows = sum(1 for i, r in enumerate(records) if i % 4 < 2 and r.n_tokens > 0)
        assert state.counts.get(SHOWS, 0) == expected_shows, side
        assert all(r.judge == "heuristic" for r in records)
    assert Axis.load(result.bundle_dir).metadata["judge"] == "heuristic"


def test_heuristic_judge_counts_marker_phrases():
    judge = HeuristicTraitJudge(load_trait("sycophancy").rubric)
    assert judge.score_text("You're absolutely right, what a brilliant idea!") == 100
    assert judge.score_text("Actually, that is a common misconception.") == 0
    assert judge.score_text("You\u2019re right, but actually it\u2019s a myth.") == 33
    assert judge.score_text("Water boils at 100 degrees.") is None
    assert judge.score([TraitItem("q", "great idea")]) == [100]


def test_judge_reply_parsing():
    assert parse_trait_score("SCORE: 85") == 85
    assert parse_trait_score("The answer flatters the user.\nscore=7") == 7
    assert parse_trait_score("I'd say 40 out of 100") == 40
    assert parse_trait_score("SCORE: 250") is None
    assert parse_trait_score("no number here") is None


def test_judge_specs():
    rubric = load_trait("malice").rubric
    assert make_trait_judge("none", rubric).name == "none"
    assert make_trait_judge(" Heuristic ", rubric).name == "heuristic"
    with pytest.raises(TraitJudgeError, match="judge spec 'scripted'"):
        make_trait_judge("scripted", rubric)
    with pytest.raises(TraitJudgeError, match="model:self needs"):
        make_trait_judge("model:self", rubric)
    model, tok = make_pair("qwen2")
    judge = make_trait_judge("model:self", rubric, model=model, tokenizer=tok)
    scores = judge.score([TraitItem("Are you sure?", "Yes.")])
    assert judge.name == "model:self" and len(scores) == 1
    assert scores[0] is None or 0 <= scores[0] <= 100


def test_settings_for_traits():
    s = ExtractSettings.from_preset("m", "quick", trait="malice")
    assert (s.prompts_per_role, s.n_questions, s.n_roles) == (None, None, None)
    assert s.samples_per_role == 120
    assert ExtractSettings.from_preset("m", "quick", trait="malice", n_questions=7).n_questions == 7
    with pytest.raises(PersonaCompassError, match="drop `roles_path`/`questions_path`"):
        ExtractSettings.from_preset("m", "quick", trait="malice", roles_path="roles.json")


def test_cli_dry_run_plans_a_trait(tmp_path):
    out = CliRunner().invoke(
        main,
        ["extract", "--out", str(tmp_path / "r"), "--trait", "confabulation", "--dry-run"],
    )
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    cat = load_trait("confabulation")
    assert plan["trait"] == "confabulation"
    assert plan["rollouts"] == len(cat.pairs) * len(cat.questions) * 2


def test_cli_unknown_trait_is_a_clear_error(tmp_path):
    out = CliRunner().invoke(
        main, ["extract", "--out", str(tmp_path / "r"), "--trait", "greed", "--dry-run"]
    )
    assert out.exit_code != 0
    assert "greed" in out.output


def test_axis_show_presents_a_trait_bundle(tmp_path, qwen_pair):
    result = run(tmp_path, qwen_pair)
    out = CliRunner().invoke(main, ["axis", "show", str(result.bundle_dir), "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert (shown["kind"], shown["trait"]) == ("trait", "sycophancy")
    assert "pc1_cosine" not in shown and shown["cosines"] == {}
    table = CliRunner().invoke(main, ["axis", "show", str(result.bundle_dir)])
    assert table.exit_code == 0 and "sycophancy" in table.output
