"""Operators on the residual stream and scoped hooks that apply them: steering and capping.

An operator maps a block's output ``hidden`` (B, T, D) to a new one, at every position. Its
tensors are prepared once per (device, dtype) and reused, so a forward step costs one matmul
per cap and no host sync. :func:`add_hooks` attaches operators to decoder blocks and returns a
handle that removes them; :func:`steering` and :func:`capping` are context managers over it
that leave the model exactly as they found it, also when the body raises.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .axis import Axis, text_config, unit_rows
from .device_buffer import DeviceBuffer
from .errors import AxisFileError, CappingConfigError
from .layers import (
    block_output,
    find_decoder_blocks,
    normalize_layer,
    normalize_layers,
    replace_block_output,
)

if TYPE_CHECKING:
    from .capping import CappingConfig

__all__ = [
    "AddVector",
    "CapCeiling",
    "CapEngagement",
    "CapFloor",
    "HookHandle",
    "Operator",
    "add_hooks",
    "capping",
    "steering",
]


@runtime_checkable
class Operator(Protocol):
    """Anything that maps ``hidden`` (..., D) to a tensor of the same shape and dtype."""

    def __call__(self, hidden: Tensor) -> Tensor: ...


def _vector(value: Any, name: str, error: type[Exception]) -> Tensor:
    if not isinstance(value, Tensor):
        raise error(f"{name} must be a 1-D torch.Tensor (d_model,), got {type(value).__name__}")
    if value.ndim != 1 or value.numel() == 0:
        raise error(f"{name} has shape {tuple(value.shape)}; pass one (d_model,) vector")
    if not value.is_floating_point():
        raise error(f"{name} has dtype {value.dtype}; pass a floating-point vector")
    vec = value.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(vec).all():
        raise error(f"{name} contains NaN or infinity; pass a finite vector")
    return vec


def _scalar(value: Any, name: str, error: type[Exception]) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name}={value!r} must be a real number")
    out = float(value)
    if not math.isfinite(out):
        raise error(f"{name}={value!r} must be finite")
    return out


class _Prepared:
    """Per-(device, dtype) cache of an operator's tensors, filled once and reused."""

    def __init__(self) -> None:
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _build(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Copy the operator's tensors to ``device`` ahead of the first forward."""
        self._get(torch.device(device), dtype)

    def _get(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        tensor = self._cache.get(key)
        if tensor is None:
            tensor = self._build(device, dtype)
            self._cache[key] = tensor
        return tensor


class AddVector(_Prepared):
    """Add ``coefficient * vector`` at every position: ``h <- h + c v``.

    The product is formed in float32 and cast once to the hidden dtype, then added.

    Example:
        >>> op = AddVector(axis.directions[15], coefficient=-4.0)
        >>> hidden = op(hidden)  # (B, T, D)
    """

    def __init__(self, vector: Tensor, coefficient: float = 1.0) -> None:
        super().__init__()
        self.vector = _vector(vector, "vector", ValueError)
        self.coefficient = _scalar(coefficient, "coefficient", ValueError)
        self._delta = self.vector * self.coefficient  # (D,) float32

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    def __repr__(self) -> str:
        return f"AddVector(d_model={self.d_model}, coefficient={self.coefficient:g})"

    def _build(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        return self._delta.to(device=device, dtype=dtype)

    def __call__(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., D), same dtype and device."""
        _check_width(hidden, self.d_model, self)
        return hidden + self._get(hidden.device, hidden.dtype)


class CapEngagement:
    """Where caps raised the residual stream, per position, kept on the device.

    Every cap operator it is attached to appends its (batch, tokens) "raised" mask to its own
    growing buffer, so positions line up with a :class:`~persona_compass.DriftMonitor`'s
    buffer when both start (or are reset) together. Nothing is copied to the host until
    :meth:`fraction`.

    Example:
        >>> engagement = CapEngagement()
        >>> with capping(model, cfg, engagement=engagement):
        ...     model.generate(...)
        >>> engagement.fraction(prompt_len, prompt_len + n_new)  # share of raised activations
    """

    def __init__(self) -> None:
        self._masks: dict[int, DeviceBuffer] = {}

    def record(self, key: int, raised: Tensor) -> None:
        """Append one forward's mask (..., tokens) for the operator ``key``."""
        rows = raised.reshape(-1, raised.shape[-1]) if raised.ndim >= 2 else raised.view(1, -1)
        buf = self._masks.get(key)
        if buf is None:  # not setdefault: that would build a buffer on every forward
            buf = self._masks[key] = DeviceBuffer(torch.bool)
        buf.append(rows)

    def reset(self) -> None:
        """Forget every recorded position."""
        for buffer in self._masks.values():
            buffer.reset()

    def fraction(self, start: int, end: int, row: int = 0) -> float | None:
        """The share of (position, capped layer) pairs in ``[start, end)`` that were raised.

        None when nothing was recorded there (no cap ran, or the range is empty).
        """
        parts = [buffer.row(row, start, end) for buffer in self._masks.values()]
        parts = [p for p in parts if p.numel()]
        if not parts:
            return None
        return float(torch.cat(parts).float().mean())


class CapFloor(_Prepared):
    """Keep the projection on a unit vector at or above a threshold.

    ``h <- h + max(tau - h·v, 0) v`` at every position, ``v`` normalised here. The projection
    and the correction are computed in float32 (in bf16 a projection of a residual stream
    with norm ~2400 would be off by several units) and the result is rounded once to the
    hidden dtype. Positions already at or above ``tau`` are returned unchanged.

    Example:
        >>> op = CapFloor(axis.directions[20], threshold=12.5)
        >>> hidden = op(hidden)  # (hidden @ unit) >= 12.5 everywhere, up to float32 rounding
    """

    def __init__(self, unit_vector: Tensor, threshold: float) -> None:
        super().__init__()
        vec = _vector(unit_vector, "unit_vector", CappingConfigError)
        norm = float(torch.linalg.vector_norm(vec))
        if norm <= 1e-12:
            raise CappingConfigError("unit_vector is zero; a cap needs a direction")
        self.unit_vector = unit_rows(vec)  # (D,) float32, unit length
        self.threshold = _scalar(threshold, "threshold", CappingConfigError)
        # The floor actually applied: (v, tau) with h <- h + max(tau - h·v, 0) v.
        self._v = self.unit_vector
        self._tau = self.threshold
        self.engagement: CapEngagement | None = None  # records where this cap raised

    @property
    def d_model(self) -> int:
        return int(self.unit_vector.shape[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d_model={self.d_model}, threshold={self.threshold:g})"

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> None:
        # The cap works in float32 whatever the hidden dtype: that is the point of it.
        self._get(torch.device(device), torch.float32)

    def _build(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        return self._v.to(device=device, dtype=torch.float32)

    def __call__(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., D), same dtype and device."""
        _check_width(hidden, self.d_model, self)
        v = self._get(hidden.device, torch.float32)
        h32 = hidden.to(torch.float32)  # no copy when hidden is already float32
        excess = (self._tau - torch.matmul(h32, v)).clamp_min_(0.0)  # (...) float32
        if self.engagement is not None:
            self.engagement.record(id(self), excess > 0)
        out = torch.addcmul(h32, excess.unsqueeze(-1), v)
        return out.to(hidden.dtype)


class CapCeiling(CapFloor):
    """Keep the projection on a unit vector at or below a threshold.

    ``h <- h - max(h·u - tau, 0) u``: the form of the research release's capping configs,
    whose vectors point away from the Assistant. It runs as the identical floor
    ``CapFloor(-u, -tau)``, so both forms give the same bits.

    Example:
        >>> op = CapCeiling(-axis.unit(20), threshold=-12.5)
        >>> # ... acts exactly as CapFloor(axis.unit(20), threshold=12.5)
    """

    def __init__(self, unit_vector: Tensor, threshold: float) -> None:
        super().__init__(unit_vector, threshold)
        self._v = -self.unit_vector
        self._tau = -self.threshold


def _check_width(hidden: Tensor, d_model: int, op: object) -> None:
    if hidden.shape[-1] != d_model:
        raise ValueError(
            f"{op!r} got hidden states of width {hidden.shape[-1]}; its vector has "
            f"d_model={d_model}: use vectors made for this model"
        )


# ---- hooks --------------------------------------------------------------------------------


class _BlockDispatch:
    """The one forward hook persona-compass keeps on a block while any operator group is on it.

    It is registered with ``prepend=True`` so that every other forward hook on the block
    (transformers' hidden-state capture, monitors, user hooks) sees the modified output; the
    groups inside it run in the order they were added, so nested contexts compose in order.
    """

    def __init__(self, block: nn.Module) -> None:
        self.groups: dict[int, tuple[Operator, ...]] = {}
        self.handle: RemovableHandle = block.register_forward_hook(self, prepend=True)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.groups:
            return None
        hidden = block_output(output)
        for ops in tuple(self.groups.values()):
            for op in ops:
                hidden = op(hidden)
        return replace_block_output(output, hidden)


_DISPATCH: weakref.WeakKeyDictionary[nn.Module, _BlockDispatch] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_NEXT_ID = itertools.count(1)


class HookHandle:
    """Removes a set of operators from a model's blocks; also a context manager.

    Example:
        >>> handle = add_hooks(model, {20: [CapFloor(axis.unit(20), 12.5)]})
        >>> model.generate(...)
        >>> handle.remove()
    """

    def __init__(self, entries: Iterable[tuple[nn.Module, int]]) -> None:
        self._entries = list(entries)

    @property
    def active(self) -> bool:
        return bool(self._entries)

    def remove(self) -> None:
        """Detach every operator this handle added (idempotent)."""
        with _LOCK:
            while self._entries:
                block, gid = self._entries.pop()
                dispatch = _DISPATCH.get(block)
                if dispatch is None:
                    continue
                dispatch.groups.pop(gid, None)
                if not dispatch.groups:
                    dispatch.handle.remove()
                    del _DISPATCH[block]

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"HookHandle(blocks={len(self._entries)})"


def _block_device_dtype(block: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    for param in block.parameters():
        if param.is_floating_point() and param.device.type != "meta":
            return param.device, param.dtype
    return None


def add_hooks(
    model: nn.Module,
    operators: Mapping[int, Sequence[Operator]],
    *,
    block_path: str | None = None,
) -> HookHandle:
    """Apply operators to decoder-block outputs until the returned handle is removed.

    Args:
        model: a Hugging Face causal LM.
        operators: block index (negative counts from the end) -> operators applied in order
            to that block's output (B, T, D).
        block_path: dotted path to the decoder blocks, overriding the search.

    Returns:
        a :class:`HookHandle`; ``remove()`` or leaving its ``with`` block detaches everything.

    Example:
        >>> with add_hooks(model, {15: [AddVector(axis.directions[15], -4.0)]}):
        ...     model.generate(...)
    """
    blocks = find_decoder_blocks(model, block_path)
    plan: list[tuple[int, tuple[Operator, ...]]] = []
    for layer, ops in operators.items():
        idx = normalize_layer(layer, len(blocks))
        group = tuple(ops)
        for op in group:
            if not callable(op):
                raise TypeError(f"operator {op!r} for layer {layer} is not callable")
        if group:
            plan.append((idx, group))
    handle = HookHandle(())
    entries = handle._entries  # filled as we go, so a failure halfway removes what was added
    try:
        for idx, group in plan:
            block = blocks[idx]
            where = _block_device_dtype(block)
            if where is not None:
                for op in group:
                    prepare = getattr(op, "prepare", None)
                    if callable(prepare):
                        prepare(*where)
            with _LOCK:
                dispatch = _DISPATCH.get(block)
                if dispatch is None:
                    dispatch = _BlockDispatch(block)
                    _DISPATCH[block] = dispatch
                gid = next(_NEXT_ID)
                dispatch.groups[gid] = group
                entries.append((block, gid))
    except BaseException:
        handle.remove()
        raise
    return handle


def _model_width(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    width = getattr(text_config(config), "hidden_size", None)
    return width if isinstance(width, int) else None


Scale = Literal["raw", "unit", "relative"]


@contextmanager
def steering(
    model: nn.Module,
    axis: Axis,
    coefficient: float,
    layers: int | Iterable[int] | str | None = None,
    *,
    scale: Scale = "raw",
    block_path: str | None = None,
) -> Iterator[HookHandle]:
    """Add a multiple of the axis to the residual stream at every position, in scope.

    Args:
        model: the model the axis was made for (shape checked; a fingerprint mismatch warns).
        axis: the Assistant Axis.
        coefficient: > 0 pushes toward the Assistant, < 0 away from it.
        layers: blocks to steer (int, list, ``"16:24"``, ``"all"``); default ``axis.layer``.
        scale: what one unit of ``coefficient`` is. ``"raw"`` adds ``c * axis[l]`` (the
            research convention); ``"unit"`` adds ``c * axis[l] / |axis[l]|``; ``"relative"``
            adds ``c * residual_norms[l] * unit``, so ``c`` is a fraction of the layer's
            typical residual norm (the axis must carry ``residual_norms``).
        block_path: dotted path to the decoder blocks, overriding the search.

    Example:
        >>> with steering(model, axis, coefficient=-4.0, layers=[15]):
        ...     model.generate(...)
    """
    if scale not in ("raw", "unit", "relative"):
        raise ValueError(f"scale={scale!r} must be 'raw', 'unit' or 'relative'")
    coef = _scalar(coefficient, "coefficient", ValueError)
    axis.check_model(model, strict=False)
    n_blocks = len(find_decoder_blocks(model, block_path))
    if n_blocks != axis.n_layers:
        raise AxisFileError(
            f"the model has {n_blocks} decoder blocks but the axis has {axis.n_layers} layers; "
            "use the axis made for this model"
        )
    chosen = [axis.layer] if layers is None else normalize_layers(layers, axis.n_layers)
    if scale == "relative" and axis.residual_norms is None:
        raise AxisFileError(
            "scale='relative' needs the axis' residual_norms, and this axis has none; "
            "re-extract the axis (extraction records them), or use scale='unit' or 'raw'"
        )
    ops: dict[int, list[Operator]] = {}
    for layer in chosen:
        if scale == "raw":
            vec = axis.directions[layer]
        else:
            vec = axis.unit(layer)
            if scale == "relative":
                assert axis.residual_norms is not None
                vec = vec * axis.residual_norms[layer]
        ops[layer] = [AddVector(vec, coef)]
    handle = add_hooks(model, ops, block_path=block_path)
    try:
        yield handle
    finally:
        handle.remove()


@contextmanager
def capping(
    model: nn.Module,
    config: CappingConfig,
    *,
    block_path: str | None = None,
    engagement: CapEngagement | None = None,
) -> Iterator[HookHandle]:
    """Apply a capping config to the model's blocks, in scope.

    Several caps on one block run in the config's order. With ``engagement``, every cap
    records where it raised the residual stream (see :class:`CapEngagement`).

    Raises:
        CappingConfigError: the config's width differs from the model's hidden size, or a
            capped layer is past the model's last block.

    Example:
        >>> cfg = CappingConfig.load("axes/smollm2-135m")
        >>> with capping(model, cfg):
        ...     model.generate(...)
    """
    blocks = find_decoder_blocks(model, block_path)
    width = _model_width(model)
    if width is not None and width != config.d_model:
        raise CappingConfigError(
            f"capping config {config.name or '(unnamed)'} has vectors of width "
            f"{config.d_model} but the model's hidden size is {width}; use a config made "
            "for this model"
        )
    too_far = [layer for layer in config.layers if layer >= len(blocks)]
    if too_far:
        raise CappingConfigError(
            f"capping config {config.name or '(unnamed)'} caps layers {sorted(set(too_far))} "
            f"but the model has {len(blocks)} decoder blocks (0..{len(blocks) - 1}); use a "
            "config made for this model"
        )
    operators = config.operators()
    if engagement is not None:
        for ops in operators.values():
            for op in ops:
                if isinstance(op, CapFloor):
                    op.engagement = engagement
    handle = add_hooks(model, operators, block_path=block_path)
    try:
        yield handle
    finally:
        handle.remove()
