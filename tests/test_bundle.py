"""Bundle: one object for an axis bundle's parts, opened, saved whole, digested, with its model."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import shutil

import pytest
import torch
from tiny import make_pair, save_tiny_bundle

import persona_compass as pc
from persona_compass import axis as axis_module
from persona_compass import bundle as bundle_module
from persona_compass import bundle_format, bundles, calibration
from persona_compass.axis import Axis
from persona_compass.bundle import Bundle
from persona_compass.bundles import shipped_bundles
from persona_compass.capping import CappingConfig
from persona_compass.errors import AxisFileError, CappingConfigError

# ``persona_compass.capping`` the attribute is the context manager; this is the module.
capping = importlib.import_module("persona_compass.capping")

FORMAT_FILES = ("axis.safetensors", "bundle.json", "calibration.json", "capping.json")


@pytest.fixture
def tiny(tmp_path):
    """A tiny model folder and its bundle with a capping config on layers 1-2."""
    model_dir, folder, axis = save_tiny_bundle(tmp_path)
    cap = CappingConfig.calibrate(axis, axis.calibration, "1:3", 25)
    cap.save(folder)
    return model_dir, folder, axis, cap


def rich_axis() -> Axis:
    """An axis with every optional part: vectors, residual norms, calibration, metadata."""
    g = torch.Generator().manual_seed(11)
    return Axis(
        directions=torch.randn(4, 64, generator=g),
        model_id="tiny-model",
        fingerprint="0123456789abcdef",
        monitor_layer=1,
        vectors={"default": torch.randn(4, 64, generator=g)},
        residual_norms=torch.rand(4, generator=g) * 10,
        calibration=pc.Calibration.from_projections(torch.randn(50, 4, generator=g)),
        metadata={"preset": "test", "roles": {"pirate": 3}},
    )


def file_vectors_cap() -> CappingConfig:
    """A capping config whose vectors are not the axis': it needs capping.safetensors."""
    g = torch.Generator().manual_seed(12)
    return CappingConfig(
        layers=(1, 3), vectors=torch.randn(2, 64, generator=g), thresholds=(0.5, -1.25)
    )


def assert_same_parts(a: Bundle, b: Bundle) -> None:
    assert torch.equal(a.axis.directions, b.axis.directions)
    assert a.axis.vectors.keys() == b.axis.vectors.keys()
    for name, vec in a.axis.vectors.items():
        assert torch.equal(vec, b.axis.vectors[name])
    if a.axis.residual_norms is None:
        assert b.axis.residual_norms is None
    else:
        assert torch.equal(a.axis.residual_norms, b.axis.residual_norms)
    assert (a.axis.model_id, a.axis.fingerprint, a.axis.layer) == (
        b.axis.model_id,
        b.axis.fingerprint,
        b.axis.layer,
    )
    assert dict(a.axis.metadata) == dict(b.axis.metadata)
    if a.calibration is None:
        assert b.calibration is None
    else:
        assert b.calibration is not None
        assert a.calibration.to_dict() == b.calibration.to_dict()
    if a.capping is None:
        assert b.capping is None
    else:
        assert b.capping is not None
        assert torch.equal(a.capping.vectors, b.capping.vectors)
        assert a.capping.to_dict(include_vectors=False) == b.capping.to_dict(include_vectors=False)


def expected_digest(folder) -> str:
    """The digest as documented: sha256 of sorted ``name NUL sha256(content)`` lines."""
    h = hashlib.sha256()
    for name in sorted(bundle_format.BUNDLE_FILES):
        path = folder / name
        if path.is_file():
            h.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


# ---- opening ---------------------------------------------------------------------------------


def test_open_by_path_reads_every_part(tiny):
    model_dir, folder, axis, cap = tiny
    bundle = Bundle.open(str(folder))
    assert bundle.folder == folder
    assert bundle.model_id == str(model_dir)
    assert_same_parts(bundle, Bundle(axis, cap))
    assert bundle.metadata == json.loads((folder / "bundle.json").read_text())
    bundle.metadata["model_id"] = "changed"  # a copy: the bundle does not change
    assert bundle.metadata["model_id"] == str(model_dir)


def test_open_by_alias_is_the_shipped_bundle():
    bundle = pc.Bundle.open("smollm2-135m")
    assert bundle.folder == shipped_bundles()["smollm2-135m"]
    assert (bundle.axis.n_layers, bundle.axis.d_model) == (30, 576)
    assert bundle.model_id == "smollm2-135m" and bundle.model_spec() == "smollm2-135m"
    assert bundle.calibration is not None and bundle.calibration.n_layers == 30
    assert bundle.capping is not None and bundle.capping.name == "layers_22:29-p0.25"
    assert bundle.metadata["format_version"] == bundle_format.BUNDLE_FORMAT_VERSION
    assert bundle.digest() == expected_digest(bundle.folder)


def test_a_bad_spec_is_a_clear_error(tmp_path):
    with pytest.raises(AxisFileError, match=r"no-such-bundle.*shipped: .*smollm2-135m"):
        Bundle.open("no-such-bundle")
    afile = tmp_path / "axis.pt"
    afile.write_bytes(b"x")
    with pytest.raises(AxisFileError, match="is a file; an axis bundle is a folder"):
        Bundle.open(afile)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AxisFileError, match="bundle.json is missing"):
        Bundle.open(tmp_path / "empty")


def test_open_checks_the_model(tiny):
    _, folder, _, _ = tiny
    fitting, _ = make_pair("qwen2")
    assert Bundle.open(folder, model=fitting).folder == folder
    shorter, _ = make_pair("qwen2", n_layers=3)
    with pytest.raises(AxisFileError, match="has 4 layers x 64 but the model .* has 3 layers"):
        Bundle.open(folder, model=shorter)
    other_family, _ = make_pair("llama")  # same shape, another architecture config
    with pytest.raises(AxisFileError, match="fingerprint"):
        Bundle.open(folder, model=other_family)
    assert Bundle.open(folder, model=other_family, strict=False).folder == folder


def test_a_capping_config_that_does_not_fit_is_refused(tiny):
    _, _, axis, cap = tiny
    narrow = CappingConfig(layers=(1,), vectors=torch.ones(1, 32), thresholds=(0.0,))
    with pytest.raises(CappingConfigError, match=r"width 32.*does not fit the axis \(width 64"):
        Bundle(axis, narrow)
    beyond = CappingConfig(layers=(4,), vectors=torch.ones(1, 64), thresholds=(0.0,))
    with pytest.raises(CappingConfigError, match="layers up to 4.*4 layers"):
        Bundle(axis, beyond)
    with pytest.raises(CappingConfigError, match=r"has no capping config \(capping.json\)"):
        Bundle(axis).require_capping()
    assert Bundle(axis, cap).require_capping() is cap


# ---- saving ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [None, "axis", "file"])
def test_save_then_open_gives_the_same_bundle(tmp_path, cap):
    axis = rich_axis()
    config = {
        None: None,
        "axis": CappingConfig.from_axis(axis, "1:3", [0.25, -0.5]),
        "file": file_vectors_cap(),
    }[cap]
    bundle = Bundle(axis, config)
    saved = bundle.save(tmp_path / "b")
    assert saved.folder == tmp_path / "b" and bundle.folder is None
    names = {p.name for p in (tmp_path / "b").iterdir()}
    expected = {"axis.safetensors", "bundle.json", "calibration.json"}
    expected |= {None: set(), "axis": {"capping.json"}, "file": {"capping.json"}}[cap]
    expected |= {"capping.safetensors"} if cap == "file" else set()
    assert names == expected
    opened = Bundle.open(tmp_path / "b")
    assert_same_parts(bundle, opened)
    assert_same_parts(saved, opened)
    assert opened.metadata == saved.metadata == axis.bundle_info()


def test_resaving_replaces_the_format_files_and_keeps_the_notes(tiny):
    _, folder, axis, _ = tiny
    (folder / "report.md").write_text("the run's report")
    Bundle(axis).save(folder)  # no capping now: the old capping.json must not survive
    assert Bundle.open(folder).capping is None
    assert not (folder / "capping.json").exists()
    assert (folder / "report.md").read_text() == "the run's report"


def test_save_refuses_a_file_and_a_folder_that_is_not_a_bundle(tmp_path):
    bundle = Bundle(rich_axis())
    (tmp_path / "f").write_text("x")
    with pytest.raises(AxisFileError, match="is a file"):
        bundle.save(tmp_path / "f")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(AxisFileError, match="not an axis bundle"):
        bundle.save(tmp_path / "d")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["notes.txt"]


def test_a_symlinked_folder_keeps_its_link(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    Bundle(rich_axis()).save(real)
    link.symlink_to(real, target_is_directory=True)
    Bundle(rich_axis(), file_vectors_cap()).save(link)
    assert link.is_symlink() and Bundle.open(link).capping is not None
    assert Bundle.open(real).capping is not None


def test_a_save_that_fails_midway_leaves_no_bundle(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    # capping.json is written last, after axis.safetensors, bundle.json and calibration.json
    monkeypatch.setattr(capping, "write_json", disk_full)
    axis = rich_axis()
    new = tmp_path / "new"
    with pytest.raises(OSError, match="No space left"):
        Bundle(axis, CappingConfig.from_axis(axis, "1:3", 0.0)).save(new)
    assert not new.exists()
    with pytest.raises(AxisFileError, match="no such bundle folder"):
        Bundle.open(new)
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind

    # over an existing bundle: the old one stays whole
    monkeypatch.undo()
    old = Bundle(axis).save(tmp_path / "old")
    before = old.digest()
    monkeypatch.setattr(capping, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        Bundle(axis, CappingConfig.from_axis(axis, "1:3", 0.0)).save(tmp_path / "old")
    reopened = Bundle.open(tmp_path / "old")
    assert reopened.capping is None and reopened.digest() == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


# ---- digest ----------------------------------------------------------------------------------


def test_the_digest_is_stable_across_save_and_open(tmp_path, tiny):
    bundle = Bundle(rich_axis(), file_vectors_cap())
    in_memory = bundle.digest()
    assert len(in_memory) == 64 and int(in_memory, 16) >= 0
    saved = bundle.save(tmp_path / "a")
    assert saved.digest() == in_memory == expected_digest(tmp_path / "a")
    assert Bundle.open(tmp_path / "a").digest() == in_memory
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    (tmp_path / "copy" / "report.md").write_text("notes are not covered")
    assert Bundle.open(tmp_path / "copy").digest() == in_memory
    assert Bundle.open(tmp_path / "a").save(tmp_path / "again").digest() == in_memory
    # the same parts always give the same bytes (safetensors metadata order included)
    assert {bundle.save(tmp_path / f"s{i}").digest() for i in range(8)} == {in_memory}


def test_the_digest_changes_with_any_format_file(tiny):
    _, folder, axis, cap = tiny
    first = Bundle.open(folder).digest()
    assert first == expected_digest(folder)
    recalibrated = dataclasses.replace(
        axis, calibration=pc.Calibration.from_projections(torch.randn(30, 4))
    )
    Bundle(recalibrated, cap).save(folder)
    second = Bundle.open(folder).digest()
    assert second != first
    Bundle(recalibrated).save(folder)  # drop capping.json
    third = Bundle.open(folder).digest()
    assert third not in (first, second) and third == expected_digest(folder)


def test_a_digest_never_describes_files_other_than_those_read(tiny):
    _, folder, axis, _ = tiny
    bundle = Bundle.open(folder)
    (folder / "capping.json").unlink()
    with pytest.raises(AxisFileError, match="changed after they were read; open the bundle"):
        bundle.digest()
    assert Bundle.open(folder).digest() == expected_digest(folder)


# ---- the model -------------------------------------------------------------------------------


def test_load_model_picks_the_bundles_model(tiny):
    model_dir, folder, _, _ = tiny
    bundle = Bundle.open(folder)
    assert bundle.model_spec() == str(model_dir)
    model, tok = bundle.load_model(dtype="float32")
    saved, _ = make_pair("qwen2")  # the model save_tiny_bundle wrote
    assert model.config.num_hidden_layers == 4 and tok.pad_token is not None
    for (name, got), (_, want) in zip(
        model.state_dict().items(), saved.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name


def test_load_model_checks_another_spec_against_the_bundle(tiny, tmp_path):
    _, folder, _, _ = tiny
    other_dir = tmp_path / "other"
    other, tok = make_pair("qwen2", n_layers=3)
    other.save_pretrained(other_dir)
    tok.save_pretrained(other_dir)
    bundle = Bundle.open(folder)
    assert bundle.model_spec(other_dir) == str(other_dir)
    with pytest.raises(AxisFileError, match="has 3 layers"):
        bundle.load_model(other_dir, dtype="float32")


def test_without_a_model_id_the_default_model_is_used():
    axis = dataclasses.replace(rich_axis(), model_id=None)
    assert Bundle(axis).model_spec() == pc.models.DEFAULT_ALIAS == "smollm2-135m"
    assert Bundle(axis).model_spec("org/name") == "org/name"


@pytest.mark.real_model
def test_the_shipped_bundle_fits_the_real_model(real_pair):
    model, _ = real_pair
    bundle = Bundle.open("smollm2-135m", model=model)
    assert bundle.axis.check_model(model) is None


# ---- one place for the format ----------------------------------------------------------------


def test_the_file_names_are_defined_once():
    """No module of the format spells a file name or the format version itself."""
    assert bundle_format.BUNDLE_FILES[:4] == FORMAT_FILES
    literals = [f'"{name}"' for name in bundle_format.BUNDLE_FILES]
    for module in (axis_module, calibration, capping, bundles, bundle_module):
        source = inspect.getsource(module)
        assert not [lit for lit in literals if lit in source], module.__name__
        assert "FORMAT_VERSION = " not in source, module.__name__
    assert axis_module.AXIS_FILE == "axis.safetensors"  # still importable where it was
    assert capping.CAPPING_FILE == "capping.json"


# ---- callers take an opened bundle -----------------------------------------------------------


def test_the_server_and_the_engines_take_an_opened_bundle(tiny):
    from fastapi.testclient import TestClient

    from persona_compass.engines import EngineError, open_engine
    from persona_compass.engines.vllm_engine import VLLMEngine
    from persona_compass.server.app import ServerConfig, create_app_from_specs

    model_dir, folder, axis, cap = tiny
    bundle = Bundle.open(folder)
    engine = open_engine("hf", str(model_dir), bundle, dtype="float32")
    assert engine.axis is bundle.axis and engine.capping_config is bundle.capping
    hosts = ("testserver",)
    app = create_app_from_specs(bundle, None, ServerConfig(model_name="", allowed_hosts=hosts))
    with TestClient(app) as client:
        assert client.get("/health").json()["model"] == str(model_dir)
    assert app.state.compass.axis is bundle.axis
    with pytest.raises(EngineError, match="save the bundle first"):
        VLLMEngine(str(model_dir), Bundle(axis, cap))
