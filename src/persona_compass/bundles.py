"""Axis bundles by name: a folder path, or the alias of a bundle shipped with the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .bundle_format import BUNDLE_FILE
from .errors import AxisFileError

SHIPPED_DIR = "data/bundles"


def shipped_bundles() -> dict[str, Path]:
    """Aliases of the bundles shipped inside the package -> their folders."""
    root = Path(str(resources.files("persona_compass") / SHIPPED_DIR))
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / BUNDLE_FILE).is_file()}


def resolve_bundle(spec: str | Path) -> Path:
    """The folder of a bundle given as a path or as a shipped alias (e.g. ``smollm2-135m``)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    shipped = shipped_bundles()
    if str(spec) in shipped:
        return shipped[str(spec)]
    names = ", ".join(shipped) or "none"
    raise AxisFileError(
        f"{spec}: no such bundle folder, and not a shipped bundle alias (shipped: {names}); "
        "pass the folder that `persona-compass extract` wrote (OUT/bundle)"
    )
