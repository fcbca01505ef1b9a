"""EvaluationSettings: every knob checked when the settings are made (no model needed), and
run_evaluation's checks of what it is handed at run time."""

from __future__ import annotations

import dataclasses

import pytest

from persona_compass.alerts import AlertRules
from persona_compass.compass import AdaptivePolicy
from persona_compass.evaluation.capability import CapabilityItem
from persona_compass.evaluation.conditions import Condition, ConditionError
from persona_compass.evaluation.runner import EvaluationError, run_evaluation
from persona_compass.evaluation.scenarios import Scenario, load_scenarios
from persona_compass.evaluation.settings import RESUME_RULE, EvaluationSettings

SCENARIOS = [
    Scenario("code-a", "Loop", "coding", "low", ("Fix my loop.", "And tests?"), ("helpful",),
             "a developer", "a bug"),
    Scenario("mood-b", "Low", "therapy", "medium", ("I feel low.", "Nobody listens.", "Now?"),
             ("referral",), "a tired person", "feeling low"),
]  # fmt: skip


def make(**kw):
    return EvaluationSettings(**{"bundle": "some-bundle", "scenarios": SCENARIOS, **kw})


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"bundle": 3}, EvaluationError, r"bundle=3 must be a bundle folder or a shipped alias"),
        ({"engine": "tpu"}, EvaluationError, r"engine 'tpu' is not one of hf, vllm; use --engine"),
        ({"engine": object()}, EvaluationError, r"engine=<object .* must be 'hf' or 'vllm'; pass"),
        ({"engine_options": {"enforce_eager": True}}, EvaluationError,
         r"engine_options apply to engine='vllm' only"),
        ({"conditions": "unsteered,capd"}, ConditionError, r"unknown part 'capd'"),
        ({"conditions": ["capped", "capped"]}, EvaluationError, r"capped appear twice"),
        ({"conditions": []}, EvaluationError, r"no condition given"),
        ({"limit": 0}, EvaluationError, r"limit=0 must be a positive integer"),
        ({"turns": -1}, EvaluationError, r"turns=-1 must be a positive integer"),
        ({"turns": "2"}, EvaluationError, r"turns='2' must be a positive integer"),
        ({"capability_limit": True}, EvaluationError,
         r"capability_limit=True must be a positive integer"),
        ({"seed": 1.5}, EvaluationError, r"seed=1.5 must be an integer"),
        ({"capability_batch_size": 0}, EvaluationError,
         r"capability_batch_size=0 must be at least 1"),
        ({"max_new_tokens": 0}, EvaluationError, r"max_new_tokens=0 must be at least 1"),
        ({"temperature": -1.0}, EvaluationError, r"temperature=-1.0 must be >= 0"),
        ({"top_p": 0.0}, EvaluationError, r"top_p=0.0 must be in \(0, 1\]"),
        ({"repetition_penalty": 0.0}, EvaluationError,
         r"repetition_penalty=0.0 must be above 0 \(1 = none\)"),
        ({"capability_max_new_tokens": 0}, EvaluationError, r"max_new_tokens=0 must be at least"),
        ({"user": None}, EvaluationError, r"user=None must be a spec string"),
        ({"judge": 3}, EvaluationError, r"judge=3 must be a spec string"),
        ({"rules": {"turn_run": 2}}, EvaluationError, r"rules=\{'turn_run': 2\} must be an Alert"),
        ({"policy": 0.5}, EvaluationError, r"policy=0.5 must be an AdaptivePolicy"),
        ({"scenarios": []}, EvaluationError, r"no scenario selected"),
        ({"scenarios": [SCENARIOS[0], SCENARIOS[0]]}, EvaluationError,
         r"two selected scenarios share an id"),
        ({"turns": 3}, EvaluationError,
         r"--turns 3 but scenario\(s\) code-a script fewer user turns; .*--user model:self"),
    ],
)  # fmt: skip
def test_each_bad_value_is_named_with_its_fix(options, error, message):
    with pytest.raises(error, match=message):
        make(**options)


def test_defaults_and_normalised_values():
    settings = make(conditions="unsteered, capped", engine=" VLLM ", turns=3, user="model:self")
    assert settings.engine == "vllm"  # a simulated user may play more turns than any script
    assert all(isinstance(c, Condition) for c in settings.condition_list)
    assert [c.name for c in settings.condition_list] == ["unsteered", "capped"]
    assert settings.rules == AlertRules() and settings.policy == AdaptivePolicy()
    assert settings.scenario_source == "custom" and isinstance(settings.scenarios, tuple)
    assert make(rules=None).rules == AlertRules()  # None: the defaults, as a missing flag
    shipped = EvaluationSettings("some-bundle", limit=3)
    assert shipped.scenario_source == "shipped" and shipped.scenarios is None
    assert shipped.selected_scenarios() == load_scenarios()[:3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 3  # type: ignore[misc]


def test_given_collections_are_copied():
    options = {"enforce_eager": True}
    sweep = {"windows": ["1:3"], "percentiles": [25.0]}
    settings = make(engine="vllm", engine_options=options, sweep=sweep)
    options["enforce_eager"] = False
    sweep["windows"] = []
    assert settings.engine_options == {"enforce_eager": True}
    assert settings.sweep == {"windows": ["1:3"], "percentiles": [25.0]}


def test_capability_items_selected():
    items = [CapabilityItem(f"i{n}", "format", "Reply OK.", "OK") for n in range(3)]
    assert make(capability_items=items, capability_limit=2).selected_capability_items() == items[:2]
    assert make(capability=False, capability_items=items).selected_capability_items() == []


def test_every_field_declares_whether_a_resume_must_match_it():
    """The keys compared on resume are the ones the settings record held before the
    declaration moved onto the fields (so old folders resume exactly as they did)."""
    assert set(RESUME_RULE.keys) == {
        "engine", "model", "model_fingerprint", "dtype", "bundle_digest", "user", "judge",
        "turns", "max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed",
        "system_prompt", "rules", "policy", "capability_max_new_tokens",
        "capability_items_digest", "trait_digests",
    }  # fmt: skip
    assert dict(RESUME_RULE.legacy) == {"engine": "hf", "trait_digests": None}
    free = [
        f.name
        for f in dataclasses.fields(EvaluationSettings)
        if f.metadata["persona_compass.resume"] is None
    ]
    assert free == [
        "engine_options", "scenarios", "scenario_source", "conditions", "limit",
        "capability_batch_size", "sweep", "command",
    ]  # fmt: skip


class FakeEngine:
    """Enough of a started engine for run_evaluation's engine check."""

    name = "vllm"

    def respond(self, requests):
        raise AssertionError("nothing may be generated")


def test_run_evaluation_checks_what_it_is_handed_before_anything_else(tmp_path):
    settings = make()
    with pytest.raises(EvaluationError, match="settings must be an EvaluationSettings, not str"):
        run_evaluation("smollm2-135m", tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match=r"name the engine in the settings .*engine='vllm'"):
        run_evaluation(settings, tmp_path / "b", engine="vllm")
    with pytest.raises(
        EvaluationError, match=r"a vllm engine but the settings say engine='hf'; set .*'vllm'"
    ):
        run_evaluation(settings, tmp_path / "c", engine=FakeEngine())
    with pytest.raises(EvaluationError, match="loaded model was passed with engine='vllm'"):
        run_evaluation(make(engine="vllm"), tmp_path / "d", model=object(), tokenizer=object())
    assert list(tmp_path.iterdir()) == []
