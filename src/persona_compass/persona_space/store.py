"""The resumable extraction store: one self-contained state file per role, written atomically.

Layout of an extraction folder ``DIR``::

    DIR/run.json                      settings of the run (a resume must match them)
    DIR/.persona-compass.lock         held by the run writing the folder (one at a time)
    DIR/activations/{role}.safetensors  running sums per score bucket, sampled per-rollout
                                      means (float16), and the role's rollout records; one
                                      row per recorded layer (run.json's recorded_layers)
    DIR/responses/{role}.jsonl        the same records in the research release's layout
                                      (derived from the state file, rewritten with it)
    DIR/progress.json                 generation seconds spent so far, over every session
    DIR/token_projections/{role}.safetensors  per-token projections of the role's sampled
                                      answers on the final axis (the replay behind the
                                      per-token calibration, :mod:`.token_replay`), at most
                                      1 MB of values per role; tied to the axis they were
                                      read on, redone when it changes
    DIR/bundle/                       the axis bundle, once the run is complete

A role's state file is the commit point: it holds the records *and* the activation sums
they contributed, so a crash at any moment leaves each role either at its previous commit
or at the new one, never in between. The answer log is derived from it: whenever a role is
loaded, a log that disagrees with its state (a crash between the two writes, a truncated or
duplicated line, a deleted file) is rewritten from the state, with a warning. A resumed run
skips every rollout id found in the state files and redoes the rest: nothing is duplicated,
nothing is lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, read_json_object, write_json, write_text
from ..errors import PersonaCompassError
from ..run_folder import ResumeRule, RunFolder

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FORMAT = "persona-compass-role-state/1"
TOKENS_DIR = "token_projections"
TOKENS_FORMAT = "persona-compass-token-projections/1"
UNSCORED = "unscored"


class StoreError(PersonaCompassError):
    """The extraction folder is unreadable or belongs to a run with other settings."""


def bucket_of(score: int | None) -> str:
    """The running-sum bucket of a judge score (``s0``..``s3``; ``unscored`` for None)."""
    return UNSCORED if score is None else f"s{score}"


@dataclass
class RolloutRecord:
    """One rollout: who answered what, how long, and the judge's score."""

    id: str
    role: str
    prompt_index: int
    question_id: int
    system_prompt: str
    question: str
    response: str
    n_tokens: int
    score: int | None = None
    judge: str = ""

    def conversation(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [
            *messages,
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.response},
        ]

    def to_research(self) -> dict[str, Any]:
        """The research release's response record (plus our fields)."""
        return {
            "system_prompt": self.system_prompt,
            "label": self.role,
            "prompt_index": self.prompt_index,
            "question_index": self.question_id,
            "question": self.question,
            "conversation": self.conversation(),
            "id": self.id,
            "n_tokens": self.n_tokens,
            "score": self.score,
            "judge": self.judge,
        }


@dataclass
class RoleState:
    """A role's committed rollouts, running activation sums and sampled activations."""

    role: str
    records: dict[str, RolloutRecord] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # bucket -> (L, D) float32
    counts: dict[str, int] = field(default_factory=dict)  # bucket -> rollouts summed
    sample_ids: list[str] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)  # each (L, D) float16

    def add(
        self,
        record: RolloutRecord,
        mean: torch.Tensor | None,
        *,
        keep_sample: bool,
        bucket: str | None = None,
    ) -> None:
        """Add a finished rollout; ``mean`` (L, D) is None when it had no content tokens.

        Its activations go to ``bucket`` (default: the judge score's, :func:`bucket_of`)."""
        if record.id in self.records:
            raise StoreError(f"rollout {record.id} is already in the store")
        self.records[record.id] = record
        if mean is None:
            return
        bucket = bucket or bucket_of(record.score)
        mean = mean.detach().to("cpu", torch.float32)
        self.sums[bucket] = self.sums[bucket] + mean if bucket in self.sums else mean.clone()
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        if keep_sample:
            self.sample_ids.append(record.id)
            self.samples.append(mean.to(torch.float16))

    @property
    def n_rows(self) -> int | None:
        """Layers per stored activation (the recorded layers), None while nothing is stored."""
        for tensor in (*self.sums.values(), *self.samples):
            return int(tensor.shape[0])
        return None

    def mean(self, buckets: tuple[str, ...] | None = None) -> tuple[torch.Tensor | None, int]:
        """Mean activation over the given buckets (all when None) and the rollout count."""
        keys = [b for b in self.sums if buckets is None or b in buckets]
        count = sum(self.counts[b] for b in keys)
        if not count:
            return None, 0
        total = torch.stack([self.sums[b] for b in keys]).sum(0)
        return total / count, count

    # -- files ---------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        tensors = {f"sum/{b}": t.contiguous() for b, t in self.sums.items()}
        if self.samples:
            tensors["samples"] = torch.stack(self.samples).contiguous()
        if not tensors:  # safetensors needs at least one tensor
            tensors["empty"] = torch.zeros(1)
        metadata = {
            "format": STATE_FORMAT,
            "role": self.role,
            "counts": json.dumps(self.counts),
            "sample_ids": json.dumps(self.sample_ids),
            "records": json.dumps([asdict(r) for r in self.records.values()]),
        }
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: Path) -> RoleState:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:  # a truncated or foreign file
            raise StoreError(
                f"{path}: unreadable role state ({exc}); delete it to redo that role"
            ) from None
        if meta.get("format") != STATE_FORMAT:
            raise StoreError(
                f"{path}: not a persona-compass role state; delete it or use a new --out"
            )
        state = cls(meta["role"])
        for raw in json.loads(meta["records"]):
            rec = RolloutRecord(**raw)
            state.records[rec.id] = rec
        state.counts = {k: int(v) for k, v in json.loads(meta["counts"]).items()}
        state.sums = {k[4:]: v for k, v in tensors.items() if k.startswith("sum/")}
        state.sample_ids = list(json.loads(meta["sample_ids"]))
        if "samples" in tensors:
            state.samples = list(tensors["samples"].unbind(0))
        return state

    def research_jsonl(self) -> str:
        return "".join(json.dumps(r.to_research()) + "\n" for r in self.records.values())


class ExtractionStore:
    """The folder of one extraction run: settings, per-role states, research-format responses.

    The folder is held (locked) from opening until :meth:`close`, or the end of a ``with``
    block, so that two runs never write into it at once.
    """

    def __init__(
        self,
        root: str | Path,
        settings: dict[str, Any],
        *,
        resume_keys: tuple[str, ...],
        legacy: Mapping[str, Any] | None = None,
    ):
        """Open or create the store; an existing run must match ``settings`` on ``resume_keys``.

        ``legacy`` gives the value a resume key had before it was recorded: a run.json written
        by an older version that lacks the key is compared as if it held that value.
        """
        self.root = Path(root)
        self.settings = settings
        self.folder = RunFolder(
            self.root, settings_file=RUN_FILE, what="an extraction run", error=StoreError
        ).open()
        try:
            if self.folder.resume(settings, ResumeRule(resume_keys, dict(legacy or {}))) is None:
                self.folder.write_settings(settings)
            else:
                logger.info("resuming the run in %s", self.root)
            (self.root / "activations").mkdir(parents=True, exist_ok=True)
            (self.root / "responses").mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.folder.close()
            raise

    def close(self) -> None:
        """Let go of the folder (another run may then open it)."""
        self.folder.close()

    def __enter__(self) -> ExtractionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_settings(self, settings: dict[str, Any]) -> None:
        """Replace the run's settings record (a re-judged run records its new judge)."""
        self.settings = settings
        self.folder.write_settings(settings)

    def state_path(self, role: str) -> Path:
        return self.root / "activations" / f"{role}.safetensors"

    def responses_path(self, role: str) -> Path:
        return self.root / "responses" / f"{role}.jsonl"

    def load_role(self, role: str) -> RoleState:
        """The role's committed state; its answer log is repaired to agree with it."""
        path = self.state_path(role)
        if not path.exists():
            return RoleState(role)
        state = RoleState.load(path)
        self.repair_responses(state)
        return state

    def repair_responses(self, state: RoleState) -> bool:
        """Rewrite ``responses/{role}.jsonl`` from the state file when they disagree.

        The state file is the commit point; the log is derived from it. A crash between the
        two writes, a truncated, duplicated or edited line or a deleted file leaves a log
        that disagrees: it is rewritten, with a warning. Returns whether it was.
        """
        path = self.responses_path(state.role)
        expected = state.research_jsonl()
        try:
            actual: str | None = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            actual = None
        except (OSError, UnicodeDecodeError):
            actual = ""
        if actual == expected:
            return False
        have = 0 if actual is None else sum(1 for line in actual.splitlines() if line.strip())
        logger.warning(
            "%s: %s; rewritten from the role's state file (%d answers, the log had %d lines)",
            path,
            "missing" if actual is None else "disagreed with the role's state file",
            len(state.records),
            have,
        )
        write_text(path, expected)
        return True

    def commit(self, state: RoleState) -> None:
        """Write the role's state (the commit point), then its research-format responses."""
        state.save(self.state_path(state.role))
        write_text(self.responses_path(state.role), state.research_jsonl())

    @property
    def progress_path(self) -> Path:
        return self.root / "progress.json"

    def generation_seconds(self) -> float | None:
        """Seconds spent generating over every session of this run; None if never recorded."""
        if not self.progress_path.exists():
            return None
        fix = "delete the file (only the run's timing is lost)"
        try:
            value = read_json_object(self.progress_path, StoreError).get("generation_seconds")
        except StoreError as exc:
            raise StoreError(f"{exc}; {fix}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise StoreError(
                f"{self.progress_path}: generation_seconds is {value!r}, not a number of "
                f"seconds; {fix}"
            )
        return float(value)

    def record_generation_seconds(self, seconds: float) -> None:
        """Store the run's total generation time (after each committed batch)."""
        write_json(self.progress_path, {"generation_seconds": round(seconds, 3)})

    def token_path(self, role: str) -> Path:
        return self.root / TOKENS_DIR / f"{role}.safetensors"

    def save_tokens(
        self, role: str, rows: torch.Tensor, lengths: list[int], key: Mapping[str, Any]
    ) -> None:
        """Commit a role's replayed per-token projections (T, k), ``lengths`` rows per
        answer, under ``key`` (what they were computed from: axis, answers, share kept)."""
        if sum(lengths) != rows.shape[0]:
            raise StoreError(
                f"{len(lengths)} answers list {sum(lengths)} rows, not {rows.shape[0]}"
            )
        metadata = {
            "format": TOKENS_FORMAT,
            "key": json.dumps(dict(key), sort_keys=True),
            "lengths": json.dumps(lengths),
        }
        (self.root / TOKENS_DIR).mkdir(exist_ok=True)
        with atomic_path(self.token_path(role), suffix=".safetensors") as tmp:
            save_file(
                {"projections": rows.to(torch.float32).contiguous()}, str(tmp), metadata=metadata
            )

    def load_tokens(self, role: str, key: Mapping[str, Any]) -> torch.Tensor | None:
        """A role's committed per-token projections if they were made under ``key``; None
        when there are none, or they belong to another axis or sample (to be replayed)."""
        path = self.token_path(role)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                rows = fh.get_tensor("projections")
            lengths = json.loads(meta["lengths"])
        except Exception as exc:  # a foreign or damaged file is replayed, not trusted
            logger.warning("%s: unreadable (%s); replaying that role", path, exc)
            return None
        fresh = json.dumps(dict(key), sort_keys=True)
        if meta.get("format") != TOKENS_FORMAT or meta.get("key") != fresh:
            return None
        if sum(lengths) != rows.shape[0]:
            logger.warning("%s: row count disagrees with its answers; replaying that role", path)
            return None
        return rows

    def roles(self) -> Iterator[str]:
        for path in sorted((self.root / "activations").glob("*.safetensors")):
            yield path.stem

    def storage_bytes(self) -> dict[str, int]:
        """Bytes on disk per role (state file plus responses)."""
        out = {}
        for role in self.roles():
            size = self.state_path(role).stat().st_size
            resp = self.root / "responses" / f"{role}.jsonl"
            out[role] = size + (resp.stat().st_size if resp.exists() else 0)
        return out
