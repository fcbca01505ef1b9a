"""Percentile tables of reference projections: what counts as a low or high reading per layer.

A :class:`Calibration` holds, for every layer, the projections of a reference population (the
persona rollouts of the extraction run) at a grid of percentiles. It turns a raw projection
into a percentile (``percentile_of``, used by the drift monitor) and a percentile into a raw
threshold (``threshold``, used to calibrate activation capping).

A calibration may also carry per-token tables (:attr:`Calibration.tokens`): the same kind of
table over the projections of individual answer tokens, of role-play answers (``"roleplay"``)
and of default-Assistant answers (``"default"``). A response mean hides its tokens, and
capping acts on every token: the token tables let a capping rule see what it will touch
(:meth:`persona_compass.CappingConfig.calibrate`, ``rule=``). They live in the same
``calibration.json`` under ``"tokens"``; a file without them reads as before.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, overload

import torch
from torch import Tensor

from .atomic import read_json_object, write_json
from .bundle_format import CALIBRATION_FILE, CALIBRATION_FORMAT_VERSION
from .errors import AxisFileError

DEFAULT_GRID: tuple[float, ...] = tuple(float(p) for p in range(101))
TOKEN_KINDS: tuple[str, ...] = ("roleplay", "default")
"""The per-token tables a calibration may carry: role-play and default-Assistant answers."""


def quantiles(samples: Tensor, percentiles: Sequence[float]) -> Tensor:
    """Per-column percentiles of ``samples``, in float64.

    The same "linear" rule as ``torch.quantile`` (and numpy's default), written on a sort so
    that it has no limit on the number of samples (``torch.quantile`` refuses more than 2**24
    elements, and a full extraction run has hundreds of thousands of rollouts x layers).

    Args:
        samples: (N, L) values, N >= 1.
        percentiles: P values in [0, 100].

    Returns:
        (L, P) float64.
    """
    data = samples.detach().to(device="cpu", dtype=torch.float64)
    ordered = torch.sort(data, dim=0).values  # (N, L)
    n = ordered.shape[0]
    pos = torch.tensor(percentiles, dtype=torch.float64) / 100.0 * (n - 1)  # (P,)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = pos.ceil().long().clamp(0, n - 1)
    frac = (pos - lo.to(torch.float64)).unsqueeze(1)  # (P, 1)
    low, high = ordered[lo], ordered[hi]  # (P, L)
    return (low + frac * (high - low)).T.contiguous()


def _check_grid(percentiles: Sequence[float]) -> tuple[float, ...]:
    try:
        grid = tuple(float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise AxisFileError(
            f"calibration percentiles={percentiles!r} must be a list of numbers in [0, 100]"
        ) from None
    if len(grid) < 2:
        raise AxisFileError(
            f"calibration percentiles={list(grid)} needs at least two entries, e.g. 0..100"
        )
    if any(not (0.0 <= p <= 100.0) for p in grid) or any(
        b <= a for a, b in zip(grid, grid[1:], strict=False)
    ):
        raise AxisFileError(
            f"calibration percentiles={list(grid)} must be strictly increasing numbers in "
            "[0, 100]; use e.g. the default grid 0, 1, ..., 100"
        )
    return grid


@dataclass(frozen=True, eq=False, repr=False)
class Calibration:
    """Per-layer percentile table of reference projections.

    Attributes:
        percentiles: P strictly increasing percentiles in [0, 100] (default 0, 1, ..., 100).
        values: (L, P) float64 projections at those percentiles, non-decreasing along P.
        n_samples: how many reference samples the table was computed from.
        source: free text saying what the samples were (e.g. ``"role rollouts, score 3"``).
        tokens: per-token tables by kind (``"roleplay"``, ``"default"``; see
            :data:`TOKEN_KINDS`), each a Calibration over single answer tokens with the same
            layers; empty when the bundle has none (made before they were recorded).

    Example:
        >>> cal = Calibration.from_projections(torch.randn(1000, 4))  # (N, L)
        >>> tau = cal.threshold(layer=2, percentile=25.0)  # raw projection, about -0.67
        >>> cal.percentile_of(tau, layer=2)  # back to 25.0
    """

    percentiles: tuple[float, ...]
    values: Tensor
    n_samples: int
    source: str = ""
    tokens: Mapping[str, Calibration] = field(default_factory=dict)
    _tables: dict[torch.device, tuple[Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        grid = _check_grid(self.percentiles)
        object.__setattr__(self, "percentiles", grid)
        values = self.values
        if not isinstance(values, Tensor):
            try:
                values = torch.as_tensor(values, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise AxisFileError(
                    "calibration values must be an (n_layers, n_percentiles) table of numbers"
                ) from None
        values = values.detach().to(device="cpu", dtype=torch.float64).contiguous()
        if values.ndim != 2 or values.shape[1] != len(grid) or values.shape[0] < 1:
            raise AxisFileError(
                f"calibration values have shape {tuple(values.shape)}; expected "
                f"(n_layers, {len(grid)}): one row per layer, one column per percentile"
            )
        if not torch.isfinite(values).all():
            raise AxisFileError("calibration values contain NaN or infinity; recompute them")
        if (values[:, 1:] < values[:, :-1]).any():
            bad = int(torch.nonzero((values[:, 1:] < values[:, :-1]).any(dim=1))[0, 0])
            raise AxisFileError(
                f"calibration values for layer {bad} decrease along the percentiles; a "
                "percentile table must be non-decreasing (recompute with from_projections)"
            )
        object.__setattr__(self, "values", values)
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int):
            raise AxisFileError(f"calibration n_samples={self.n_samples!r} must be an integer")
        if self.n_samples < 1:
            raise AxisFileError(f"calibration n_samples={self.n_samples} must be at least 1")
        if not isinstance(self.source, str):
            raise AxisFileError(f"calibration source={self.source!r} must be a string")
        object.__setattr__(self, "tokens", MappingProxyType(self._checked_tokens()))

    def _checked_tokens(self) -> dict[str, Calibration]:
        if not isinstance(self.tokens, Mapping):
            raise AxisFileError(
                f"calibration tokens must map {' / '.join(TOKEN_KINDS)} to tables, got "
                f"{type(self.tokens).__name__}"
            )
        tokens = dict(self.tokens)
        for kind, table in tokens.items():
            if kind not in TOKEN_KINDS:
                raise AxisFileError(
                    f"calibration tokens has a table {kind!r}; the kinds are "
                    f"{', '.join(TOKEN_KINDS)}"
                )
            if not isinstance(table, Calibration) or table.tokens:
                raise AxisFileError(
                    f"calibration tokens[{kind!r}] must be a Calibration without tables of its own"
                )
            if table.n_layers != self.n_layers:
                raise AxisFileError(
                    f"calibration tokens[{kind!r}] covers {table.n_layers} layers but the "
                    f"calibration {self.n_layers}; compute both on the same axis"
                )
        return tokens

    # Read-only mapping proxies cannot be pickled: pickle a plain dict, drop device copies.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens": dict(self.tokens), "_tables": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "tokens", MappingProxyType(dict(state["tokens"])))

    def __repr__(self) -> str:
        tokens = f", tokens={list(self.tokens)}" if self.tokens else ""
        return (
            f"Calibration(n_layers={self.n_layers}, percentiles={len(self.percentiles)}, "
            f"n_samples={self.n_samples}, source={self.source!r}{tokens})"
        )

    def token_table(self, kind: str) -> Calibration | None:
        """The per-token table ``kind`` (``"roleplay"`` or ``"default"``), None if absent."""
        if kind not in TOKEN_KINDS:
            raise ValueError(f"kind={kind!r} must be one of {', '.join(TOKEN_KINDS)}")
        return self.tokens.get(kind)

    def with_tokens(self, **tables: Calibration | None) -> Calibration:
        """A copy that also carries per-token tables (``roleplay=``, ``default=``; None
        leaves a kind out)."""
        merged = {**self.tokens, **{k: v for k, v in tables.items() if v is not None}}
        return Calibration(self.percentiles, self.values, self.n_samples, self.source, merged)

    @property
    def n_layers(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_projections(
        cls,
        projections: Tensor,
        percentiles: Sequence[float] = DEFAULT_GRID,
        source: str = "",
    ) -> Calibration:
        """Build the table from reference projections.

        Args:
            projections: (N, L) projections of N reference samples on every layer's axis.
            percentiles: the grid to tabulate.
            source: what the samples were.
        """
        if not isinstance(projections, Tensor) or projections.ndim != 2:
            shape = tuple(projections.shape) if isinstance(projections, Tensor) else None
            raise AxisFileError(
                f"projections must be an (n_samples, n_layers) tensor, got shape {shape}"
            )
        if projections.shape[0] < 1 or projections.shape[1] < 1:
            raise AxisFileError(
                f"projections of shape {tuple(projections.shape)} are empty; "
                "calibrate on at least one sample"
            )
        if not torch.isfinite(projections).all():
            raise AxisFileError(
                "projections contain NaN or infinity; drop the broken samples first"
            )
        grid = _check_grid(percentiles)
        return cls(grid, quantiles(projections, grid), int(projections.shape[0]), source)

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(values (L, P), percentiles (P,)) in float64 on ``device``, copied once per device."""
        table = self._tables.get(device)
        if table is None:
            table = (
                self.values.to(device),
                torch.tensor(self.percentiles, dtype=torch.float64, device=device),
            )
            self._tables[device] = table
        return table

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer={layer!r} must be an integer")
        idx = layer + self.n_layers if layer < 0 else layer
        if not 0 <= idx < self.n_layers:
            raise ValueError(
                f"layer={layer} is out of range for a calibration of {self.n_layers} layers"
            )
        return idx

    @overload
    def percentile_of(self, value: float, layer: int) -> float: ...

    @overload
    def percentile_of(self, value: Tensor, layer: int) -> Tensor: ...

    def percentile_of(self, value: float | Tensor, layer: int) -> float | Tensor:
        """Where ``value`` falls in the layer's reference distribution, in [0, 100].

        Piecewise-linear between the table's points, clamped at its ends. Where several
        percentiles share one value (ties), a value equal to it maps to the middle of the run.

        Args:
            value: a float, or a tensor of any shape (stays on its device, no host sync).
            layer: the layer whose table to use.

        Returns:
            a float for a float, else a float32 tensor of ``value``'s shape; NaN stays NaN.
        """
        idx = self._layer(layer)
        if isinstance(value, Tensor):
            values, grid = self._table(value.device)
            x = value.detach().to(torch.float64)
            out = _invert(x, values[idx], grid)
            return out.to(torch.float32)
        values, grid = self._table(torch.device("cpu"))
        x = torch.tensor(float(value), dtype=torch.float64)
        return float(_invert(x, values[idx], grid))

    def threshold(self, layer: int, percentile: float) -> float:
        """The raw projection at ``percentile`` (interpolated between table points)."""
        idx = self._layer(layer)
        p = float(percentile)
        lo_p, hi_p = self.percentiles[0], self.percentiles[-1]
        if not lo_p <= p <= hi_p:
            raise ValueError(
                f"percentile={percentile!r} is outside the calibrated range [{lo_p:g}, {hi_p:g}]"
            )
        row = self.values[idx]
        i = bisect.bisect_left(self.percentiles, p)
        if self.percentiles[i] == p:
            return float(row[i])
        p0, p1 = self.percentiles[i - 1], self.percentiles[i]
        v0, v1 = float(row[i - 1]), float(row[i])
        return v0 + (p - p0) / (p1 - p0) * (v1 - v0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (floats are float64, so the table round-trips exactly).

        Per-token tables go under ``"tokens"``, only when there are some: a calibration
        without them writes exactly what earlier versions wrote."""
        data: dict[str, Any] = {
            "format_version": CALIBRATION_FORMAT_VERSION,
            "source": self.source,
            "n_samples": self.n_samples,
            "percentiles": list(self.percentiles),
            "values": self.values.tolist(),
        }
        if self.tokens:
            data["tokens"] = {
                kind: {k: v for k, v in table.to_dict().items() if k != "format_version"}
                for kind, table in self.tokens.items()
            }
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Inverse of :meth:`to_dict`; raises AxisFileError on anything malformed."""
        if not isinstance(data, dict):
            raise AxisFileError(
                f"calibration data must be a JSON object, got {type(data).__name__}"
            )
        version = data.get("format_version", CALIBRATION_FORMAT_VERSION)
        if version != CALIBRATION_FORMAT_VERSION:
            raise AxisFileError(
                f"calibration format_version={version!r} is not supported (this persona-compass "
                f"reads version {CALIBRATION_FORMAT_VERSION}); upgrade persona-compass"
            )
        missing = [k for k in ("percentiles", "values", "n_samples") if k not in data]
        if missing:
            raise AxisFileError(f"calibration data lacks {', '.join(missing)}")
        raw_tokens = data.get("tokens") or {}
        if not isinstance(raw_tokens, dict) or any(
            not isinstance(t, dict) or "tokens" in t for t in raw_tokens.values()
        ):
            raise AxisFileError(
                "calibration tokens must be an object of per-token tables, e.g. "
                '{"roleplay": {...}, "default": {...}}'
            )
        tokens = {}
        for kind, table in raw_tokens.items():
            try:
                tokens[kind] = cls.from_dict(table)
            except AxisFileError as exc:
                raise AxisFileError(f"calibration tokens[{kind!r}]: {exc}") from None
        return cls(
            percentiles=data["percentiles"],
            values=data["values"],
            n_samples=data["n_samples"],
            source=data.get("source", ""),
            tokens=tokens,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``calibration.json`` atomically; ``path`` is the file or its bundle folder."""
        target = Path(path)
        if target.is_dir() or not target.suffix:
            target = target / CALIBRATION_FILE
        write_json(target, self.to_dict())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read ``calibration.json`` (the file or its bundle folder)."""
        target = Path(path)
        if target.is_dir():
            target = target / CALIBRATION_FILE
        if not target.is_file():
            raise AxisFileError(f"no calibration file at {target}")
        data = read_json_object(target, AxisFileError)
        try:
            return cls.from_dict(data)
        except AxisFileError as exc:
            raise AxisFileError(f"{target}: {exc}") from None


def _invert(x: Tensor, row: Tensor, grid: Tensor) -> Tensor:
    """Percentile of ``x`` (any shape, float64) on one layer's table: ``row``, ``grid`` (P,)."""
    flat = x.reshape(-1).contiguous()
    # Interpolating from the first and from the last table point equal to x, then averaging,
    # puts a value inside a run of ties at the middle of that run; elsewhere both agree.
    left = _interp(flat, row, grid, right=False)
    right = _interp(flat, row, grid, right=True)
    out = 0.5 * (left + right)
    out = torch.where(torch.isnan(flat), flat, out)
    return out.reshape(x.shape)


def _interp(x: Tensor, row: Tensor, grid: Tensor, *, right: bool) -> Tensor:
    n = row.numel()
    i = torch.searchsorted(row, x, right=right)  # in [0, n]
    lo = (i - 1).clamp(0, n - 2)
    hi = lo + 1
    v0, v1 = row[lo], row[hi]
    denom = v1 - v0
    # Inside the table the segment (i - 1, i) has v0 < v1 by construction of searchsorted;
    # zero widths only occur at the clamped ends, which the where() below overrides.
    t = ((x - v0) / torch.where(denom > 0, denom, 1.0)).clamp(0.0, 1.0)
    out = grid[lo] + t * (grid[hi] - grid[lo])
    out = torch.where(i == 0, grid[0], out)
    return torch.where(i == n, grid[-1], out)
