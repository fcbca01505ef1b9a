"""``axis push``: a bundle -> safetensors, JSON and a model card on the Hub (mocked at HfApi).

The upload itself is ``huggingface_hub.HfApi``'s: the tests replace its methods at that
boundary and check what would be uploaded, where and how. A pushed folder imports back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import httpx2
import pytest
import torch
from click.testing import CliRunner
from fake_hub import add_folder
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from tiny import save_tiny_bundle

from persona_compass.axis import Axis
from persona_compass.capping import CappingConfig
from persona_compass.cli import main
from persona_compass.hub import HubError, import_from_hub, push_bundle

TARGET = "hf:me/persona-axes/tiny-qwen"


@pytest.fixture
def bundle(tmp_path):
    """A calibrated tiny bundle with a capping config and a report (which stays home)."""
    model_dir, folder, axis = save_tiny_bundle(tmp_path)
    axis = dataclasses.replace(
        axis,
        metadata={
            "method": "role-play extraction",
            "preset": "quick",
            "judge": "none",
            "monitor_auroc": 0.875,
            "roles": {"pirate": 12, "ghost": 9},
        },
    )
    axis.save(folder)
    CappingConfig.calibrate(axis, axis.calibration, "1:3", 25.0).save(folder)
    (folder / "report.md").write_text("# report\n")
    return model_dir, folder


class Recorder:
    """Stands in for the Hub: records every HfApi call and what the upload folder held."""

    def __init__(self, monkeypatch, fail: int | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        rec = self

        def create_repo(api, repo_id, **kw):
            rec.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def create_branch(api, repo_id, **kw):
            rec.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(api, **kw):
            if fail is not None:
                request = httpx2.Request("POST", "https://huggingface.co/api/x")
                raise HfHubHTTPError(
                    f"{fail} denied", response=httpx2.Response(fail, request=request)
                )
            rec.calls.append(("upload_folder", kw))
            folder = Path(kw["folder_path"])  # a temporary folder, gone after the push
            rec.uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}
            return type("CommitInfo", (), {"commit_url": "https://hub/commit/abc"})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_uploads_the_bundle_files_and_a_card(bundle, monkeypatch):
    _, folder = bundle
    hub = Recorder(monkeypatch)
    result = push_bundle(folder, TARGET + "@axes-v1", message="tiny axis")
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1] == {
        "repo_id": "me/persona-axes",
        "repo_type": "dataset",
        "private": None,
        "exist_ok": True,
    }
    assert hub.calls[1][1] == {
        "repo_id": "me/persona-axes",
        "branch": "axes-v1",
        "repo_type": "dataset",
        "exist_ok": True,
    }
    upload = hub.calls[2][1]
    assert upload["repo_id"] == "me/persona-axes" and upload["repo_type"] == "dataset"
    assert upload["path_in_repo"] == "tiny-qwen" and upload["revision"] == "axes-v1"
    assert upload["commit_message"] == "tiny axis"
    # the bundle's safetensors and JSON, byte for byte, and the card; not its report
    expected = {"axis.safetensors", "bundle.json", "calibration.json", "capping.json"}
    assert set(hub.uploaded) == expected | {"README.md"}
    for name in expected:
        assert hub.uploaded[name] == (folder / name).read_bytes()
        assert result.files[name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert hub.uploaded["README.md"].decode() == result.card
    assert result.commit_url == "https://hub/commit/abc" and result.folder is None


def test_card_shows_the_bundle_numbers(bundle):
    _, folder = bundle
    axis, cap = Axis.load(folder), CappingConfig.load(folder)
    card = push_bundle(folder, TARGET, dry_run=folder.parent / "up").card
    cal = axis.calibration
    assert f"# Assistant Axis bundle for `{axis.model_id}`" in card
    assert f"| layers x width | {axis.n_layers} x {axis.d_model} |" in card
    assert "| monitor layer | 2 |" in card
    assert "| roles | 2 roles, 21 score-3 rollouts |" in card
    assert "| held-out AUROC at the monitor layer | 0.875 |" in card
    p25, p75 = cal.threshold(2, 25.0), cal.threshold(2, 75.0)
    assert f"| p25 / p75 at the monitor layer | {p25:.4g} / {p75:.4g} |" in card
    assert f"`{cap.name}` (floor), layers 1-2" in card
    assert "role-play extraction, preset `quick`, judge `none`" in card
    for name, sha in push_bundle(folder, TARGET, dry_run=folder.parent / "up2").files.items():
        assert f"{sha}  {name}" in card
    assert f"axis import {TARGET} --model {axis.model_id} --out bundle" in card
    assert "--engine vllm --cap on" in card


def test_card_of_an_uncalibrated_bundle_without_capping(tmp_path):
    axis = Axis(torch.randn(4, 64), model_id="tiny")
    axis.save(tmp_path / "b")
    card = push_bundle(tmp_path / "b", "hf:me/r", repo_type="model", dry_run=tmp_path / "up").card
    assert "none (run `persona-compass axis calibrate` after import)" in card
    assert "| capping | none |" in card and "--cap on" not in card
    assert "axis import hf:me/r --repo-type model --model tiny" in card


def test_dry_run_writes_the_upload_folder_and_it_imports_back(bundle, tmp_path):
    model_dir, folder = bundle
    up = tmp_path / "upload"
    result = push_bundle(folder, TARGET, dry_run=up)
    assert result.folder == up
    assert sorted(p.name for p in up.iterdir()) == [
        "README.md",
        "axis.safetensors",
        "bundle.json",
        "calibration.json",
        "capping.json",
    ]
    # published, then imported by someone else: the same axis, calibration and capping
    cache = tmp_path / "cache"
    commit = add_folder(cache, "me/persona-axes", up, "tiny-qwen")
    imported = import_from_hub(
        TARGET, str(model_dir), tmp_path / "again", cache_dir=cache, local_files_only=True
    )
    again, original = Axis.load(tmp_path / "again"), Axis.load(folder)
    assert torch.equal(again.directions, original.directions)
    assert torch.equal(again.calibration.values, original.calibration.values)
    assert again.metadata["hub"]["commit"] == commit == imported.commit
    assert again.metadata["monitor_auroc"] == 0.875
    assert again.model_id == str(model_dir.resolve())
    cap_a, cap_b = CappingConfig.load(tmp_path / "again"), CappingConfig.load(folder)
    assert cap_a.thresholds == cap_b.thresholds and torch.equal(cap_a.vectors, cap_b.vectors)
    with pytest.raises(HubError, match="its capping config is imported as it is"):
        import_from_hub(
            TARGET,
            str(model_dir),
            tmp_path / "x",
            cache_dir=cache,
            local_files_only=True,
            experiment="layers_1:3-p0.25",
        )


def test_push_errors(bundle, tmp_path, monkeypatch):
    _, folder = bundle
    with pytest.raises(HubError, match="a push goes to a branch"):
        push_bundle(folder, f"{TARGET}@{'a' * 40}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(HubError, match="not an empty folder"):
        push_bundle(folder, TARGET, dry_run=tmp_path / "full")
    Recorder(monkeypatch, fail=401)
    with pytest.raises(HubError, match=r"refused the push \(401\); log in with `hf auth login`"):
        push_bundle(folder, TARGET)
    Recorder(monkeypatch, fail=500)
    with pytest.raises(HubError, match="refused the push: 500 denied"):
        push_bundle(folder, TARGET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set.*`dry_run=DIR`"):
        push_bundle(folder, TARGET)


def test_broken_bundle_is_not_pushed(bundle, tmp_path, monkeypatch):
    _, folder = bundle
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "axis.safetensors").unlink()
    hub = Recorder(monkeypatch)
    with pytest.raises(Exception, match="lacks axis.safetensors"):
        push_bundle(broken, TARGET)
    assert hub.calls == []


def test_cli_push_dry_run_and_upload(bundle, tmp_path, monkeypatch):
    _, folder = bundle
    up = tmp_path / "upload"
    res = CliRunner().invoke(main, ["axis", "push", str(folder), TARGET, "--dry-run", str(up)])
    assert res.exit_code == 0, res.output
    assert f"dry run: the upload folder is {up}" in res.output and (up / "README.md").is_file()
    hub = Recorder(monkeypatch)
    args = ["axis", "push", str(folder), "hf:me/axes", "--repo-type", "model", "--private"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert hub.calls[0][1]["private"] is True and hub.calls[0][1]["repo_type"] == "model"
    assert hub.calls[-1][1]["path_in_repo"] is None and hub.calls[-1][1]["revision"] is None
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    res = CliRunner().invoke(main, ["axis", "push", str(folder), "me/axes"])
    assert res.exit_code == 1 and "is not a Hub source" in res.output
