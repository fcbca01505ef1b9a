"""Activation capping configurations: which layers, which directions, which thresholds.

Capping keeps the persona coordinate from falling below a threshold on a window of layers:
``h <- h + max(tau_l - h·v_l, 0) v_l`` at every position (the "floor" form, ``v`` the unit
axis). The research release stores the same operation as a "ceiling" on the negated axis,
``h <- h - max(h·u - tau', 0) u`` with ``u = -v`` and ``tau' = -tau``; both are supported and
give identical activations. Thresholds are calibrated by a named rule (:data:`RULES`): the
research's percentile of role-play response means (the paper's best: the 25th percentile on
upper-middle layers), or a rule on per-token projections, which is what the cap acts on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_path, read_json_object, write_json
from .axis import AXIS_KEY, Axis, safe_torch_load, unit_rows
from .bundle_format import (
    AXIS_FILE,
    CAPPING_FILE,
    CAPPING_FORMAT_VERSION,
    CAPPING_VECTORS_FILE,
)
from .calibration import Calibration, quantiles
from .errors import CappingConfigError
from .interventions import CapCeiling, CapFloor, Operator
from .layers import normalize_layers

Form = Literal["floor", "ceiling"]

RULES: tuple[str, ...] = ("response-mean", "token-default", "token-roleplay")
"""How :meth:`CappingConfig.calibrate` turns reference projections into thresholds, per layer:

- ``response-mean`` (the research's, the default): the ``percentile``-th percentile of the
  role-play answers' response means.
- ``token-default``: the highest floor that leaves at least ``keep`` % (default 99) of the
  default-Assistant answers' tokens untouched (at or above it): of their n per-token
  projections, the m-th largest, m = ceil(keep % of n). In ceiling form, the lowest ceiling
  that leaves them at or below it (the m-th smallest).
- ``token-roleplay``: the ``percentile``-th percentile of the role-play answers' per-token
  projections.
"""
DEFAULT_RULE = "response-mean"
DEFAULT_PERCENTILE = 25.0
DEFAULT_KEEP = 99.0
TOKEN_TABLE = {"token-default": "default", "token-roleplay": "roleplay"}
"""The per-token table (:attr:`Calibration.tokens`) each token rule reads."""


def capping_id(
    layers: Sequence[int],
    percentile: float | None = None,
    *,
    rule: str = DEFAULT_RULE,
    keep: float | None = None,
) -> str:
    """A config name in the research release's style.

    ``[16, ..., 23]`` and 25.0 give ``"layers_16:24-p0.25"`` (half-open range, percentile
    as a fraction); a non-contiguous selection is listed, ``"layers_3,5,7-p0.25"``. The
    token rules are marked: ``"layers_16:24-tp0.25"`` (``token-roleplay``),
    ``"layers_16:24-keep0.99"`` (``token-default`` with ``keep=99``).
    """
    unique = sorted(set(layers))
    if unique and unique == list(range(unique[0], unique[-1] + 1)):
        window = f"{unique[0]}:{unique[-1] + 1}"
    else:
        window = ",".join(str(layer) for layer in unique)
    name = f"layers_{window}"
    if rule == "token-default" and keep is not None:
        name += f"-keep{round(float(keep) / 100.0, 6)!r}"
    elif percentile is not None:
        mark = "tp" if rule == "token-roleplay" else "p"
        name += f"-{mark}{round(float(percentile) / 100.0, 6)!r}"
    return name


def keep_rank(n: int, keep: float) -> int:
    """How many of ``n`` samples must stay untouched to keep ``keep`` % of them: ceil, >= 1."""
    return min(n, max(1, math.ceil(round(keep * n / 100.0, 9))))


def keep_percentile(n: int, keep: float, form: Form = "floor") -> float:
    """Where the ``token-default`` threshold sits among ``n`` sorted samples, as a percentile
    in the linear convention of :func:`~persona_compass.calibration.quantiles`: the m-th
    largest (floor) or m-th smallest (ceiling) sample, m = :func:`keep_rank`."""
    if n <= 1:
        return 0.0 if form == "floor" else 100.0
    m = keep_rank(n, keep)
    index = n - m if form == "floor" else m - 1  # 0-based, in ascending order
    return 100.0 * index / (n - 1)


def _number(name: str, value: Any, low: float, high: float, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CappingConfigError(f"{name}={value!r} must be a number in [{low:g}, {high:g}]")
    if not low <= float(value) <= high:
        raise CappingConfigError(f"{name}={value!r} must be in [{low:g}, {high:g}] ({example})")
    return float(value)


def _missing_tokens(rule: str, calibration: Calibration) -> CappingConfigError:
    return CappingConfigError(
        f"rule {rule!r} needs the per-token projections of {TOKEN_TABLE[rule]} answers, and "
        f"this calibration has none (it holds {calibration.source or 'response means only'}); "
        "record them with `persona-compass axis calibrate --force BUNDLE --model MODEL`, or "
        "re-extract the bundle with this version of persona-compass"
    )


def _axis_rows_sha(rows: Tensor) -> str:
    data = rows.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, eq=False, repr=False)
class CappingConfig:
    """Caps: cap ``i`` acts on block ``layers[i]`` along ``vectors[i]`` at ``thresholds[i]``.

    Attributes:
        layers: k block indices (a block may appear several times; its caps run in order).
        vectors: (k, d_model) directions, stored unit-normalised float32.
        thresholds: k thresholds on the projection onto each vector.
        form: ``"floor"`` keeps ``h·v >= tau``; ``"ceiling"`` keeps ``h·v <= tau``.
        name: an id such as ``"layers_16:24-p0.25"``.
        metadata: JSON-ready facts (percentile, calibration source, reference file...).

    Example:
        >>> cfg = CappingConfig.calibrate(axis, axis.calibration, layers="16:24", percentile=25)
        >>> cfg.name
        'layers_16:24-p0.25'
        >>> with persona_compass.capping(model, cfg):
        ...     model.generate(...)
    """

    layers: tuple[int, ...]
    vectors: Tensor
    thresholds: tuple[float, ...]
    form: Form = "floor"
    name: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise CappingConfigError(
                f"layers={layers!r} must be a sequence of block indices, e.g. (16, 17, 18)"
            )
        layers = tuple(layers)
        if not layers:
            raise CappingConfigError("layers=() is empty; name at least one block to cap")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise CappingConfigError(
                    f"layers={list(layers)} holds {layer!r}; every entry must be a block index "
                    ">= 0 (normalise negative indices with the model's block count first)"
                )
        object.__setattr__(self, "layers", layers)
        k = len(layers)

        vectors = self.vectors
        if not isinstance(vectors, Tensor):
            raise CappingConfigError(
                f"vectors must be a (k, d_model) torch.Tensor, got {type(vectors).__name__}"
            )
        if vectors.ndim != 2 or vectors.shape[0] != k or vectors.shape[1] < 1:
            raise CappingConfigError(
                f"vectors has shape {tuple(vectors.shape)}; expected ({k}, d_model): one "
                f"direction per entry of layers={list(layers)}"
            )
        if not vectors.is_floating_point():
            raise CappingConfigError(f"vectors has dtype {vectors.dtype}; pass floating point")
        vectors = vectors.detach().to(device="cpu", dtype=torch.float32)
        if not torch.isfinite(vectors).all():
            raise CappingConfigError("vectors contain NaN or infinity; pass finite directions")
        norms = torch.linalg.vector_norm(vectors, dim=1)
        if (norms <= 1e-12).any():
            bad = [layers[i] for i in torch.nonzero(norms <= 1e-12)[:, 0].tolist()]
            raise CappingConfigError(
                f"vectors for layers {bad} are zero; a cap needs a direction (is the axis zero "
                "there? pick other layers)"
            )
        object.__setattr__(self, "vectors", unit_rows(vectors).contiguous())

        thresholds = self.thresholds
        if isinstance(thresholds, Tensor):
            thresholds = thresholds.detach().cpu().reshape(-1).tolist()
        if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Iterable):
            raise CappingConfigError(
                f"thresholds={thresholds!r} must be a sequence of {k} numbers, one per layer"
            )
        thresholds = tuple(thresholds)
        if len(thresholds) != k:
            raise CappingConfigError(
                f"thresholds has {len(thresholds)} values but layers has {k}; give one "
                "threshold per capped layer"
            )
        clean: list[float] = []
        for value in thresholds:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CappingConfigError(
                    f"thresholds holds {value!r}; every entry must be a number"
                )
            if not math.isfinite(value):
                raise CappingConfigError(
                    f"thresholds holds {value!r}; thresholds must be finite numbers"
                )
            clean.append(float(value))
        object.__setattr__(self, "thresholds", tuple(clean))

        if self.form not in ("floor", "ceiling"):
            raise CappingConfigError(
                f"form={self.form!r} must be 'floor' (keep h·v >= tau) or 'ceiling' (h·v <= tau)"
            )
        if not isinstance(self.name, str):
            raise CappingConfigError(f"name={self.name!r} must be a string")
        metadata = dict(self.metadata)
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise CappingConfigError(f"metadata must be JSON-serialisable: {exc}") from None
        object.__setattr__(self, "metadata", MappingProxyType(metadata))

    # Read-only mapping proxies cannot be pickled: copy and pickle through a plain dict.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "metadata": dict(self.metadata)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "metadata", MappingProxyType(dict(state["metadata"])))

    def __repr__(self) -> str:
        taus = ", ".join(f"{t:.4g}" for t in self.thresholds[:4])
        more = ", ..." if len(self.thresholds) > 4 else ""
        return (
            f"CappingConfig(name={self.name!r}, form={self.form!r}, layers={list(self.layers)}, "
            f"thresholds=[{taus}{more}], d_model={self.d_model})"
        )

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    # ---- operators and forms -----------------------------------------------------------------

    def operators(self) -> dict[int, list[Operator]]:
        """Block index -> its cap operators, in config order."""
        make = CapFloor if self.form == "floor" else CapCeiling
        ops: dict[int, list[Operator]] = {}
        for layer, vec, tau in zip(self.layers, self.vectors, self.thresholds, strict=True):
            ops.setdefault(layer, []).append(make(vec, tau))
        return ops

    def to_floor(self) -> CappingConfig:
        """The identical floor form: a ceiling on ``(u, tau)`` is a floor on ``(-u, -tau)``."""
        if self.form == "floor":
            return self
        return self._flipped("floor")

    def to_ceiling(self) -> CappingConfig:
        """The identical config in ceiling form (the research release's convention)."""
        if self.form == "ceiling":
            return self
        return self._flipped("ceiling")

    def _flipped(self, form: Form) -> CappingConfig:
        return CappingConfig(
            layers=self.layers,
            vectors=-self.vectors,
            thresholds=tuple(-t for t in self.thresholds),
            form=form,
            name=self.name,
            metadata=dict(self.metadata),
        )

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_axis(
        cls,
        axis: Axis,
        layers: int | Iterable[int] | str,
        thresholds: float | Sequence[float],
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        form: Form = "floor",
    ) -> CappingConfig:
        """Floors (or ceilings) on the axis' unit vectors.

        Args:
            axis: the Assistant Axis (or a trait axis, usually with ``form="ceiling"``).
            layers: blocks to cap (int, list, ``"16:24"``, ``"all"``), sorted and deduplicated.
            thresholds: one number for every layer, or one per layer in sorted layer order.
            name: default ``capping_id(layers)``.
            form: ``"floor"`` keeps ``h·v >= tau`` (the Assistant Axis must not fall);
                ``"ceiling"`` keeps ``h·v <= tau`` (a trait must not rise).
        """
        chosen = normalize_layers(layers, axis.n_layers)
        if isinstance(thresholds, bool):
            raise CappingConfigError(f"thresholds={thresholds!r} must be numbers")
        if isinstance(thresholds, (int, float)):
            taus: tuple[float, ...] = (float(thresholds),) * len(chosen)
        else:
            taus = tuple(thresholds)
            if len(taus) != len(chosen):
                raise CappingConfigError(
                    f"thresholds has {len(taus)} values for {len(chosen)} layers {chosen}; give "
                    "one per layer (in sorted layer order) or a single number"
                )
        return cls(
            layers=tuple(chosen),
            vectors=axis.units()[chosen],
            thresholds=taus,
            form=form,
            name=capping_id(chosen) if name is None else name,
            metadata=dict(metadata or {}),
        )

    @classmethod
    def calibrate(
        cls,
        axis: Axis,
        projections: Calibration | Tensor,
        layers: int | Iterable[int] | str,
        percentile: float | None = None,
        *,
        rule: str = DEFAULT_RULE,
        keep: float | None = None,
        name: str | None = None,
        form: Form = "floor",
    ) -> CappingConfig:
        """Floors on the axis at thresholds a rule reads off reference projections, per layer.

        With ``form="ceiling"`` the thresholds are ceilings instead: a trait axis capped at,
        say, its 75th percentile keeps every token at or below that much of the trait.

        Args:
            axis: the Assistant Axis (or a trait axis, with ``form="ceiling"``).
            projections: a :class:`Calibration` (the rule reads its table: the response-mean
                table, or the per-token table in :attr:`Calibration.tokens`), or the rule's
                population as an (N, n_layers) tensor of projections on the axis (response
                means of role play; tokens of default or of role-play answers), which gives
                exact thresholds.
            layers: the window to cap, e.g. ``"16:24"`` (half-open) or a list.
            percentile: in [0, 100] for ``response-mean`` and ``token-roleplay`` (default
                25, the paper's best); not for ``token-default``.
            rule: one of :data:`RULES`.
            keep: for ``token-default``: the share of default-answer tokens to leave
                untouched, in (0, 100] (default 99).
            name: default like ``"layers_16:24-p0.25"`` (see :func:`capping_id`).

        The config's metadata records ``rule``, ``percentile`` or ``keep``, ``n_samples``
        and ``calibration_source``. On a table, ``token-default`` reads the table at the
        percentile where the m-th sample of its ``n_samples`` sits, interpolated between
        the table's percentiles (exact on a tensor).

        Raises:
            CappingConfigError: an unknown rule, a number out of range or given to the
                wrong rule, a calibration without the rule's per-token table (the message
                says how to record it), or projections of the wrong shape.
        """
        if rule not in RULES:
            raise CappingConfigError(f"rule={rule!r} is unknown; use one of {', '.join(RULES)}")
        if rule == "token-default":
            if percentile is not None:
                raise CappingConfigError(
                    "rule 'token-default' takes keep= (the share of default-answer tokens to "
                    "leave untouched, e.g. 99), not percentile="
                )
            amount = _number("keep", DEFAULT_KEEP if keep is None else keep, 0.0, 100.0, "e.g. 99")
            if amount == 0.0:
                raise CappingConfigError("keep=0 leaves no token untouched; use e.g. 99")
            meta: dict[str, Any] = {"rule": rule, "keep": amount}
        else:
            if keep is not None:
                raise CappingConfigError(
                    f"keep= is for rule='token-default'; rule {rule!r} takes percentile="
                )
            p = DEFAULT_PERCENTILE if percentile is None else percentile
            amount = _number("percentile", p, 0.0, 100.0, "e.g. 25 for the 25th percentile")
            meta = {"percentile": amount, "rule": rule}
        chosen = normalize_layers(layers, axis.n_layers)
        if isinstance(projections, Calibration):
            taus, table = _table_thresholds(axis, projections, chosen, rule, amount, form)
            meta.update(n_samples=table.n_samples, calibration_source=table.source)
        elif isinstance(projections, Tensor):
            taus = _sample_thresholds(axis, projections, chosen, rule, amount, form)
            meta.update(n_samples=int(projections.shape[0]), calibration_source="projections")
        else:
            raise CappingConfigError(
                "projections must be a Calibration or an (n_samples, n_layers) tensor, got "
                f"{type(projections).__name__}"
            )
        if name is None:
            if rule == "token-default":
                name = capping_id(chosen, rule=rule, keep=amount)
            else:
                name = capping_id(chosen, amount, rule=rule)
        return cls.from_axis(axis, chosen, taus, name=name, metadata=meta, form=form)

    @property
    def rule(self) -> str | None:
        """The calibration rule that made this config (``metadata["rule"]``); None when not
        recorded (an imported config, or one calibrated before rules were recorded)."""
        rule = self.metadata.get("rule")
        return rule if isinstance(rule, str) else None

    # ---- research release format ------------------------------------------------------------

    @staticmethod
    def _read_reference(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[Any]]:
        obj = safe_torch_load(path, what="capping config", error=CappingConfigError)
        if not isinstance(obj, dict) or "vectors" not in obj or "experiments" not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise CappingConfigError(
                f"{path} is not a capping config: expected a dict with 'vectors' and "
                f"'experiments', found {keys}"
            )
        vectors, experiments = obj["vectors"], obj["experiments"]
        if not isinstance(vectors, dict) or not isinstance(experiments, list):
            raise CappingConfigError(f"{path}: 'vectors' must be a dict and 'experiments' a list")
        return vectors, experiments

    @staticmethod
    def reference_ids(path: str | os.PathLike[str]) -> list[str]:
        """The experiment ids in a research-release ``capping_config.pt``."""
        _, experiments = CappingConfig._read_reference(path)
        return [str(e.get("id")) for e in experiments if isinstance(e, dict)]

    @classmethod
    def from_reference(cls, path: str | os.PathLike[str], experiment_id: str) -> CappingConfig:
        """Import one experiment of the research release's ``capping_config.pt``.

        Read with ``torch.load(weights_only=True)`` only. The release caps from above on
        vectors pointing away from the Assistant, so this returns a ``"ceiling"`` config;
        ``.to_floor()`` gives the identical floor on the axis direction.

        Raises:
            UnsafeFileError: the pickle would run code; it was refused and nothing ran.
            CappingConfigError: missing file, wrong layout, or unknown ``experiment_id``
                (the message lists the available ids).
        """
        vectors, experiments = cls._read_reference(path)
        ids = [str(e.get("id")) for e in experiments if isinstance(e, dict)]
        found = [e for e in experiments if isinstance(e, dict) and e.get("id") == experiment_id]
        if not found:
            raise CappingConfigError(
                f"no experiment {experiment_id!r} in {path}; available: "
                f"{', '.join(ids) if ids else '(none)'}"
            )
        interventions = found[0].get("interventions")
        if not isinstance(interventions, list) or not interventions:
            raise CappingConfigError(f"{path}: experiment {experiment_id!r} has no interventions")
        layers: list[int] = []
        rows: list[Tensor] = []
        caps: list[float] = []
        names: list[str] = []
        for i, item in enumerate(interventions):
            where = f"{path}: experiment {experiment_id!r} intervention {i}"
            if not isinstance(item, dict) or "vector" not in item or "cap" not in item:
                raise CappingConfigError(f"{where} must be a dict with 'vector' and 'cap'")
            vname = item["vector"]
            entry = vectors.get(vname)
            if not isinstance(entry, dict) or "layer" not in entry or "vector" not in entry:
                raise CappingConfigError(
                    f"{where} names vector {vname!r}, which is missing or lacks 'layer'/'vector'"
                )
            layer, vec, cap = entry["layer"], entry["vector"], item["cap"]
            if isinstance(layer, Tensor) and layer.numel() == 1:
                layer = int(layer.item())
            if isinstance(cap, Tensor) and cap.numel() == 1:
                cap = float(cap.item())
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise CappingConfigError(f"{where}: layer {layer!r} must be an integer")
            if not isinstance(vec, Tensor) or vec.ndim != 1:
                raise CappingConfigError(f"{where}: vector {vname!r} must be a 1-D tensor")
            if rows and vec.shape != rows[0].shape:
                raise CappingConfigError(
                    f"{where}: vector {vname!r} has width {vec.shape[0]}, others {rows[0].shape[0]}"
                )
            layers.append(layer)
            rows.append(vec.to(torch.float32))
            caps.append(cap)
            names.append(str(vname))
        return cls(
            layers=tuple(layers),
            vectors=torch.stack(rows),
            thresholds=tuple(caps),
            form="ceiling",
            name=experiment_id,
            metadata={"source": "reference", "reference_file": Path(path).name, "vectors": names},
        )

    def to_reference(self, path: str | os.PathLike[str], experiment_id: str | None = None) -> Path:
        """Write this config in the research release's ``capping_config.pt`` layout.

        The file holds only tensors and plain containers, so ``weights_only`` loaders read it.
        """
        ceiling = self.to_ceiling()
        vectors: dict[str, dict[str, Any]] = {}
        interventions: list[dict[str, Any]] = []
        for i, (layer, vec, cap) in enumerate(
            zip(ceiling.layers, ceiling.vectors, ceiling.thresholds, strict=True)
        ):
            vname = f"layer_{layer}/persona_compass_{i}"
            vectors[vname] = {"layer": layer, "vector": vec.clone()}
            interventions.append({"vector": vname, "cap": cap})
        eid = experiment_id or self.name or capping_id(self.layers)
        payload = {"vectors": vectors, "experiments": [{"id": eid, "interventions": interventions}]}
        target = Path(path)
        with atomic_path(target, suffix=".pt") as tmp:
            torch.save(payload, tmp)
        return target

    # ---- dicts and bundle files ------------------------------------------------------------

    def to_dict(self, *, include_vectors: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; float32 vectors round-trip exactly through JSON floats."""
        data: dict[str, Any] = {
            "format_version": CAPPING_FORMAT_VERSION,
            "name": self.name,
            "form": self.form,
            "layers": list(self.layers),
            "thresholds": list(self.thresholds),
            "metadata": dict(self.metadata),
        }
        if include_vectors:
            data["vectors"] = self.vectors.tolist()
        return data

    @classmethod
    def from_dict(cls, data: Any, *, vectors: Tensor | None = None) -> CappingConfig:
        """Inverse of :meth:`to_dict`; ``vectors`` supplies them when the dict has none."""
        if not isinstance(data, dict):
            raise CappingConfigError(
                f"a capping config must be a JSON object, got {type(data).__name__}"
            )
        version = data.get("format_version", CAPPING_FORMAT_VERSION)
        if version != CAPPING_FORMAT_VERSION:
            raise CappingConfigError(
                f"capping format_version={version!r} is not supported (this persona-compass "
                f"reads {CAPPING_FORMAT_VERSION}); upgrade persona-compass"
            )
        missing = [k for k in ("layers", "thresholds") if k not in data]
        if missing:
            raise CappingConfigError(f"the capping config lacks {', '.join(missing)}")
        if vectors is None:
            raw = data.get("vectors")
            if not isinstance(raw, list):
                raise CappingConfigError(
                    "the capping config has no vectors list; pass vectors= or load the bundle"
                )
            try:
                vectors = torch.tensor(raw, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise CappingConfigError(
                    "the capping config's vectors must be a (k, d_model) list of numbers"
                ) from None
        if not isinstance(data["layers"], list) or not isinstance(data["thresholds"], list):
            raise CappingConfigError("the capping config's layers and thresholds must be lists")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise CappingConfigError("the capping config's metadata must be a JSON object")
        return cls(
            layers=tuple(data["layers"]),
            vectors=vectors,
            thresholds=tuple(data["thresholds"]),
            form=data.get("form", "floor"),
            name=data.get("name", ""),
            metadata=metadata,
        )

    def _axis_reference(self, folder: Path) -> dict[str, Any] | None:
        """``{"source": "axis", ...}`` if the vectors are exactly the bundle axis' unit vectors."""
        path = folder / AXIS_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                if AXIS_KEY not in fh.keys():  # noqa: SIM118 - safe_open has no __contains__
                    return None
                axis = fh.get_tensor(AXIS_KEY).to(torch.float32)
        except (SafetensorError, OSError):
            return None
        if axis.ndim != 2 or axis.shape[1] != self.d_model or max(self.layers) >= axis.shape[0]:
            return None
        rows = axis[list(self.layers)]
        sign = 1.0 if self.form == "floor" else -1.0
        if not torch.equal(self.vectors, sign * unit_rows(rows)):
            return None
        return {"source": "axis", "sign": int(sign), "axis_sha256": _axis_rows_sha(rows)}

    def save(self, bundle_dir: str | os.PathLike[str]) -> Path:
        """Write ``capping.json`` into the bundle folder (created if needed), atomically.

        When the vectors are exactly the bundle axis' unit vectors (configs from
        :meth:`from_axis` / :meth:`calibrate`), the JSON refers to ``axis.safetensors``;
        otherwise they go to ``capping.safetensors`` beside it.
        """
        folder = Path(bundle_dir)
        if folder.exists() and not folder.is_dir():
            raise CappingConfigError(f"{folder} is a file; pass the bundle folder")
        folder.mkdir(parents=True, exist_ok=True)
        data = self.to_dict(include_vectors=False)
        source = self._axis_reference(folder)
        if source is None:
            with atomic_path(folder / CAPPING_VECTORS_FILE, suffix=".safetensors") as tmp:
                save_file({"vectors": self.vectors}, str(tmp))
            source = {"source": "file", "file": CAPPING_VECTORS_FILE}
        data["vectors"] = source
        write_json(folder / CAPPING_FILE, data)
        stale = folder / CAPPING_VECTORS_FILE
        if source["source"] == "axis" and stale.exists():
            stale.unlink()
        return folder / CAPPING_FILE

    @classmethod
    def load_optional(cls, bundle_dir: str | os.PathLike[str]) -> CappingConfig | None:
        """The bundle's capping config, or None when the bundle has no ``capping.json``."""
        if not (Path(bundle_dir) / CAPPING_FILE).is_file():
            return None
        return cls.load(bundle_dir)

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike[str]) -> CappingConfig:
        """Read ``capping.json`` from a bundle folder (or the file itself)."""
        path = Path(bundle_dir)
        if path.is_dir():
            path = path / CAPPING_FILE
        folder = path.parent
        if not path.is_file():
            raise CappingConfigError(
                f"no capping config at {path}; calibrate one with CappingConfig.calibrate and "
                "save it, or import a reference file with CappingConfig.from_reference"
            )
        data = read_json_object(path, CappingConfigError)
        spec = data.get("vectors")
        try:
            if isinstance(spec, list):
                return cls.from_dict(data)
            if not isinstance(spec, dict) or spec.get("source") not in ("axis", "file"):
                raise CappingConfigError(
                    "'vectors' must be {'source': 'axis'}, {'source': 'file', 'file': ...} "
                    "or a list"
                )
            if spec["source"] == "file":
                vectors = _load_vectors_file(folder / str(spec.get("file", CAPPING_VECTORS_FILE)))
            else:
                vectors = _axis_vectors(folder, data, spec)
            return cls.from_dict(data, vectors=vectors)
        except CappingConfigError as exc:
            raise CappingConfigError(f"{path}: {exc}") from None


def _table_thresholds(
    axis: Axis, calibration: Calibration, layers: list[int], rule: str, amount: float, form: Form
) -> tuple[list[float], Calibration]:
    """Thresholds read off the table the rule uses, and that table."""
    if calibration.n_layers != axis.n_layers:
        raise CappingConfigError(
            f"the calibration covers {calibration.n_layers} layers but the axis has "
            f"{axis.n_layers}; use the calibration made with this axis"
        )
    table: Calibration | None = calibration
    if rule in TOKEN_TABLE:
        table = calibration.token_table(TOKEN_TABLE[rule])
        if table is None:
            raise _missing_tokens(rule, calibration)
    assert table is not None
    at = keep_percentile(table.n_samples, amount, form) if rule == "token-default" else amount
    try:
        return [table.threshold(layer, at) for layer in layers], table
    except ValueError as exc:
        raise CappingConfigError(str(exc)) from None


def _sample_thresholds(
    axis: Axis, projections: Tensor, layers: list[int], rule: str, amount: float, form: Form
) -> list[float]:
    """Exact thresholds from samples: a percentile, or ``token-default``'s order statistic."""
    if projections.ndim != 2 or projections.shape[1] != axis.n_layers:
        raise CappingConfigError(
            f"projections has shape {tuple(projections.shape)}; expected (n_samples, "
            f"{axis.n_layers}): every sample's projection on every layer's axis"
        )
    if projections.shape[0] < 1:
        raise CappingConfigError("projections is empty; calibrate on at least one sample")
    picked = projections[:, layers]
    if not torch.isfinite(picked).all():
        raise CappingConfigError(
            "projections contain NaN or infinity; drop the broken samples first"
        )
    if rule != "token-default":
        return quantiles(picked, [amount])[:, 0].tolist()
    n = int(picked.shape[0])
    m = keep_rank(n, amount)
    ordered = torch.sort(picked.to(torch.float64), dim=0).values
    return ordered[n - m if form == "floor" else m - 1].tolist()


def _load_vectors_file(path: Path) -> Tensor:
    if not path.is_file():
        raise CappingConfigError(f"the vectors file {path.name} is missing from the bundle")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CappingConfigError(f"cannot read {path}: {exc}") from None
    if "vectors" not in tensors:
        raise CappingConfigError(f"{path} has no 'vectors' tensor")
    return tensors["vectors"]


def _axis_vectors(folder: Path, data: dict[str, Any], spec: dict[str, Any]) -> Tensor:
    path = folder / AXIS_FILE
    if not path.is_file():
        raise CappingConfigError(
            f"the config takes its vectors from the bundle's {AXIS_FILE}, which is missing; "
            "keep capping.json inside its axis bundle"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CappingConfigError(f"cannot read {path}: {exc}") from None
    axis = tensors.get(AXIS_KEY)
    layers = data.get("layers")
    if axis is None or axis.ndim != 2:
        raise CappingConfigError(f"{path} has no (n_layers, d_model) 'axis' tensor")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        or min(layers) < 0
        or max(layers) >= axis.shape[0]
    ):
        raise CappingConfigError(
            f"layers={layers!r} must be block indices within the axis' {axis.shape[0]} layers"
        )
    rows = axis[layers].to(torch.float32)
    expected = spec.get("axis_sha256")
    if expected is not None and expected != _axis_rows_sha(rows):
        raise CappingConfigError(
            f"the config was calibrated on a different axis than the bundle's {AXIS_FILE} "
            "(the axis changed since); recalibrate with CappingConfig.calibrate and save again"
        )
    sign = spec.get("sign", 1)
    if sign not in (1, -1):
        raise CappingConfigError(f"vectors.sign={sign!r} must be 1 or -1")
    units = unit_rows(rows)
    return units if sign == 1 else -units
