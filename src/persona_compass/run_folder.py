"""A long run's output folder: made or resumed, held by one process at a time, with a settings
record that a resumed run must match.

Extraction (``run.json``) and evaluation (``settings.json``) keep their runs in such a folder:

* a settings dataclass says, next to each field, whether a resumed run must match it
  (``field(metadata=must_match())``) or may change it (``field(metadata=MAY_CHANGE)``: speed,
  selection, presentation); :meth:`ResumeRule.of` reads that declaration;
* :class:`RunFolder` makes the folder or reopens it, refuses a folder that holds something
  else, locks it against a second process writing into it, compares a resumed run's recorded
  settings with the new ones (naming every differing key with both values) and writes the
  settings record atomically.

Example:
    >>> with RunFolder(out, settings_file="run.json", what="a run").open() as folder:
    ...     folder.resume(record, ResumeRule.of(MySettings))
    ...     folder.write_settings(record)
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Any, ClassVar

from .atomic import read_json_object, write_json
from .errors import PersonaCompassError

logger = logging.getLogger(__name__)

LOCK_FILE = ".persona-compass.lock"
"""The file in a run folder whose lock says that a process is writing the run."""

RESUME = "persona_compass.resume"
"""The field-metadata key of a settings field's resume declaration."""


class RunFolderError(PersonaCompassError):
    """A run folder that cannot be used: foreign, held by another run, or other settings."""


class _Unset:
    """No legacy value: a record without the key differs from any new value but None."""


_UNSET = _Unset()


def must_match(*recorded: str, legacy: Any = _UNSET) -> Mapping[str, Any]:
    """Field metadata: a resumed run must have recorded the same value as the new run.

    Args:
        recorded: the record's keys to compare (default: the field's own name). Name what the
            run derives from the field when that is what the stored results depend on, such as
            a file's digest rather than its path.
        legacy: what a record written before the key existed stands for (one key only).

    Example:
        >>> engine: str = field(default="hf", metadata=must_match(legacy="hf"))
    """
    if not isinstance(legacy, _Unset) and len(recorded) > 1:
        raise TypeError("legacy= describes one recorded key; declare the others without it")
    return MappingProxyType({RESUME: (recorded, legacy)})


MAY_CHANGE: Mapping[str, Any] = MappingProxyType({RESUME: None})
"""Field metadata: speed, selection or presentation, free to change when a run resumes."""


@dataclass(frozen=True)
class ResumeRule:
    """The recorded keys a resumed run must match, and what an older record meant by a key
    it lacks (``legacy``)."""

    keys: tuple[str, ...]
    legacy: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, settings_class: type) -> ResumeRule:
        """The rule a settings dataclass declares on its fields (in field order).

        Raises:
            TypeError: a field declares neither :func:`must_match` nor :data:`MAY_CHANGE` (so
                a new setting cannot be added without deciding).
        """
        keys: list[str] = []
        legacy: dict[str, Any] = {}
        for f in dataclasses.fields(settings_class):
            if RESUME not in f.metadata:
                raise TypeError(
                    f"{settings_class.__name__}.{f.name} does not say whether a resumed run must "
                    "match it; declare it with field(metadata=must_match()) or "
                    "field(metadata=MAY_CHANGE)"
                )
            declared = f.metadata[RESUME]
            if declared is None:
                continue
            recorded, old = declared
            for key in recorded or (f.name,):
                if key not in keys:
                    keys.append(key)
                if not isinstance(old, _Unset):
                    legacy[key] = old
        return cls(tuple(keys), legacy)

    def differences(self, previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
        """``key: old -> new`` for every key whose values differ; a key ``previous`` lacks
        counts as its legacy value (None when it has none)."""
        out = []
        for key in self.keys:
            old, new = previous.get(key, self.legacy.get(key)), current.get(key)
            if old != new:
                out.append(f"{key}: {old!r} -> {new!r}")
        return out


class RunFolder:
    """A run's output folder, held by this process from :meth:`open` until :meth:`close`.

    Args:
        root: the folder (made when missing).
        settings_file: the name of the settings record in it.
        what: what the folder holds, for messages (``"an evaluation"``).
        error: the exception type raised for a folder that cannot be used.
        fmt: the ``format`` value the record must hold (None: not checked).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        settings_file: str,
        what: str,
        error: type[PersonaCompassError] = RunFolderError,
        fmt: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.settings_path = self.root / settings_file
        self.what = what
        self.error = error
        self.fmt = fmt
        self._lock: _Lock | None = None

    def open(self) -> RunFolder:
        """Make the folder when it is missing and lock it for this process.

        Files whose names start with a dot (the lock, a desktop's index) do not make a folder
        foreign.

        Raises:
            error: the folder holds files but no settings record, or another run holds it.
        """
        if self.root.exists() and not self.root.is_dir():
            raise self.error(f"{self.root} is a file, not a folder; choose a new --out")
        if not self.settings_path.exists() and self.root.exists():
            if any(not p.name.startswith(".") for p in self.root.iterdir()):
                raise self.error(
                    f"{self.root} is not empty and holds no {self.settings_path.name}; "
                    "choose a new --out"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock.take(self.root / LOCK_FILE, self.error)
        return self

    def close(self) -> None:
        """Let go of the folder (another run may then open it)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def read_settings(self) -> dict[str, Any] | None:
        """The recorded settings; None in a new folder.

        Raises:
            error: the record cannot be read, or is another program's file.
        """
        path = self.settings_path
        if not path.exists():
            return None
        try:
            data = read_json_object(path, self.error)
        except self.error as exc:
            raise self.error(f"{exc}; choose a new --out") from None
        if self.fmt is not None and data.get("format") != self.fmt:
            raise self.error(
                f"{path} is not the settings record of {self.what} (its format is "
                f"{data.get('format')!r}, not {self.fmt!r}); choose a new --out"
            )
        return data

    def resume(
        self,
        settings: Mapping[str, Any],
        rule: ResumeRule,
        *,
        force: bool = False,
        force_option: str | None = None,
    ) -> dict[str, Any] | None:
        """Check the recorded settings against the new ``settings``; return the recorded ones
        (None in a new folder).

        Args:
            settings: the new run's settings record.
            rule: which keys must match.
            force: go on although keys differ (logged); only for runs that can redo what the
                change affects.
            force_option: how the refusal offers forcing (``"pass --force to ..."``).

        Raises:
            error: a key of ``rule`` differs and ``force`` is off; the message names each key
                with both values and says to rerun with the same settings or use a new --out.
        """
        previous = self.read_settings()
        if previous is None:
            return None
        diffs = rule.differences(previous, settings)
        if diffs and not force:
            ways = [
                f"rerun with the same settings (see {self.settings_path})",
                "choose a new --out",
            ]
            if force_option:
                ways.append(force_option)
            raise self.error(
                f"{self.root} holds {self.what} made with other settings ({'; '.join(diffs)}); "
                f"{', '.join(ways[:-1])}, or {ways[-1]}"
            )
        if diffs:
            logger.warning(
                "%s: settings changed (%s); forced, so the run goes on with the new ones",
                self.root,
                "; ".join(diffs),
            )
        return previous

    def write_settings(self, settings: Mapping[str, Any]) -> None:
        """Write the settings record (atomically: the old record or the new, never half)."""
        write_json(self.settings_path, dict(settings))


class _Lock:
    """A held run-folder lock: an exclusive POSIX record lock on the lock file.

    POSIX locks (``lockf``) rather than ``flock``: a child process forked while the lock is
    held (a vLLM engine's workers) does not inherit them, so a killed run's folder is free as
    soon as the run itself is gone, and they also work on network filesystems. They do not
    conflict within one process, so the process keeps its own register of held folders.
    """

    _held: ClassVar[set[Path]] = set()
    # re-entrant: a dropped lock may be finalized by the garbage collector inside take()
    _guard: ClassVar[threading.RLock] = threading.RLock()

    def __init__(self, path: Path, handle: IO[bytes] | None) -> None:
        # a folder dropped without close() lets go too, when it is collected
        self._finalizer = weakref.finalize(self, _Lock._drop, path, handle)

    @classmethod
    def _drop(cls, path: Path, handle: IO[bytes] | None) -> None:
        with cls._guard:
            if handle is not None:
                handle.close()  # closing the file drops the process's lock on it
            cls._held.discard(path)

    @classmethod
    def take(cls, path: Path, error: type[PersonaCompassError]) -> _Lock:
        """Lock ``path`` for this process (released by :meth:`release` or when the process
        ends, however it ends).

        Raises:
            error: another process, or another open folder of this one, holds the lock.
        """
        key = path.resolve()
        with cls._guard:
            if key in cls._held:
                raise _in_use(error, path, f"pid {os.getpid()} on {socket.gethostname()}")
            try:
                import fcntl
            except ImportError:  # pragma: no cover - Windows: only this process's register
                cls._held.add(key)
                return cls(key, None)
            handle = open(path, "a+b")  # noqa: SIM115 - kept open while the folder is held
            try:
                fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):  # a filesystem without locks
                    logger.warning(
                        "cannot lock %s (%s); nothing stops a second run writing here", path, exc
                    )
                else:
                    handle.seek(0)
                    holder = handle.read().decode("utf-8", "replace").strip()
                    handle.close()  # this process holds no lock on the file: nothing to lose
                    raise _in_use(error, path, holder or "a process") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            handle.flush()
            cls._held.add(key)
            return cls(key, handle)

    def release(self) -> None:
        self._finalizer()  # runs once


def _in_use(error: type[PersonaCompassError], path: Path, holder: str) -> PersonaCompassError:
    return error(
        f"{path.parent} is in use by another run ({holder} holds {path.name}); two runs must "
        "not write into one folder: wait for that run to end, or choose a new --out"
    )
