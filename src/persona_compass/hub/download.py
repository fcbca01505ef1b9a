"""Fetch one folder of a Hub repository through ``huggingface_hub`` (its cache, its token).

Two steps, both at one commit: first only the small marker files (``assistant_axis.pt``,
``bundle.json``) of the whole repository, which says which folders hold an axis (and gives a
useful error when the requested one does not); then the requested folder itself, without the
other models' folders. The first step resolves the revision to a commit hash and the second
asks for that commit, so a branch that moves in between cannot mix two versions.

Offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``, or a Hub that does not answer) only
the local cache is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from ..models.cache import sha256_file
from .source import HubError, HubSource

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Snapshot:
    """The fetched folder of a Hub repository.

    Attributes:
        source: what was asked for.
        commit: the commit hash the revision resolved to.
        root: the cached snapshot of the repository at that commit.
        files: repository-relative paths of the folder's files, sorted.
        offline: whether only the local cache was used.
    """

    source: HubSource
    commit: str
    root: Path
    files: tuple[str, ...]
    offline: bool

    @property
    def folder(self) -> Path:
        """The requested folder in the local snapshot."""
        return self.root / self.source.subfolder if self.source.subfolder else self.root

    def path(self, name: str) -> Path:
        """A file of the snapshot by its repository-relative path."""
        return self.root / name

    def digests(self) -> dict[str, str]:
        """sha256 of every file of the folder, by repository-relative path."""
        return {name: sha256_file(self.root / name) for name in self.files}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the local cache only (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def fetch_folder(
    source: HubSource,
    *,
    markers: Sequence[str],
    only: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Snapshot:
    """Download (or find in the cache) the folder ``source`` names.

    Args:
        source: the repository, folder and revision.
        markers: file names that make a folder an axis folder (one must be in it).
        only: fetch only these file patterns of the folder (default: every file in it).
        cache_dir: the Hugging Face cache (default: ``huggingface_hub``'s, ``HF_HUB_CACHE``).
        local_files_only: True reads the cache only; None decides: offline when
            ``HF_HUB_OFFLINE`` is set or the Hub does not answer.
        token: passed to ``huggingface_hub`` (None: its own login and ``HF_TOKEN``).

    Raises:
        HubError: no such repository, revision or folder, a folder without a marker, or
            offline with nothing cached (the message says how to fix each).
    """
    if local_files_only is None:
        from ..models.loader import hub_reachable

        local_files_only = hub_offline() or not hub_reachable()
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    markers_at = [f"*{name}" for name in markers]
    root = _download(source, source.revision, markers_at, None, cache_dir, local_files_only, token)
    commit = root.name
    if not _COMMIT.match(commit):
        raise HubError(f"{source}: the cache folder {root} is not a snapshot of one commit")
    holders = _marker_folders(root, markers)
    if source.subfolder not in holders:
        raise HubError(_no_axis_message(source, commit, root, holders, markers, local_files_only))
    # Other axis folders inside the requested one belong to other models: leave them out.
    others = [d for d in holders if d != source.subfolder and d.startswith(prefix)]
    allow = [prefix + pattern for pattern in only] if only is not None else [prefix + "*"]
    ignore = [f"{d}/*" for d in others] or None
    root = _download(source, commit, allow, ignore, cache_dir, local_files_only, token)
    # The cache may hold more of this commit than was asked for now (an earlier, fuller
    # download): list what the patterns select, as a download would.
    files = sorted(
        name
        for path in (root / source.subfolder if source.subfolder else root).rglob("*")
        if path.is_file()
        and _selected(name := path.relative_to(root).as_posix(), allow, ignore or [])
    )
    return Snapshot(source, commit, root, tuple(files), bool(local_files_only))


def _selected(name: str, allow: list[str], ignore: list[str]) -> bool:
    """``huggingface_hub``'s pattern rule: matches an allow pattern and no ignore pattern."""
    return any(fnmatch(name, p) for p in allow) and not any(fnmatch(name, p) for p in ignore)


def _marker_folders(root: Path, markers: Sequence[str]) -> list[str]:
    """Repository-relative folders ("" for the root) that hold one of ``markers``."""
    found = {
        path.parent.relative_to(root).as_posix()
        for name in markers
        for path in root.rglob(name)
        if path.is_file()
    }
    return sorted("" if d == "." else d for d in found)


def _no_axis_message(
    source: HubSource,
    commit: str,
    root: Path,
    holders: list[str],
    markers: Sequence[str],
    offline: bool,
) -> str:
    where = f"folder {source.subfolder!r}" if source.subfolder else "the repository's root"
    what = " or ".join(markers)
    looked = " (offline: only the local cache was searched)" if offline else ""
    target = root / source.subfolder if source.subfolder else root
    held = sorted(p.name for p in target.iterdir())[:10] if target.is_dir() else []
    has = f"; it holds {', '.join(held)}" if held else ""
    if holders:
        names = ", ".join(d or "(root)" for d in holders)
        example = HubSource(source.repo_id, holders[0], source.revision, source.repo_type)
        return (
            f"{source}: {where} holds no {what} at commit {commit[:12]}{has}{looked}; the "
            f"folders that do: {names}. Name one, e.g. {example}"
        )
    return (
        f"{source}: the repository holds no {what} at commit {commit[:12]}{looked}; check the "
        f"repository and folder on {source.url(commit)}"
    )


def _download(
    source: HubSource,
    revision: str | None,
    allow: list[str],
    ignore: list[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
) -> Path:
    """``snapshot_download`` with its errors turned into one-line :class:`HubError`s."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = source.repo_type
    try:
        path = snapshot_download(
            source.repo_id,
            repo_type=kind,
            revision=revision,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            local_files_only=local_files_only,
            allow_patterns=allow,
            ignore_patterns=ignore,
            token=token,
        )
    except IncompleteSnapshotError as exc:
        raise HubError(
            f"{source}: the local cache holds only part of this revision ({_first_line(exc)}); "
            "connect to the network and run again to complete it"
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(_offline_message(source, cache_dir, local_files_only)) from None
    except GatedRepoError:
        raise HubError(
            f"{source}: the repository is gated; request access on {source.url()} and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        other = "model" if kind == "dataset" else "dataset"
        raise HubError(
            f"{source}: no {kind} repository {source.repo_id} on the Hub, or it is private and "
            f"you are not logged in (`hf auth login`); check the name, or pass "
            f"`repo_type='{other}'` if it is a {other} repository"
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"{source}: the repository has no revision {revision!r}; name a branch, tag or "
            f"commit hash that exists (see {source.url('main')})"
        ) from None
    except HfHubHTTPError as exc:
        raise HubError(f"{source}: the Hub refused the download: {_first_line(exc)}") from None
    except HFValidationError as exc:
        raise HubError(f"{source}: {_first_line(exc)}") from None
    except OSError as exc:  # connection problems, a cache folder that cannot be written
        raise HubError(f"{source}: cannot fetch it: {_first_line(exc)}") from None
    return Path(path)


def _offline_message(
    source: HubSource, cache_dir: str | os.PathLike[str] | None, local_files_only: bool
) -> str:
    rev = f" at revision {source.revision}" if source.revision else ""
    cache = f" ({cache_dir})" if cache_dir is not None else ""
    why = (
        "only the cache may be used (offline: HF_HUB_OFFLINE or --offline)"
        if local_files_only
        else "the Hub cannot be reached"
    )
    include = f" --include '{source.subfolder}/*'" if source.subfolder else ""
    revision = f" --revision {source.revision}" if source.revision else ""
    return (
        f"{source} is not in the local Hugging Face cache{cache}{rev} and {why}. Connect to "
        "the network and run again, or download it beforehand with `hf download "
        f"{source.repo_id} --repo-type {source.repo_type}{include}{revision}` (the same "
        "HF_HUB_CACHE) and run again offline"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
