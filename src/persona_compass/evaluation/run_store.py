"""The evaluation folder's bookkeeping: unit files and their paths, the digests that decide what
a rerun may reuse, and the run's tally (see :mod:`.runner` for the layout; the settings a rerun
must match are declared in :mod:`.settings`, checked by :mod:`persona_compass.run_folder`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import read_json_object
from ..axis import AXIS_FILE, BUNDLE_FILE
from ..calibration import CALIBRATION_FILE
from ..capping import CAPPING_FILE, CAPPING_VECTORS_FILE, CappingConfig
from ..errors import PersonaCompassError
from .capability import CapabilityItem
from .conditions import condition_slug

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
RUNS_DIR = "runs"
CAPABILITY_DIR = "capability"
SETTINGS_FORMAT = "persona-compass-evaluation/1"
RUN_FORMAT = "persona-compass-eval-run/1"
CAPABILITY_FORMAT = "persona-compass-eval-capability/1"


class EvaluationError(PersonaCompassError):
    """An evaluation that cannot start or continue (settings clash, bad selection...)."""


# --------------------------------------------------------------------------- helpers


def json_digest(data: Any) -> str:
    """A short, stable hash of JSON-able data (keys sorted)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def bundle_digest(folder: Path) -> str:
    """A hash of the bundle files that decide the readings and the caps."""
    h = hashlib.sha256()
    for name in (AXIS_FILE, BUNDLE_FILE, CALIBRATION_FILE, CAPPING_FILE):
        path = folder / name
        h.update(name.encode())
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    vectors = folder / CAPPING_VECTORS_FILE  # hashed without its name (as runs so far were)
    if vectors.is_file():
        h.update(hashlib.sha256(vectors.read_bytes()).digest())
    return h.hexdigest()[:20]


def capping_digest(cfg: CappingConfig | None) -> str | None:
    if cfg is None:
        return None
    data = cfg.vectors.contiguous().numpy().tobytes()
    return json_digest(
        {
            "layers": list(cfg.layers),
            "thresholds": list(cfg.thresholds),
            "form": cfg.form,
            "vectors": hashlib.sha256(data).hexdigest(),
        }
    )


def items_digest(items: Sequence[CapabilityItem]) -> str:
    return json_digest([item.to_dict() for item in items])


def run_path(out_dir: Path, scenario_id: str, condition: str) -> Path:
    return out_dir / RUNS_DIR / f"{scenario_id}__{condition_slug(condition)}.json"


def capability_path(out_dir: Path, condition: str) -> Path:
    return out_dir / CAPABILITY_DIR / f"{condition_slug(condition)}.json"


def read_unit(path: Path, fmt: str) -> dict[str, Any] | None:
    """A complete unit file, or None (missing, partial, foreign or unfinished)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        logger.warning("%s is unreadable (a partial write?); it will be redone", path)
        return None
    block = data.get("evaluation") if isinstance(data, dict) else None
    if (
        not isinstance(block, dict)
        or block.get("format") != fmt
        or block.get("complete") is not True
    ):
        logger.warning("%s is not a complete evaluation unit; it will be redone", path)
        return None
    return data


def read_settings(out_dir: str | Path) -> dict[str, Any]:
    """``DIR/settings.json``.

    Raises:
        EvaluationError: there is none, or it is unreadable.
    """
    path = Path(out_dir) / SETTINGS_FILE
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist; is {out_dir} an evaluation folder?")
    data = read_json_object(path, EvaluationError)
    if data.get("format") != SETTINGS_FORMAT:
        raise EvaluationError(f"{path} is not a persona-compass evaluation settings file")
    return data


# --------------------------------------------------------------------------- results


@dataclass
class EvaluationResult:
    """What :func:`~.runner.run_evaluation` did."""

    out_dir: Path
    settings: dict[str, Any]
    planned: int = 0
    generated: int = 0
    rejudged: int = 0
    skipped: int = 0
    capability_done: int = 0
    seconds: float = 0.0
    answers: int = 0
    answer_seconds: list[float] = field(default_factory=list)

    @property
    def seconds_per_answer(self) -> float | None:
        return sum(self.answer_seconds) / len(self.answer_seconds) if self.answer_seconds else None
