"""persona-compass: find a model's Assistant Axis, monitor persona drift live, and cap it."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import PersonaCompassError

__all__ = ["PersonaCompassError", "__version__"]
