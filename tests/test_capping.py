"""CappingConfig: validation, calibration, floor/ceiling equivalence, reference files, bundles."""

from __future__ import annotations

import json

import pytest
import torch

from persona_compass.axis import AXIS_FILE, Axis
from persona_compass.calibration import Calibration
from persona_compass.capping import (
    CAPPING_FILE,
    CAPPING_VECTORS_FILE,
    CappingConfig,
    capping_id,
)
from persona_compass.errors import CappingConfigError, LayerError, UnsafeFileError
from persona_compass.interventions import CapCeiling, CapFloor, capping
from persona_compass.layers import block_output, find_decoder_blocks

L, D = 4, 64


@pytest.fixture
def axis() -> Axis:
    return Axis(torch.randn(L, D), model_id="tiny")


def equal_configs(a: CappingConfig, b: CappingConfig) -> bool:
    return (
        a.layers == b.layers
        and torch.equal(a.vectors, b.vectors)
        and a.thresholds == b.thresholds
        and a.form == b.form
        and a.name == b.name
        and dict(a.metadata) == dict(b.metadata)
    )


class _Malicious:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---- validation ----------------------------------------------------------------------------


def test_vectors_are_stored_unit_float32():
    raw = torch.randn(2, D, dtype=torch.float64) * 7
    cfg = CappingConfig(layers=[1, 2], vectors=raw, thresholds=[0.5, 1])
    assert cfg.layers == (1, 2) and cfg.thresholds == (0.5, 1.0)
    assert cfg.vectors.dtype == torch.float32
    torch.testing.assert_close(cfg.vectors.norm(dim=1), torch.ones(2))
    assert cfg.form == "floor" and len(cfg) == 2 and cfg.d_model == D
    assert "layers=[1, 2]" in repr(cfg)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layers=()), r"layers=\(\) is empty"),
        (dict(layers=(1, -2)), r"layers=\[1, -2\] holds -2"),
        (dict(layers="1:3"), "layers='1:3' must be a sequence"),
        (dict(vectors=torch.randn(3, D)), r"vectors has shape \(3, 64\); expected \(2, d_model\)"),
        (dict(vectors=torch.zeros(2, D)), r"layers \[1, 2\] are zero"),
        (dict(vectors=torch.full((2, D), float("nan"))), "NaN"),
        (dict(thresholds=(1.0,)), "thresholds has 1 values but layers has 2"),
        (dict(thresholds=(1.0, float("inf"))), "finite"),
        (dict(thresholds=(1.0, "2")), "holds '2'"),
        (dict(form="clamp"), "form='clamp' must be 'floor'"),
        (dict(metadata={"x": {1, 2}}), "JSON"),
    ],
)
def test_validation_names_the_parameter(kwargs, message):
    args = dict(layers=(1, 2), vectors=torch.randn(2, D), thresholds=(0.0, 1.0))
    args.update(kwargs)
    with pytest.raises(CappingConfigError, match=message):
        CappingConfig(**args)


def test_capping_id():
    assert capping_id(range(16, 24), 25.0) == "layers_16:24-p0.25"
    assert capping_id([46, 47, 48, 49, 50, 51, 52, 53], 25) == "layers_46:54-p0.25"
    assert capping_id([3], 1) == "layers_3:4-p0.01"
    assert capping_id([2, 3], 50) == "layers_2:4-p0.5"
    assert capping_id([5, 3, 7]) == "layers_3,5,7"
    assert capping_id([0, 1], 100) == "layers_0:2-p1.0"
    # the per-token rules are marked; the response-mean rule keeps the research's ids
    assert capping_id(range(16, 24), 25, rule="response-mean") == "layers_16:24-p0.25"
    assert capping_id(range(16, 24), 25, rule="token-roleplay") == "layers_16:24-tp0.25"
    assert capping_id(range(16, 24), rule="token-default", keep=99) == "layers_16:24-keep0.99"


# ---- construction from an axis ------------------------------------------------------------


def test_from_axis(axis):
    cfg = CappingConfig.from_axis(axis, "1:3", 2.5)
    assert cfg.layers == (1, 2) and cfg.thresholds == (2.5, 2.5)
    assert torch.equal(cfg.vectors, axis.units()[[1, 2]])
    assert cfg.name == "layers_1:3" and cfg.form == "floor"
    cfg = CappingConfig.from_axis(axis, [3, -4], [1.0, 2.0], name="mine")
    assert cfg.layers == (0, 3) and cfg.thresholds == (1.0, 2.0) and cfg.name == "mine"
    with pytest.raises(CappingConfigError, match="one per layer"):
        CappingConfig.from_axis(axis, [1, 2, 3], [1.0])
    with pytest.raises(LayerError):
        CappingConfig.from_axis(axis, "2:9", 0.0)


def test_calibrate_from_projections_tensor(axis):
    projections = torch.randn(300, L) * 3 + 10
    cfg = CappingConfig.calibrate(axis, projections, "1:4", percentile=25)
    assert cfg.name == "layers_1:4-p0.25"
    for layer, tau in zip(cfg.layers, cfg.thresholds, strict=True):
        expected = torch.quantile(projections[:, layer].double(), 0.25).item()
        assert tau == pytest.approx(expected, abs=1e-12)
    assert cfg.metadata["percentile"] == 25.0 and cfg.metadata["n_samples"] == 300
    assert cfg.rule == cfg.metadata["rule"] == "response-mean"  # the default rule, recorded
    assert torch.equal(cfg.vectors, axis.units()[[1, 2, 3]])


def test_calibrate_from_calibration(axis):
    cal = Calibration.from_projections(torch.randn(300, L), source="role rollouts")
    cfg = CappingConfig.calibrate(axis, cal, [2, 3], percentile=1)
    assert cfg.thresholds == (cal.threshold(2, 1), cal.threshold(3, 1))
    assert cfg.name == "layers_2:4-p0.01"
    assert cfg.metadata["calibration_source"] == "role rollouts"


@pytest.mark.parametrize(
    ("projections", "percentile", "message"),
    [
        (torch.randn(10, L), 101, "percentile=101"),
        (torch.randn(10, L), -1, "percentile=-1"),
        (torch.randn(10, L + 1), 25, r"shape \(10, 5\)"),
        (torch.zeros(0, L), 25, "empty"),
        (Calibration.from_projections(torch.randn(10, L + 1)), 25, "covers 5 layers"),
        ([1.0, 2.0], 25, "Calibration or"),
    ],
)
def test_calibrate_errors(axis, projections, percentile, message):
    with pytest.raises(CappingConfigError, match=message):
        CappingConfig.calibrate(axis, projections, "1:3", percentile)


# ---- floor and ceiling ---------------------------------------------------------------------


def test_to_floor_and_to_ceiling(axis):
    floor = CappingConfig.from_axis(axis, "1:3", [1.0, -2.0])
    ceiling = floor.to_ceiling()
    assert ceiling.form == "ceiling" and ceiling.thresholds == (-1.0, 2.0)
    assert torch.equal(ceiling.vectors, -floor.vectors)
    assert equal_configs(ceiling.to_floor(), floor)
    assert floor.to_floor() is floor and ceiling.to_ceiling() is ceiling
    assert all(isinstance(op, CapCeiling) for ops in ceiling.operators().values() for op in ops)
    assert all(type(op) is CapFloor for ops in floor.operators().values() for op in ops)


def write_release_file(path, axis: Axis, layers, floors, dtype=torch.float32):
    """A capping_config.pt in the research release's layout: vectors pointing away from the
    Assistant (the negated axis, unnormalised), caps from above at minus the floors."""
    vectors = {
        f"layer_{layer}/contrast_role_pos3_default1": {
            "layer": layer,
            "vector": (-axis.directions[layer]).to(dtype),
        }
        for layer in layers
    }
    experiment = {
        "id": capping_id(layers, 25),
        "interventions": [
            {"vector": f"layer_{layer}/contrast_role_pos3_default1", "cap": -tau}
            for layer, tau in zip(layers, floors, strict=True)
        ],
    }
    other = {"id": "layers_0:1-p0.5", "interventions": []}
    torch.save({"vectors": vectors, "experiments": [other, experiment]}, path)
    return experiment["id"]


@torch.no_grad()
def run(model, ids):
    out = model(ids, output_hidden_states=True)
    return torch.stack(out.hidden_states), out.logits


def capped_outputs(model, ids, cfg, layers):
    blocks = find_decoder_blocks(model)
    seen = {}
    handles = [
        blocks[layer].register_forward_hook(
            lambda m, a, o, layer=layer: seen.__setitem__(layer, block_output(o).clone())
        )
        for layer in layers
    ]
    try:
        with capping(model, cfg):
            hidden, logits = run(model, ids)
    finally:
        for h in handles:
            h.remove()
    return hidden, logits, seen


def test_ceiling_on_negated_axis_equals_floor_on_axis(llama_pair, axis, tmp_path):
    model, _ = llama_pair
    ids = torch.randint(20, 200, (2, 14))
    layers = [1, 2, 3]
    base_hidden, _ = run(model, ids)
    floors = [float(axis.project(base_hidden[layer + 1], layer).median()) for layer in layers]

    floor = CappingConfig.from_axis(axis, layers, floors)
    # As the release stores it: unnormalised negated axis, caps from above at -tau.
    ceiling = CappingConfig(
        layers=tuple(layers),
        vectors=-axis.directions[layers],
        thresholds=tuple(-t for t in floors),
        form="ceiling",
    )
    eid = write_release_file(tmp_path / "capping_config.pt", axis, layers, floors)
    imported = CappingConfig.from_reference(tmp_path / "capping_config.pt", eid)
    assert imported.form == "ceiling" and imported.layers == tuple(layers)
    assert imported.name == "layers_1:4-p0.25"

    h_floor, logits_floor, seen_floor = capped_outputs(model, ids, floor, layers)
    assert not torch.equal(h_floor, base_hidden)  # the caps did act
    for cfg in (ceiling, imported, imported.to_floor(), floor.to_ceiling()):
        h, logits, seen = capped_outputs(model, ids, cfg, layers)
        torch.testing.assert_close(h, h_floor, rtol=0, atol=1e-6)
        # Both forms run the same floor on exactly negated vectors: even the bits agree.
        assert torch.equal(h, h_floor)
        torch.testing.assert_close(logits, logits_floor, rtol=0, atol=1e-6)
        for layer, tau in zip(layers, floors, strict=True):
            # The invariant in the floor's terms, whichever form ran.
            assert (axis.project(seen[layer], layer) >= tau - 1e-5).all()
            torch.testing.assert_close(seen[layer], seen_floor[layer], rtol=0, atol=1e-6)
    torch.testing.assert_close(imported.to_floor().vectors, floor.vectors, rtol=0, atol=1e-7)


def test_from_reference_bf16_vectors(axis, tmp_path):
    eid = write_release_file(tmp_path / "c.pt", axis, [2], [1.5], dtype=torch.bfloat16)
    cfg = CappingConfig.from_reference(tmp_path / "c.pt", eid)
    assert cfg.vectors.dtype == torch.float32 and cfg.thresholds == (-1.5,)
    cos = (cfg.to_floor().vectors[0] * axis.unit(2)).sum()
    assert cos > 0.999
    assert cfg.metadata["vectors"] == ["layer_2/contrast_role_pos3_default1"]
    assert CappingConfig.reference_ids(tmp_path / "c.pt") == ["layers_0:1-p0.5", eid]


def test_from_reference_errors(axis, tmp_path):
    write_release_file(tmp_path / "c.pt", axis, [1, 2], [0.0, 0.0])
    with pytest.raises(CappingConfigError, match=r"available: layers_0:1-p0.5, layers_1:3-p0.25"):
        CappingConfig.from_reference(tmp_path / "c.pt", "layers_46:54-p0.25")
    with pytest.raises(CappingConfigError, match="no interventions"):
        CappingConfig.from_reference(tmp_path / "c.pt", "layers_0:1-p0.5")
    with pytest.raises(CappingConfigError, match="no capping config"):
        CappingConfig.from_reference(tmp_path / "missing.pt", "x")
    torch.save({"axis": torch.randn(L, D)}, tmp_path / "axis.pt")
    with pytest.raises(CappingConfigError, match="expected a dict with 'vectors'"):
        CappingConfig.from_reference(tmp_path / "axis.pt", "x")
    bad = {
        "vectors": {"v": {"layer": 1, "vector": torch.randn(D)}},
        "experiments": [{"id": "e", "interventions": [{"vector": "w", "cap": 1.0}]}],
    }
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CappingConfigError, match="names vector 'w'"):
        CappingConfig.from_reference(tmp_path / "bad.pt", "e")


def test_from_reference_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"vectors": _Malicious(marker), "experiments": []}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match="Nothing from it ran"):
        CappingConfig.from_reference(tmp_path / "evil.pt", "x")
    assert not marker.exists()


def test_to_reference_round_trip(axis, tmp_path):
    cfg = CappingConfig.calibrate(axis, torch.randn(100, L), "1:4", 25)
    path = cfg.to_reference(tmp_path / "out.pt")
    data = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert [e["id"] for e in data["experiments"]] == [cfg.name]
    back = CappingConfig.from_reference(path, cfg.name)
    assert back.form == "ceiling"
    floor = back.to_floor()
    assert floor.layers == cfg.layers and floor.thresholds == cfg.thresholds
    assert torch.equal(floor.vectors, cfg.vectors)


# ---- dicts and bundles ---------------------------------------------------------------------


def test_dict_round_trip_is_exact(axis):
    cfg = CappingConfig.calibrate(axis, torch.randn(50, L), "0:2", 25)
    again = CappingConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert equal_configs(again, cfg)
    light = cfg.to_dict(include_vectors=False)
    assert "vectors" not in light
    with pytest.raises(CappingConfigError, match="no vectors"):
        CappingConfig.from_dict(light)
    assert equal_configs(CappingConfig.from_dict(light, vectors=cfg.vectors), cfg)
    with pytest.raises(CappingConfigError, match="format_version=7"):
        CappingConfig.from_dict({**cfg.to_dict(), "format_version": 7})


def test_save_refers_to_the_bundle_axis(axis, tmp_path):
    bundle = axis.save(tmp_path / "bundle")
    cfg = CappingConfig.calibrate(axis, torch.randn(80, L), "1:4", 25)
    cfg.save(bundle)
    data = json.loads((bundle / CAPPING_FILE).read_text())
    assert data["vectors"]["source"] == "axis" and data["vectors"]["sign"] == 1
    assert not (bundle / CAPPING_VECTORS_FILE).exists()
    assert equal_configs(CappingConfig.load(bundle), cfg)
    assert equal_configs(CappingConfig.load(bundle / CAPPING_FILE), cfg)
    # The ceiling form of the same caps still refers to the axis, with sign -1.
    cfg.to_ceiling().save(bundle)
    assert json.loads((bundle / CAPPING_FILE).read_text())["vectors"]["sign"] == -1
    assert equal_configs(CappingConfig.load(bundle), cfg.to_ceiling())
    # Re-saving the axis keeps capping.json.
    Axis.load(bundle).save(bundle)
    assert equal_configs(CappingConfig.load(bundle), cfg.to_ceiling())


def test_save_stores_foreign_vectors(axis, tmp_path):
    cfg = CappingConfig(layers=(1, 1), vectors=torch.randn(2, D), thresholds=(0.0, 1.0), name="x")
    bundle = axis.save(tmp_path / "bundle")
    cfg.save(bundle)
    data = json.loads((bundle / CAPPING_FILE).read_text())
    assert data["vectors"] == {"source": "file", "file": CAPPING_VECTORS_FILE}
    assert equal_configs(CappingConfig.load(bundle), cfg)
    # Also without any axis in the folder.
    cfg.save(tmp_path / "alone")
    assert equal_configs(CappingConfig.load(tmp_path / "alone"), cfg)
    # A later axis-backed save removes the stale vectors file.
    CappingConfig.from_axis(axis, [2], 0.0).save(bundle)
    assert not (bundle / CAPPING_VECTORS_FILE).exists()


def test_load_detects_a_changed_axis(axis, tmp_path):
    bundle = axis.save(tmp_path / "bundle")
    CappingConfig.from_axis(axis, "1:3", 0.0).save(bundle)
    Axis(torch.randn(L, D)).save(bundle)  # a different axis, same bundle
    with pytest.raises(CappingConfigError, match="different axis"):
        CappingConfig.load(bundle)
    (bundle / AXIS_FILE).unlink()
    with pytest.raises(CappingConfigError, match="axis.safetensors, which is missing"):
        CappingConfig.load(bundle)


def test_load_errors(tmp_path):
    with pytest.raises(CappingConfigError, match="no capping config"):
        CappingConfig.load(tmp_path)
    (tmp_path / CAPPING_FILE).write_text("[1, 2")
    with pytest.raises(CappingConfigError, match="cannot read"):
        CappingConfig.load(tmp_path)
    (tmp_path / CAPPING_FILE).write_text(
        json.dumps({"layers": [1], "thresholds": [0.0], "vectors": {"source": "web"}})
    )
    with pytest.raises(CappingConfigError, match="'vectors' must be"):
        CappingConfig.load(tmp_path)
    (tmp_path / CAPPING_FILE).write_text(
        json.dumps({"layers": [1], "thresholds": [0.0], "vectors": {"source": "file"}})
    )
    with pytest.raises(CappingConfigError, match="capping.safetensors is missing"):
        CappingConfig.load(tmp_path)


def test_config_copies_and_pickles(axis):
    import copy
    import pickle

    cfg = CappingConfig.calibrate(axis, torch.randn(20, L), "1:3", 25)
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert equal_configs(clone, cfg)
        with pytest.raises(TypeError):
            clone.metadata["x"] = 1


def test_load_optional_is_none_without_a_capping_file(tmp_path):
    assert CappingConfig.load_optional(tmp_path) is None
