"""The resumable work folder of ``axis calibrate``: settings, answers and their projections.

Layout of a work folder ``DIR``::

    DIR/run.json              the settings of the run (a resume must match them)
    DIR/answers.safetensors   every recorded answer's per-layer projection (N, n_layers)
                              float32 and, in its metadata, the answers themselves

The answers file is rewritten atomically after each batch (it is small: one row of
``n_layers`` numbers per answer), so a crash leaves the previous commit or the new one. A
resumed run skips every answer id already in it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_path, read_json_object, write_json
from ..persona_space.catalogue import DEFAULT_ROLE
from .source import HubError

STORE_FORMAT = "persona-compass-calibration-answers/1"
RUN_FILE = "run.json"
ANSWERS_FILE = "answers.safetensors"


@dataclass(frozen=True)
class AnswerRecord:
    """One recorded answer: which prompt and question, how many content tokens, the text."""

    id: str
    role: str
    prompt_index: int
    question_id: int
    n_tokens: int
    response: str


class CalibrationStore:
    """The answers of one calibration run and their projections on every layer's axis.

    Args:
        root: the work folder (created if needed).
        settings: the run's settings, written to ``run.json``.
        resume_keys: settings an existing run must share (the science, not the speed).

    Raises:
        HubError: the folder holds a run with other settings, or is not a work folder.
    """

    def __init__(self, root: str | Path, settings: dict[str, Any], resume_keys: tuple[str, ...]):
        self.root = Path(root)
        run_file = self.root / RUN_FILE
        if run_file.is_file():
            old = read_json_object(run_file, HubError)
            diffs = [
                f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                for k in resume_keys
                if old.get(k) != settings.get(k)
            ]
            if diffs:
                raise HubError(
                    f"the work folder {self.root} holds a calibration run with other settings "
                    f"({'; '.join(diffs)}); rerun with the settings in {run_file}, or pass "
                    "another `work_dir` folder (or delete this one to start over)"
                )
        elif self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise HubError(
                f"{self.root} is not empty and holds no {RUN_FILE}, so it is not a calibration "
                "work folder; pass another `work_dir` folder"
            )
        else:
            write_json(run_file, settings)
        self.records: list[AnswerRecord] = []
        self._rows: list[Tensor] = []
        if (self.root / ANSWERS_FILE).is_file():
            self._load()

    @property
    def path(self) -> Path:
        return self.root / ANSWERS_FILE

    def done(self) -> set[str]:
        """Ids of the answers already recorded."""
        return {r.id for r in self.records}

    def add(self, records: list[AnswerRecord], projections: Tensor) -> None:
        """Record a batch: ``projections`` (B, n_layers), NaN rows for empty answers."""
        if projections.ndim != 2 or projections.shape[0] != len(records):
            raise HubError(
                f"{len(records)} answers but projections of shape {tuple(projections.shape)}"
            )
        done = self.done()
        for rec, row in zip(records, projections, strict=True):
            if rec.id in done:
                raise HubError(f"answer {rec.id} is already recorded in {self.path}")
            self.records.append(rec)
            self._rows.append(row.detach().to("cpu", torch.float32).clone())

    def commit(self) -> None:
        """Write every recorded answer (atomically: the old file or the new, never half)."""
        metadata = {
            "format": STORE_FORMAT,
            "records": json.dumps([asdict(r) for r in self.records]),
        }
        tensors = {"projections": torch.stack(self._rows).contiguous()}
        with atomic_path(self.path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def projections(self, *, default: bool) -> Tensor:
        """(N, n_layers) projections of the default (or the role-play) answers with content."""
        rows = [
            row
            for rec, row in zip(self.records, self._rows, strict=True)
            if (rec.role == DEFAULT_ROLE) == default and rec.n_tokens > 0
        ]
        if not rows:
            return torch.empty(0, 0)
        stacked = torch.stack(rows)
        return stacked[torch.isfinite(stacked).all(dim=1)]

    def _load(self) -> None:
        fix = f"delete {self.path} to record the answers again"
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                meta = fh.metadata() or {}
                rows = fh.get_tensor("projections")
        except (SafetensorError, OSError, KeyError) as exc:
            raise HubError(f"{self.path}: unreadable ({exc}); {fix}") from None
        if meta.get("format") != STORE_FORMAT:
            raise HubError(f"{self.path} is not a calibration answers file; {fix}")
        try:
            records = [AnswerRecord(**raw) for raw in json.loads(meta["records"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise HubError(f"{self.path}: unreadable answer records ({exc}); {fix}") from None
        if rows.ndim != 2 or rows.shape[0] != len(records):
            raise HubError(f"{self.path}: {len(records)} answers but {rows.shape[0]} rows; {fix}")
        self.records = records
        self._rows = list(rows.to(torch.float32).unbind(0))

    @property
    def n_layers(self) -> int | None:
        """Layers per stored row, None while nothing is recorded."""
        return int(self._rows[0].shape[0]) if self._rows else None


def nan_rows(projections: Tensor, n_tokens: list[int]) -> Tensor:
    """``projections`` with the rows of empty answers (no content token) set to NaN."""
    out = projections.clone()
    for i, n in enumerate(n_tokens):
        if n <= 0:
            out[i] = math.nan
    return out
