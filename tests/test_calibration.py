"""Calibration: percentile tables of reference projections."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from persona_compass.calibration import (
    CALIBRATION_FILE,
    DEFAULT_GRID,
    Calibration,
    quantiles,
)
from persona_compass.errors import AxisFileError


@pytest.fixture
def projections() -> torch.Tensor:
    # (N, L): layers with different centres and spreads, as real layers have.
    return torch.randn(500, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor(
        [0.0, 40.0, -3.0]
    )


def test_from_projections_matches_torch_quantile(projections):
    cal = Calibration.from_projections(projections, source="test rollouts")
    assert cal.percentiles == DEFAULT_GRID
    assert cal.values.shape == (3, 101)
    assert cal.values.dtype == torch.float64
    assert cal.n_samples == 500 and cal.source == "test rollouts"
    q = torch.tensor(DEFAULT_GRID, dtype=torch.float64) / 100
    expected = torch.quantile(projections, q, dim=0).T
    torch.testing.assert_close(cal.values, expected, rtol=0, atol=1e-12)


def test_quantiles_accepts_float32_and_one_sample():
    one = torch.tensor([[1.5, -2.0]])
    table = quantiles(one, [0.0, 50.0, 100.0])
    assert torch.equal(table, torch.tensor([[1.5] * 3, [-2.0] * 3], dtype=torch.float64))


def test_threshold_on_grid_and_between(projections):
    cal = Calibration.from_projections(projections, percentiles=[0.0, 25.0, 50.0, 100.0])
    exact = torch.quantile(projections[:, 1], 0.25).item()
    assert cal.threshold(1, 25.0) == pytest.approx(exact, abs=1e-12)
    # Between grid points the table is interpolated linearly.
    v25, v50 = cal.values[1, 1].item(), cal.values[1, 2].item()
    assert cal.threshold(1, 30.0) == pytest.approx(v25 + (5 / 25) * (v50 - v25), abs=1e-12)
    assert cal.threshold(-1, 0.0) == pytest.approx(projections[:, 2].min().item(), abs=1e-12)
    with pytest.raises(ValueError, match="percentile=101"):
        cal.threshold(0, 101)
    with pytest.raises(ValueError, match="layer=3"):
        cal.threshold(3, 10)


def test_percentile_of_inverts_threshold(projections):
    cal = Calibration.from_projections(projections)
    for layer in range(3):
        for p in (0.5, 1.0, 25.0, 37.3, 50.0, 99.0):
            assert cal.percentile_of(cal.threshold(layer, p), layer) == pytest.approx(p, abs=1e-6)


def test_percentile_of_clamps_at_the_ends(projections):
    cal = Calibration.from_projections(projections)
    assert cal.percentile_of(-1e9, 1) == 0.0
    assert cal.percentile_of(1e9, 1) == 100.0
    assert isinstance(cal.percentile_of(40.0, 1), float)


def test_percentile_of_is_vectorised_and_keeps_nan(projections):
    cal = Calibration.from_projections(projections)
    values = torch.tensor([[-1e9, 38.0, 40.0], [41.5, float("nan"), 1e9]])
    out = cal.percentile_of(values, 1)
    assert out.shape == values.shape and out.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            v = values[i, j].item()
            if math.isnan(v):
                assert math.isnan(out[i, j].item())
            else:
                assert out[i, j].item() == pytest.approx(cal.percentile_of(v, 1), abs=1e-4)
    # bf16 input works too and stays on its device.
    assert cal.percentile_of(values.bfloat16(), 1).device == values.device


def test_percentile_of_ties_map_to_the_middle():
    # Layer 0: values 0 for percentiles 0..50, then rising to 1 at 100.
    cal = Calibration(
        percentiles=(0.0, 25.0, 50.0, 100.0),
        values=torch.tensor([[0.0, 0.0, 0.0, 1.0]]),
        n_samples=10,
    )
    assert cal.percentile_of(0.0, 0) == pytest.approx(25.0)
    assert cal.percentile_of(0.5, 0) == pytest.approx(75.0)
    constant = Calibration((0.0, 100.0), torch.tensor([[2.0, 2.0]]), 3)
    assert constant.percentile_of(2.0, 0) == pytest.approx(50.0)
    assert constant.percentile_of(1.0, 0) == 0.0
    assert constant.percentile_of(3.0, 0) == 100.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(percentiles=(0.0, 50.0, 40.0)), "strictly increasing"),
        (dict(percentiles=(0.0, 150.0)), r"\[0, 100\]"),
        (dict(percentiles=(5.0,)), "at least two"),
        (dict(values=torch.tensor([[1.0, 0.0, 2.0]])), "decrease"),
        (dict(values=torch.tensor([1.0, 2.0, 3.0])), "shape"),
        (dict(values=torch.tensor([[0.0, float("nan"), 1.0]])), "NaN"),
        (dict(n_samples=0), "n_samples"),
        (dict(n_samples=2.5), "n_samples"),
    ],
)
def test_validation(kwargs, message):
    args = dict(percentiles=(0.0, 50.0, 100.0), values=torch.tensor([[0.0, 1.0, 2.0]]), n_samples=4)
    args.update(kwargs)
    with pytest.raises(AxisFileError, match=message):
        Calibration(**args)


def test_from_projections_rejects_bad_input():
    with pytest.raises(AxisFileError, match="shape"):
        Calibration.from_projections(torch.randn(10))
    with pytest.raises(AxisFileError, match="empty"):
        Calibration.from_projections(torch.zeros(0, 3))
    with pytest.raises(AxisFileError, match="NaN"):
        Calibration.from_projections(torch.tensor([[1.0], [float("inf")]]))


def test_dict_and_file_round_trip_exactly(tmp_path, projections):
    cal = Calibration.from_projections(projections, source="rollouts")
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert torch.equal(again.values, cal.values)
    assert (again.percentiles, again.n_samples, again.source) == (
        cal.percentiles,
        cal.n_samples,
        cal.source,
    )
    path = cal.save(tmp_path)
    assert path == tmp_path / CALIBRATION_FILE
    loaded = Calibration.load(tmp_path)
    assert torch.equal(loaded.values, cal.values)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary behind


def test_load_errors(tmp_path):
    with pytest.raises(AxisFileError, match="no calibration file"):
        Calibration.load(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(AxisFileError, match="cannot read"):
        Calibration.load(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(AxisFileError, match="upgrade"):
        Calibration.load(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"percentiles": [0, 100]}))
    with pytest.raises(AxisFileError, match="lacks values, n_samples"):
        Calibration.load(tmp_path)


# ---- per-token tables ------------------------------------------------------------------------


def test_token_tables_round_trip_and_leave_old_files_unchanged(tmp_path, projections):
    cal = Calibration.from_projections(projections, source="means")
    assert "tokens" not in cal.to_dict() and cal.tokens == {}  # what earlier versions wrote
    role = Calibration.from_projections(projections[:100] - 1, source="role tokens")
    default = Calibration.from_projections(projections[100:] + 1, source="default tokens")
    both = cal.with_tokens(roleplay=role, default=default)
    assert cal.tokens == {} and set(both.tokens) == {"roleplay", "default"}
    assert both.token_table("roleplay") is both.tokens["roleplay"]
    assert cal.token_table("default") is None
    for again in (
        Calibration.from_dict(json.loads(json.dumps(both.to_dict()))),
        Calibration.load(both.save(tmp_path)),
        pickle.loads(pickle.dumps(both)),
    ):
        assert torch.equal(again.values, cal.values) and again.source == "means"
        for kind, table in both.tokens.items():
            got = again.tokens[kind]
            assert torch.equal(got.values, table.values)
            assert (got.n_samples, got.source) == (table.n_samples, table.source)
    data = both.to_dict()
    assert data["format_version"] == 1 and "format_version" not in data["tokens"]["default"]
    # a reader that knows nothing of tokens reads the response-mean table as before
    plain = {k: v for k, v in data.items() if k != "tokens"}
    assert Calibration.from_dict(plain).to_dict() == cal.to_dict()


def test_token_table_validation(projections):
    cal = Calibration.from_projections(projections)
    other = Calibration.from_projections(projections[:, :2])
    with pytest.raises(AxisFileError, match="the kinds are roleplay, default"):
        cal.with_tokens(judged=cal)
    with pytest.raises(AxisFileError, match="covers 2 layers but the calibration 3"):
        cal.with_tokens(default=other)
    with pytest.raises(AxisFileError, match="without tables of its own"):
        cal.with_tokens(default=cal.with_tokens(roleplay=cal))
    with pytest.raises(ValueError, match="kind='x'"):
        cal.token_table("x")
    data = cal.to_dict()
    data["tokens"] = {"default": {"percentiles": [0, 100]}}
    with pytest.raises(AxisFileError, match=r"tokens\['default'\]: calibration data lacks"):
        Calibration.from_dict(data)
    data["tokens"] = ["not", "an object"]
    with pytest.raises(AxisFileError, match="object of per-token tables"):
        Calibration.from_dict(data)
