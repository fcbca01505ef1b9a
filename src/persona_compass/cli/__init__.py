"""Command line: ``persona-compass``. Thin over the public Python API."""

from __future__ import annotations

from . import axis_cmd, demo_cmd, extract_cmd, models_cmd, monitor_cmd  # noqa: F401
from .app import main

__all__ = ["main"]
