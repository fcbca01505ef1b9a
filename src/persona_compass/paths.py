"""Where persona-compass keeps its files (converted models, caches)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "PERSONA_COMPASS_HOME"


def compass_home() -> Path:
    """The home folder: ``$PERSONA_COMPASS_HOME``, else ``~/.cache/persona-compass``."""
    env = os.environ.get(HOME_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "persona-compass"
    base.mkdir(parents=True, exist_ok=True)
    return base
