"""An offline stand-in for the Hugging Face Hub: files laid out in ``huggingface_hub``'s cache.

``huggingface_hub`` keeps a repository as ``{type}s--OWNER--REPO/`` with ``blobs/<sha256>``
(the contents), ``snapshots/<commit>/<path>`` (links to the blobs) and ``refs/<name>`` (a
branch or tag -> commit). Writing that layout in a temporary folder and reading it with
``local_files_only=True`` runs the real download code without a network.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
from huggingface_hub.file_download import repo_folder_name


def pt_bytes(obj: object) -> bytes:
    """What ``torch.save(obj, file)`` writes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def add_commit(
    cache: Path,
    repo_id: str,
    files: dict[str, bytes],
    *,
    refs: tuple[str, ...] = ("main",),
    repo_type: str = "dataset",
) -> str:
    """Put one commit of ``files`` (repository path -> bytes) in the cache; returns its hash.

    Each name in ``refs`` (a branch or tag) is pointed at the commit.
    """
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    listing = b"".join(
        path.encode() + hashlib.sha256(data).digest() for path, data in sorted(files.items())
    )
    commit = hashlib.sha1(listing).hexdigest()
    for path, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit


def add_folder(cache: Path, repo_id: str, folder: Path, prefix: str, **kwargs: object) -> str:
    """Put every file of a local ``folder`` under ``prefix/`` in one new commit."""
    files = {
        f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    return add_commit(cache, repo_id, files, **kwargs)  # type: ignore[arg-type]
