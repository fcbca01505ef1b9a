"""``axis import hf:...``: a published axis folder -> a bundle, through huggingface_hub's cache.

No network: every test lays the files out in a temporary Hugging Face cache (fake_hub.py)
and reads it with ``local_files_only`` / ``HF_HUB_OFFLINE=1``, as an offline user would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fake_hub import add_commit, pt_bytes
from tiny import make_pair

from persona_compass.axis import Axis, model_fingerprint, unit_rows
from persona_compass.capping import CappingConfig
from persona_compass.cli import main
from persona_compass.errors import UnsafeFileError
from persona_compass.hub import HubError, HubSource, import_from_hub, parse_source
from persona_compass.hub.importer import source_digest

REPO = "lu-christina/assistant-axis-vectors"
FOLDER = "tiny-qwen"
N_LAYERS, D_MODEL = 4, 64  # tiny.make_pair("qwen2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = make_pair("qwen2")
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tensors(seed: int) -> dict[str, torch.Tensor]:
    """The release's tensors for the tiny model: bf16, as published."""
    g = torch.Generator().manual_seed(seed)
    names = ("axis", "pirate", "ghost", "default")
    return {n: torch.randn(N_LAYERS, D_MODEL, generator=g).to(torch.bfloat16) for n in names}


def capping_payload(axis: torch.Tensor, experiments: tuple[str, ...] = ("layers_1:3-p0.25",)):
    """A capping_config.pt in the release's ceiling form: caps on -axis at -tau."""
    vectors = {f"layer_{i}/assistant": {"layer": i, "vector": -axis[i]} for i in (1, 2)}
    caps = [
        {"vector": "layer_1/assistant", "cap": -0.5},
        {"vector": "layer_2/assistant", "cap": 0.25},
    ]
    return {
        "vectors": vectors,
        "experiments": [{"id": e, "interventions": caps} for e in experiments],
    }


def release_files(seed: int = 0, *, capping: bool = True) -> dict[str, bytes]:
    """A repository laid out like the release: one folder per model, plus other things."""
    t = tensors(seed)
    files = {
        "README.md": b"# assistant axis vectors\n",
        f"{FOLDER}/assistant_axis.pt": pt_bytes(t["axis"]),
        f"{FOLDER}/role_vectors/pirate.pt": pt_bytes(t["pirate"]),
        f"{FOLDER}/role_vectors/ghost.pt": pt_bytes(t["ghost"]),
        f"{FOLDER}/default.pt": pt_bytes(t["default"]),
        "other-model/assistant_axis.pt": pt_bytes(torch.randn(6, 32)),
        "docs/notes.md": b"notes\n",
    }
    if capping:
        files[f"{FOLDER}/capping_config.pt"] = pt_bytes(capping_payload(t["axis"]))
    return files


def do_import(cache: Path, model_dir: Path, out: Path, source: str = f"hf:{REPO}/{FOLDER}", **kw):
    return import_from_hub(
        source, str(model_dir), out, cache_dir=cache, local_files_only=True, **kw
    )


# ---- sources ---------------------------------------------------------------------------------


def test_parse_source_reads_every_part():
    src = parse_source("hf:lu-christina/assistant-axis-vectors/qwen-3-32b@v1.0")
    assert src == HubSource("lu-christina/assistant-axis-vectors", "qwen-3-32b", "v1.0", "dataset")
    assert str(src) == "hf:lu-christina/assistant-axis-vectors/qwen-3-32b@v1.0"
    assert parse_source("hf:o/r").subfolder == "" and parse_source("hf:o/r").revision is None
    assert parse_source("hf:o/r/a/b/").subfolder == "a/b"
    assert parse_source("hf:o/r", "model").repo_type == "model"
    assert parse_source(f"hf:o/r@{'a' * 40}").pinned and not parse_source("hf:o/r@main").pinned


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("o/r", "is not a Hub source"),
        ("hf:onlyowner", "does not name a repository"),
        ("hf:o/r@", "names no revision"),
        ("hf:-o/r", "owner name '-o'"),
        ("hf:o/r--x", "repository name 'r--x'"),
        ("hf:o/r/../x", "'..' part"),
        ("hf:o/r/a//b", "empty"),
    ],
)
def test_parse_source_refuses_malformed_text(text, says):
    with pytest.raises(HubError) as exc:
        parse_source(text)
    assert says in str(exc.value)


def test_parse_source_refuses_unknown_repo_type():
    with pytest.raises(HubError, match="repo type 'space'"):
        parse_source("hf:o/r", "space")


# ---- import --------------------------------------------------------------------------------


def test_import_release_folder_makes_a_checked_bundle(tmp_path, model_dir):
    cache = tmp_path / "cache"
    files = release_files()
    commit = add_commit(cache, REPO, files)
    result = do_import(cache, model_dir, tmp_path / "bundle")
    t = tensors(0)
    axis = Axis.load(tmp_path / "bundle")
    assert torch.equal(axis.directions, t["axis"].float())
    assert set(axis.vectors) == {"role/pirate", "role/ghost", "default"}
    assert torch.equal(axis.vectors["role/pirate"], t["pirate"].float())
    assert torch.equal(axis.vectors["default"], t["default"].float())
    assert axis.calibration is None and axis.layer == N_LAYERS // 2
    model, _ = make_pair("qwen2")
    assert axis.fingerprint == model_fingerprint(model)
    Axis.load(tmp_path / "bundle", model=model)  # fits the model, fingerprint included
    assert axis.model_id == str(model_dir.resolve())
    # provenance: the requested revision, its commit, the sha256 of every source file
    hub = axis.metadata["hub"]
    assert hub["commit"] == commit == result.commit and hub["revision"] is None
    assert hub["repo_id"] == REPO and hub["subfolder"] == FOLDER and hub["repo_type"] == "dataset"
    expected = {
        name: hashlib.sha256(data).hexdigest()
        for name, data in files.items()
        if name.startswith(f"{FOLDER}/")
    }
    assert axis.metadata["source_files"] == expected == result.files
    assert axis.metadata["source_digest"] == source_digest(expected)
    # the release's ceiling caps (-axis, -tau) became floors on the axis (axis, tau)
    cap = CappingConfig.load(tmp_path / "bundle")
    assert cap.form == "floor" and cap.layers == (1, 2) and cap.thresholds == (0.5, -0.25)
    assert torch.equal(cap.vectors, unit_rows(t["axis"].float()[[1, 2]]))
    assert cap.name == "layers_1:3-p0.25" == axis.metadata["capping_experiment"]
    # and they act identically on activations
    ceiling_file = _write(tmp_path / "c.pt", files[f"{FOLDER}/capping_config.pt"])
    ceiling = CappingConfig.from_reference(ceiling_file, "layers_1:3-p0.25")
    h = torch.randn(5, D_MODEL)
    for layer in (1, 2):
        floor_ops, ceil_ops = cap.operators()[layer], ceiling.operators()[layer]
        torch.testing.assert_close(floor_ops[0](h.clone()), ceil_ops[0](h.clone()))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_revision_pinning_by_tag_commit_and_branch(tmp_path, model_dir):
    cache = tmp_path / "cache"
    old = add_commit(cache, REPO, release_files(seed=1), refs=("v1",))
    new = add_commit(cache, REPO, release_files(seed=2), refs=("main",))
    assert old != new
    for source, seed, commit, revision in [
        (f"hf:{REPO}/{FOLDER}@v1", 1, old, "v1"),
        (f"hf:{REPO}/{FOLDER}@{old}", 1, old, old),
        (f"hf:{REPO}/{FOLDER}", 2, new, None),
        (f"hf:{REPO}/{FOLDER}@main", 2, new, "main"),
    ]:
        out = tmp_path / f"b-{seed}-{revision}"
        do_import(cache, model_dir, out, source)
        axis = Axis.load(out)
        assert torch.equal(axis.directions, tensors(seed)["axis"].float()), source
        assert axis.metadata["hub"]["commit"] == commit
        assert axis.metadata["hub"]["revision"] == revision


def test_unknown_revision_offline_says_how_to_get_it(tmp_path, model_dir):
    cache = tmp_path / "cache"
    add_commit(cache, REPO, release_files())
    with pytest.raises(
        HubError, match="not in the local Hugging Face cache.*at revision v9"
    ) as exc:
        do_import(cache, model_dir, tmp_path / "b", f"hf:{REPO}/{FOLDER}@v9")
    assert "--revision v9" in str(exc.value) and not (tmp_path / "b").exists()


def test_folder_without_axis_lists_the_folders_that_have_one(tmp_path, model_dir):
    cache = tmp_path / "cache"
    add_commit(cache, REPO, release_files())
    with pytest.raises(HubError, match="folder 'docs' holds no assistant_axis.pt") as exc:
        do_import(cache, model_dir, tmp_path / "b", f"hf:{REPO}/docs")
    assert "other-model, tiny-qwen" in str(exc.value) and "notes.md" in str(exc.value)
    with pytest.raises(HubError, match="repository's root holds no"):
        do_import(cache, model_dir, tmp_path / "b", f"hf:{REPO}")
    with pytest.raises(HubError, match="folder 'nowhere' holds no"):
        do_import(cache, model_dir, tmp_path / "b", f"hf:{REPO}/nowhere")
    assert not (tmp_path / "b").exists()


def test_repository_with_no_axis_anywhere(tmp_path, model_dir):
    cache = tmp_path / "cache"
    add_commit(cache, "o/empty", {"README.md": b"hi\n"})
    with pytest.raises(HubError, match="the repository holds no assistant_axis.pt or bundle.json"):
        do_import(cache, model_dir, tmp_path / "b", "hf:o/empty")


def test_shape_mismatch_names_both_shapes(tmp_path, model_dir):
    cache = tmp_path / "cache"
    add_commit(cache, REPO, release_files())
    with pytest.raises(
        HubError, match="6 layers of width 32 but the model .* 4 layers of width 64"
    ):
        do_import(cache, model_dir, tmp_path / "b", f"hf:{REPO}/other-model")
    assert not (tmp_path / "b").exists()


class Evil:
    """A pickle that creates a file when it is loaded by a full unpickler."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("victim", ["assistant_axis.pt", "role_vectors/pirate.pt"])
def test_pickle_that_runs_code_is_refused(tmp_path, model_dir, victim):
    # the payload really runs code under a full unpickler (so the refusal below means something)
    probe = tmp_path / "probe.pt"
    probe.write_bytes(pt_bytes(Evil(tmp_path / "probe-ran")))
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    marker = tmp_path / "pwned"
    files = release_files()
    files[f"{FOLDER}/{victim}"] = pt_bytes(Evil(marker))
    cache = tmp_path / "cache"
    add_commit(cache, REPO, files)
    with pytest.raises(UnsafeFileError, match="refused to load .*Nothing from it ran"):
        do_import(cache, model_dir, tmp_path / "b")
    assert not marker.exists() and not (tmp_path / "b").exists()


def test_no_cache_offline_says_connect_or_predownload(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "empty-cache"
    with pytest.raises(HubError) as exc:
        import_from_hub(f"hf:{REPO}/{FOLDER}", str(model_dir), tmp_path / "b", cache_dir=cache)
    msg = str(exc.value)
    assert "not in the local Hugging Face cache" in msg and "offline" in msg
    assert "Connect to the network" in msg
    assert f"hf download {REPO} --repo-type dataset --include '{FOLDER}/*'" in msg


def test_without_role_vectors_only_the_axis_and_capping_come(tmp_path, model_dir):
    cache = tmp_path / "cache"
    add_commit(cache, REPO, release_files())
    result = do_import(cache, model_dir, tmp_path / "b", role_vectors=False)
    assert dict(result.axis.vectors) == {}
    assert sorted(result.files) == [f"{FOLDER}/assistant_axis.pt", f"{FOLDER}/capping_config.pt"]


def test_files_that_are_not_role_vectors_are_reported_not_imported(tmp_path, model_dir):
    files = release_files()
    files[f"{FOLDER}/pca.pt"] = pt_bytes(torch.randn(3, D_MODEL))
    files[f"{FOLDER}/meta.pt"] = pt_bytes({"layers": 4})
    files[f"{FOLDER}/persona_vectors/pirate.pt"] = pt_bytes(torch.zeros(N_LAYERS, D_MODEL))
    cache = tmp_path / "cache"
    add_commit(cache, REPO, files)
    result = do_import(cache, model_dir, tmp_path / "b")
    assert set(result.skipped) == {f"{FOLDER}/pca.pt", f"{FOLDER}/meta.pt"}
    assert "shape (3, 64)" in result.skipped[f"{FOLDER}/pca.pt"]
    # two files named pirate.pt keep their folder to stay apart
    assert {"role/role_vectors/pirate", "role/persona_vectors/pirate"} <= set(result.axis.vectors)
    assert Axis.load(tmp_path / "b").metadata["skipped_files"] == result.skipped


def test_capping_experiment_choice(tmp_path, model_dir):
    t = tensors(0)
    files = release_files(capping=False)
    files[f"{FOLDER}/capping_config.pt"] = pt_bytes(
        capping_payload(t["axis"], ("layers_1:3-p0.25", "layers_1:3-p0.5"))
    )
    cache = tmp_path / "cache"
    add_commit(cache, REPO, files)
    with pytest.raises(HubError, match="holds 2 experiments .*choose one with `experiment`"):
        do_import(cache, model_dir, tmp_path / "b")
    result = do_import(cache, model_dir, tmp_path / "b", experiment="layers_1:3-p0.5")
    assert result.capping is not None and result.capping.name == "layers_1:3-p0.5"
    assert result.capping.metadata["experiments"] == ["layers_1:3-p0.25", "layers_1:3-p0.5"]


def test_experiment_without_capping_config_is_refused(tmp_path, model_dir):
    cache = tmp_path / "cache"
    add_commit(cache, REPO, release_files(capping=False))
    with pytest.raises(HubError, match="has no capping_config.pt"):
        do_import(cache, model_dir, tmp_path / "b", experiment="layers_1:3-p0.25")
    result = do_import(cache, model_dir, tmp_path / "b")
    assert result.capping is None and not (tmp_path / "b" / "capping.json").exists()


def test_existing_out_needs_force(tmp_path, model_dir):
    cache = tmp_path / "cache"
    add_commit(cache, REPO, release_files())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.txt").write_text("x")
    with pytest.raises(HubError, match="already exists; pass `force=True`"):
        do_import(cache, model_dir, tmp_path / "b")
    do_import(cache, model_dir, tmp_path / "b", force=True)
    assert not (tmp_path / "b" / "old.txt").exists() and (tmp_path / "b" / "bundle.json").exists()


def test_model_repository_type(tmp_path, model_dir):
    cache = tmp_path / "cache"
    add_commit(cache, "me/axes", release_files(), repo_type="model")
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        do_import(cache, model_dir, tmp_path / "b", f"hf:me/axes/{FOLDER}")
    result = do_import(cache, model_dir, tmp_path / "b", f"hf:me/axes/{FOLDER}", repo_type="model")
    assert result.axis.metadata["hub"]["repo_type"] == "model"


# ---- command line ---------------------------------------------------------------------------


def test_cli_import_hf_source(tmp_path, model_dir):
    cache = tmp_path / "cache"
    commit = add_commit(cache, REPO, release_files())
    out = tmp_path / "bundle"
    args = ["axis", "import", f"hf:{REPO}/{FOLDER}", "--model", str(model_dir), "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--cache-dir", str(cache), "--offline"])
    assert res.exit_code == 0, res.output
    assert f"commit {commit[:12]}" in res.output and "2 role vectors" in res.output
    assert "axis calibrate" in res.output
    info = json.loads((out / "bundle.json").read_text())
    assert info["metadata"]["hub"]["commit"] == commit
    shown = CliRunner().invoke(main, ["axis", "show", str(out), "--json"])
    assert json.loads(shown.output)["capping"]["form"] == "floor"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ([], "need --model SPEC"),
        (["--model", "x", "--model-id", "y"], "not --model-id"),
        (["--model", "x", "--capping", "c.pt"], "--capping is for a local file"),
    ],
)
def test_cli_import_hf_usage_errors(tmp_path, extra, says):
    args = ["axis", "import", f"hf:{REPO}/{FOLDER}", "--out", str(tmp_path / "b"), *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and says in res.output


def test_cli_import_local_file_refuses_hub_options(tmp_path):
    pt = tmp_path / "assistant_axis.pt"
    pt.write_bytes(pt_bytes(torch.randn(N_LAYERS, D_MODEL)))
    args = ["axis", "import", str(pt), "--out", str(tmp_path / "b")]
    res = CliRunner().invoke(main, [*args, "--model", "x", "--offline"])
    assert res.exit_code == 2 and "--model, --offline only apply to hf: sources" in res.output
    res = CliRunner().invoke(main, args)  # the local import keeps working
    assert res.exit_code == 0, res.output
    assert Axis.load(tmp_path / "b").directions.shape == (N_LAYERS, D_MODEL)


def test_bundle_shortcuts_import_calibrate_and_push(tmp_path, model_dir):
    """The library path of the three commands: Bundle.from_hub, .calibrate, .push."""
    from persona_compass.bundle import Bundle
    from persona_compass.hub import CalibrateSettings

    cache = tmp_path / "cache"
    add_commit(cache, REPO, release_files())
    bundle = Bundle.from_hub(
        f"hf:{REPO}/{FOLDER}",
        str(model_dir),
        tmp_path / "b",
        cache_dir=cache,
        local_files_only=True,
    )
    assert bundle.calibration is None and bundle.capping is not None
    assert bundle.metadata["metadata"]["hub"]["revision"] in (None, "main")
    settings = CalibrateSettings(roles=2, questions=2, max_new_tokens=4, batch_size=7)
    calibrated = bundle.calibrate(str(model_dir), settings=settings, progress=False)
    assert calibrated.calibration is not None and calibrated.folder == bundle.folder
    card = calibrated.push("hf:me/axes", dry_run=tmp_path / "up").card
    assert "calibration" in card.lower()
    from persona_compass.errors import AxisFileError

    with pytest.raises(AxisFileError, match="saved bundle"):
        Bundle(bundle.axis).push("hf:me/axes")
