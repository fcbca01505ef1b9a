"""Capture inside vLLM: per-request running sums of post-block residuals, kept on the device.

The extraction's single-pass capture (:mod:`persona_compass.persona_space.capture`) for the
vllm engine. When vLLM is started with ``additional_config={"persona_compass_capture":
{"layers": [...], "n_layers": N}}``, every chosen decoder layer ends with the opaque op
``persona_compass::capture_sum``, which adds each token's block output to the sums row of
its request (``sums[layer].index_add_(0, token_row, block_out)``). Before each step the host
writes one row index per token (one host-to-device copy); row 0 collects every token that
counts nothing (prompt positions, padding, requests that did not ask for capture).

Which tokens count (the hf capture's semantics): a request asks for capture with
``SamplingParams.extra_args["persona_compass_capture"] = {"id": ...}``; a position counts
when it is at or past the prompt's length, i.e. it feeds back a generated token. vLLM stops a
request at its end-of-turn token before feeding it, and never feeds the last sampled token,
so a request stopped by its token budget leaves that token out. A position counts once: a
request that vLLM preempts and recomputes does not add its recomputed positions again.

Only the sums and token counts leave the engine: :meth:`CaptureRuntime.take` (the worker
extension's ``persona_compass_capture_take``) hands over finished requests' rows and frees
them. These are vLLM internals, pinned with the engine's vLLM release.

Per-token projections (``axis calibrate``'s per-token calibration): after
:meth:`CaptureRuntime.project` (``persona_compass_capture_project``) gives the capture unit
directions, the same op also writes each counted token's projection on its layer's
direction into a per-request table on the device (one float per token and layer; column =
the token's place in the answer). When a request is released only a bounded, evenly spread
share of its tokens (:func:`persona_compass.token_budget.keep_rows`) is copied to the host;
``persona_compass_capture_take_tokens`` hands those over by capture id.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..token_budget import kept_count, kept_positions

logger = logging.getLogger(__name__)

CAPTURE_KEY = "persona_compass_capture"  # in additional_config and in SamplingParams.extra_args
OP_NAME = "persona_compass::capture_sum"
TRASH_ROW = 0  # the sums row of tokens that count nothing
MAX_KEPT = 4096  # finished requests' sums nobody collected are dropped past this
_NEVER = np.iinfo(np.int64).max  # the first counted position of a row that counts nothing


class CaptureTables:
    """The device tensors the op reads and writes.

    Args:
        layers: decoder layers whose outputs are summed.
        d_model: the residual width.
        max_tokens: the most tokens one forward carries.
        max_rows: sums rows (row 0 collects what counts nothing).
        device: the model's device.
    """

    def __init__(
        self,
        layers: list[int],
        d_model: int,
        *,
        max_tokens: int,
        max_rows: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.layers = tuple(sorted(set(layers)))
        self.position = {layer: i for i, layer in enumerate(self.layers)}
        dev = torch.device(device)
        self.sums = torch.zeros(len(self.layers), max_rows, d_model, device=dev)
        self.token_row = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        # On a CPU only the counted tokens are added (a few per step), by host-side index
        # lists: index_add_ over every token of a prefill is slow there (tens of ms per
        # layer on a busy 2-core machine). A GPU adds all tokens: fixed shapes suit its graphs.
        self.compact = dev.type == "cpu"
        self.counted_tokens = torch.zeros(max_tokens, dtype=torch.long)
        self.counted_rows = torch.zeros(max_tokens, dtype=torch.long)
        self.n_counted = 0
        # per-token projections (off until enable_tokens): (layers, rows, positions + 1); the
        # last column takes the tokens past ``max_positions`` (none when sized right)
        self.token_units: Tensor | None = None
        self.token_proj: Tensor | None = None
        self.token_col = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.counted_cols = torch.zeros(max_tokens, dtype=torch.long)
        self.max_positions = 0

    def enable_tokens(self, units: Tensor, max_positions: int) -> None:
        """Also record each counted token's projection on ``units`` (one row per layer)."""
        dev = self.sums.device
        self.token_units = units.to(device=dev, dtype=torch.float32).contiguous()
        self.max_positions = int(max_positions)
        rows = self.sums.shape[1]
        self.token_proj = torch.zeros(len(self.layers), rows, self.max_positions + 1, device=dev)


def add_block_sums(tables: CaptureTables, layer: int, block_out: Tensor) -> None:
    """Add each token's block output (n, d_model) to its row's float32 sums."""
    pos = tables.position[layer]
    sums = tables.sums[pos]
    proj, units = tables.token_proj, tables.token_units
    if tables.compact:
        k = tables.n_counted
        if k:
            values = block_out.index_select(0, tables.counted_tokens[:k]).to(torch.float32)
            sums.index_put_((tables.counted_rows[:k],), values, accumulate=True)
            if proj is not None and units is not None:
                where = (tables.counted_rows[:k], tables.counted_cols[:k])
                proj[pos].index_put_(where, values @ units[pos])
        return
    n = block_out.shape[0]
    values = block_out.to(torch.float32)
    sums.index_add_(0, tables.token_row[:n], values)
    if proj is not None and units is not None:
        # tokens that count nothing all land on the trash row's cells: never read
        where = (tables.token_row[:n], tables.token_col[:n])
        proj[pos].index_put_(where, values @ units[pos])


_ACTIVE: CaptureTables | None = None  # one set per process, as for the compass op


def activate(tables: CaptureTables | None) -> None:
    global _ACTIVE
    _ACTIVE = tables


@torch.library.custom_op(OP_NAME, mutates_args=())
def capture_sum(hidden: Tensor, residual: Tensor | None, layer: int) -> Tensor:
    """Opaque to torch.compile: sums the layer output ``hidden + residual`` (``residual``
    None: ``hidden``) into the active tables and returns ``hidden`` unchanged (a copy: a
    custom op may not return its input; the caller uses it, so the op is never dropped)."""
    tables = _ACTIVE
    if tables is not None and layer in tables.position:
        add_block_sums(tables, layer, hidden if residual is None else hidden + residual)
    return hidden.clone()


@capture_sum.register_fake
def _(hidden: Tensor, residual: Tensor | None, layer: int) -> Tensor:
    return torch.empty_like(hidden)


_capture_classes: dict[type, type] = {}


def _capture_class(cls: Any) -> type:
    """A subclass of a decoder layer whose forward ends with the capture op."""
    if cls in _capture_classes:
        return _capture_classes[cls]
    inner = cls.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = inner(self, *args, **kwargs)
        op = torch.ops.persona_compass.capture_sum
        layer = self._persona_compass_capture_layer
        if isinstance(out, tuple) and len(out) == 2:
            hidden, residual = out  # vLLM's (mlp_out, residual): the block output is the sum
            return op(hidden, residual, layer), residual
        return op(out, None, layer)

    new = type(f"Capture{cls.__name__}", (cls,), {"forward": forward})
    _capture_classes[cls] = new
    return new


class CaptureRuntime:
    """Capture inside one worker: the tables, request rows and finished sums."""

    def __init__(self, runner: Any, settings: dict[str, Any]) -> None:
        from .vllm_worker import find_layers

        if getattr(runner, "speculative_config", None):
            raise RuntimeError("persona-compass capture does not support speculative decoding")
        n_layers = int(settings["n_layers"])
        layers = sorted({int(x) for x in settings["layers"]})
        if not layers or not all(0 <= x < n_layers for x in layers):
            raise RuntimeError(f"capture layers {layers} are not within 0..{n_layers - 1}")
        blocks: nn.ModuleList = find_layers(runner.model, n_layers)
        for layer in layers:
            block = blocks[layer]
            block.__class__ = _capture_class(type(block))
            setattr(block, "_persona_compass_capture_layer", layer)  # noqa: B010
        self.max_tokens = int(runner.max_num_tokens)
        self.max_rows = 2 * int(runner.max_num_reqs) + 1  # finished rows wait for take()
        d_model = int(runner.model_config.get_hidden_size())
        device = torch.device(runner.device)
        self.tables = CaptureTables(
            layers, d_model, max_tokens=self.max_tokens, max_rows=self.max_rows, device=device
        )
        activate(self.tables)
        self.on_gpu = device.type == "cuda"
        # CUDA graphs captured at start replay the op as it was then: a table switched on
        # later (project) would never be written in graph-replayed steps
        self.graphs = self.on_gpu and not getattr(runner.model_config, "enforce_eager", False)
        self._host_rows = [
            torch.zeros(self.max_tokens, dtype=torch.long, pin_memory=self.on_gpu) for _ in range(2)
        ]
        self._events: list[Any] = [None, None]
        self._step = 0
        # per sums row: the first position still to count, and the positions counted
        self.floor = np.full(self.max_rows, _NEVER, dtype=np.int64)
        self.counted = np.zeros(self.max_rows, dtype=np.int64)
        self.first = np.zeros(self.max_rows, dtype=np.int64)  # the answer's first position
        self._host_cols: list[Tensor] = []
        self.token_share = (0, 1)  # kept tokens: (per_answer, max_new_tokens)
        self.finished_tokens: OrderedDict[str, Tensor] = OrderedDict()
        self.row_of: dict[str, int] = {}  # vLLM request id -> sums row
        self.capture_id: dict[str, str] = {}  # vLLM request id -> capture id ("" = none)
        self._free = list(range(self.max_rows - 1, TRASH_ROW, -1))
        self._last_ids: tuple[str, ...] = ()
        self._row_of_req = np.zeros(0, dtype=np.int64)
        self.finished: OrderedDict[str, tuple[Tensor, int]] = OrderedDict()
        logger.info("persona-compass: capturing layers %s", layers)

    # -- requests -> rows -------------------------------------------------------------------
    def _sync_requests(self, runner: Any, req_ids: list[str]) -> None:
        live = runner.requests
        gone = [r for r in self.capture_id if r not in live]  # finished or aborted
        self._release([r for r in gone if r in self.row_of], keep=True)
        for rid in gone:
            self.capture_id.pop(rid, None)
        for rid in req_ids:
            if rid in self.capture_id:
                continue
            params = getattr(live[rid], "sampling_params", None)
            extra = (getattr(params, "extra_args", None) or {}).get(CAPTURE_KEY)
            self.capture_id[rid] = str(extra["id"]) if extra else ""
            if not extra:
                continue
            if not self._free:
                raise RuntimeError("persona-compass capture ran out of sums rows")
            row = self._free.pop()
            self.row_of[rid] = row
            self.floor[row] = int(live[rid].num_prompt_tokens)  # the prompt counts nothing
            self.first[row] = self.floor[row]
            self.counted[row] = 0
        self._row_of_req = np.array([self.row_of.get(r, TRASH_ROW) for r in req_ids])

    def _release(self, rids: list[str], *, keep: bool) -> dict[str, tuple[Tensor, int]]:
        """Copy the rows of ``rids`` to the host, zero and free them (``keep``: file them
        under their capture ids for a later :meth:`take`)."""
        if not rids:
            return {}
        rows = [self.row_of.pop(r) for r in rids]
        index = torch.tensor(rows, dtype=torch.long, device=self.tables.sums.device)
        sums = self.tables.sums.index_select(1, index).transpose(0, 1).to("cpu")  # (k, L, D)
        self.tables.sums.index_fill_(1, index, 0.0)
        out = {}
        for i, (rid, row) in enumerate(zip(rids, rows, strict=True)):
            out[self.capture_id[rid]] = (sums[i].clone(), int(self.counted[row]))
            if self.tables.token_proj is not None:
                self._keep_tokens(self.capture_id[rid], row)
            self.floor[row], self.counted[row] = _NEVER, 0
            self._free.append(row)
        if keep:
            self.finished.update(out)
            while len(self.finished) > MAX_KEPT:
                self.finished.popitem(last=False)
        return out

    def _keep_tokens(self, capture_id: str, row: int) -> None:
        """Copy the kept share of a released row's token projections to the host, zero it."""
        proj = self.tables.token_proj
        assert proj is not None
        n = min(int(self.counted[row]), self.tables.max_positions)
        keep = kept_positions(n, kept_count(n, *self.token_share)).to(proj.device)
        kept = proj[:, row].index_select(1, keep)  # (layers, n_kept)
        self.finished_tokens[capture_id] = kept.T.contiguous().to("cpu")
        proj[:, row].zero_()
        while len(self.finished_tokens) > MAX_KEPT:
            self.finished_tokens.popitem(last=False)

    def project(self, units: Tensor, max_positions: int, per_answer: int, max_new: int) -> None:
        """Record per-token projections on ``units`` ((captured layers, d_model), in layer
        order) from now on; keep ``per_answer`` of every ``max_new`` tokens of an answer."""
        if tuple(units.shape) != (len(self.tables.layers), self.tables.sums.shape[2]):
            raise RuntimeError(
                f"projection units of shape {tuple(units.shape)}; expected one row per captured "
                f"layer ({len(self.tables.layers)}) of width {self.tables.sums.shape[2]}"
            )
        if self.row_of:
            raise RuntimeError("turn per-token projections on before the first request")
        if self.graphs:
            raise RuntimeError(
                "per-token projections need vLLM without CUDA graphs (enforce_eager=True; "
                "`axis calibrate --eager`)"
            )
        self.tables.enable_tokens(units, max_positions)
        self.token_share = (int(per_answer), int(max_new))
        self._host_cols = [
            torch.zeros(self.max_tokens, dtype=torch.long, pin_memory=self.on_gpu) for _ in range(2)
        ]

    # -- per step ---------------------------------------------------------------------------
    def before_forward(self, runner: Any, n_padded: int) -> None:
        """Write each token's sums row (one host-to-device copy) and count the tokens."""
        batch = runner.input_batch
        n_reqs = int(batch.num_reqs)
        req_ids = list(batch.req_ids[:n_reqs])
        if tuple(req_ids) != self._last_ids:  # a request came or left
            self._sync_requests(runner, req_ids)
            self._last_ids = tuple(req_ids)
        qsl = np.asarray(runner.query_start_loc.np[: n_reqs + 1], dtype=np.int64)
        per_req = np.diff(qsl)
        n = int(qsl[-1])
        starts = np.asarray(batch.num_computed_tokens_cpu[:n_reqs], dtype=np.int64)
        rows = self._row_of_req
        # each token's position in its request, and whether it feeds a generated token
        # that was not counted before (a recomputed position after preemption counts once)
        positions = np.repeat(starts - qsl[:-1], per_req) + np.arange(n, dtype=np.int64)
        counts = positions >= np.repeat(self.floor[rows], per_req)
        token_rows = np.where(counts, np.repeat(rows, per_req), TRASH_ROW)
        tables = self.tables
        cols = None
        if tables.token_proj is not None:  # each counted token's place in its answer
            first = np.repeat(self.first[rows], per_req)
            cols = np.where(counts, np.minimum(positions - first, tables.max_positions), 0)
        if tables.compact:
            chosen = np.flatnonzero(token_rows)
            tables.n_counted = len(chosen)
            tables.counted_tokens.numpy()[: len(chosen)] = chosen
            tables.counted_rows.numpy()[: len(chosen)] = token_rows[chosen]
            if cols is not None:
                tables.counted_cols.numpy()[: len(chosen)] = cols[chosen]
        k = self._step % 2
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copies that last used these host buffers
        host = self._host_rows[k]
        host_np = host.numpy()
        host_np[:n] = token_rows
        host_np[n:n_padded] = TRASH_ROW
        self.tables.token_row[:n_padded].copy_(host[:n_padded], non_blocking=True)
        if cols is not None and not tables.compact:
            host_cols = self._host_cols[k]
            host_cols.numpy()[:n] = cols
            host_cols.numpy()[n:n_padded] = 0
            tables.token_col[:n_padded].copy_(host_cols[:n_padded], non_blocking=True)
        self.counted += np.bincount(token_rows, minlength=self.max_rows)
        self.floor[rows] = np.maximum(self.floor[rows], starts + per_req)
        self.floor[TRASH_ROW], self.counted[TRASH_ROW] = _NEVER, 0

    def after_forward(self) -> None:
        """Point every token at the trash row again, so that a forward the host did not
        prepare (a dummy run) adds to no request; guard this step's host buffer."""
        self.tables.token_row.zero_()
        self.tables.n_counted = 0
        k = self._step % 2
        self._step += 1
        event = None
        if self.on_gpu:
            event = torch.cuda.Event()
            event.record()
        self._events[k] = event

    # -- the engine's calls -----------------------------------------------------------------
    def take(self, ids: list[str]) -> dict[str, tuple[Tensor, int]]:
        """Hand over (and forget) the sums (n_layers, d_model) and token counts of finished
        requests, by capture id."""
        wanted = set(ids)
        running = [r for r, cid in self.capture_id.items() if cid in wanted and r in self.row_of]
        out = self._release(running, keep=False)
        for rid in running:
            self.capture_id[rid] = ""  # done: never counted again
        self._last_ids = ()  # the next step maps its requests to rows afresh
        for cid in ids:
            if cid in self.finished:
                out[cid] = self.finished.pop(cid)
        return out

    def take_tokens(self, ids: list[str]) -> dict[str, Tensor]:
        """Hand over (and forget) the kept per-token projections (n_kept, captured layers)
        of requests already handed over by :meth:`take`, by capture id."""
        return {cid: self.finished_tokens.pop(cid) for cid in ids if cid in self.finished_tokens}

    def info(self) -> dict[str, Any]:
        return {
            "layers": list(self.tables.layers),
            "max_rows": self.max_rows,
            "max_tokens": self.max_tokens,
            "device": str(self.tables.sums.device),
            "rows_in_use": len(self.row_of),
            "uncollected": len(self.finished),
            "token_projections": self.tables.token_proj is not None,
        }


def _install(runner: Any) -> None:
    extra = getattr(runner.vllm_config, "additional_config", None) or {}
    settings = extra.get(CAPTURE_KEY) if isinstance(extra, dict) else None
    runner._persona_compass_capture = CaptureRuntime(runner, settings) if settings else None


def register() -> None:
    """Called by the vLLM plugin (:func:`.vllm_worker.register`): capture when configured."""
    from .vllm_runner import patch_runners

    patch_runners("_persona_compass_capture", _install)


class CaptureWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) by the capture engine."""

    def _capture(self) -> CaptureRuntime:
        runtime = getattr(self.model_runner, "_persona_compass_capture", None)  # type: ignore[attr-defined]
        if runtime is None:
            raise RuntimeError(
                "persona-compass capture is not installed in this worker: the plugin did not "
                "load (is persona-compass installed in the environment vLLM runs in?)"
            )
        return runtime

    def persona_compass_capture_info(self) -> dict[str, Any]:
        return self._capture().info()

    def persona_compass_capture_take(self, ids: list[str]) -> dict[str, tuple[Tensor, int]]:
        return self._capture().take(list(ids))

    def persona_compass_capture_project(
        self, units: Tensor, max_positions: int, per_answer: int, max_new: int
    ) -> None:
        self._capture().project(units, max_positions, per_answer, max_new)

    def persona_compass_capture_take_tokens(self, ids: list[str]) -> dict[str, Tensor]:
        return self._capture().take_tokens(list(ids))
