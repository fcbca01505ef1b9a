"""The compass as one tensor op per decoder layer, for serving engines that batch requests.

A serving engine runs many requests in one forward: the tokens of every request sit in one
(tokens, d_model) matrix. :class:`CompassTables` holds persistent tensors that say, per token,
which request slot it belongs to, and per slot and layer, the steering coefficient, the cap
threshold and which cap vector applies. :func:`apply_compass` reads those tables, steers and
caps every token at once, records each token's projection on the monitor layer, each trait
needle's projection on its own layer, and where the cap raised it, and returns the new layer
output. It has no Python branch on the data and no host sync, so the same kernels serve any
mix of requests and can be captured in a CUDA graph; changing a request's settings is a write
into its slot's row.

Slot 0 is the null slot (no steering, cap threshold -inf): padding tokens and requests
without compass settings use it.

Per layer, with ``V`` the layer's table of unit cap vectors (row 0 is the axis' unit vector
``u``), ``G = V Vᵀ``, ``s`` each token's slot, ``alpha, tau, sel = params[s]`` (steering
coefficient, floor, one-hot choice of cap vector) and ``h`` the block output in float32::

    P0    = h Vᵀ                                  projections before any change
    p     = (P0 + alpha G[0]) · sel               the cap vector's projection after steering
    e     = max(tau - p, 0)                       how far below the floor
    C     = alpha onehot(0) + e sel               the change, in the basis V
    out   = h + C V
    read  = P0[:, 0] + C G[:, 0]                  projection on u after the change

The trait needles read on a layer are the rows of ``W`` (their unit vectors), with
``X = V Wᵀ`` kept beside ``G``; they read the changed output, as the ``hf`` engine's monitor
hook reads the capped one::

    traits = h Wᵀ + C X                          = out Wᵀ, one stacked matmul for all of them

Every per-token setting comes from one row gather (``params[s]``), so a layer costs two
small matrix products (two more where trait needles are read: ``h Wᵀ`` and the (K, k) sized
``C X``) and a handful of element-wise kernels whatever the batch holds.

This is the ``hf`` engine's steering (``h + alpha u``) followed by its floor cap
(``h + max(tau - h·v, 0) v``), computed in float32 and rounded once to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

NULL_SLOT = 0
OP_NAME = "persona_compass::steer_cap"


class CompassTables:
    """The persistent per-slot and per-token tensors that :func:`apply_compass` reads.

    Args:
        axis_units: layer -> the axis' unit vector there (d_model,), for every layer the op
            runs on.
        monitor_layer: the layer whose projections are recorded (must be in ``axis_units``).
        max_tokens: the most tokens one forward carries (the engine's batch token budget).
        max_slots: how many requests can hold compass settings at once (slot 0 included).
        vectors_per_layer: cap vectors a layer can hold (row 0 is the axis' unit vector).
        device: where the tables live (the model's device).
        trait_units: each trait needle's ``(layer, unit vector)``, in needle order; the layer
            must be an op layer. Row ``j`` of ``trait_readings`` holds needle ``j``'s readings.
    """

    def __init__(
        self,
        axis_units: Mapping[int, Tensor],
        monitor_layer: int,
        *,
        max_tokens: int,
        max_slots: int,
        vectors_per_layer: int = 4,
        device: torch.device | str = "cpu",
        trait_units: Sequence[tuple[int, Tensor]] = (),
    ) -> None:
        if monitor_layer not in axis_units:
            raise ValueError(f"monitor layer {monitor_layer} is not among the op layers")
        outside = sorted({layer for layer, _ in trait_units} - set(axis_units))
        if outside:
            raise ValueError(f"trait layers {outside} are not among the op layers")
        if max_slots < 2 or max_tokens < 1 or vectors_per_layer < 1:
            raise ValueError("max_slots >= 2, max_tokens >= 1 and vectors_per_layer >= 1")
        self.layers: tuple[int, ...] = tuple(sorted(axis_units))
        self.position = {layer: i for i, layer in enumerate(self.layers)}
        self.monitor_layer = monitor_layer
        self.max_tokens, self.max_slots = max_tokens, max_slots
        n_layers, dev = len(self.layers), torch.device(device)
        d_model = int(next(iter(axis_units.values())).shape[0])
        self.d_model = d_model
        self.vectors = torch.zeros(n_layers, vectors_per_layer, d_model, device=dev)
        for layer, unit in axis_units.items():
            vec = unit.detach().to(dev, torch.float32).reshape(-1)
            self.vectors[self.position[layer], 0] = vec / vec.norm()
        self.gram = torch.zeros(n_layers, vectors_per_layer, vectors_per_layer, device=dev)
        self._init_traits(trait_units, dev)
        self._refresh_gram()
        self.used_vectors = [1] * n_layers  # rows filled per layer (row 0: the axis)
        self.token_slot = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        # per layer and slot: [alpha, tau, sel_0 .. sel_{K-1}] (one gather per layer and step)
        self.params = torch.zeros(n_layers, max_slots, 2 + vectors_per_layer, device=dev)
        self.params[:, :, 1] = float("-inf")
        self.readings = torch.zeros(max_tokens, device=dev)
        self.raised = torch.zeros(n_layers, max_tokens, dtype=torch.bool, device=dev)
        self._first = torch.zeros(vectors_per_layer, device=dev)
        self._first[0] = 1.0

    def _init_traits(self, trait_units: Sequence[tuple[int, Tensor]], dev: torch.device) -> None:
        """Per op layer, the needles read there: their units ``W`` (zero rows pad every layer
        to the most needles any holds) and, as a device index, their rows in the readings."""
        self.n_traits = len(trait_units)
        members: list[list[int]] = [[] for _ in self.layers]
        for j, (layer, _) in enumerate(trait_units):
            members[self.position[layer]].append(j)
        width = max((len(m) for m in members), default=0)
        self.trait_vectors = torch.zeros(len(self.layers), width, self.d_model, device=dev)
        for i, needles in enumerate(members):
            for row, j in enumerate(needles):
                vec = trait_units[j][1].detach().to(dev, torch.float32).reshape(-1)
                self.trait_vectors[i, row] = vec / vec.norm()
        # fixed at start: which needles a layer reads is never a branch on the data
        self.trait_rows: list[Tensor | None] = [
            torch.tensor(m, dtype=torch.long, device=dev) if m else None for m in members
        ]
        self.trait_cross = torch.zeros(len(self.layers), self.vectors.shape[1], width, device=dev)
        self.trait_readings = torch.zeros(self.n_traits, self.max_tokens, device=dev)

    def _refresh_gram(self) -> None:
        self.gram.copy_(self.vectors @ self.vectors.transpose(1, 2))
        self.trait_cross.copy_(self.vectors @ self.trait_vectors.transpose(1, 2))

    # -- settings (host side, between steps) ------------------------------------------------
    def add_vector(self, layer: int, vector: Tensor) -> int:
        """Put a cap vector into ``layer``'s table (once); returns its row."""
        i = self.position[layer]
        vec = vector.detach().to(self.vectors.device, torch.float32).reshape(-1)
        vec = vec / vec.norm()
        for row in range(self.used_vectors[i]):
            if torch.equal(self.vectors[i, row], vec):
                return row
        row = self.used_vectors[i]
        if row >= self.vectors.shape[1]:
            raise RuntimeError(
                f"layer {layer} already holds {row} cap vectors; start the engine with more "
                "vectors_per_layer to serve more capping configs at once"
            )
        self.vectors[i, row] = vec
        self.used_vectors[i] = row + 1
        self._refresh_gram()
        return row

    def set_slot(
        self,
        slot: int,
        *,
        caps: Sequence[tuple[int, int, float]] = (),
        steer: Sequence[tuple[int, float]] = (),
    ) -> None:
        """Write one request's settings: caps ``(layer, vector row, tau)``, steering
        ``(layer, alpha)`` adding ``alpha`` times the axis' unit vector."""
        if not 0 < slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside 1..{self.max_slots - 1}")
        self.clear_slot(slot)
        for layer, row, tau in caps:
            i = self.position[layer]
            if not 0 <= row < self.used_vectors[i]:
                raise ValueError(f"layer {layer} has no cap vector in row {row}")
            self.params[i, slot, 1] = float(tau)
            self.params[i, slot, 2 + int(row)] = 1.0
        for layer, alpha in steer:
            self.params[self.position[layer], slot, 0] = float(alpha)

    def clear_slot(self, slot: int) -> None:
        """Return a slot to the null settings."""
        self.params[:, slot] = 0.0
        self.params[:, slot, 1] = float("-inf")


# The tables the op reads: one set per process (a tensor-parallel rank is its own process).
_ACTIVE: CompassTables | None = None


def activate(tables: CompassTables | None) -> None:
    """Make ``tables`` the ones the registered op reads (None: the op changes nothing)."""
    global _ACTIVE
    _ACTIVE = tables


def active_tables() -> CompassTables | None:
    return _ACTIVE


def apply_compass(tables: CompassTables, layer: int, block_out: Tensor, addend: Tensor) -> Tensor:
    """The compass on one layer: returns ``addend`` changed so that ``block_out`` changes
    by the steering and cap of each token's slot.

    ``block_out`` is the layer's output (tokens, d_model) and ``addend`` the part of it the
    caller may replace (the whole output, or the MLP output beside a separate residual).
    The monitor layer's projections, the trait needles' projections on this layer and every
    cap's raised mask are written to the tables.
    """
    i = tables.position[layer]
    n = block_out.shape[0]
    vectors, gram = tables.vectors[i], tables.gram[i]  # (K, D), (K, K)
    prm = tables.params[i].index_select(0, tables.token_slot[:n])  # (n, 2 + K)
    alpha, tau, sel = prm[:, :1], prm[:, 1], prm[:, 2:]
    h32 = block_out.to(torch.float32)  # no copy when the model runs in float32
    p0 = h32 @ vectors.T  # (n, K)
    p = torch.linalg.vecdot(torch.addcmul(p0, alpha, gram[0]), sel)  # (n,)
    excess = torch.relu(tau - p)  # 0 where tau = -inf (no cap)
    torch.gt(excess, 0, out=tables.raised[i, :n])
    change = torch.addcmul(alpha * tables._first, sel, excess.unsqueeze(1))  # (n, K)
    if layer == tables.monitor_layer:
        torch.addmv(p0[:, 0], change, gram[:, 0], out=tables.readings[:n])
    rows = tables.trait_rows[i]
    if rows is not None:  # this layer reads trait needles (fixed when the tables were made)
        k = rows.shape[0]
        units, cross = tables.trait_vectors[i, :k], tables.trait_cross[i, :, :k]
        traits = torch.addmm(h32 @ units.T, change, cross)  # (n, k): the changed output's
        tables.trait_readings[:, :n].index_copy_(0, rows, traits.T)
    a32 = h32 if addend is block_out else addend.to(torch.float32)  # cast once
    return torch.addmm(a32, change, vectors).to(addend.dtype)


@torch.library.custom_op(OP_NAME, mutates_args=())
def steer_cap(hidden: Tensor, residual: Tensor | None, layer: int) -> Tensor:
    """Opaque to torch.compile: the new ``hidden`` of a layer whose output is
    ``hidden + residual`` (``residual`` None: the output is ``hidden``)."""
    tables = _ACTIVE
    if tables is None or layer not in tables.position:
        return hidden.clone()
    block = hidden if residual is None else hidden + residual
    return apply_compass(tables, layer, block, hidden)


@steer_cap.register_fake
def _(hidden: Tensor, residual: Tensor | None, layer: int) -> Tensor:
    return torch.empty_like(hidden)
