"""The resumable work folder of ``axis calibrate``: settings, answers and their projections.

Layout of a work folder ``DIR``::

    DIR/run.json              the settings of the run (a resume must match them)
    DIR/answers.safetensors   every recorded answer's per-layer projection (N, n_layers)
                              float32, the kept per-token projections of every answer
                              (``tokens``, (T, n_layers) float32, answer after answer) and,
                              in its metadata, the answers themselves

The answers file is rewritten atomically after each batch (it is small: one row of
``n_layers`` numbers per answer, and per role at most
:data:`~persona_compass.token_budget.TOKEN_BUDGET_BYTES` of token rows), so a crash leaves the
previous commit or the new one. A resumed run skips every answer id already in it. A work
folder written before per-token projections were recorded (format ``/1``) resumes: its
answers have none (``token_rows`` None).
"""

from __future__ import annotations

import dataclasses
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

STORE_FORMAT = "persona-compass-calibration-answers/2"
READABLE_FORMATS = ("persona-compass-calibration-answers/1", STORE_FORMAT)
RUN_FILE = "run.json"
ANSWERS_FILE = "answers.safetensors"


@dataclass(frozen=True)
class AnswerRecord:
    """One recorded answer: which prompt and question, how many content tokens, the text,
    and how many of its per-token projections were kept (None: none were recorded)."""

    id: str
    role: str
    prompt_index: int
    question_id: int
    n_tokens: int
    response: str
    token_rows: int | None = None


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
        self._tokens: list[Tensor | None] = []
        if (self.root / ANSWERS_FILE).is_file():
            self._load()

    @property
    def path(self) -> Path:
        return self.root / ANSWERS_FILE

    def done(self) -> set[str]:
        """Ids of the answers already recorded."""
        return {r.id for r in self.records}

    def add(
        self,
        records: list[AnswerRecord],
        projections: Tensor,
        tokens: list[Tensor | None] | None = None,
    ) -> None:
        """Record a batch: ``projections`` (B, n_layers), NaN rows for empty answers, and
        per answer its kept per-token projections (n_kept, n_layers), or None if not
        recorded (``tokens`` None: none for the whole batch)."""
        if projections.ndim != 2 or projections.shape[0] != len(records):
            raise HubError(
                f"{len(records)} answers but projections of shape {tuple(projections.shape)}"
            )
        tokens = [None] * len(records) if tokens is None else list(tokens)
        if len(tokens) != len(records) or any(
            t is not None and (t.ndim != 2 or t.shape[1] != projections.shape[1]) for t in tokens
        ):
            raise HubError(
                f"{len(records)} answers need one (n_tokens, {projections.shape[1]}) token "
                "table each (or None)"
            )
        done = self.done()
        for rec, row, tok in zip(records, projections, tokens, strict=True):
            if rec.id in done:
                raise HubError(f"answer {rec.id} is already recorded in {self.path}")
            kept = None if tok is None else tok.detach().to("cpu", torch.float32).clone()
            self.records.append(
                dataclasses.replace(rec, token_rows=None if kept is None else kept.shape[0])
            )
            self._rows.append(row.detach().to("cpu", torch.float32).clone())
            self._tokens.append(kept)

    def commit(self) -> None:
        """Write every recorded answer (atomically: the old file or the new, never half)."""
        metadata = {
            "format": STORE_FORMAT,
            "records": json.dumps([asdict(r) for r in self.records]),
        }
        tensors = {"projections": torch.stack(self._rows).contiguous()}
        kept = [t for t in self._tokens if t is not None and t.shape[0]]
        if kept:
            tensors["tokens"] = torch.cat(kept).contiguous()
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

    def token_projections(self, *, default: bool) -> tuple[Tensor, int, int]:
        """The kept per-token projections (T, n_layers) of the default (or role-play)
        answers with content, how many answers gave them, and how many answers with content
        have none recorded (from a work folder of an earlier version)."""
        chosen = [
            tok
            for rec, tok in zip(self.records, self._tokens, strict=True)
            if (rec.role == DEFAULT_ROLE) == default and rec.n_tokens > 0
        ]
        have = [t for t in chosen if t is not None and t.shape[0]]
        missing = sum(1 for t in chosen if t is None)
        if not have:
            return torch.empty(0, 0), 0, missing
        rows = torch.cat(have)
        return rows[torch.isfinite(rows).all(dim=1)], len(have), missing

    def _load(self) -> None:
        fix = f"delete {self.path} to record the answers again"
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                meta = fh.metadata() or {}
                rows = fh.get_tensor("projections")
                names = set(fh.keys())  # noqa: SIM118 - safe_open has no __contains__
                tokens = fh.get_tensor("tokens") if "tokens" in names else None
        except (SafetensorError, OSError, KeyError) as exc:
            raise HubError(f"{self.path}: unreadable ({exc}); {fix}") from None
        if meta.get("format") not in READABLE_FORMATS:
            raise HubError(f"{self.path} is not a calibration answers file; {fix}")
        try:
            records = [AnswerRecord(**raw) for raw in json.loads(meta["records"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise HubError(f"{self.path}: unreadable answer records ({exc}); {fix}") from None
        if rows.ndim != 2 or rows.shape[0] != len(records):
            raise HubError(f"{self.path}: {len(records)} answers but {rows.shape[0]} rows; {fix}")
        counts = [r.token_rows or 0 for r in records]
        n_tokens = 0 if tokens is None else int(tokens.shape[0])
        if sum(counts) != n_tokens or (tokens is not None and tokens.shape[1] != rows.shape[1]):
            raise HubError(
                f"{self.path}: the answers list {sum(counts)} token rows but the file holds "
                f"{n_tokens}; {fix}"
            )
        if tokens is None:  # every count is 0
            tokens = torch.zeros(0, rows.shape[1])
        pieces = torch.split(tokens.to(torch.float32), counts)
        self.records = records
        self._rows = list(rows.to(torch.float32).unbind(0))
        self._tokens = [
            None if r.token_rows is None else piece
            for r, piece in zip(records, pieces, strict=True)
        ]

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
