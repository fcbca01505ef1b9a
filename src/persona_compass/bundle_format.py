"""The axis bundle's on-disk format: its file names and format versions, defined once.

:mod:`persona_compass.axis`, :mod:`persona_compass.calibration`, :mod:`persona_compass.capping`
and :mod:`persona_compass.bundle` import these instead of spelling the names themselves, so a
file cannot be called one thing when written and another when read or hashed.
"""

from __future__ import annotations

BUNDLE_FORMAT_VERSION = 1
"""``format_version`` of ``bundle.json``; a newer one is refused with "upgrade persona-compass"."""

CALIBRATION_FORMAT_VERSION = 1
"""``format_version`` of ``calibration.json``. Its optional ``"tokens"`` tables (per-token
projections of role-play and default answers) were added without a new version: a reader
that predates them ignores the key and reads the response-mean table as before, and a file
without them is read by this version unchanged."""
CAPPING_FORMAT_VERSION = 1

AXIS_FILE = "axis.safetensors"
"""The axis (``axis``, (n_layers, d_model) float32), its extra vectors and ``residual_norms``."""

BUNDLE_FILE = "bundle.json"
"""Format version, library version, model id and fingerprint, shapes, monitor layer, metadata."""

CALIBRATION_FILE = "calibration.json"
"""Per-layer percentiles of reference projections (optional): of role-play response means,
and optionally (``"tokens"``) of single tokens of role-play and of default answers."""

CAPPING_FILE = "capping.json"
"""The recommended capping config (optional)."""

CAPPING_VECTORS_FILE = "capping.safetensors"
"""Capping vectors that are not the axis' own unit vectors (only beside such a ``capping.json``)."""

BUNDLE_FILES: tuple[str, ...] = (
    AXIS_FILE,
    BUNDLE_FILE,
    CALIBRATION_FILE,
    CAPPING_FILE,
    CAPPING_VECTORS_FILE,
)
"""Every file the format defines. Other files in a bundle folder (``report.md``, charts) are
the run's notes: they are kept when a bundle is re-saved, and no digest covers them."""
