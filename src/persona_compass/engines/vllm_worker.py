"""The worker side of the vLLM engine: the plugin that puts the compass op into the model,
the per-step bookkeeping that maps tokens to requests, and the worker extension the engine
calls over ``collective_rpc``.

vLLM loads :func:`register` (entry point ``vllm.general_plugins``) in every process. It
wraps the model runner's ``load_model`` so that, when the engine was started with
``additional_config={"persona_compass": {...}}``, the chosen decoder layers call the opaque
``persona_compass::steer_cap`` op right after the weights load and before vLLM compiles or
captures anything; and its ``_model_forward`` so that each step first writes every token's
request slot into the op's tables and afterwards copies that step's readings to the host
(one asynchronous copy per step). These are vLLM internals: the engine pins the vLLM release
and its tests fail loudly when an upgrade moves them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from .compass_op import NULL_SLOT, CompassTables, activate

logger = logging.getLogger(__name__)

CONFIG_KEY = "persona_compass"  # in additional_config and in SamplingParams.extra_args
MAX_KEPT_RECORDS = 4096  # readings of finished requests nobody collected are dropped past this

_compass_classes: dict[type, type] = {}


def _compass_class(cls: Any) -> type:
    """A subclass of a decoder layer whose forward ends with the compass op."""
    if cls in _compass_classes:
        return _compass_classes[cls]
    inner = cls.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = inner(self, *args, **kwargs)
        op = torch.ops.persona_compass.steer_cap
        if isinstance(out, tuple) and len(out) == 2:
            hidden, residual = out  # vLLM's (mlp_out, residual): the block output is the sum
            return op(hidden, residual, self._persona_compass_layer), residual
        return op(out, None, self._persona_compass_layer)

    new = type(f"Compass{cls.__name__}", (cls,), {"forward": forward})
    _compass_classes[cls] = new
    return new


def find_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The decoder-layer list of a vLLM model (a ModuleList named ``layers`` of that length)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers"):
            if len(module) == n_layers:
                return module
    raise RuntimeError(
        f"persona-compass found no list of {n_layers} decoder layers in {type(model).__name__}; "
        "this architecture is not supported by the vllm engine (use --engine hf)"
    )


class _Record:
    """One request's per-position readings, filled step by step on the host: the monitor
    layer's projections, the cap layers' raised flags and the trait needles' projections."""

    def __init__(self, n_layers: int, n_traits: int) -> None:
        self.projections = np.full(256, np.nan, dtype=np.float32)
        self.raised = np.zeros((256, n_layers), dtype=bool)
        self.traits = np.full((256, n_traits), np.nan, dtype=np.float32)

    def write(
        self, start: int, projections: np.ndarray, raised: np.ndarray, traits: np.ndarray
    ) -> None:
        end = start + len(projections)
        if end > len(self.projections):
            size = max(end, 2 * len(self.projections))
            grown = np.full(size, np.nan, dtype=np.float32)
            grown[: len(self.projections)] = self.projections
            more = np.zeros((size, self.raised.shape[1]), dtype=bool)
            more[: len(self.raised)] = self.raised
            wider = np.full((size, self.traits.shape[1]), np.nan, dtype=np.float32)
            wider[: len(self.traits)] = self.traits
            self.projections, self.raised, self.traits = grown, more, wider
        self.projections[start:end] = projections
        self.raised[start:end] = raised
        self.traits[start:end] = traits


class CompassRuntime:
    """The compass inside one worker: its tables, request slots and collected readings."""

    def __init__(self, runner: Any, settings: dict[str, Any]) -> None:
        from ..axis import Axis

        if getattr(runner, "speculative_config", None):
            raise RuntimeError(
                "the persona-compass vllm engine does not support speculative decoding"
            )
        axis = Axis.load(settings["bundle"])
        traits = [Axis.load(folder) for folder in settings.get("traits", ())]
        layers = sorted({int(x) for x in settings["layers"]})
        monitor = int(settings["monitor_layer"])
        model = runner.model
        blocks = find_layers(model, axis.n_layers)
        for layer in layers:
            block = blocks[layer]
            block.__class__ = _compass_class(type(block))
            setattr(block, "_persona_compass_layer", layer)  # noqa: B010 (a plain int attribute)
        self.max_tokens = int(runner.max_num_tokens)
        max_slots = 2 * int(runner.max_num_reqs) + 1
        device = runner.device
        self.tables = CompassTables(
            {layer: axis.unit(layer) for layer in layers},
            monitor,
            max_tokens=self.max_tokens,
            max_slots=max_slots,
            vectors_per_layer=int(settings.get("vectors_per_layer", 4)),
            device=device,
            trait_units=[(t.layer, t.unit(t.layer)) for t in traits],
        )
        activate(self.tables)
        self.on_gpu = torch.device(device).type == "cuda"
        pin = self.on_gpu
        self._host_slots = [
            torch.zeros(self.max_tokens, dtype=torch.long, pin_memory=pin) for _ in range(2)
        ]
        n_op, n_traits = len(layers), len(traits)
        self._host_read = [
            (
                torch.zeros(self.max_tokens, dtype=torch.float32, pin_memory=pin),
                torch.zeros(self.max_tokens, n_op, dtype=torch.bool, pin_memory=pin),
                torch.zeros(self.max_tokens, n_traits, dtype=torch.float32, pin_memory=pin),
            )
            for _ in range(2)
        ]
        self._events: list[Any] = [None, None]
        self._step = 0
        self.slot_of: dict[str, int] = {}  # vLLM request id -> slot
        self.compass_id: dict[str, str] = {}  # vLLM request id -> the engine's request id
        self._free = list(range(max_slots - 1, NULL_SLOT, -1))
        self._last_ids: tuple[str, ...] = ()
        self._row_slots = np.zeros(0, dtype=np.int64)
        self._row_ids: list[str | None] = []
        self._recording = False  # whether any request of the current batch is read
        self._pending: tuple[Any, ...] | None = None
        self.records: OrderedDict[str, _Record] = OrderedDict()
        self.trait_layers = [t.layer for t in traits]
        logger.info(
            "persona-compass: op on layers %s, monitor layer %d, trait needles on %s",
            layers,
            monitor,
            self.trait_layers,
        )

    # -- requests -> slots ------------------------------------------------------------------
    def _sync_requests(self, runner: Any, req_ids: list[str]) -> None:
        live = runner.requests
        for rid in [r for r in self.compass_id if r not in live]:  # finished or aborted
            self.compass_id.pop(rid)
            slot = self.slot_of.pop(rid, None)
            if slot is not None:
                self.tables.clear_slot(slot)
                self._free.append(slot)
        for rid in req_ids:
            if rid in self.slot_of or rid in self.compass_id:
                continue
            params = getattr(live[rid], "sampling_params", None)
            extra = (getattr(params, "extra_args", None) or {}).get(CONFIG_KEY)
            if not extra:
                self.compass_id[rid] = ""  # seen, no compass settings: the null slot
                continue
            self.compass_id[rid] = str(extra["id"])
            caps = [(int(c[0]), int(c[1]), float(c[2])) for c in extra.get("caps", ())]
            steer = [(int(s[0]), float(s[1])) for s in extra.get("steer", ())]
            if caps or steer:
                if not self._free:
                    raise RuntimeError("persona-compass ran out of request slots")
                slot = self._free.pop()
                self.tables.set_slot(slot, caps=caps, steer=steer)
                self.slot_of[rid] = slot
        self._row_slots = np.array([self.slot_of.get(r, NULL_SLOT) for r in req_ids])
        self._row_ids = [self.compass_id.get(r) or None for r in req_ids]
        self._recording = any(self._row_ids)

    def before_forward(self, runner: Any, n_padded: int) -> None:
        """Write each token's slot (one host-to-device copy) and mark readings unwritten."""
        self._collect()
        batch = runner.input_batch
        n_reqs = int(batch.num_reqs)
        req_ids = list(batch.req_ids[:n_reqs])
        if tuple(req_ids) != self._last_ids:  # a request came or left (finished, aborted)
            self._sync_requests(runner, req_ids)
            self._last_ids = tuple(req_ids)
        qsl = np.asarray(runner.query_start_loc.np[: n_reqs + 1], dtype=np.int64)
        counts = np.diff(qsl)
        n = int(qsl[-1])
        k = self._step % 2
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy that last used these host buffers
        host = self._host_slots[k]
        host_np = host.numpy()
        host_np[:n] = np.repeat(self._row_slots, counts)
        host_np[n:n_padded] = NULL_SLOT
        tables = self.tables
        tables.token_slot[:n_padded].copy_(host[:n_padded], non_blocking=True)
        tables.readings[:n_padded].fill_(float("nan"))  # a layer that never ran shows as NaN
        if tables.n_traits:
            tables.trait_readings[:, :n_padded].fill_(float("nan"))
        starts = np.asarray(batch.num_computed_tokens_cpu[:n_reqs], dtype=np.int64).copy()
        self._step_info = (self._row_ids, starts, qsl, n)  # replaced, never mutated

    def after_forward(self) -> None:
        """Start this step's readings on their way to the host (asynchronous on a GPU)."""
        row_ids, starts, qsl, n = self._step_info
        k = self._step % 2
        self._step += 1
        if self._recording:
            host_read, host_raised, host_traits = self._host_read[k]
            host_read[:n].copy_(self.tables.readings[:n], non_blocking=True)
            host_raised[:n].copy_(self.tables.raised[:, :n].T, non_blocking=True)
            if self.tables.n_traits:
                host_traits[:n].copy_(self.tables.trait_readings[:, :n].T, non_blocking=True)
        event = None
        if self.on_gpu:  # guards this step's host buffers until the copies are done
            event = torch.cuda.Event()
            event.record()
        self._events[k] = event
        if self._recording:
            self._pending = (event, k, row_ids, starts, qsl)

    def _collect(self) -> None:
        """File the last step's readings under their requests."""
        if self._pending is None:
            return
        event, k, row_ids, starts, qsl = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        read, raised, traits = (buffer.numpy() for buffer in self._host_read[k])
        n_layers, n_traits = raised.shape[1], traits.shape[1]
        for row, cid in enumerate(row_ids):
            if not cid:
                continue
            record = self.records.get(cid)
            if record is None:
                record = self.records[cid] = _Record(n_layers, n_traits)
                while len(self.records) > MAX_KEPT_RECORDS:
                    self.records.popitem(last=False)
            a, b = int(qsl[row]), int(qsl[row + 1])
            record.write(int(starts[row]), read[a:b], raised[a:b], traits[a:b])

    # -- the engine's calls -----------------------------------------------------------------
    def take(
        self, ids: list[str]
    ) -> dict[str, tuple[list[float], list[list[bool]], list[list[float]]]]:
        """Hand over (and forget) the readings of finished requests: per request, the monitor
        layer's projections, the raised flags (position, op layer) and each trait needle's
        projections (needle, position)."""
        self._collect()
        out = {}
        for cid in ids:
            record = self.records.pop(cid, None)
            if record is None:
                continue
            valid = ~np.isnan(record.projections)
            end = int(np.flatnonzero(valid)[-1]) + 1 if valid.any() else 0
            out[cid] = (
                record.projections[:end].tolist(),
                record.raised[:end].tolist(),
                record.traits[:end].T.tolist(),
            )
        return out

    def peek(self, offsets: dict[str, int]) -> dict[str, tuple[list[float], list[list[float]]]]:
        """The monitor-layer and trait needles' readings (needle, position) of running
        requests from each given position on (kept: :meth:`take` still hands over
        everything). Streaming reads only what is new."""
        self._collect()
        out = {}
        for cid, start in offsets.items():
            record = self.records.get(cid)
            if record is None:
                continue
            values = record.projections[int(start) :]
            valid = ~np.isnan(values)
            end = int(np.argmin(valid)) if not valid.all() else len(values)
            traits = record.traits[int(start) : int(start) + end]
            out[cid] = (values[:end].tolist(), traits.T.tolist())
        return out

    def info(self) -> dict[str, Any]:
        return {
            "layers": list(self.tables.layers),
            "monitor_layer": self.tables.monitor_layer,
            "trait_layers": list(self.trait_layers),
            "max_slots": self.tables.max_slots,
            "max_tokens": self.max_tokens,
            "device": str(self.tables.vectors.device),
            "tracked_requests": len(self.compass_id),
            "free_slots": len(self._free),
            "uncollected_readings": len(self.records),
        }


def _install(runner: Any) -> None:
    extra = getattr(runner.vllm_config, "additional_config", None) or {}
    settings = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    runner._persona_compass = CompassRuntime(runner, settings) if settings else None


def register() -> None:
    """vLLM general plugin: make model runners install the compass when configured."""
    from .vllm_capture import register as register_capture
    from .vllm_runner import patch_runners

    register_capture()  # the extraction's in-engine capture, when configured
    patch_runners("_persona_compass", _install)


class CompassWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``): what the engine calls by name."""

    def _compass(self) -> CompassRuntime:
        runtime = getattr(self.model_runner, "_persona_compass", None)  # type: ignore[attr-defined]
        if runtime is None:
            raise RuntimeError(
                "the persona-compass op is not installed in this worker: the plugin did not "
                "load (is persona-compass installed in the environment vLLM runs in?)"
            )
        return runtime

    def persona_compass_info(self) -> dict[str, Any]:
        return self._compass().info()

    def persona_compass_add_vectors(self, items: list[tuple[int, list[float]]]) -> list[int]:
        tables = self._compass().tables
        return [tables.add_vector(int(layer), torch.tensor(vec)) for layer, vec in items]

    def persona_compass_take(self, ids: list[str]) -> dict[str, Any]:
        return self._compass().take(list(ids))

    def persona_compass_peek(self, offsets: dict[str, int]) -> dict[str, Any]:
        return self._compass().peek(dict(offsets))

    def persona_compass_read(
        self, offsets: dict[str, int], ids: list[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`peek` and :meth:`take` in one call (one round trip to the worker)."""
        compass = self._compass()
        return compass.peek(dict(offsets)), compass.take(list(ids))
