"""Interventions: operator algebra, hooks, steering and capping on tiny (and the real) models."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from tiny import make_model

from persona_compass.axis import Axis, model_fingerprint
from persona_compass.capping import CappingConfig
from persona_compass.errors import AxisFileError, CappingConfigError, LayerError
from persona_compass.interventions import (
    AddVector,
    CapCeiling,
    CapFloor,
    HookHandle,
    add_hooks,
    capping,
    steering,
)
from persona_compass.layers import block_output, find_decoder_blocks

D = 64


def tokens(n: int = 12, batch: int = 2) -> torch.Tensor:
    return torch.randint(20, 200, (batch, n))


def axis_for(model) -> Axis:
    blocks = find_decoder_blocks(model)
    return Axis(torch.randn(len(blocks), D), fingerprint=model_fingerprint(model))


@torch.no_grad()
def forward(model, ids, **kwargs):
    return model(ids, output_hidden_states=True, **kwargs)


@contextmanager
def record(model, layers, *, before_interventions: bool = False):
    """Collect block outputs per layer. ``before_interventions=True`` registers the recorder
    with ``prepend=True`` after the interventions, so it runs before them: the raw output."""
    blocks = find_decoder_blocks(model)
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    for layer in layers:

        def hook(module, args, output, layer=layer):
            seen[layer].append(block_output(output).detach().clone())

        handles.append(blocks[layer].register_forward_hook(hook, prepend=before_interventions))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def hook_keys(model):
    return [list(b._forward_hooks) for b in find_decoder_blocks(model)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---- operators -----------------------------------------------------------------------------


def test_add_vector_exact():
    hidden = torch.randn(2, 5, D)
    vec = torch.randn(D)
    out = AddVector(vec, -3.5)(hidden)
    assert torch.equal(out, hidden + (-3.5 * vec))
    assert not torch.equal(out, hidden)


def test_cap_floor_algebra_and_invariant():
    v = torch.randn(D)
    u = v / v.norm()
    hidden = torch.randn(3, 7, D)
    proj = hidden @ u
    tau = float(proj.median())
    out = CapFloor(v, tau)(hidden)  # normalises v itself
    expected = hidden + (tau - proj).clamp_min(0).unsqueeze(-1) * u
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert ((out @ u) >= tau - 1e-5).all()
    above = proj >= tau
    assert above.any() and (~above).any()
    assert torch.equal(out[above], hidden[above])  # untouched, bit for bit


def test_cap_ceiling_is_the_floor_on_the_negated_vector():
    u = torch.randn(D)
    hidden = torch.randn(4, 9, D)
    tau = float((hidden @ (u / u.norm())).median())
    ceiling = CapCeiling(u, tau)(hidden)
    floor = CapFloor(-u, -tau)(hidden)
    assert torch.equal(ceiling, floor)
    unit = u / u.norm()
    assert ((ceiling @ unit) <= tau + 1e-5).all()
    manual = hidden - ((hidden @ unit) - tau).clamp_min(0).unsqueeze(-1) * unit
    torch.testing.assert_close(ceiling, manual, rtol=0, atol=1e-6)


def test_bf16_cap_projects_in_float32():
    u = torch.randn(D)
    u = u / u.norm()
    hidden = (torch.randn(2, 6, D) * 300).bfloat16()  # residual norms ~2400, like SmolLM2
    tau = float((hidden.float() @ u).median())
    out = CapFloor(u, tau)(hidden)
    assert out.dtype == torch.bfloat16
    after = out.float() @ u
    # One bf16 rounding of each component: |error| <= |h| * 2**-8.
    tol = out.float().norm(dim=-1) * 2**-8
    assert (after >= tau - tol).all()
    above = (hidden.float() @ u) >= tau
    assert torch.equal(out[above], hidden[above])


def test_operators_prepare_once_per_device_and_dtype():
    op = CapFloor(torch.randn(D), 0.0)
    op.prepare("cpu", torch.bfloat16)
    assert list(op._cache) == [(torch.device("cpu"), torch.float32)]  # caps stay float32
    cached = op._cache[(torch.device("cpu"), torch.float32)]
    op(torch.randn(2, 3, D))
    op(torch.randn(2, 3, D).bfloat16())
    assert op._cache[(torch.device("cpu"), torch.float32)] is cached and len(op._cache) == 1
    add = AddVector(torch.randn(D), 2.0)
    add(torch.randn(1, 1, D).bfloat16())
    assert add._cache[(torch.device("cpu"), torch.bfloat16)].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: CapFloor(torch.randn(2, D), 0.0), CappingConfigError, "unit_vector has shape"),
        (lambda: CapFloor(torch.zeros(D), 0.0), CappingConfigError, "zero"),
        (lambda: CapFloor(torch.randn(D), float("nan")), CappingConfigError, "threshold=nan"),
        (lambda: CapCeiling(torch.randn(D), "1"), CappingConfigError, "threshold='1'"),
        (lambda: CapFloor([1.0, 2.0], 0.0), CappingConfigError, "torch.Tensor"),
        (lambda: AddVector(torch.randn(D), True), ValueError, "coefficient=True"),
        (lambda: AddVector(torch.full((D,), float("inf")), 1.0), ValueError, "NaN or inf"),
    ],
)
def test_operator_validation(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_operator_rejects_the_wrong_width():
    with pytest.raises(ValueError, match="width 32"):
        CapFloor(torch.randn(D), 0.0)(torch.randn(1, 2, 32))


# ---- hooks ---------------------------------------------------------------------------------


def test_add_hooks_handle_removes_everything(llama_pair):
    model, _ = llama_pair
    ids = tokens()
    base = forward(model, ids)
    before = hook_keys(model)
    handle = add_hooks(model, {1: [AddVector(torch.ones(D), 1.0)], -1: []})
    assert isinstance(handle, HookHandle) and handle.active
    changed = forward(model, ids)
    assert torch.equal(changed.hidden_states[2], base.hidden_states[2] + 1.0)
    handle.remove()
    handle.remove()  # idempotent
    assert hook_keys(model) == before
    assert torch.equal(forward(model, ids).logits, base.logits)
    with pytest.raises(LayerError, match="layer=9"):
        add_hooks(model, {9: [AddVector(torch.ones(D), 1.0)]})
    assert hook_keys(model) == before


def test_steering_adds_exactly_c_times_axis(tiny_pair):
    model, _ = tiny_pair
    axis = axis_for(model)
    ids = tokens()
    base = forward(model, ids)
    with steering(model, axis, coefficient=-4.0, layers=[1]):
        steered = forward(model, ids)
    # Block 1 output is hidden_states[2]; everything before it is unchanged.
    assert torch.equal(steered.hidden_states[1], base.hidden_states[1])
    assert torch.equal(
        steered.hidden_states[2], base.hidden_states[2] + (-4.0) * axis.directions[1]
    )
    assert torch.equal(forward(model, ids).logits, base.logits)


def test_steering_default_layer_scales_and_specs(llama_pair):
    model, _ = llama_pair
    axis = Axis(
        torch.randn(4, D), residual_norms=torch.tensor([1.0, 2.0, 3.0, 4.0]), monitor_layer=1
    )
    ids = tokens()
    base = forward(model, ids)
    with steering(model, axis, 2.0):  # the monitor layer
        out = forward(model, ids)
    assert torch.equal(out.hidden_states[2], base.hidden_states[2] + 2.0 * axis.directions[1])
    with steering(model, axis, 2.0, layers="1:2", scale="unit"):
        out = forward(model, ids)
    assert torch.equal(out.hidden_states[2], base.hidden_states[2] + 2.0 * axis.unit(1))
    with steering(model, axis, 0.5, layers=[1], scale="relative"):
        out = forward(model, ids)
    expected = base.hidden_states[2] + 0.5 * (axis.unit(1) * 2.0)
    assert torch.equal(out.hidden_states[2], expected)
    with record(model, [0, 2]) as seen, steering(model, axis, 1.0, layers="0,2"):
        forward(model, ids)
    with record(model, [0, 2]) as raw:
        forward(model, ids)
    assert torch.equal(seen[0][0], raw[0][0] + axis.directions[0])


def test_steering_errors(llama_pair):
    model, _ = llama_pair
    axis = axis_for(model)
    with pytest.raises(ValueError, match="scale='big'"), steering(model, axis, 1.0, scale="big"):
        pass
    with pytest.raises(AxisFileError, match="residual_norms"):
        with steering(model, axis, 1.0, scale="relative"):
            pass
    with pytest.raises(ValueError, match="coefficient=nan"):
        with steering(model, axis, float("nan")):
            pass
    with pytest.raises(LayerError, match="layer=4"):
        with steering(model, axis, 1.0, layers=[4]):
            pass
    with pytest.raises(AxisFileError, match="3 layers"):
        with steering(make_model("llama", n_layers=3), axis, 1.0):
            pass
    assert hook_keys(model) == [[] for _ in range(4)]


def test_hidden_states_show_interventions_even_if_capture_hooks_came_first(llama_pair):
    # transformers 5 installs permanent hidden-state capture hooks on the first forward with
    # output_hidden_states; ours are prepended so the captured states include the change.
    model, _ = llama_pair
    axis = axis_for(model)
    ids = tokens()
    base = forward(model, ids)
    assert any(hook_keys(model))  # the capture hooks exist now
    with steering(model, axis, 3.0, layers=0):
        out = forward(model, ids)
    assert torch.equal(out.hidden_states[1], base.hidden_states[1] + 3.0 * axis.directions[0])


# ---- capping -------------------------------------------------------------------------------


def median_thresholds(model, axis, ids, layers):
    with record(model, layers) as seen:
        forward(model, ids)
    return [float(axis.project(seen[layer][0], layer).median()) for layer in layers]


def test_capping_invariant_and_untouched_positions(tiny_pair):
    model, _ = tiny_pair
    axis = axis_for(model)
    ids = tokens(16, 3)
    layers = [1, 2, 3]
    cfg = CappingConfig.from_axis(axis, layers, median_thresholds(model, axis, ids, layers))
    with capping(model, cfg):
        with record(model, layers, before_interventions=True) as pre, record(model, layers) as post:
            forward(model, ids)
    for layer, tau in zip(layers, cfg.thresholds, strict=True):
        h_pre, h_post = pre[layer][0], post[layer][0]
        u = axis.unit(layer)
        p_pre = h_pre @ u
        assert ((h_post @ u) >= tau - 1e-5).all()
        above = p_pre >= tau
        assert above.any() and (~above).any()
        assert torch.equal(h_post[above], h_pre[above])
        expected = h_pre + (tau - p_pre).clamp_min(0).unsqueeze(-1) * u
        torch.testing.assert_close(h_post, expected, rtol=0, atol=1e-6)


def test_capping_matches_hidden_states_by_hand(llama_pair):
    model, _ = llama_pair
    axis = axis_for(model)
    ids = tokens()
    base = forward(model, ids)
    u = axis.unit(0)
    tau = float((base.hidden_states[1] @ u).median())
    with capping(model, CappingConfig.from_axis(axis, [0], [tau])):
        out = forward(model, ids)
    h = base.hidden_states[1]
    expected = h + (tau - h @ u).clamp_min(0).unsqueeze(-1) * u
    torch.testing.assert_close(out.hidden_states[1], expected, rtol=0, atol=1e-6)


def test_several_caps_on_one_layer_compose_in_order(llama_pair):
    model, _ = llama_pair
    v1, v2 = torch.randn(D), torch.randn(D)
    ids = tokens()
    with record(model, [2]) as raw:
        forward(model, ids)
    h = raw[2][0]
    t1 = float((h @ (v1 / v1.norm())).median())
    t2 = float((h @ (v2 / v2.norm())).quantile(0.7))
    cfg = CappingConfig(layers=(2, 2), vectors=torch.stack([v1, v2]), thresholds=(t1, t2))
    with capping(model, cfg), record(model, [2]) as seen:
        forward(model, ids)
    expected = CapFloor(v2, t2)(CapFloor(v1, t1)(h))
    assert torch.equal(seen[2][0], expected)


def test_model_is_bit_identical_after_exit_and_after_an_exception(tiny_pair):
    model, _ = tiny_pair
    axis = axis_for(model)
    ids = tokens()
    params = snapshot(model)
    base = forward(model, ids).logits
    hooks_before = hook_keys(model)  # after transformers installed its capture hooks
    cfg = CappingConfig.from_axis(axis, "1:4", 1e3)  # caps every position hard
    with capping(model, cfg), steering(model, axis, 5.0, layers="all"):
        assert not torch.equal(forward(model, ids).logits, base)
    assert hook_keys(model) == hooks_before
    assert_same_params(model, params)
    assert torch.equal(forward(model, ids).logits, base)

    with pytest.raises(RuntimeError, match="boom"):
        with capping(model, cfg):
            with steering(model, axis, 5.0):
                raise RuntimeError("boom")
    assert hook_keys(model) == hooks_before
    assert_same_params(model, params)
    assert torch.equal(forward(model, ids).logits, base)


def test_no_hooks_at_all_on_a_fresh_model():
    model = make_model("llama")
    axis = axis_for(model)
    ids = tokens()
    with capping(model, CappingConfig.from_axis(axis, "all", 0.0)):
        with torch.no_grad():
            model(ids)
        assert all(hook_keys(model))
    assert all(not b._forward_hooks for b in find_decoder_blocks(model))


def test_capping_during_generate(llama_pair):
    model, tok = llama_pair
    axis = axis_for(model)
    ids = tokens(8, 1)
    layers = [1, 2]
    cfg = CappingConfig.from_axis(axis, layers, median_thresholds(model, axis, ids, layers))
    before = hook_keys(model)
    with capping(model, cfg), record(model, layers) as seen:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    for layer, tau in zip(layers, cfg.thresholds, strict=True):
        steps = seen[layer]
        assert steps[0].shape[1] == ids.shape[1]  # the prompt
        assert len(steps) >= 2 and all(s.shape[1] == 1 for s in steps[1:])  # decode steps
        for h in steps:
            assert ((h @ axis.unit(layer)) >= tau - 1e-5).all()
    assert hook_keys(model) == before


def test_steering_during_generate_changes_only_in_scope(llama_pair):
    model, _ = llama_pair
    axis = axis_for(model)
    ids = tokens(8, 1)
    with torch.no_grad():
        base = model.generate(ids, max_new_tokens=6, do_sample=False)
        with steering(model, axis, 50.0, layers="all"):
            steered = model.generate(ids, max_new_tokens=6, do_sample=False)
        again = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert not torch.equal(steered, base)
    assert torch.equal(again, base)


def test_capping_bf16_model_within_bf16_tolerance(llama_pair):
    model, _ = llama_pair
    model = model.to(torch.bfloat16)
    axis = axis_for(model)
    ids = tokens(16, 2)
    layers = [1, 2]
    cfg = CappingConfig.from_axis(axis, layers, median_thresholds(model, axis, ids, layers))
    with capping(model, cfg):
        with record(model, layers, before_interventions=True) as pre, record(model, layers) as post:
            forward(model, ids)
    for layer, tau in zip(layers, cfg.thresholds, strict=True):
        h_pre, h_post = pre[layer][0], post[layer][0]
        assert h_post.dtype == torch.bfloat16
        u = axis.unit(layer)
        tol = h_post.float().norm(dim=-1) * 2**-8
        assert ((h_post.float() @ u) >= tau - tol).all()
        above = (h_pre.float() @ u) >= tau
        assert torch.equal(h_post[above], h_pre[above])


def test_capping_checks_the_model(llama_pair):
    model, _ = llama_pair
    wide = CappingConfig(layers=(1,), vectors=torch.randn(1, D + 1), thresholds=(0.0,))
    with pytest.raises(CappingConfigError, match="width 65 .* hidden size is 64"):
        with capping(model, wide):
            pass
    far = CappingConfig(layers=(2, 6), vectors=torch.randn(2, D), thresholds=(0.0, 0.0))
    with pytest.raises(CappingConfigError, match=r"layers \[6\] .* 4 decoder blocks"):
        with capping(model, far):
            pass
    assert all(not b._forward_hooks for b in find_decoder_blocks(model))


@pytest.mark.real_model
def test_capping_on_the_real_model(real_pair):
    model, tok = real_pair
    blocks = find_decoder_blocks(model)
    n_layers, width = len(blocks), model.config.hidden_size
    axis = Axis(torch.randn(n_layers, width), fingerprint=model_fingerprint(model))
    text = "I am not an assistant. I am a wandering ghost who remembers the sea."
    ids = tok(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    layers = list(range(n_layers // 2, n_layers // 2 + 8))
    cfg = CappingConfig.from_axis(axis, layers, median_thresholds(model, axis, ids, layers))
    before = hook_keys(model)
    with capping(model, cfg):
        with record(model, layers, before_interventions=True) as pre, record(model, layers) as post:
            forward(model, ids)
    assert hook_keys(model) == before
    for layer, tau in zip(layers, cfg.thresholds, strict=True):
        h_pre, h_post = pre[layer][0], post[layer][0]
        assert not (h_pre.float() @ axis.unit(layer).to(h_pre.device) >= tau).all()  # it acted
        u = axis.unit(layer).to(h_post.device)
        tol = h_post.float().norm(dim=-1) * 2**-8
        assert ((h_post.float() @ u) >= tau - tol).all()
        above = (h_pre.float() @ u) >= tau
        assert torch.equal(h_post[above], h_pre[above])
