"""An axis bundle as one value: its axis, calibration, capping config and model, opened together.

Every command, the server, the evaluation runner and the engines open a bundle the same way:

    >>> bundle = Bundle.open("smollm2-135m")           # a folder, or a shipped alias
    >>> model, tok = bundle.load_model()                # the bundle's model, checked against it
    >>> bundle.axis, bundle.calibration, bundle.capping
    >>> bundle.digest()                                 # what exactly was used, for the record

The file names and format versions live in :mod:`persona_compass.bundle_format`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_dir, copy_contents, read_json_object
from .axis import Axis
from .bundle_format import BUNDLE_FILE, BUNDLE_FILES, CAPPING_FILE
from .bundles import resolve_bundle
from .calibration import Calibration
from .capping import CappingConfig
from .errors import AxisFileError, CappingConfigError
from .models import DEFAULT_ALIAS, load_model

# (name, size, mtime_ns) of each format file present: how a bundle notices that its folder
# changed after it was read, so that a digest never describes files other than those loaded.
_Stats = tuple[tuple[str, int, int], ...]

# Files are hashed in chunks so that a bundle of a 70B model is never read into memory whole.
_CHUNK = 1 << 20


@dataclass(frozen=True, eq=False, repr=False)
class Bundle:
    """An axis bundle: the axis (with its calibration), the capping config, the model id.

    Build one from parts (``Bundle(axis, capping)``) and :meth:`save` it, or :meth:`open` a
    folder or shipped alias. A bundle is immutable; ``dataclasses.replace(bundle, capping=cfg)``
    gives a new one (not tied to any folder until saved).

    Attributes:
        axis: the :class:`~persona_compass.Axis`; it carries the calibration.
        capping: the recommended :class:`~persona_compass.CappingConfig`, or None.
        folder: where the bundle was opened from or saved to; None for one built in memory.

    Raises:
        CappingConfigError: the capping config does not fit the axis (width or layers).

    Example:
        >>> bundle = Bundle.open("smollm2-135m")
        >>> model, tok = bundle.load_model()
        >>> session = CompassSession(model, tok, bundle.axis, bundle.capping)
    """

    axis: Axis
    capping: CappingConfig | None = None
    folder: Path | None = field(default=None, init=False)
    _info: dict[str, Any] | None = field(default=None, init=False, repr=False)
    _stats: _Stats = field(default=(), init=False, repr=False)
    _digest: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.axis, Axis):
            raise AxisFileError(f"axis must be an Axis, got {type(self.axis).__name__}")
        cap = self.capping
        if cap is None:
            return
        if not isinstance(cap, CappingConfig):
            raise CappingConfigError(
                f"capping must be a CappingConfig or None, got {type(cap).__name__}"
            )
        if cap.d_model != self.axis.d_model or max(cap.layers) >= self.axis.n_layers:
            raise CappingConfigError(
                f"the capping config {cap.name or '(unnamed)'} (width {cap.d_model}, layers up "
                f"to {max(cap.layers)}) does not fit the axis (width {self.axis.d_model}, "
                f"{self.axis.n_layers} layers); calibrate it on this axis "
                "(CappingConfig.calibrate) or use the capping config made for its model"
            )

    def __repr__(self) -> str:
        cap = "none" if self.capping is None else repr(self.capping.name or "(unnamed)")
        return (
            f"Bundle(folder={str(self.folder) if self.folder else None!r}, "
            f"model_id={self.model_id!r}, n_layers={self.axis.n_layers}, "
            f"d_model={self.axis.d_model}, calibrated={self.calibration is not None}, "
            f"capping={cap})"
        )

    # ---- parts ----------------------------------------------------------------------------

    @property
    def calibration(self) -> Calibration | None:
        """The percentile tables of reference projections (``calibration.json``), or None."""
        return self.axis.calibration

    @property
    def model_id(self) -> str | None:
        """The model the axis was extracted from (alias, hub id or path), if recorded."""
        return self.axis.model_id

    @property
    def metadata(self) -> dict[str, Any]:
        """The content of ``bundle.json`` (a copy): format and library versions, model id,
        fingerprint, shapes, monitor layer and the run's ``metadata`` (preset, roles...)."""
        info = self._info if self._info is not None else self.axis.bundle_info()
        return copy.deepcopy(info)

    def require_capping(self) -> CappingConfig:
        """The capping config, or a CappingConfigError saying the bundle has none."""
        if self.capping is None:
            where = f"the bundle {self.folder}" if self.folder else "this bundle"
            raise CappingConfigError(
                f"{where} has no capping config ({CAPPING_FILE}); calibrate one with "
                "CappingConfig.calibrate and save it, or import a reference file with "
                "CappingConfig.from_reference"
            )
        return self.capping

    # ---- the model ------------------------------------------------------------------------

    def model_spec(self, spec: str | os.PathLike[str] | None = None) -> str:
        """The model spec to load: ``spec`` if given, else the bundle's model id, else the
        library's default model (``smollm2-135m``)."""
        if spec:
            return os.fspath(spec)
        return self.model_id or DEFAULT_ALIAS

    def check_model(self, model: nn.Module, *, strict: bool = True) -> None:
        """Raise AxisFileError if the bundle does not fit ``model`` (see Axis.check_model)."""
        self.axis.check_model(model, strict=strict)

    def load_model(
        self,
        spec: str | os.PathLike[str] | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        strict: bool = True,
        **options: Any,
    ) -> tuple[Any, Any]:
        """Load ``spec`` (default: :meth:`model_spec`) and check it against the bundle.

        Args:
            spec: a model spec (alias, folder, ``.gguf`` or hub id); default the bundle's model.
            dtype: as for :func:`~persona_compass.load_model`.
            strict: a model of the same shape but another config fingerprint raises (True)
                or is logged (False).
            **options: more :func:`~persona_compass.load_model` options (``device``,
                ``device_map``, ``block_path``).

        Returns:
            ``(model, tokenizer)``, as :func:`~persona_compass.load_model` returns them.

        Raises:
            AxisFileError: the model does not fit the axis (layers, width or fingerprint).
        """
        model, tokenizer = load_model(self.model_spec(spec), dtype=dtype, **options)
        self.check_model(model, strict=strict)
        return model, tokenizer

    # ---- files ----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        spec: str | os.PathLike[str],
        *,
        model: nn.Module | None = None,
        strict: bool = True,
    ) -> Bundle:
        """Read a bundle folder, or the bundle shipped under an alias (e.g. ``smollm2-135m``).

        Args:
            spec: a folder path (tried first) or a shipped alias.
            model: if given, the bundle is checked against it (layers, width, fingerprint).
            strict: see :meth:`check_model`.

        Raises:
            AxisFileError: ``spec`` is neither a folder nor a shipped alias (the message lists
                the aliases), the folder is not a readable bundle, or ``model`` does not fit.
            CappingConfigError: ``capping.json`` is unreadable or does not fit the axis.
        """
        folder = resolve_bundle(os.fspath(spec))
        stats = _file_stats(folder) if folder.is_dir() else ()
        axis = Axis.load(folder)
        info = read_json_object(folder / BUNDLE_FILE, AxisFileError)
        bundle = cls(axis, CappingConfig.load_optional(folder))
        bundle._place(folder, info, stats)
        if model is not None:
            bundle.check_model(model, strict=strict)
        return bundle

    @classmethod
    def from_hub(
        cls, source: str, model: str | os.PathLike[str], out: str | os.PathLike[str], **options: Any
    ) -> Bundle:
        """Import a published axis folder (``hf:OWNER/REPO[/SUBFOLDER][@REVISION]``) as a bundle
        at ``out`` and open it; ``options`` go to
        :func:`persona_compass.hub.import_from_hub` (``repo_type``, ``experiment``, ``force``,
        ``local_files_only``, ...)."""
        from .hub import import_from_hub

        return cls.open(import_from_hub(source, model, out, **options).bundle)

    def calibrate(self, model: Any, **options: Any) -> Bundle:
        """Record default and role-play answers of ``model`` and write this (saved) bundle's
        calibration; returns the bundle reopened. ``options`` go to
        :func:`persona_compass.hub.calibrate_bundle` (``engine``, ``settings``, ``work_dir``,
        ``force``, ...); it resumes after a crash."""
        from .hub import calibrate_bundle

        if self.folder is None:
            raise AxisFileError("calibrate needs a saved bundle; call save(folder) first")
        calibrate_bundle(self.folder, model, **options)
        return Bundle.open(self.folder)

    def push(self, target: str, **options: Any) -> Any:
        """Publish this (saved) bundle to ``hf:OWNER/REPO[/SUBFOLDER][@BRANCH]`` with a
        generated model card; ``options`` go to :func:`persona_compass.hub.push_bundle`
        (``repo_type``, ``private``, ``dry_run``, ...). Returns its ``PushResult``."""
        from .hub import push_bundle

        if self.folder is None:
            raise AxisFileError("push needs a saved bundle; call save(folder) first")
        return push_bundle(self.folder, target, **options)

    def save(self, folder: str | os.PathLike[str]) -> Bundle:
        """Write the bundle into ``folder`` whole or not at all; returns it, tied to the folder.

        Every part is written into a temporary sibling folder, which then takes ``folder``'s
        place in one rename: a crash or an error while writing leaves ``folder`` as it was
        (or, between the two renames of a replacement, absent), never a half-written bundle.
        Re-saving over an existing bundle replaces all of its format files (a stale
        ``calibration.json`` or ``capping.json`` does not survive) and keeps its other files
        (``report.md``, charts). A ``folder`` that is a symbolic link keeps the link.

        Raises:
            AxisFileError: ``folder`` is a file, or a non-empty folder that is not a bundle.
        """
        target = Path(folder).expanduser()
        if target.is_symlink():
            target = target.resolve()
        if target.exists() and not target.is_dir():
            raise AxisFileError(f"{target} is a file; an axis bundle is a folder")
        existing = target.is_dir() and any(target.iterdir())
        if existing and not (target / BUNDLE_FILE).is_file():
            raise AxisFileError(
                f"{target} is a non-empty folder but not an axis bundle (no {BUNDLE_FILE}); "
                "save into a new or empty folder"
            )
        with atomic_dir(target) as tmp:
            self.axis.save(tmp)
            if self.capping is not None:
                self.capping.save(tmp)
            if existing:
                copy_contents(target, tmp, skip=BUNDLE_FILES)
        saved = Bundle(self.axis, self.capping)
        saved._place(target, self.axis.bundle_info(), _file_stats(target))
        return saved

    def digest(self) -> str:
        """A sha256 (64 hex digits) of the bundle's format files.

        It covers the contents of ``axis.safetensors``, ``bundle.json``, ``calibration.json``,
        ``capping.json`` and ``capping.safetensors``, those present, under their names: the
        hash of the sorted lines ``name NUL sha256(content)``. Other files (reports, charts)
        and the folder's path are not covered: a copy of a bundle has its digest. A bundle
        built in memory has the digest its saved files will have.

        Raises:
            AxisFileError: the folder's files changed since the bundle was read; open it again.
        """
        if self._digest:
            return self._digest[0]
        if self.folder is None:
            with tempfile.TemporaryDirectory(prefix="persona-compass-digest-") as tmp:
                return self.save(Path(tmp) / "bundle").digest()
        if _file_stats(self.folder) != self._stats:
            raise AxisFileError(
                f"the bundle files in {self.folder} changed after they were read; "
                "open the bundle again (Bundle.open) to use and digest what is there now"
            )
        h = hashlib.sha256()
        for name, _, _ in self._stats:
            h.update(f"{name}\0{_file_sha256(self.folder / name)}\n".encode())
        self._digest.append(h.hexdigest())
        return self._digest[0]

    def _place(self, folder: Path, info: dict[str, Any], stats: _Stats) -> None:
        """Tie a freshly built bundle to the folder it was read from or written to."""
        object.__setattr__(self, "folder", folder)
        object.__setattr__(self, "_info", info)
        object.__setattr__(self, "_stats", stats)


def _file_stats(folder: Path) -> _Stats:
    stats = []
    for name in sorted(BUNDLE_FILES):
        path = folder / name
        if path.is_file():
            st = path.stat()
            stats.append((name, st.st_size, st.st_mtime_ns))
    return tuple(stats)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def open_trait_bundles(specs: Any, beside: Axis) -> list[Bundle]:
    """Open trait needle bundles (folders, aliases or opened bundles) to read beside ``beside``.

    Each must be a trait bundle (``extract --trait``) of the same model, and each trait name
    may come once; raises :class:`AxisFileError` or
    :class:`~persona_compass.errors.PersonaCompassError` naming the bundle otherwise.
    """
    from .monitor import needle_names

    bundles = []
    for spec in specs:
        try:
            bundle = spec if isinstance(spec, Bundle) else Bundle.open(spec)
        except AxisFileError as exc:
            raise AxisFileError(f"trait {str(spec)!r}: {exc}") from None
        label = str(bundle.folder or spec)
        meta = bundle.axis.metadata or {}
        if meta.get("kind") != "trait" or not meta.get("trait"):
            raise AxisFileError(
                f"trait {label!r} is not a trait bundle (its bundle.json has no kind 'trait'); "
                "pass a bundle made by `persona-compass extract --trait NAME` (e.g. "
                "smollm2-135m-sycophancy)"
            )
        bundle.axis.check_compatible(beside)
        bundles.append(bundle)
    needle_names([b.axis for b in bundles])  # each trait name once
    return bundles
