"""The axis-quality verdict: thresholds, missing facts, trait bundles, axis show and reports."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from tiny import make_pair

from persona_compass.axis import Axis
from persona_compass.axis_verdict import (
    AxisFacts,
    Verdict,
    axis_verdict,
    bundle_verdict,
    default_identity,
    facts_from_metadata,
)
from persona_compass.bundle import Bundle
from persona_compass.bundles import resolve_bundle
from persona_compass.cli import main
from persona_compass.persona_space.extract import ExtractSettings, run_extraction
from persona_compass.persona_space.report import ReportError, default_pc1_beyond
from persona_compass.persona_space.store import RoleState
from persona_compass.persona_space.trait_extract import write_trait_report

NOT_RECORDED = [
    "held-out AUROC (default vs role-play answers): not recorded",
    "where the default persona sits along PC1: not recorded",
    "share of default answers that present as an AI: not recorded",
    "capping sweep: not recorded",
    "without a held-out AUROC the verdict is at most usable",
]


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    ("auroc", "level", "band"),
    [
        (0.9, "strong", "strong: >= 0.90"),
        (0.8999, "usable", "usable: >= 0.75 and < 0.90"),
        (0.75, "usable", "usable: >= 0.75 and < 0.90"),
        (0.7499, "weak", "weak: < 0.75"),
    ],
)
def test_auroc_thresholds_at_their_boundaries(auroc, level, band):
    verdict = axis_verdict(AxisFacts(heldout_auroc=auroc))
    assert verdict.level == level
    assert verdict.reasons[0] == (
        f"held-out AUROC {auroc:.4f} at the monitor layer, default vs role-play answers ({band})"
    )
    # the other facts are listed as missing and do not count
    assert verdict.reasons[1:] == NOT_RECORDED[1:4]


@pytest.mark.parametrize(
    ("share", "level", "text"),
    [
        (0.95, "strong", "95.0% of 40 roles along PC1 at the monitor layer (strong: >= 95%)"),
        (0.9499, "usable", "95.0% of 40 roles along PC1 at the monitor layer (usable: >= 75% "),
        (0.75, "usable", "75.0% of 40 roles along PC1 at the monitor layer (usable: >= 75% "),
        (0.7499, "weak", "75.0% of 40 roles along PC1 at the monitor layer (weak: < 75%)"),
    ],
)
def test_pc1_position_thresholds_at_their_boundaries(share, level, text):
    verdict = axis_verdict(AxisFacts(heldout_auroc=0.95, default_pc1_beyond=share, n_roles=40))
    assert verdict.level == level
    assert verdict.reasons[1].startswith("the default persona lies beyond " + text)


@pytest.mark.parametrize(
    ("as_ai", "answers", "level", "band"),
    [
        (8, 10, "strong", "strong: >= 80%"),
        (79, 100, "usable", "usable: >= 50% and < 80%"),
        (1, 2, "usable", "usable: >= 50% and < 80%"),
        (49, 100, "weak", "weak: < 50%"),
    ],
)
def test_ai_share_thresholds_at_their_boundaries(as_ai, answers, level, band):
    facts = AxisFacts(heldout_auroc=0.95, default_answers=answers, default_as_ai=as_ai)
    verdict = axis_verdict(facts)
    assert verdict.level == level
    share = 100.0 * as_ai / answers
    assert verdict.reasons[2] == (
        f"{as_ai} of {answers} default answers ({share:.1f}%) present as an AI "
        f"(heuristic judge) ({band})"
    )


def test_the_verdict_is_the_lowest_recorded_level():
    strong = dict(heldout_auroc=0.97, default_pc1_beyond=1.0, default_answers=10, default_as_ai=9)
    assert axis_verdict(AxisFacts(**strong)).level == "strong"
    assert axis_verdict(AxisFacts(**{**strong, "default_as_ai": 2})).level == "weak"
    assert axis_verdict(AxisFacts(**{**strong, "default_pc1_beyond": 0.8})).level == "usable"
    assert axis_verdict(AxisFacts(**{**strong, "heldout_auroc": 0.7})).level == "weak"


# --------------------------------------------------------------------------- missing facts


def test_nothing_recorded_is_usable_and_says_so():
    verdict = axis_verdict(AxisFacts())
    assert verdict == Verdict("usable", NOT_RECORDED)
    assert verdict.to_dict() == {"verdict": "usable", "verdict_reasons": NOT_RECORDED}


def test_without_auroc_the_other_facts_still_decide_but_never_strong():
    weak = axis_verdict(AxisFacts(default_pc1_beyond=0.5))
    assert weak.level == "weak"
    best = axis_verdict(AxisFacts(default_pc1_beyond=1.0, default_answers=5, default_as_ai=5))
    assert best.level == "usable"
    assert best.reasons[-1] == "without a held-out AUROC the verdict is at most usable"


@pytest.mark.parametrize(
    "bad", [None, "0.9", True, float("nan"), float("inf"), 1.5, -0.1, [0.9], {}]
)
def test_unreadable_metadata_counts_as_not_recorded(bad):
    meta = {
        "monitor_auroc": bad,
        "auroc": bad,
        "monitor_default_pc1_beyond": bad,
        "default_identity": bad,
        "roles": bad,
    }
    facts = facts_from_metadata(meta, 3, {"chosen_by": bad, "reason": bad})
    assert facts == AxisFacts()
    assert axis_verdict(facts).reasons == NOT_RECORDED


def test_identity_counts_must_be_consistent():
    for identity in (
        {"answers": 4, "as_ai": 5},
        {"answers": -1, "as_ai": 0},
        {"answers": 4},
        {"answers": 4.0, "as_ai": 1},
    ):
        facts = facts_from_metadata({"default_identity": identity})
        assert (facts.default_answers, facts.default_as_ai) == (None, None)
    facts = facts_from_metadata({"default_identity": {"answers": 0, "as_ai": 0}})
    assert axis_verdict(facts).reasons[2].endswith("present as an AI: not recorded")


def test_facts_from_metadata_reads_what_extraction_records():
    meta = {
        "auroc": [0.5, 0.6, None, 0.8],
        "monitor_default_pc1_beyond": 0.975,
        "roles": {"pirate": 24, "chef": 23},
        "default_identity": {"answers": 60, "as_ai": 45, "judge": "heuristic"},
    }
    facts = facts_from_metadata(meta, monitor_layer=3)
    assert facts == AxisFacts(
        heldout_auroc=0.8,  # from the per-layer list when monitor_auroc is missing
        default_pc1_beyond=0.975,
        n_roles=2,
        default_answers=60,
        default_as_ai=45,
    )
    assert facts_from_metadata({**meta, "monitor_auroc": 0.91}, 3).heldout_auroc == 0.91
    assert facts_from_metadata(meta, monitor_layer=2).heldout_auroc is None  # unrecorded layer
    assert facts_from_metadata(meta, monitor_layer=7).heldout_auroc is None
    assert facts_from_metadata(meta).heldout_auroc is None


def test_a_sweep_note_is_reported_but_not_graded():
    note = {"chosen_by": "persona-compass evaluate --sweep", "reason": "cap-a has the lowest"}
    facts = facts_from_metadata({"monitor_auroc": 0.95}, 0, note)
    assert facts.sweep == "cap-a has the lowest"
    verdict = axis_verdict(facts)
    assert verdict.reasons[3] == "capping sweep (not graded): cap-a has the lowest"
    assert verdict.level == "strong"
    calibrated = {"percentile": 25.0, "calibration_source": "projections"}
    assert facts_from_metadata({}, 0, calibrated).sweep is None


# --------------------------------------------------------------------------- trait bundles


def _trait_axis(auroc: float | None) -> Axis:
    meta = {
        "kind": "trait",
        "trait": "malice",
        "description": "Cruelty toward people.",
        "judge": "none",
        "pairs": 2,
        "questions": 6,
        "max_new_tokens": 5,
        "n_shows": 12,
        "n_avoids": 12,
        "buckets": {"elicit": {"shows": 12}, "suppress": {"avoids": 12}},
        "heldout": {
            "train_questions": 4,
            "test_questions": 2,
            "n_test_shows": 4,
            "n_test_avoids": 4,
        },
        "auroc": [0.5, 0.6, auroc, 0.7],
        "cosines": {},
    }
    if auroc is not None:
        meta["monitor_auroc"] = auroc
    return Axis(torch.randn(4, 8), model_id="tiny", monitor_layer=2, metadata=meta)


def test_trait_bundles_are_graded_on_their_auroc_alone():
    verdict = bundle_verdict(_trait_axis(0.8254))
    assert verdict == Verdict(
        "usable",
        [
            "held-out AUROC 0.8254 at the monitor layer, trait-showing vs trait-avoiding "
            "answers (usable: >= 0.75 and < 0.90)"
        ],
    )
    assert bundle_verdict(_trait_axis(0.92)).level == "strong"
    assert bundle_verdict(_trait_axis(0.5413)).level == "weak"
    missing = bundle_verdict(_trait_axis(None))
    assert missing == Verdict(
        "usable",
        [
            "held-out AUROC (trait-showing vs trait-avoiding answers): not recorded",
            "without a held-out AUROC the verdict is at most usable",
        ],
    )


def test_trait_report_has_a_verdict_section(tmp_path):
    axis = _trait_axis(0.7)
    meta = dict(axis.metadata)
    meta["auroc"] = [0.5, 0.6, 0.7, 0.65]
    axis = Axis(axis.directions, model_id="tiny", monitor_layer=2, metadata=meta)
    write_trait_report(tmp_path, axis, torch.tensor([0.5, 0.6, 0.7, 0.65]))
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Verdict")[1].split("## Cosine")[0]
    assert "**weak**" in section
    assert "- held-out AUROC 0.7000 at the monitor layer" in section and "(weak: < 0.75)" in section


# --------------------------------------------------------------------------- PC1 position


def test_default_pc1_beyond_counts_the_roles_on_the_far_side():
    pc1 = torch.tensor([1.0, 0.0])
    roles = torch.tensor([[-2.0, 5.0], [-1.0, 0.0], [1.0, 3.0], [2.0, 0.0]])
    at = [3.0, 0.0, -3.0, 1.0, 2.0]
    shares = [default_pc1_beyond(roles, torch.tensor([x, 9.0]), pc1) for x in at]
    # beyond every role at either end; in the middle half; a tie counts on neither side
    assert shares == [1.0, 0.5, 1.0, 0.5, 0.75]
    with pytest.raises(ReportError, match="non-empty"):
        default_pc1_beyond(roles[:0], torch.zeros(2), pc1)


def _persona_axis(default_x: float, metadata: dict | None = None) -> Axis:
    """Roles spread along the first coordinate (their PC1); the default at ``default_x``."""
    xs = [-2.0, -1.0, 1.0, 2.0]
    vectors = {f"role/r{i}": torch.zeros(3, 4) for i in range(len(xs))}
    for (_, vec), x in zip(vectors.items(), xs, strict=True):
        vec[:, 0], vec[:, 1] = x, 0.1 * x * x  # a little off the line: still PC1 along x
    default = torch.zeros(3, 4)
    default[:, 0] = default_x
    roles_mean = torch.stack(list(vectors.values())).mean(0)
    return Axis(
        default - roles_mean,
        model_id="tiny",
        monitor_layer=1,
        vectors={"default": default, **vectors},
        metadata=metadata or {},
    )


def test_pc1_position_is_derived_from_the_vectors_when_not_recorded():
    at_end = bundle_verdict(_persona_axis(3.0, {"monitor_auroc": 0.93}))
    assert at_end.level == "strong"
    assert at_end.reasons[1] == (
        "the default persona lies beyond 100.0% of 4 roles along PC1 at the monitor layer, "
        "from the bundle's role vectors (strong: >= 95%)"
    )
    among = bundle_verdict(_persona_axis(0.0, {"monitor_auroc": 0.93}))
    assert among.level == "weak" and "beyond 50.0% of 4 roles" in among.reasons[1]
    # a recorded value wins over the vectors and is not marked as derived
    recorded = bundle_verdict(
        _persona_axis(0.0, {"monitor_auroc": 0.93, "monitor_default_pc1_beyond": 0.8})
    )
    assert recorded.level == "usable"
    assert recorded.reasons[1] == (
        "the default persona lies beyond 80.0% of the roles along PC1 at the monitor layer "
        "(usable: >= 75% and < 95%)"
    )
    # no default vector (a bare imported axis): not recorded
    bare = Axis(torch.randn(3, 4), monitor_layer=1, metadata={"monitor_auroc": 0.93})
    assert bundle_verdict(bare).reasons[1] == NOT_RECORDED[1]


def test_default_identity_counts_answers_that_say_they_are_an_ai():
    answers = [
        "I am an AI language model created to help you.",
        "I'm Sarah Thompson, a nurse from Ohio.",
        "As an AI, I don't have a favourite colour.",
        "",
        "Paris is the capital of France.",
    ]
    assert default_identity(answers) == {"answers": 5, "as_ai": 2, "judge": "heuristic"}
    assert default_identity([]) == {"answers": 0, "as_ai": 0, "judge": "heuristic"}


# --------------------------------------------------------------------------- shipped bundle, CLI

SHIPPED_REASONS = [
    "held-out AUROC 0.8424 at the monitor layer, default vs role-play answers "
    "(usable: >= 0.75 and < 0.90)",
    "the default persona lies beyond 52.5% of 40 roles along PC1 at the monitor layer, "
    "from the bundle's role vectors (weak: < 75%)",
    "share of default answers that present as an AI: not recorded",
    "capping sweep: not recorded",
]


def test_axis_show_json_carries_the_verdict_of_the_shipped_bundle():
    result = CliRunner().invoke(main, ["axis", "show", "smollm2-135m", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == "weak"
    assert data["verdict_reasons"] == SHIPPED_REASONS
    table = CliRunner().invoke(main, ["axis", "show", "smollm2-135m"])
    assert table.exit_code == 0, table.output
    assert "verdict" in table.output and "weak" in table.output


def test_axis_show_reports_a_sweep_note(tmp_path):
    folder = tmp_path / "swept"
    shutil.copytree(resolve_bundle("smollm2-135m"), folder)
    capping = json.loads((folder / "capping.json").read_text())
    capping["metadata"].update(
        chosen_by="persona-compass evaluate --sweep", reason="layers_22:29-p0.25 has the lowest"
    )
    (folder / "capping.json").write_text(json.dumps(capping))
    result = CliRunner().invoke(main, ["axis", "show", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    reasons = json.loads(result.stdout)["verdict_reasons"]
    assert reasons == [
        *SHIPPED_REASONS[:3],
        "capping sweep (not graded): layers_22:29-p0.25 has the lowest",
    ]


# --------------------------------------------------------------------------- extraction


def test_extraction_records_the_facts_and_the_report_states_the_verdict(tmp_path):
    model, tok = make_pair("qwen2")
    settings = ExtractSettings.from_preset(
        "tiny",
        "quick",
        n_roles=3,
        prompts_per_role=1,
        n_questions=4,
        max_new_tokens=5,
        batch_size=5,
        judge="none",
        samples_per_role=4,
        min_role_count=1,
    )
    result = run_extraction(
        settings,
        tmp_path / "run",
        model=model,
        tokenizer=tok,
        model_id="tiny",
        model_name="Tiny",
        progress=False,
    )
    assert result.bundle_dir is not None
    bundle = Bundle.open(result.bundle_dir)
    meta = bundle.axis.metadata
    default = RoleState.load(result.out_dir / "activations" / "default.safetensors")
    texts = [r.response for r in default.records.values()]
    assert meta["default_identity"] == default_identity(texts)
    assert meta["default_identity"]["answers"] == 5 * 4  # 5 default prompts x 4 questions
    # the recorded PC1 position is the one the bundle's vectors give
    derived = bundle_verdict(
        Axis(
            bundle.axis.directions,
            monitor_layer=bundle.axis.layer,
            vectors=bundle.axis.vectors,
            metadata={},
        )
    )
    recorded = meta["monitor_default_pc1_beyond"]
    assert f"beyond {100 * recorded:.1f}% of 3 roles" in derived.reasons[1]
    verdict = bundle_verdict(bundle.axis, bundle.capping)
    report = (result.bundle_dir / "report.md").read_text()
    assert "\n".join(verdict.markdown()) in report
    assert report.index("## Verdict") < report.index("## Chosen layers")
    shown = CliRunner().invoke(main, ["axis", "show", str(result.bundle_dir), "--json"])
    assert json.loads(shown.stdout)["verdict_reasons"] == verdict.reasons
