"""The batched compass op (what the vllm engine runs per layer): exact algebra against the
hf engine's operators, per-token settings, the tables, and the op through torch.compile."""

from __future__ import annotations

import pytest
import torch

from persona_compass.engines import compass_op
from persona_compass.engines.compass_op import CompassTables, apply_compass
from persona_compass.interventions import AddVector, CapFloor

D = 16


def _units(layers, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        layer: torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
        for layer in layers
    }


def _tables(layers=(3, 5), monitor=5, **kw):
    return CompassTables(_units(layers), monitor, max_tokens=32, max_slots=6, **kw)


def _hidden(n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen) * 10, torch.randn(n, D, generator=gen) * 10


def test_null_slot_leaves_the_layer_bit_identical():
    tables = _tables()
    hidden, residual = _hidden()
    out = apply_compass(tables, 3, hidden + residual, hidden)
    assert torch.equal(out, hidden)
    assert not tables.raised[:, :6].any()


def test_cap_equals_the_hf_floor_and_keeps_the_projection_at_the_threshold():
    tables = _tables()
    hidden, residual = _hidden()
    block = hidden + residual
    unit = tables.vectors[0, 0]
    ordered = (block @ unit).sort().values
    tau = float(ordered[2:4].mean())  # between two tokens: three below, three above
    tables.set_slot(1, caps=[(3, 0, tau)])
    tables.token_slot[:6] = 1
    out = apply_compass(tables, 3, block, hidden)
    expected = CapFloor(unit, tau)(block)
    torch.testing.assert_close(out + residual, expected, rtol=0, atol=1e-4)
    proj = (out + residual) @ unit
    assert (proj >= tau - 1e-4).all()
    raised = tables.raised[0, :6]
    assert raised.tolist() == ((block @ unit) < tau).tolist()
    assert raised.any() and not raised.all()  # the test exercises both branches


def test_steering_then_cap_equals_the_hf_operators_in_order():
    tables = _tables()
    hidden, residual = _hidden()
    block = hidden + residual
    unit_cap = torch.nn.functional.normalize(torch.randn(D), dim=0)
    row = tables.add_vector(5, unit_cap)
    tau = float((block @ unit_cap).mean())
    tables.set_slot(2, caps=[(5, row, tau)], steer=[(5, -3.0)])
    tables.token_slot[:6] = 2
    out = apply_compass(tables, 5, block, hidden)
    axis_unit = tables.vectors[tables.position[5], 0]
    expected = CapFloor(unit_cap, tau)(AddVector(axis_unit, -3.0)(block))
    torch.testing.assert_close(out + residual, expected, rtol=0, atol=1e-4)
    # the monitor layer's reading is the projection of the changed output on the axis
    torch.testing.assert_close(tables.readings[:6], (out + residual) @ axis_unit, atol=1e-4, rtol=0)


def test_each_token_gets_its_own_slot_as_if_alone():
    tables = _tables()
    hidden, residual = _hidden(n=8)
    block = hidden + residual
    unit = tables.vectors[0, 0]
    tables.set_slot(1, caps=[(3, 0, 50.0)])
    tables.set_slot(2, caps=[(3, 0, -50.0)])
    tables.set_slot(3, steer=[(3, 7.0)])
    slots = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    tables.token_slot[:8] = slots
    mixed = apply_compass(tables, 3, block, hidden)
    for i, slot in enumerate(slots.tolist()):
        tables.token_slot[:1] = slot
        alone = apply_compass(tables, 3, block[i : i + 1], hidden[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5)
    assert ((mixed[1] + residual[1]) @ unit).item() == pytest.approx(50.0, abs=1e-3)


def test_bfloat16_layer_is_computed_in_float32_and_rounded_once():
    tables = _tables()
    hidden, residual = _hidden()
    hidden, residual = hidden.bfloat16(), residual.bfloat16()
    block = hidden + residual
    tables.set_slot(1, caps=[(3, 0, 1000.0)])
    tables.token_slot[:6] = 1
    out = apply_compass(tables, 3, block, hidden)
    assert out.dtype == torch.bfloat16
    unit = tables.vectors[0, 0]
    change = (1000.0 - block.float() @ unit).unsqueeze(1) * unit
    torch.testing.assert_close(out, (hidden.float() + change).bfloat16(), rtol=0, atol=0)


def test_tables_reuse_vectors_refuse_overflow_and_clear_slots():
    tables = _tables(vectors_per_layer=2)
    vec = torch.randn(D, generator=torch.Generator().manual_seed(7))
    assert tables.add_vector(3, vec) == 1
    assert tables.add_vector(3, vec * 2) == 1  # same direction: same row
    assert tables.add_vector(3, tables.vectors[0, 0]) == 0  # the axis itself
    with pytest.raises(RuntimeError, match="vectors_per_layer"):
        tables.add_vector(3, torch.randn(D, generator=torch.Generator().manual_seed(9)))
    with pytest.raises(ValueError, match="slot"):
        tables.set_slot(0, caps=[(3, 0, 1.0)])
    tables.set_slot(4, caps=[(3, 1, 2.0)], steer=[(5, 1.0)])
    tables.clear_slot(4)
    assert torch.isinf(tables.params[:, 4, 1]).all()  # no floor on any layer
    assert not tables.params[:, 4, 0].any() and not tables.params[:, 4, 2:].any()
    with pytest.raises(ValueError, match="monitor layer"):
        CompassTables(_units([1]), 2, max_tokens=4, max_slots=2)


def test_registered_op_runs_inside_torch_compile_and_follows_table_writes():
    """A compiled graph must call the op on every run, reading the tables as they are now:
    a constant-folded or skipped op would keep the first result."""
    tables = _tables()
    compass_op.activate(tables)
    try:

        def layer(hidden, residual):
            return torch.ops.persona_compass.steer_cap(hidden * 1.0, residual, 3)

        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        hidden, residual = _hidden()
        tables.token_slot[:6] = 1
        first = compiled(hidden, residual)
        assert torch.equal(first, hidden)  # slot 1 is still empty
        tables.set_slot(1, steer=[(3, 5.0)])
        second = compiled(hidden, residual)
        torch.testing.assert_close(second, hidden + 5.0 * tables.vectors[0, 0], atol=1e-5, rtol=0)
    finally:
        compass_op.activate(None)
    # with no active tables the op changes nothing
    hidden, residual = _hidden()
    assert torch.equal(torch.ops.persona_compass.steer_cap(hidden, residual, 3), hidden)


def _trait_tables():
    """Op layers 3 and 5 (monitor 5); needles 0 and 2 on layer 3, needle 1 on layer 5."""
    gen = torch.Generator().manual_seed(11)
    needles = [(3, torch.randn(D, generator=gen)) for _ in range(3)]
    needles[1] = (5, needles[1][1])
    tables = _tables(trait_units=needles)
    return tables, [torch.nn.functional.normalize(v, dim=0).double() for _, v in needles]


def test_trait_readings_equal_the_changed_output_in_float64():
    tables, units = _trait_tables()
    hidden, residual = _hidden(n=8)
    block = hidden + residual
    slots = torch.tensor([1, 1, 0, 2, 1, 2, 0, 1])
    steer = {1: 4.0, 2: -6.0}
    # float64 reference: the hf operators in order (steer, then floor), read after the change
    axis_unit = tables.vectors[tables.position[3], 0].double()
    alpha = torch.tensor([steer.get(s, 0.0) for s in slots.tolist()]).double()
    ref = block.double() + alpha[:, None] * axis_unit
    v = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64), dim=0)
    capped = slots == 1
    tau = float((ref[capped] @ v).median())  # the floor raises some capped tokens, not all
    below = ref[capped] @ v < tau
    assert below.any() and not below.all()
    ref[capped] += torch.relu(tau - ref[capped] @ v)[:, None] * v
    row = tables.add_vector(3, v.float())  # after the tables were made: the cross term follows
    tables.set_slot(1, caps=[(3, row, tau)], steer=[(3, steer[1])])
    tables.set_slot(2, steer=[(3, steer[2])])
    tables.token_slot[:8] = slots
    tables.trait_readings.fill_(float("nan"))
    out = apply_compass(tables, 3, block, hidden)
    torch.testing.assert_close((out + residual).double(), ref, rtol=0, atol=1e-4)
    for j in (0, 2):  # the needles of layer 3, rows that are not side by side in the table
        torch.testing.assert_close(
            tables.trait_readings[j, :8].double(), ref @ units[j], rtol=0, atol=1e-4
        )
    # layer 5 did not run: its needle and every position past the batch stay unwritten
    assert torch.isnan(tables.trait_readings[1]).all()
    assert torch.isnan(tables.trait_readings[:, 8:]).all()


def test_trait_needle_on_the_monitor_layer_reads_with_the_axis():
    tables, units = _trait_tables()
    hidden, residual = _hidden()
    block = hidden + residual
    tau = float((block @ tables.vectors[tables.position[5], 0]).max()) + 1.0  # all raised
    tables.set_slot(3, caps=[(5, 0, tau)])
    tables.token_slot[:6] = 3
    out = apply_compass(tables, 5, block, hidden)
    changed = (out + residual).double()
    torch.testing.assert_close(
        tables.readings[:6].double(), torch.full((6,), tau).double(), rtol=0, atol=1e-4
    )
    torch.testing.assert_close(
        tables.trait_readings[1, :6].double(), changed @ units[1], rtol=0, atol=1e-4
    )
    assert tables.raised[tables.position[5], :6].all()


def test_trait_layers_must_be_op_layers():
    with pytest.raises(ValueError, match=r"trait layers \[4\] are not among the op layers"):
        _tables(trait_units=[(4, torch.ones(D))])
    assert _tables().trait_readings.shape == (0, 32)  # no needles: nothing to read
