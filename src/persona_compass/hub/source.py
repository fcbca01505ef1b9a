"""Where a published axis lives on the Hugging Face Hub: ``hf:OWNER/REPO[/SUBFOLDER][@REVISION]``.

The research release is the dataset repository ``lu-christina/assistant-axis-vectors`` with
one folder per model, so ``hf:lu-christina/assistant-axis-vectors/qwen-3-32b`` names Qwen 3
32B's files at the repository's default branch, and ``...qwen-3-32b@<commit>`` pins them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PersonaCompassError

PREFIX = "hf:"
REPO_TYPES: tuple[str, ...] = ("dataset", "model")
DEFAULT_REPO_TYPE = "dataset"  # the research release is a dataset repository

# The Hub's rules for owner and repository names: letters, digits, '-', '_', '.'; no '--'
# or '..', no leading or trailing '-' or '.'.
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_FORM = "hf:OWNER/REPO[/SUBFOLDER][@REVISION]"


class HubError(PersonaCompassError):
    """A Hub source that cannot be read, fetched, imported or pushed (the message says why)."""


@dataclass(frozen=True)
class HubSource:
    """A folder of a Hub repository at a revision.

    Attributes:
        repo_id: ``OWNER/REPO``.
        subfolder: the folder inside the repository (``""``: its root).
        revision: a branch, tag or commit hash; None: the repository's default branch.
        repo_type: ``"dataset"`` (the research release) or ``"model"``.
    """

    repo_id: str
    subfolder: str = ""
    revision: str | None = None
    repo_type: str = DEFAULT_REPO_TYPE

    def __str__(self) -> str:
        text = PREFIX + self.repo_id
        if self.subfolder:
            text += "/" + self.subfolder
        if self.revision:
            text += "@" + self.revision
        return text

    @property
    def pinned(self) -> bool:
        """Whether the revision is a full commit hash (the files can never change)."""
        return self.revision is not None and bool(_COMMIT.match(self.revision))

    def url(self, revision: str | None = None) -> str:
        """The web page of the folder on the Hub."""
        kind = "datasets/" if self.repo_type == "dataset" else ""
        rev = revision or self.revision or "main"
        tail = f"/tree/{rev}" + (f"/{self.subfolder}" if self.subfolder else "")
        return f"https://huggingface.co/{kind}{self.repo_id}{tail}"


def is_hub_source(text: str) -> bool:
    """Whether ``text`` names a Hub source (starts with ``hf:``)."""
    return str(text).startswith(PREFIX)


def parse_source(text: str, repo_type: str = DEFAULT_REPO_TYPE) -> HubSource:
    """Read ``hf:OWNER/REPO[/SUBFOLDER][@REVISION]``.

    Args:
        text: the source, e.g. ``"hf:lu-christina/assistant-axis-vectors/qwen-3-32b@main"``.
        repo_type: ``"dataset"`` (default) or ``"model"``.

    Raises:
        HubError: the text does not have that form; the message shows the part at fault.
    """
    if repo_type not in REPO_TYPES:
        raise HubError(f"repo type {repo_type!r} is not one of {', '.join(REPO_TYPES)}")
    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise HubError(f"{text!r} is not a Hub source; write {_FORM}")
    body = text[len(PREFIX) :].strip()
    path, at, revision = body.partition("@")
    if at and not revision:
        raise HubError(f"{text!r} ends with '@' but names no revision; write {_FORM}")
    if revision and (revision != revision.strip() or "@" in revision or ".." in revision):
        raise HubError(f"{text!r}: revision {revision!r} is not a branch, tag or commit hash")
    parts = path.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise HubError(
            f"{text!r} does not name a repository; write {_FORM}, e.g. "
            "hf:lu-christina/assistant-axis-vectors/qwen-3-32b"
        )
    owner, repo, folder = parts[0], parts[1], parts[2:]
    for what, name in (("owner", owner), ("repository", repo)):
        if not _NAME.match(name) or "--" in name or ".." in name:
            raise HubError(
                f"{text!r}: {what} name {name!r} is not a valid Hub name (letters, digits, "
                "'-', '_', '.'; no '--' or '..'; no '-' or '.' at either end)"
            )
    if folder and folder[-1] == "":
        folder = folder[:-1]  # a trailing slash
    if any(part in ("", ".", "..") for part in folder):
        raise HubError(
            f"{text!r}: the subfolder {'/'.join(folder)!r} has an empty, '.' or '..' part; "
            "name a folder of the repository such as qwen-3-32b"
        )
    return HubSource(f"{owner}/{repo}", "/".join(folder), revision or None, repo_type)
