"""Axis: validation, projection, model checks, bundle files, reference import."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_model

import persona_compass
from persona_compass.axis import (
    AXIS_FILE,
    BUNDLE_FILE,
    Axis,
    model_fingerprint,
    safe_torch_load,
)
from persona_compass.calibration import CALIBRATION_FILE, Calibration
from persona_compass.errors import AxisFileError, LayerError, UnsafeFileError

L, D = 4, 64


def make_axis(**kwargs) -> Axis:
    args = dict(directions=torch.randn(L, D), model_id="tiny-llama")
    args.update(kwargs)
    return Axis(**args)


class _Malicious:
    """Unpickling this object would create ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_is_short_stable_and_shape_sensitive():
    model = make_model("llama")
    fp = model_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(model.config) == fp
    assert model_fingerprint(make_model("llama", seed=3)) == fp  # weights do not matter
    assert model_fingerprint(make_model("llama", n_layers=3)) != fp
    assert model_fingerprint(make_model("qwen2")) != fp  # same shape, other architecture
    as_dict = {k: getattr(model.config, k) for k in ("model_type", "num_hidden_layers")}
    assert len(model_fingerprint(as_dict)) == 16


# ---- construction --------------------------------------------------------------------------


def test_construction_normalises_types_and_defaults():
    directions = torch.randn(L, D, dtype=torch.bfloat16)
    axis = Axis(directions, vectors={"default": torch.randn(L, D, dtype=torch.float64)})
    assert axis.directions.dtype == torch.float32
    assert torch.equal(axis.directions, directions.float())
    assert axis.vectors["default"].dtype == torch.float32
    assert (axis.n_layers, axis.d_model) == (L, D)
    assert axis.monitor_layer is None and axis.layer == L // 2
    assert axis.library_version == persona_compass.__version__
    assert make_axis(monitor_layer=-1).monitor_layer == L - 1
    assert "n_layers=4" in repr(axis)
    with pytest.raises(TypeError):
        axis.vectors["x"] = torch.zeros(L, D)  # read-only mapping


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(directions=torch.randn(D)), r"shape \(64,\)"),
        (dict(directions=torch.zeros(L, D)), "every row"),
        (dict(directions=torch.full((L, D), float("nan"))), "NaN"),
        (dict(directions=torch.ones(L, D, dtype=torch.int64)), "floating"),
        (dict(monitor_layer=7), "monitor_layer=7"),
        (dict(vectors={"default": torch.randn(L, D + 1)}), "'default' has shape"),
        (dict(vectors={"axis": torch.randn(L, D)}), "not allowed"),
        (dict(residual_norms=torch.ones(L + 1)), "residual_norms"),
        (dict(residual_norms=-torch.ones(L)), "non-negative"),
        (dict(metadata={"when": object()}), "JSON"),
        (dict(model_id=3), "model_id"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(AxisFileError, match=message):
        make_axis(**kwargs)


def test_zero_row_at_monitor_layer_is_refused_elsewhere_allowed():
    directions = torch.randn(L, D)
    directions[0] = 0
    axis = Axis(directions)  # monitor layer 2 is fine
    assert torch.equal(axis.units()[0], torch.zeros(D))
    with pytest.raises(AxisFileError, match="zero at layer 0"):
        axis.unit(0)
    with pytest.raises(AxisFileError, match="zero at layer 0"):
        axis.project(torch.randn(D), layer=0)
    with pytest.raises(AxisFileError, match="monitor layer 0"):
        Axis(directions, monitor_layer=0)


def test_calibration_must_cover_the_layers():
    cal = Calibration.from_projections(torch.randn(10, L + 1))
    with pytest.raises(AxisFileError, match="5 layers"):
        make_axis(calibration=cal)


# ---- projection ----------------------------------------------------------------------------


def test_project_matches_the_definition():
    axis = make_axis()
    hidden = torch.randn(2, 5, D)
    for layer in range(L):
        a = axis.directions[layer].double()
        expected = hidden.double() @ a / a.norm()
        got = axis.project(hidden, layer)
        assert got.shape == (2, 5) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(axis.project(hidden), axis.project(hidden, axis.layer))
    assert torch.equal(axis.project(hidden, -1), axis.project(hidden, L - 1))
    assert torch.equal(axis.unit(1), axis.units()[1])


def test_project_bf16_is_computed_in_float32():
    # Residual norms like SmolLM2's (~2400): a bf16 dot product would be off by units.
    axis = make_axis()
    hidden = (torch.randn(64, D) * 300).bfloat16()
    got = axis.project(hidden, 1)
    exact = hidden.double() @ (axis.directions[1].double() / axis.directions[1].double().norm())
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < 1e-3


def test_unit_vectors_are_cached_per_device():
    axis = make_axis()
    first = axis.units()
    assert axis.units() is first
    axis.project(torch.randn(3, D), 1)
    assert list(axis._units) == [torch.device("cpu")]
    assert axis._units[torch.device("cpu")] is first


def test_project_errors():
    axis = make_axis()
    with pytest.raises(AxisFileError, match="last dimension 63"):
        axis.project(torch.randn(2, D - 1))
    with pytest.raises(LayerError, match="layer=4"):
        axis.project(torch.randn(D), layer=4)


# ---- model checks --------------------------------------------------------------------------


def test_check_model(caplog):
    model = make_model("llama")
    axis = make_axis(fingerprint=model_fingerprint(model))
    axis.check_model(model)
    with pytest.raises(AxisFileError, match=r"4 layers x 64 .* 3 layers x 64"):
        axis.check_model(make_model("llama", n_layers=3))
    other = make_model("qwen2")  # same shape, other architecture
    with pytest.raises(AxisFileError, match="strict=False"):
        axis.check_model(other)
    with caplog.at_level(logging.WARNING, logger="persona_compass.axis"):
        axis.check_model(other, strict=False)
    assert "fingerprint" in caplog.text
    make_axis().check_model(other)  # no fingerprint recorded: shape check only


# ---- bundle files --------------------------------------------------------------------------


def full_axis() -> Axis:
    model = make_model("llama")
    return make_axis(
        fingerprint=model_fingerprint(model),
        monitor_layer=1,
        vectors={"default": torch.randn(L, D), "role/pirate": torch.randn(L, D)},
        residual_norms=torch.rand(L) * 10,
        calibration=Calibration.from_projections(torch.randn(50, L), source="rollouts"),
        metadata={"preset": "quick", "roles": {"pirate": 12}},
    )


def test_save_load_round_trip(tmp_path):
    axis = full_axis()
    path = axis.save(tmp_path / "bundle")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [AXIS_FILE, BUNDLE_FILE, CALIBRATION_FILE]
    )
    info = json.loads((path / BUNDLE_FILE).read_text())
    assert info["format_version"] == 1 and (info["n_layers"], info["d_model"]) == (L, D)
    assert info["library_version"] == persona_compass.__version__
    assert set(load_file(str(path / AXIS_FILE))) == {
        "axis",
        "default",
        "role/pirate",
        "residual_norms",
    }

    loaded = Axis.load(path, model=make_model("llama"))
    assert torch.equal(loaded.directions, axis.directions)
    assert loaded.vectors.keys() == axis.vectors.keys()
    for name in axis.vectors:
        assert torch.equal(loaded.vectors[name], axis.vectors[name])
    assert loaded.residual_norms is not None and axis.residual_norms is not None
    assert torch.equal(loaded.residual_norms, axis.residual_norms)
    assert loaded.calibration is not None and axis.calibration is not None
    assert torch.equal(loaded.calibration.values, axis.calibration.values)
    assert (loaded.model_id, loaded.fingerprint, loaded.monitor_layer) == (
        axis.model_id,
        axis.fingerprint,
        1,
    )
    assert dict(loaded.metadata) == dict(axis.metadata)


def test_resave_keeps_other_files_and_drops_stale_calibration(tmp_path):
    path = full_axis().save(tmp_path / "bundle")
    (path / "capping.json").write_text("{}")
    (path / "report.md").write_text("# report")
    (path / "plots").mkdir()
    (path / "plots" / "drift.png").write_bytes(b"png")
    make_axis().save(path)  # a new axis without calibration
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted([AXIS_FILE, BUNDLE_FILE, "capping.json", "report.md", "plots"])
    assert (path / "report.md").read_text() == "# report"
    assert (path / "plots" / "drift.png").read_bytes() == b"png"
    assert not list(tmp_path.glob(".*"))  # no temporary folders left


def test_save_refuses_files_and_foreign_folders(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AxisFileError, match="is a file"):
        make_axis().save(tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(AxisFileError, match="not an axis bundle"):
        make_axis().save(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    make_axis().save(tmp_path / "empty")


def test_load_refuses_a_mismatched_model(tmp_path):
    path = full_axis().save(tmp_path / "b")
    with pytest.raises(AxisFileError, match="3 layers"):
        Axis.load(path, model=make_model("llama", n_layers=3))
    with pytest.raises(AxisFileError, match="fingerprint"):
        Axis.load(path, model=make_model("qwen2"))
    assert Axis.load(path, model=make_model("qwen2"), strict=False).n_layers == L


def test_load_errors(tmp_path):
    with pytest.raises(AxisFileError, match="no axis bundle"):
        Axis.load(tmp_path / "missing")
    (tmp_path / "axis.pt").write_bytes(b"")
    with pytest.raises(AxisFileError, match="from_reference"):
        Axis.load(tmp_path / "axis.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AxisFileError, match="bundle.json is missing"):
        Axis.load(tmp_path / "empty")

    path = make_axis().save(tmp_path / "b")
    info = json.loads((path / BUNDLE_FILE).read_text())

    (path / BUNDLE_FILE).write_text("{oops")
    with pytest.raises(AxisFileError, match="cannot read"):
        Axis.load(path)
    (path / BUNDLE_FILE).write_text(json.dumps({**info, "format_version": 2}))
    with pytest.raises(AxisFileError, match="upgrade persona-compass"):
        Axis.load(path)
    (path / BUNDLE_FILE).write_text(json.dumps({**info, "d_model": 65}))
    with pytest.raises(AxisFileError, match=r"\(4, 64\) but bundle.json says \(4, 65\)"):
        Axis.load(path)
    (path / BUNDLE_FILE).write_text(json.dumps(info))
    (path / AXIS_FILE).write_bytes(b"garbage")
    with pytest.raises(AxisFileError, match="cannot read"):
        Axis.load(path)
    (path / AXIS_FILE).unlink()
    with pytest.raises(AxisFileError, match="lacks axis.safetensors"):
        Axis.load(path)


# ---- reference files -----------------------------------------------------------------------


def test_from_reference_raw_bf16_tensor(tmp_path):
    raw = torch.randn(L, D).bfloat16()
    torch.save(raw, tmp_path / "assistant_axis.pt")
    model = make_model("llama")
    axis = Axis.from_reference(tmp_path / "assistant_axis.pt", model_id="tiny", model=model)
    assert axis.directions.dtype == torch.float32
    assert torch.equal(axis.directions, raw.float())
    assert axis.model_id == "tiny" and axis.fingerprint == model_fingerprint(model)
    assert axis.metadata["source"] == "reference"
    assert axis.metadata["reference_dtype"] == "bfloat16"


def test_from_reference_dict_and_monitor_layer(tmp_path):
    raw = torch.randn(L, D)
    torch.save({"axis": raw}, tmp_path / "old.pt")
    axis = Axis.from_reference(tmp_path / "old.pt", monitor_layer=3)
    assert torch.equal(axis.directions, raw) and axis.layer == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.randn(D), r"shape \(64,\)"),
        ({"vectors": torch.randn(L, D)}, "without an 'axis' entry"),
        ([1, 2, 3], "a list"),
        (torch.zeros(L, D), "every row"),
        (torch.ones(L, D, dtype=torch.int32), "int32"),
    ],
)
def test_from_reference_wrong_content(tmp_path, content, message):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(AxisFileError, match=message):
        Axis.from_reference(tmp_path / "bad.pt")


def test_from_reference_missing_or_corrupt(tmp_path):
    with pytest.raises(AxisFileError, match="no reference axis file"):
        Axis.from_reference(tmp_path / "nope.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(AxisFileError, match="cannot read"):
        Axis.from_reference(tmp_path / "corrupt.pt")


def test_from_reference_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(_Malicious(marker), tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(UnsafeFileError, match="Nothing from it ran"):
        Axis.from_reference(tmp_path / "evil.pt")
    assert not marker.exists()
    # UnsafeFileError is an AxisFileError, so callers catching file problems catch it too.
    with pytest.raises(AxisFileError):
        safe_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()

    # Positive control: the file really runs code when loaded without weights_only.
    handle = torch.load(tmp_path / "evil.pt", weights_only=False)
    handle.close()
    assert marker.exists()


def test_axis_copies_and_pickles():
    import copy
    import pickle

    axis = full_axis()
    axis.project(torch.randn(D))  # fill the unit cache
    for clone in (copy.deepcopy(axis), pickle.loads(pickle.dumps(axis))):
        assert torch.equal(clone.directions, axis.directions)
        assert torch.equal(clone.vectors["default"], axis.vectors["default"])
        assert dict(clone.metadata) == dict(axis.metadata)
        assert torch.equal(clone.project(torch.ones(D), 1), axis.project(torch.ones(D), 1))
        with pytest.raises(TypeError):
            clone.metadata["x"] = 1  # still read-only
