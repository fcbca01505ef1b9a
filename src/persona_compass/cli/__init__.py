"""Command line: ``persona-compass``. Thin over the public Python API."""

from __future__ import annotations

from . import (  # noqa: F401
    axis_cmd,
    chat_cmd,
    demo_cmd,
    evaluate_cmd,
    extract_cmd,
    models_cmd,
    monitor_cmd,
)
from .app import main
from .serve_cmd import serve  # noqa: F401

__all__ = ["main"]
