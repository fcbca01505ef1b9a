"""Publish a bundle on the Hub: ``axis push BUNDLE hf:OWNER/REPO[/SUBFOLDER][@BRANCH]``.

For the people who extract axes for other models: the bundle's format files, safetensors and
JSON (never a pickle; the run's notes such as ``report.md`` stay home), and a generated model
card with its numbers go up in one commit through ``huggingface_hub.HfApi`` (its login and
``HF_TOKEN``). ``dry_run`` writes the exact upload
folder locally instead. Anyone can then ``axis import`` it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir
from ..bundle import Bundle
from ..bundle_format import BUNDLE_FILES
from ..models.cache import sha256_file
from .download import hub_offline
from .model_card import model_card
from .source import DEFAULT_REPO_TYPE, HubError, HubSource, parse_source

CARD_FILE = "README.md"


@dataclass(frozen=True)
class PushResult:
    """What was (or, for a dry run, would be) uploaded.

    Attributes:
        target: the repository, folder and branch.
        files: sha256 of every uploaded bundle file (the card aside), by name.
        card: the model card (``README.md``) text.
        folder: the dry run's upload folder; None after a real upload.
        commit_url: the Hub commit of a real upload.
    """

    target: HubSource
    files: dict[str, str]
    card: str
    folder: Path | None = None
    commit_url: str | None = None


def bundle_files(bundle: Path) -> list[Path]:
    """The bundle's files that are published: those of the bundle format that it has."""
    return sorted(bundle / name for name in BUNDLE_FILES if (bundle / name).is_file())


def stage_upload(bundle: Path, target: HubSource, folder: Path) -> tuple[dict[str, str], str]:
    """Copy the published files into ``folder`` and write the card; returns (digests, card)."""
    opened = Bundle.open(bundle)  # refuses a broken bundle before anything is staged
    axis, capping = opened.axis, opened.capping
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for path in bundle_files(bundle):
        shutil.copy2(path, folder / path.name)
        files[path.name] = sha256_file(folder / path.name)
    card = model_card(axis, capping, files, target)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return files, card


def push_bundle(
    bundle: str | os.PathLike[str],
    target: str | HubSource,
    *,
    repo_type: str = DEFAULT_REPO_TYPE,
    private: bool | None = None,
    message: str | None = None,
    dry_run: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> PushResult:
    """Upload a bundle (safetensors + JSON + model card) to a Hub repository folder.

    Args:
        bundle: the bundle folder (or a shipped alias).
        target: ``hf:OWNER/REPO[/SUBFOLDER][@BRANCH]``; the repository is created if needed,
            and so is the branch.
        repo_type: ``"dataset"`` (like the research release) or ``"model"``.
        private: for a repository created now (None: the Hub's default).
        message: the commit message.
        dry_run: write the upload folder here instead of uploading (must be new or empty).
        token: for ``huggingface_hub`` (None: its login or ``HF_TOKEN``).

    Raises:
        HubError: a bad target, a commit hash as branch, offline, no permission.
        AxisFileError: the bundle is broken.
    """
    dest = parse_source(target, repo_type) if isinstance(target, str) else target
    if dest.pinned:
        raise HubError(
            f"{dest}: a push goes to a branch, and {dest.revision} is a commit hash; name a "
            "branch after '@' or leave it out for the default branch"
        )
    opened = Bundle.open(bundle)
    assert opened.folder is not None  # an opened bundle has its folder
    folder = opened.folder
    if dry_run is not None:
        out = Path(dry_run)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise HubError(f"`dry_run` {out} exists and is not an empty folder; choose a new one")
        with atomic_dir(out) as tmp:
            files, card = stage_upload(folder, dest, tmp)
        return PushResult(dest, files, card, folder=out)
    if hub_offline():
        raise HubError(
            "HF_HUB_OFFLINE is set: a push needs the network; unset it, or write the upload "
            "folder with `dry_run=DIR`"
        )
    with tempfile.TemporaryDirectory(prefix="persona-compass-push-") as tmp:
        staged = Path(tmp) / "upload"
        files, card = stage_upload(folder, dest, staged)
        model = opened.model_id or "a model"
        message = message or f"persona-compass axis bundle for {model}"
        url = _upload(dest, staged, private, message, token)
    return PushResult(dest, files, card, commit_url=url)


def _upload(
    dest: HubSource, staged: Path, private: bool | None, message: str, token: str | bool | None
) -> str | None:
    """One commit of ``staged`` into ``dest``; Hub errors become one-line HubErrors."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi(token=token)
    kind = dest.repo_type
    login = "log in with `hf auth login` or set HF_TOKEN to a token with write access"
    try:
        api.create_repo(dest.repo_id, repo_type=kind, private=private, exist_ok=True)
        if dest.revision:
            api.create_branch(dest.repo_id, branch=dest.revision, repo_type=kind, exist_ok=True)
        info = api.upload_folder(
            repo_id=dest.repo_id,
            repo_type=kind,
            folder_path=staged,
            path_in_repo=dest.subfolder or None,
            revision=dest.revision,
            commit_message=message,
        )
    except LocalTokenNotFoundError:
        raise HubError(f"{dest}: no Hugging Face token; {login}") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(f"{dest}: the Hub refused the push ({status}); {login}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"{dest}: the Hub refused the push: {first}") from None
    except OSError as exc:  # no connection
        raise HubError(f"{dest}: cannot reach the Hub to push ({exc}); try again online") from None
    return getattr(info, "commit_url", None)
