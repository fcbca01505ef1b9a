"""Drift monitoring: per-token projections on the Assistant Axis, live or after the fact.

:class:`DriftMonitor` hooks one decoder block and writes every token's projection into a
growing device buffer during any forward or ``generate`` call. Nothing is copied to the host
until you ask (no ``.item()`` per token), so watching costs one small matmul per step.

:func:`project_conversation` renders a conversation with the model's chat template, runs one
forward pass and averages the projections over each turn's content tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .alerts import Alert, AlertRules, AlertTracker
from .axis import Axis
from .calibration import Calibration
from .chat import render_chat
from .device_buffer import DeviceBuffer
from .errors import PersonaCompassError
from .layers import block_output, find_decoder_blocks, normalize_layer

logger = logging.getLogger(__name__)

MAIN = -1
"""In a layer's needle group, the monitor's own axis (trait needles are 0, 1, ...)."""


def needle_names(traits: Sequence[Axis]) -> tuple[str, ...]:
    """Each trait axis' name (its bundle's ``trait``); two needles with one name are refused."""
    names = []
    for i, trait in enumerate(traits):
        meta = trait.metadata or {}
        if meta.get("kind") != "trait" or not meta.get("trait"):
            raise PersonaCompassError(
                f"traits[{i}] is not a trait axis (its bundle has no kind 'trait'); pass "
                "bundles made by `persona-compass extract --trait NAME`"
            )
        names.append(str(meta["trait"]))
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise PersonaCompassError(
            f"trait needle(s) {', '.join(doubled)} given twice; pass each once"
        )
    return tuple(names)


@dataclass(frozen=True)
class TokenReadings:
    """Per-token projections of a slice of the buffer, and their percentiles (if calibrated)."""

    projections: list[float]
    percentiles: list[float] | None


@dataclass(frozen=True)
class TraitReading:
    """One trait needle's reading of a turn: its mean projection and percentile (high = more
    of the trait)."""

    projection: float
    percentile: float | None

    def to_dict(self) -> dict[str, Any]:
        proj = None if math.isnan(self.projection) else self.projection
        return {"projection": proj, "percentile": self.percentile}


def trait_reading(trait: Axis, projection: float, layer: int | None = None) -> TraitReading:
    """A trait needle's projection with its percentile on its calibration at ``layer``
    (default: its monitor layer); no percentile without a calibration or a finite value."""
    calibration = trait.calibration
    pct = None
    if calibration is not None and math.isfinite(projection):
        at = trait.layer if layer is None else layer
        pct = float(calibration.percentile_of(projection, at))
    return TraitReading(projection, pct)


@dataclass(frozen=True)
class TurnReading:
    """One turn on the compass: its mean projection, percentile, capping state and alerts.

    ``index`` is the turn's message index; ``cap_engagement`` is the fraction of the turn's
    capped token-layer activations that the floor raised (None when the turn was not capped).
    ``traits`` holds the trait needles' readings by name (empty without trait axes).
    """

    index: int
    role: str
    projection: float
    percentile: float | None
    n_tokens: int
    capped: bool = False
    cap_engagement: float | None = None
    alerts: tuple[Alert, ...] = field(default=())
    traits: Mapping[str, TraitReading] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The transcript layout of a reading (JSON-ready; NaN becomes null)."""
        proj = None if math.isnan(self.projection) else self.projection
        traits = {"traits": {k: v.to_dict() for k, v in self.traits.items()}} if self.traits else {}
        return {
            "index": self.index,
            "role": self.role,
            "projection": proj,
            "percentile": self.percentile,
            "n_tokens": self.n_tokens,
            "capped": self.capped,
            "cap_engagement": self.cap_engagement,
            "alerts": [a.to_dict() for a in self.alerts],
            **traits,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurnReading:
        """The inverse of :meth:`to_dict` (validate with ``transcripts.check_readings`` first)."""
        projection = data["projection"]
        percentile = data.get("percentile")
        engagement = data.get("cap_engagement")
        traits = {
            str(name): TraitReading(
                math.nan if t.get("projection") is None else float(t["projection"]),
                None if t.get("percentile") is None else float(t["percentile"]),
            )
            for name, t in (data.get("traits") or {}).items()
        }
        return cls(
            index=int(data["index"]),
            role=str(data["role"]),
            projection=math.nan if projection is None else float(projection),
            percentile=None if percentile is None else float(percentile),
            n_tokens=int(data["n_tokens"]),
            capped=bool(data.get("capped", False)),
            cap_engagement=None if engagement is None else float(engagement),
            alerts=tuple(Alert.from_dict(a) for a in data.get("alerts", ())),
            traits=traits,
        )

    def shifted(self, offset: int) -> TurnReading:
        """The same reading with its (and its alerts') message index moved by ``offset``."""
        alerts = tuple(replace(a, turn=a.turn + offset) for a in self.alerts)
        return replace(self, index=self.index + offset, alerts=alerts)


class DriftMonitor:
    """Record per-token projections on the axis at one layer, on the device.

    Args:
        model: a Hugging Face causal LM.
        axis: the :class:`Axis` to project on.
        layer: the block to watch (default: the axis' monitor layer).
        block_path: explicit dotted path to the decoder blocks, if not auto-detected.
        capacity: initial token capacity of the buffer; it doubles when full.
        calibration: the percentile scale (default: the axis bundle's calibration).
        rules: alert rules for :meth:`end_turn` (default :class:`AlertRules`).
        on_alert: called with every :class:`Alert` raised.
        traits: trait axes (bundles of ``kind: "trait"``) read beside the axis, each at its
            own monitor layer. Axes that share a layer are read with one stacked matmul per
            forward; each needle has its own calibration and alert tracker, whose rules fire
            when the trait goes *high* (see :class:`~persona_compass.alerts.AlertTracker`).

    Example:
        >>> with DriftMonitor(model, axis) as mon:
        ...     model.generate(**inputs, max_new_tokens=32)
        >>> mon.token_projections()  # (batch, prompt + generated - 1) float32

    With ``generate``, the prompt's forward records every prompt position, then each step
    records the one token it feeds; the last generated token is never fed back, so it has no
    projection. Padding positions are recorded too: mask them with the attention mask.
    """

    def __init__(
        self,
        model: nn.Module,
        axis: Axis,
        layer: int | None = None,
        *,
        block_path: str | None = None,
        capacity: int = 1024,
        calibration: Calibration | None = None,
        rules: AlertRules | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        traits: Sequence[Axis] = (),
    ) -> None:
        blocks = find_decoder_blocks(model, block_path)
        axis.check_model(model)
        for trait in traits:
            trait.check_model(model)
        chosen = normalize_layer(axis.layer if layer is None else layer, len(blocks))
        self._setup(axis, chosen, calibration, rules, on_alert, capacity, traits)
        self._block: nn.Module | None = blocks[self.layer]
        self._blocks: dict[int, nn.Module] = {
            at: blocks[at] for at in self._groups if at != self.layer
        }

    def _setup(
        self,
        axis: Axis,
        layer: int,
        calibration: Calibration | None,
        rules: AlertRules | None,
        on_alert: Callable[[Alert], None] | None,
        capacity: int,
        traits: Sequence[Axis] = (),
    ) -> None:
        self.layer = layer
        self.axis = axis
        self.calibration = calibration if calibration is not None else axis.calibration
        callbacks = [on_alert] if on_alert is not None else []
        self.tracker = AlertTracker(rules, callbacks)
        self.turns: list[TurnReading] = []
        self._buffer = DeviceBuffer(torch.float32, capacity)
        self._unit: torch.Tensor | None = None
        self._handle: Any = None
        self.traits = tuple(traits)
        self.trait_names = needle_names(self.traits)
        self.trait_layers = tuple(normalize_layer(t.layer, t.n_layers) for t in self.traits)
        self._trait_buffers = [DeviceBuffer(torch.float32, capacity) for _ in self.traits]
        self._trait_trackers = [
            AlertTracker(rules, callbacks, needle=name) for name in self.trait_names
        ]
        # layer -> the needles read there (MAIN = the axis itself), one stacked matmul each
        self._groups: dict[int, list[int]] = {layer: [MAIN]} if self.traits else {}
        for i, at in enumerate(self.trait_layers):
            self._groups.setdefault(at, []).append(i)
        self._stacks: dict[int, torch.Tensor] = {}
        self._trait_handles: list[Any] = []

    @classmethod
    def from_projections(
        cls,
        axis: Axis,
        projections: torch.Tensor,
        *,
        layer: int | None = None,
        calibration: Calibration | None = None,
        rules: AlertRules | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        traits: Sequence[Axis] = (),
        trait_projections: torch.Tensor | None = None,
    ) -> DriftMonitor:
        """A monitor over projections measured elsewhere (a serving engine), not attached to
        a model: ``read``, ``measure_turn`` and ``end_turn`` work as after a live run.

        ``projections`` is one sequence's per-position values (n_tokens,); with ``traits``,
        ``trait_projections`` holds the needles' values (len(traits), n_tokens).
        """
        self = cls.__new__(cls)
        chosen = normalize_layer(axis.layer if layer is None else layer, axis.n_layers)
        capacity = max(1, projections.numel())
        self._setup(axis, chosen, calibration, rules, on_alert, capacity, traits)
        self._block = None
        self.load(projections, trait_projections)
        return self

    def load(
        self, projections: torch.Tensor, trait_projections: torch.Tensor | None = None
    ) -> None:
        """Replace the token buffers with one sequence's readings measured elsewhere: the
        axis' (n_tokens,) and the needles' (n_traits, n_tokens), in ``trait_names`` order."""
        n = projections.numel()
        if self.traits:
            shape = None if trait_projections is None else tuple(trait_projections.shape)
            if shape != (len(self.traits), n):
                raise PersonaCompassError(
                    f"trait readings of shape {shape} do not fit {len(self.traits)} needles "
                    f"over {n} tokens; pass one row per needle, as long as the axis' readings"
                )
        rows = [projections, *(trait_projections if trait_projections is not None else ())]
        for buffer, row in zip([self._buffer, *self._trait_buffers], rows, strict=False):
            buffer.reset()
            if n:
                buffer.append(row.detach().float().reshape(1, -1))

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> DriftMonitor:
        if self._handle is not None:
            raise PersonaCompassError("this DriftMonitor is already active; use a new one")
        if self._block is None:
            raise PersonaCompassError(
                "this DriftMonitor reads projections measured elsewhere and has no model "
                "to watch; make one with DriftMonitor(model, axis)"
            )
        if self._groups:
            self._handle = self._block.register_forward_hook(self._stacked_hook(self.layer))
            self._trait_handles = [
                block.register_forward_hook(self._stacked_hook(at))
                for at, block in self._blocks.items()
            ]
        else:
            self._handle = self._block.register_forward_hook(self._hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hook (idempotent). Readings stay available."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for handle in self._trait_handles:
            handle.remove()
        self._trait_handles = []

    # -- recording -------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = block_output(output)
        if self._unit is None or self._unit.device != hidden.device:
            self._unit = self.axis.unit(self.layer).to(hidden.device, torch.float32)
        proj = hidden.detach().float() @ self._unit  # (B, T): stays on the device
        if self._buffer.append(proj):
            logger.warning("batch size changed to %d: readings reset", proj.shape[0])

    def _stacked_hook(self, layer: int) -> Callable[[nn.Module, Any, Any], None]:
        """The hook of one layer when trait needles are read: every needle of that layer in
        one (hidden @ stacked units) matmul, each column appended to its needle's buffer."""
        members = self._groups[layer]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = block_output(output)
            stack = self._stacks.get(layer)
            if stack is None or stack.device != hidden.device:
                units = [
                    (self.axis if i == MAIN else self.traits[i]).unit(
                        self.layer if i == MAIN else layer
                    )
                    for i in members
                ]
                stack = torch.stack(units, dim=1).to(hidden.device, torch.float32)
                self._stacks[layer] = stack
            proj = hidden.detach().float() @ stack  # (B, T, k): stays on the device
            for column, i in enumerate(members):
                buffer = self._buffer if i == MAIN else self._trait_buffers[i]
                if buffer.append(proj[..., column]) and i == MAIN:
                    logger.warning("batch size changed to %d: readings reset", proj.shape[0])

        return hook

    # -- readings --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the hook is attached."""
        return self._handle is not None

    @property
    def n_tokens(self) -> int:
        """Token positions recorded so far (per sequence)."""
        return self._buffer.length

    def token_projections(self) -> torch.Tensor:
        """Per-token projections so far: (batch, n_tokens) float32, on the model's device."""
        data = self._buffer.data
        if data is None:
            return torch.empty(0, 0)
        return data[:, : self._buffer.length].clone()

    def trait_token_projections(self, name: str) -> torch.Tensor:
        """One trait needle's per-token projections so far: (batch, n_tokens) float32."""
        buffer = self._trait_buffers[self._needle(name)]
        if buffer.data is None:
            return torch.empty(0, 0)
        return buffer.data[:, : buffer.length].clone()

    def _needle(self, name: str) -> int:
        if name not in self.trait_names:
            known = ", ".join(self.trait_names) or "none"
            raise PersonaCompassError(f"no trait needle named {name!r} (this monitor has: {known})")
        return self.trait_names.index(name)

    def reset(self) -> None:
        """Forget the token buffers (the hooks stay attached; turns and alerts are kept)."""
        self._buffer.reset()
        for buffer in self._trait_buffers:
            buffer.reset()

    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised so far by :meth:`end_turn` (trait needles' ones included)."""
        if not self.traits:
            return self.tracker.alerts
        everything = [*self.tracker.alerts]
        for tracker in self._trait_trackers:
            everything.extend(tracker.alerts)
        return sorted(everything, key=lambda a: a.turn)

    def percentile(self, value: float) -> float | None:
        """A projection's percentile at the monitor layer, or None without a calibration."""
        if self.calibration is None or math.isnan(value):
            return None
        return float(self.calibration.percentile_of(value, self.layer))

    def read(
        self, start: int, end: int, row: int = 0, *, percentiles: bool = True
    ) -> TokenReadings:
        """Projections (and percentiles) of buffer positions ``[start, end)``: one host copy.

        ``percentiles=False`` skips the per-token percentiles (``None`` in the result).
        """
        want = percentiles and self.calibration is not None
        values = self._buffer.row(row, start, end)
        if values.numel() == 0:
            return TokenReadings([], [] if want else None)
        pcts = None
        if want:
            assert self.calibration is not None
            pcts = self.calibration.percentile_of(values, self.layer).cpu().tolist()
        return TokenReadings(values.cpu().tolist(), pcts)

    def read_traits(self, start: int, end: int, row: int = 0) -> dict[str, TokenReadings]:
        """Every trait needle's projections and percentiles over ``[start, end)``."""
        out = {}
        for i, (name, trait) in enumerate(zip(self.trait_names, self.traits, strict=True)):
            values = self._trait_buffers[i].row(row, start, end)
            calibration = trait.calibration
            pcts = None
            if calibration is not None and values.numel():
                pcts = calibration.percentile_of(values, self.trait_layers[i]).cpu().tolist()
            out[name] = TokenReadings(values.cpu().tolist(), pcts)
        return out

    def trait_reading(self, name: str, projection: float) -> TraitReading:
        """A trait needle's mean projection with its percentile on the needle's own scale."""
        i = self._needle(name)
        return trait_reading(self.traits[i], projection, self.trait_layers[i])

    def replay(self, reading: TurnReading) -> None:
        """Take a stored assistant reading into the alert history (no alert is re-raised):
        a restored conversation's rules go on from where it stopped."""
        trackers = [(self.tracker, reading.percentile)]
        for name, tracker in zip(self.trait_names, self._trait_trackers, strict=True):
            trait = reading.traits.get(name)
            trackers.append((tracker, trait.percentile if trait is not None else None))
        for tracker, pct in trackers:
            value = math.nan if pct is None else pct
            tracker.history.append(value if tracker.needle is None else 100 - value)
            tracker.alerts.extend(a for a in reading.alerts if a.needle == tracker.needle)

    def shift_turns(self, offset: int) -> None:
        """Move every kept reading and alert by ``offset`` messages (a system message came
        or went)."""
        self.turns[:] = [t.shifted(offset) for t in self.turns]
        for tracker in (self.tracker, *self._trait_trackers):
            tracker.alerts[:] = [replace(a, turn=a.turn + offset) for a in tracker.alerts]

    def measure_turn(
        self,
        tokens: TokenReadings,
        *,
        index: int,
        role: str = "assistant",
        capped: bool = False,
        cap_engagement: float | None = None,
        trait_tokens: Mapping[str, TokenReadings] | None = None,
    ) -> TurnReading:
        """A turn's reading from its token readings; assistant turns go through the alert rules.

        ``trait_tokens`` are the trait needles' readings of the same tokens (see
        :meth:`read_traits`). The reading is not kept (see :meth:`end_turn`).
        """
        n = len(tokens.projections)
        projection = sum(tokens.projections) / n if n else float("nan")
        percentile = self.percentile(projection)
        alerts: list[Alert] = []
        if role == "assistant":
            alerts += self.tracker.observe(index, percentile, tokens.percentiles or ())
        traits: dict[str, TraitReading] = {}
        for name, readings in (trait_tokens or {}).items():
            values = readings.projections
            traits[name] = reading = self.trait_reading(
                name, sum(values) / len(values) if values else float("nan")
            )
            if role == "assistant":
                tracker = self._trait_trackers[self._needle(name)]
                alerts += tracker.observe(index, reading.percentile, readings.percentiles or ())
        return TurnReading(
            index, role, projection, percentile, n, capped, cap_engagement, tuple(alerts), traits
        )

    def end_turn(
        self,
        start: int,
        end: int,
        *,
        index: int,
        role: str = "assistant",
        row: int = 0,
        capped: bool = False,
        cap_engagement: float | None = None,
        tokens: TokenReadings | None = None,
    ) -> TurnReading:
        """Close a turn over buffer positions ``[start, end)``: read it, check alerts, keep it.

        Alerts are checked for assistant turns only. One host copy per turn, none when the
        caller passes the ``tokens`` it already read for that range.
        """
        if tokens is None:
            tokens = self.read(start, end, row)
        reading = self.measure_turn(
            tokens,
            index=index,
            role=role,
            capped=capped,
            cap_engagement=cap_engagement,
            trait_tokens=self.read_traits(start, end, row) if self.traits else None,
        )
        self.turns.append(reading)
        return reading


@dataclass(frozen=True)
class TurnProjection:
    """The mean projection of one turn's content tokens.

    ``index`` is the turn's position in the conversation's message list; ``traits`` maps
    each trait needle's name to its mean projection over the same tokens.
    """

    index: int
    role: str
    projection: float
    n_tokens: int
    traits: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.traits:  # the layout without trait needles stays as it was
            del data["traits"]
        return data


def _windows(n_tokens: int, window: int) -> list[tuple[int, int, int, int]]:
    """Windows over a long sequence: (win_start, win_end, keep_start, keep_end).

    Window k starts at k * window // 2. The first window keeps all its tokens; each later one
    keeps only its second half, so every kept token sees at least window // 2 tokens of
    preceding context (or all of it, near the start).
    """
    if n_tokens <= window:
        return [(0, n_tokens, 0, n_tokens)]
    stride = window // 2
    out = [(0, window, 0, window)]
    start = stride
    while out[-1][3] < n_tokens:
        end = min(start + window, n_tokens)
        out.append((start, end, out[-1][3], end))
        start += stride
    return out


def context_length(model: nn.Module) -> int | None:
    """The model's maximum context (``max_position_embeddings``), if it declares one."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


@torch.inference_mode()
def token_projections(
    model: nn.Module,
    axis: Axis,
    input_ids: Sequence[int],
    *,
    layer: int | None = None,
    max_context: int | None = None,
    block_path: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Projections of every token of one sequence at one layer: (n_tokens,) float32, on CPU.

    :func:`needle_projections` reads trait needles in the same pass.

    Sequences longer than ``max_context`` (default: the model's context length) are processed
    in half-overlapping windows (see :func:`_windows`), never silently cut: each window costs
    the same, so the time grows linearly with the length (about twice a single pass, since
    windows overlap by half). ``progress`` shows a bar over the tokens (stderr) when there is
    more than one window.
    """
    return needle_projections(
        model,
        axis,
        input_ids,
        layer=layer,
        max_context=max_context,
        block_path=block_path,
        progress=progress,
    )[0]


@torch.inference_mode()
def needle_projections(
    model: nn.Module,
    axis: Axis,
    input_ids: Sequence[int],
    *,
    traits: Sequence[Axis] = (),
    layer: int | None = None,
    max_context: int | None = None,
    block_path: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """:func:`token_projections` of the axis and of each trait needle, from one pass:
    (1 + len(traits), n_tokens) float32 on CPU, the axis first, the traits in order."""
    window = max_context or context_length(model) or len(input_ids)
    if window < 2:
        raise PersonaCompassError(f"max_context={window} is too small; use at least 2 tokens")
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    out = torch.empty(1 + len(traits), ids.shape[1], dtype=torch.float32)
    spans = _windows(ids.shape[1], window)
    if len(spans) > 1:
        logger.info(
            "%d tokens exceed the context of %d: %d windows", ids.shape[1], window, len(spans)
        )
    from tqdm import tqdm

    bar = tqdm(
        total=ids.shape[1],
        desc="tokens",
        unit="tok",
        disable=not progress or len(spans) < 2,
        dynamic_ncols=True,
    )
    with bar, DriftMonitor(model, axis, layer, block_path=block_path, traits=traits) as mon:
        for win_start, win_end, keep_start, keep_end in spans:
            mon.reset()
            model(input_ids=ids[:, win_start:win_end], use_cache=False)
            rows = [mon.token_projections()[0]]
            rows += [mon.trait_token_projections(name)[0] for name in mon.trait_names]
            proj = torch.stack(rows).cpu()
            out[:, keep_start:keep_end] = proj[:, keep_start - win_start : keep_end - win_start]
            bar.update(keep_end - keep_start)
    return out


def project_conversation(
    model: nn.Module,
    tokenizer: Any,
    axis: Axis,
    messages: Sequence[dict[str, str]],
    *,
    layer: int | None = None,
    roles: Sequence[str] | None = ("assistant",),
    max_context: int | None = None,
    block_path: str | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
    traits: Sequence[Axis] = (),
) -> list[TurnProjection]:
    """Per-turn mean projections of a conversation's content tokens, in one forward pass.

    Args:
        model: the model.
        tokenizer: its tokenizer (chat template required).
        axis: the axis to project on.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        layer: block to read (default: the axis' monitor layer).
        roles: which turns to report (None: every turn that has a span).
        max_context: window size for long conversations (default: the model's context).
        max_tokens: refuse conversations longer than this many tokens (None: no limit).
        progress: show a progress bar for conversations longer than one window.
        traits: trait needles read in the same pass (each at its own monitor layer).

    Returns:
        One :class:`TurnProjection` per selected turn, in conversation order. A turn with no
        content tokens reports ``nan``.
    """
    rendered = render_chat(tokenizer, list(messages))
    n_tokens = len(rendered.input_ids)
    if max_tokens is not None and n_tokens > max_tokens:
        raise PersonaCompassError(
            f"the conversation has {n_tokens:,} tokens, over the limit of {max_tokens:,}; "
            "split it, or raise the limit (`max_tokens=N`; reading costs time "
            "linear in the length)"
        )
    proj = needle_projections(
        model,
        axis,
        rendered.input_ids,
        traits=traits,
        layer=layer,
        max_context=max_context,
        block_path=block_path,
        progress=progress,
    )
    names = needle_names(traits)
    turns = []
    for span in rendered.spans:
        if roles is not None and span.role not in roles:
            continue
        values = proj[:, span.start : span.end]
        n = int(values.shape[1])
        means = values.mean(dim=1).tolist() if n else [float("nan")] * values.shape[0]
        needles = dict(zip(names, means[1:], strict=True))
        turns.append(TurnProjection(span.index, span.role, means[0], n, needles))
    return turns
