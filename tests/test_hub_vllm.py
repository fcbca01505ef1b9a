"""``axis calibrate --engine vllm``: the answers generated in vLLM, every layer captured there.

One small run on SmolLM2 (the shipped bundle, its calibration removed). Skipped when vLLM or
the model is not installed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("vllm")

from persona_compass.axis import Axis  # noqa: E402
from persona_compass.bundles import resolve_bundle  # noqa: E402
from persona_compass.errors import ModelNotInstalledError  # noqa: E402
from persona_compass.hub import CalibrateSettings, calibrate_bundle  # noqa: E402
from persona_compass.hub.calibration_store import CalibrationStore  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]


def test_calibrate_with_the_vllm_engine(tmp_path):
    shipped = Axis.load(resolve_bundle("smollm2-135m"))
    bundle = tmp_path / "bundle"
    dataclasses.replace(shipped, calibration=None).save(bundle)
    settings = CalibrateSettings(roles=2, questions=1, max_new_tokens=8, batch_size=4)
    options = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8}
    try:
        run = calibrate_bundle(
            bundle,
            "smollm2-135m",
            engine="vllm",
            settings=settings,
            progress=False,
            engine_options=options,
        )
    except ModelNotInstalledError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"smollm2-135m not installed: {exc}")
    assert run.engine == "vllm" and run.n_answers == 5 * 1 + 2 * 1 == run.generated_now
    saved = Axis.load(bundle)
    assert saved.calibration is not None
    assert saved.calibration.n_samples == run.n_role_answers == 2
    assert saved.calibration.n_layers == shipped.n_layers
    store = CalibrationStore(run.work_dir, {}, ())
    assert all(0 < r.n_tokens <= 8 and r.response for r in store.records)
    assert store.n_layers == shipped.n_layers
    # the per-token projections were captured in the engine, in the same pass: every token
    # of every answer (the budget is ample), averaging to the answer's response-mean projection
    assert set(saved.calibration.tokens) == {"roleplay", "default"}
    assert run.n_role_tokens == saved.calibration.tokens["roleplay"].n_samples > 0
    for rec, row, tokens in zip(store.records, store._rows, store._tokens, strict=True):
        assert tokens is not None and rec.token_rows == tokens.shape[0] == rec.n_tokens
        assert torch.allclose(tokens.mean(0), row, rtol=1e-4, atol=1e-3), rec.id
