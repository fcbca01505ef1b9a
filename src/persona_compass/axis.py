"""The Assistant Axis as a value object: per-layer directions, projection, bundle files.

``axis[l] = mean(default activations)[l] - mean(role vectors)[l]`` points toward the
Assistant persona at block ``l``; the projection ``h · axis[l] / |axis[l]|`` is the persona
coordinate (high = Assistant-like, low = drifted). An axis lives on disk as a bundle folder
(``axis.safetensors`` + ``bundle.json`` + optional ``calibration.json``, ``capping.json``...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import __version__
from .atomic import atomic_dir, copy_contents, read_json_object
from .bundle_format import AXIS_FILE, BUNDLE_FILE, BUNDLE_FORMAT_VERSION, CALIBRATION_FILE
from .calibration import Calibration
from .errors import AxisFileError, LayerError, PersonaCompassError, UnsafeFileError
from .layers import find_decoder_blocks, normalize_layer

logger = logging.getLogger(__name__)

AXIS_KEY = "axis"
RESIDUAL_NORMS_KEY = "residual_norms"
_RESERVED = (AXIS_KEY, RESIDUAL_NORMS_KEY)

FINGERPRINT_FIELDS: tuple[str, ...] = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)

# Rows shorter than this are treated as zero: they have no direction to project on.
_MIN_NORM = 1e-12


def text_config(model_or_config: Any) -> Any:
    """The config that describes the language model (the text part of multimodal wrappers)."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        config = getter()
    return config


def _config_value(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def model_fingerprint(model_or_config: Any) -> str:
    """A short stable hash of the architecture-defining config fields.

    Two checkpoints of one architecture (a base model and its fine-tune) share a fingerprint;
    it only guards against using an axis on a model of a different shape or family.

    Args:
        model_or_config: a model (its ``.config`` is used), a config object or a dict.

    Returns:
        16 hex characters of a sha256 over ``FINGERPRINT_FIELDS``.
    """
    config = text_config(model_or_config)
    fields = {key: _config_value(config, key) for key in FINGERPRINT_FIELDS}
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def unit_rows(directions: Tensor) -> Tensor:
    """Row-normalise (..., D) in float32; zero rows stay zero.

    Rows that are already unit length (to float32 rounding) are returned unchanged, so that
    normalising twice gives the same bits: capping configs built from an axis can then be
    recognised as "the axis unit vectors" exactly.
    """
    x = directions.to(torch.float32)
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    is_unit = (norms - 1.0).abs() <= 1e-6
    safe = torch.where(norms > _MIN_NORM, norms, torch.ones_like(norms))
    scaled = torch.where(norms > _MIN_NORM, x / safe, torch.zeros_like(x))
    return torch.where(is_unit, x, scaled)


def safe_torch_load(
    path: str | os.PathLike[str],
    *,
    what: str = "reference axis file",
    error: type[PersonaCompassError] = AxisFileError,
) -> Any:
    """Load a ``.pt`` file with ``weights_only=True`` and nothing else.

    Raises:
        UnsafeFileError: the pickle asks for anything beyond tensors and plain containers
            (it could run code); it was refused before any of it ran.
        ``error``: the file is missing or unreadable.
    """
    target = Path(path)
    if not target.is_file():
        raise error(f"no {what} at {target}; check the path")
    try:
        return torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeFileError(
            f"refused to load {target}: it is not a plain tensor file, and loading it fully "
            f"could run code from it (weights_only loader: {reason}). Nothing from it ran. "
            "Only use .pt files you trust, or ask for a safetensors version."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise error(f"cannot read {what} {target}: {exc}") from None


@dataclass(frozen=True, eq=False, repr=False)
class Axis:
    """A model's Assistant Axis: one direction per decoder block.

    Attributes:
        directions: (n_layers, d_model) float32, unnormalised (default mean minus role mean).
        model_id: the model it was extracted from (HF id, alias or path).
        fingerprint: :func:`model_fingerprint` of that model.
        monitor_layer: block used for monitoring and steering; None means ``n_layers // 2``.
        vectors: extra (n_layers, d_model) vectors, e.g. ``"default"``, ``"role/pirate"``.
        residual_norms: (n_layers,) typical residual-stream norm per block (relative steering).
        calibration: percentile table of reference projections.
        metadata: JSON-ready facts (preset, judge, roles and counts, command, date...).
        library_version: the persona-compass version that made it.

    Example:
        >>> axis = Axis.load("axes/smollm2-135m")
        >>> axis.project(hidden)            # (..., d_model) at axis.layer -> (...) float32
        >>> axis.project(hidden, layer=20)
    """

    directions: Tensor
    model_id: str | None = None
    fingerprint: str | None = None
    monitor_layer: int | None = None
    vectors: Mapping[str, Tensor] = field(default_factory=dict)
    residual_norms: Tensor | None = None
    calibration: Calibration | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    library_version: str = __version__
    _units: dict[torch.device, Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _nonzero: tuple[bool, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        d = self.directions
        if not isinstance(d, Tensor):
            raise AxisFileError(f"directions must be a torch.Tensor, got {type(d).__name__}")
        if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
            raise AxisFileError(
                f"directions have shape {tuple(d.shape)}; an axis is (n_layers, d_model)"
            )
        if not d.is_floating_point():
            raise AxisFileError(f"directions must be real floating point, got {d.dtype}")
        d = d.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(d).all():
            bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(d))[:, 0]})
            raise AxisFileError(f"directions contain NaN or infinity at layers {bad[:10]}")
        norms = torch.linalg.vector_norm(d, dim=1)
        if not (norms > _MIN_NORM).any():
            raise AxisFileError("every row of directions is zero; the axis has no direction")
        object.__setattr__(self, "directions", d)
        object.__setattr__(self, "_nonzero", tuple(bool(n > _MIN_NORM) for n in norms))
        n_layers, d_model = d.shape

        if self.monitor_layer is not None:
            try:
                layer = normalize_layer(self.monitor_layer, n_layers, name="monitor_layer")
            except LayerError as exc:
                raise AxisFileError(str(exc)) from None
            object.__setattr__(self, "monitor_layer", layer)
        if not self._nonzero[self.layer]:
            raise AxisFileError(
                f"the axis is zero at its monitor layer {self.layer}; "
                "pass monitor_layer= a layer where it is not"
            )

        for name in ("model_id", "fingerprint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise AxisFileError(f"{name}={value!r} must be a string or None")

        vectors: dict[str, Tensor] = {}
        for name, vec in dict(self.vectors).items():
            if not isinstance(name, str) or not name or name in _RESERVED:
                raise AxisFileError(
                    f"vector name {name!r} is not allowed; use a non-empty string other than "
                    f"{' or '.join(_RESERVED)} (e.g. 'default', 'role/pirate')"
                )
            if not isinstance(vec, Tensor) or tuple(vec.shape) != (n_layers, d_model):
                shape = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
                raise AxisFileError(
                    f"vector {name!r} has shape {shape}; expected ({n_layers}, {d_model}) "
                    "like the axis"
                )
            vec = vec.detach().to(device="cpu", dtype=torch.float32).contiguous()
            if not torch.isfinite(vec).all():
                raise AxisFileError(f"vector {name!r} contains NaN or infinity")
            vectors[name] = vec
        object.__setattr__(self, "vectors", MappingProxyType(vectors))

        if self.residual_norms is not None:
            rn = self.residual_norms
            if not isinstance(rn, Tensor) or tuple(rn.shape) != (n_layers,):
                shape = tuple(rn.shape) if isinstance(rn, Tensor) else type(rn).__name__
                raise AxisFileError(
                    f"residual_norms has shape {shape}; expected ({n_layers},), one per layer"
                )
            rn = rn.detach().to(device="cpu", dtype=torch.float32).contiguous()
            if not torch.isfinite(rn).all() or (rn < 0).any():
                raise AxisFileError("residual_norms must be finite and non-negative")
            object.__setattr__(self, "residual_norms", rn)

        if self.calibration is not None:
            if not isinstance(self.calibration, Calibration):
                raise AxisFileError(
                    f"calibration must be a Calibration, got {type(self.calibration).__name__}"
                )
            if self.calibration.n_layers != n_layers:
                raise AxisFileError(
                    f"calibration covers {self.calibration.n_layers} layers but the axis has "
                    f"{n_layers}; recalibrate with Calibration.from_projections"
                )

        metadata = dict(self.metadata)
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise AxisFileError(
                f"metadata must be JSON-serialisable (str, numbers, lists, dicts): {exc}"
            ) from None
        object.__setattr__(self, "metadata", MappingProxyType(metadata))

    # Read-only mapping proxies cannot be pickled: copy and pickle through plain dicts.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(vectors=dict(self.vectors), metadata=dict(self.metadata), _units={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["vectors"] = MappingProxyType(dict(state["vectors"]))
        state["metadata"] = MappingProxyType(dict(state["metadata"]))
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        extra = ", ".join(self.vectors) or "none"
        return (
            f"Axis(model_id={self.model_id!r}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, layer={self.layer}, vectors=[{extra}], "
            f"calibrated={self.calibration is not None})"
        )

    # ---- shape and directions -------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return int(self.directions.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[1])

    @property
    def layer(self) -> int:
        """The effective monitor layer: ``monitor_layer`` or the middle block."""
        return self.monitor_layer if self.monitor_layer is not None else self.n_layers // 2

    def _resolve(self, layer: int | None) -> int:
        if layer is None:
            return self.layer
        return normalize_layer(layer, self.n_layers)

    def _units_on(self, device: torch.device) -> Tensor:
        """(L, D) float32 unit directions on ``device``, computed once per device."""
        units = self._units.get(device)
        if units is None:
            units = self._units.get(torch.device("cpu"))
            if units is None:
                units = unit_rows(self.directions)
                self._units[torch.device("cpu")] = units
            if units.device != device:
                units = units.to(device)
                self._units[device] = units
        return units

    def _check_row(self, layer: int) -> None:
        if not self._nonzero[layer]:
            raise AxisFileError(
                f"the axis is zero at layer {layer}; it has no direction there, use another layer"
            )

    def unit(self, layer: int | None = None) -> Tensor:
        """(d_model,) float32 unit axis at ``layer`` (default: the monitor layer)."""
        idx = self._resolve(layer)
        self._check_row(idx)
        return self._units_on(torch.device("cpu"))[idx]

    def units(self) -> Tensor:
        """(n_layers, d_model) float32 unit axes (rows where the axis is zero stay zero)."""
        return self._units_on(torch.device("cpu"))

    def project(self, hidden: Tensor, layer: int | None = None) -> Tensor:
        """Persona coordinate ``hidden · axis[l] / |axis[l]|``, computed in float32.

        Args:
            hidden: (..., d_model) activations of block ``layer``'s output, any dtype/device.
            layer: block index (negative counts from the end); default: the monitor layer.

        Returns:
            (...) float32 on ``hidden``'s device.
        """
        idx = self._resolve(layer)
        if hidden.shape[-1] != self.d_model:
            raise AxisFileError(
                f"hidden has last dimension {hidden.shape[-1]} but the axis has d_model="
                f"{self.d_model}; project activations of the model the axis was made for"
            )
        self._check_row(idx)
        unit = self._units_on(hidden.device)[idx]
        return torch.matmul(hidden.to(torch.float32), unit)

    # ---- model compatibility --------------------------------------------------------------

    def check_model(self, model: nn.Module, *, strict: bool = True) -> None:
        """Raise AxisFileError if this axis does not fit ``model``.

        Layer count and hidden size must match. A different config fingerprint (same shape,
        different architecture) raises too, unless ``strict=False``: then it is logged.
        """
        config = text_config(model)
        n_layers = _config_value(config, "num_hidden_layers")
        d_model = _config_value(config, "hidden_size")
        if n_layers is None:
            n_layers = len(find_decoder_blocks(model))
        name = _config_value(config, "_name_or_path") or type(model).__name__
        if n_layers != self.n_layers or (d_model is not None and d_model != self.d_model):
            raise AxisFileError(
                f"the axis ({self.model_id or 'unknown model'}) has {self.n_layers} layers x "
                f"{self.d_model} but the model {name} has {n_layers} layers x {d_model}; "
                "load the model the axis was made for, or extract an axis for this model"
            )
        if self.fingerprint is None:
            return
        found = model_fingerprint(model)
        if found != self.fingerprint:
            msg = (
                f"the axis was made for {self.model_id or 'another model'} (fingerprint "
                f"{self.fingerprint}) but the model {name} has fingerprint {found}: same shape, "
                "different architecture config"
            )
            if strict:
                raise AxisFileError(msg + "; pass strict=False to use the axis anyway")
            logger.warning("%s; using the axis anyway (strict=False)", msg)

    def check_compatible(self, other: Axis) -> None:
        """Raise AxisFileError unless this axis and ``other`` come from one model (same layers,
        width and, where both record one, config fingerprint): a trait needle beside the
        Assistant Axis must read the same model."""
        fingerprints = {self.fingerprint, other.fingerprint} - {None}
        if (self.n_layers, self.d_model) == (other.n_layers, other.d_model) and len(
            fingerprints
        ) <= 1:
            return

        def described(axis: Axis) -> str:
            name = (axis.metadata or {}).get("trait") or "assistant"
            return (
                f"{name} ({axis.model_id or 'unknown model'}, {axis.n_layers} layers x "
                f"{axis.d_model}, fingerprint {axis.fingerprint})"
            )

        raise AxisFileError(
            f"the axes {described(self)} and {described(other)} come from different models; "
            "use bundles extracted from the same model"
        )

    # ---- files ----------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        tensors = {AXIS_KEY: self.directions}
        tensors.update(self.vectors)
        if self.residual_norms is not None:
            tensors[RESIDUAL_NORMS_KEY] = self.residual_norms
        return tensors

    def bundle_info(self) -> dict[str, Any]:
        """The content of ``bundle.json``."""
        return {
            "format_version": BUNDLE_FORMAT_VERSION,
            "library_version": self.library_version,
            "model_id": self.model_id,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "monitor_layer": self.monitor_layer,
            "metadata": dict(self.metadata),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle folder atomically; returns its path.

        Files of the bundle that the axis does not own (``capping.json``, reports...) are
        kept. A stale ``calibration.json`` is dropped when the axis has no calibration.

        Raises:
            AxisFileError: ``path`` is a file, or a non-empty folder that is not a bundle.
        """
        target = Path(path)
        if target.exists() and not target.is_dir():
            raise AxisFileError(f"{target} is a file; an axis bundle is a folder")
        if target.is_dir() and any(target.iterdir()) and not (target / BUNDLE_FILE).is_file():
            raise AxisFileError(
                f"{target} is a non-empty folder but not an axis bundle (no {BUNDLE_FILE}); "
                "save into a new or empty folder"
            )
        own = {AXIS_FILE, BUNDLE_FILE, CALIBRATION_FILE}
        with atomic_dir(target) as tmp:
            if target.is_dir():
                copy_contents(target, tmp, skip=own)
            # One metadata key: safetensors writes several in a random order, and the same
            # axis must give the same bytes (bundle digests). bundle.json has the version.
            save_file(
                self._tensors(),
                str(tmp / AXIS_FILE),
                metadata={"format": "persona-compass-axis"},
            )
            (tmp / BUNDLE_FILE).write_text(
                json.dumps(self.bundle_info(), indent=2) + "\n", encoding="utf-8"
            )
            if self.calibration is not None:
                self.calibration.save(tmp / CALIBRATION_FILE)
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        strict: bool = True,
    ) -> Axis:
        """Read an axis bundle folder (or a shipped bundle's alias, e.g. ``"smollm2-135m"``);
        with ``model``, check that it fits (see check_model)."""
        from .bundles import shipped_bundles

        folder = Path(path)
        if not folder.exists() and str(path) in shipped_bundles():
            folder = shipped_bundles()[str(path)]
        if not folder.exists():
            raise AxisFileError(
                f"no axis bundle at {folder}; make one with `persona-compass extract` or "
                "import a reference file with `persona-compass axis import`"
            )
        if not folder.is_dir():
            hint = (
                "; for a reference .pt file use Axis.from_reference"
                if folder.suffix == ".pt"
                else ""
            )
            raise AxisFileError(f"{folder} is a file; an axis bundle is a folder{hint}")
        info = _read_bundle_info(folder)
        tensors = _read_tensors(folder / AXIS_FILE)
        if AXIS_KEY not in tensors:
            raise AxisFileError(
                f"{folder / AXIS_FILE} has no {AXIS_KEY!r} tensor (found {sorted(tensors)})"
            )
        directions = tensors.pop(AXIS_KEY)
        expected = (info["n_layers"], info["d_model"])
        if tuple(directions.shape) != expected:
            raise AxisFileError(
                f"{folder / AXIS_FILE}: axis has shape {tuple(directions.shape)} but "
                f"{BUNDLE_FILE} says {expected}; the bundle is inconsistent, re-save it"
            )
        residual_norms = tensors.pop(RESIDUAL_NORMS_KEY, None)
        calibration = None
        if (folder / CALIBRATION_FILE).is_file():
            calibration = Calibration.load(folder / CALIBRATION_FILE)
        try:
            axis = cls(
                directions=directions,
                model_id=info.get("model_id"),
                fingerprint=info.get("fingerprint"),
                monitor_layer=info.get("monitor_layer"),
                vectors=tensors,
                residual_norms=residual_norms,
                calibration=calibration,
                metadata=info.get("metadata") or {},
                library_version=str(info.get("library_version", "unknown")),
            )
        except AxisFileError as exc:
            raise AxisFileError(f"{folder}: {exc}") from None
        if model is not None:
            axis.check_model(model, strict=strict)
        return axis

    @classmethod
    def from_reference(
        cls,
        path: str | os.PathLike[str],
        *,
        model_id: str | None = None,
        monitor_layer: int | None = None,
        model: nn.Module | None = None,
    ) -> Axis:
        """Import the research release's ``assistant_axis.pt``.

        The file is a raw (n_layers, d_model) tensor (usually bf16) or ``{"axis": tensor}``;
        it is read with ``torch.load(weights_only=True)`` only.

        Args:
            path: the ``.pt`` file.
            model_id: the model it belongs to, recorded in the axis.
            monitor_layer: override of the middle-block default.
            model: if given, the axis is checked against it and records its fingerprint.

        Raises:
            UnsafeFileError: the pickle would run code; it was refused and nothing ran.
            AxisFileError: missing file or content that is not an axis.
        """
        target = Path(path)
        obj = safe_torch_load(target)
        if isinstance(obj, dict):
            if AXIS_KEY not in obj:
                raise AxisFileError(
                    f"{target} holds a dict without an 'axis' entry (keys: "
                    f"{sorted(map(str, obj))[:10]}); expected a (n_layers, d_model) tensor"
                )
            obj = obj[AXIS_KEY]
        if not isinstance(obj, Tensor) or obj.ndim != 2 or not obj.is_floating_point():
            what = (
                f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
                if isinstance(obj, Tensor)
                else f"a {type(obj).__name__}"
            )
            raise AxisFileError(
                f"{target} holds {what}; an axis file holds a floating (n_layers, d_model) "
                "tensor or {'axis': tensor}"
            )
        metadata = {
            "source": "reference",
            "reference_file": target.name,
            "reference_dtype": str(obj.dtype).removeprefix("torch."),
            "imported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            axis = cls(
                directions=obj,
                model_id=model_id,
                fingerprint=model_fingerprint(model) if model is not None else None,
                monitor_layer=monitor_layer,
                metadata=metadata,
            )
        except AxisFileError as exc:
            raise AxisFileError(f"{target}: {exc}") from None
        if model is not None:
            axis.check_model(model)
        return axis


def _read_bundle_info(folder: Path) -> dict[str, Any]:
    info_path = folder / BUNDLE_FILE
    if not info_path.is_file():
        raise AxisFileError(
            f"{folder} is not an axis bundle: {BUNDLE_FILE} is missing "
            f"(found {sorted(p.name for p in folder.iterdir())[:10]})"
        )
    info = read_json_object(info_path, AxisFileError)
    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise AxisFileError(f"{info_path}: format_version={version!r} must be an integer")
    if version > BUNDLE_FORMAT_VERSION:
        raise AxisFileError(
            f"{info_path} has format_version {version}, newer than this persona-compass "
            f"reads ({BUNDLE_FORMAT_VERSION}); upgrade persona-compass"
        )
    if version < 1:
        raise AxisFileError(f"{info_path}: format_version={version} is not a valid version")
    for key in ("n_layers", "d_model"):
        value = info.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AxisFileError(f"{info_path}: {key}={value!r} must be a positive integer")
    metadata = info.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise AxisFileError(f"{info_path}: metadata must be a JSON object")
    return info


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise AxisFileError(f"the axis bundle lacks {path.name} (looked for {path})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AxisFileError(f"cannot read {path}: {exc}") from None
