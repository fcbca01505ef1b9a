"""DriftMonitor and project_conversation: live projections equal the hidden-state algebra."""

from __future__ import annotations

import pytest
import torch

from persona_compass.axis import Axis, model_fingerprint
from persona_compass.chat import render_chat
from persona_compass.monitor import DriftMonitor, _windows, project_conversation, token_projections

CONVERSATION = [
    {"role": "user", "content": "Hello there, who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant."},
    {"role": "user", "content": "Tell me a secret about the stars."},
    {"role": "assistant", "content": "Stars are mostly hydrogen and helium!"},
]


def random_axis(model, layer=None) -> Axis:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=g)
    return Axis(
        directions=directions,
        model_id="tiny",
        fingerprint=model_fingerprint(model),
        monitor_layer=layer,
    )


def hidden_projection(model, axis, input_ids, layer, attention_mask=None):
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    unit = axis.directions[layer] / axis.directions[layer].norm()
    return out.hidden_states[layer + 1].float() @ unit


@pytest.mark.parametrize("layer", [0, 2, -2])  # the last hidden_states entry is normed
def test_forward_projections_equal_hidden_states(llama_pair, layer):
    model, _ = llama_pair
    axis = random_axis(model)
    ids = torch.randint(10, 200, (2, 9))
    with DriftMonitor(model, axis, layer=layer) as mon:
        with torch.no_grad():
            model(input_ids=ids)
    expected = hidden_projection(model, axis, ids, layer % 4)
    got = mon.token_projections()
    assert got.shape == (2, 9)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_generate_records_every_fed_token(qwen_pair):
    model, tok = qwen_pair
    axis = random_axis(model, layer=1)
    ids = torch.randint(10, 200, (1, 7))
    with DriftMonitor(model, axis, capacity=2) as mon:  # tiny capacity: the buffer must grow
        out = model.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    n = out.shape[1]
    got = mon.token_projections()
    assert got.shape == (1, n - 1)  # the last generated token is never fed back
    expected = hidden_projection(model, axis, out[:, :-1], 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_hook_removed_on_exit_and_on_error(llama_pair):
    model, _ = llama_pair
    axis = random_axis(model)
    block = model.model.layers[axis.layer]
    with pytest.raises(RuntimeError, match="boom"):
        with DriftMonitor(model, axis):
            assert len(block._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(block._forward_hooks) == 0


def test_reset_and_batch_change(llama_pair):
    model, _ = llama_pair
    axis = random_axis(model)
    with DriftMonitor(model, axis) as mon, torch.no_grad():
        model(input_ids=torch.randint(10, 200, (1, 5)))
        model(input_ids=torch.randint(10, 200, (1, 3)))
        assert mon.n_tokens == 8
        mon.reset()
        model(input_ids=torch.randint(10, 200, (3, 4)))
        assert mon.token_projections().shape == (3, 4)


def test_project_conversation_matches_manual_means(tiny_pair):
    model, tok = tiny_pair
    axis = random_axis(model, layer=2)
    turns = project_conversation(model, tok, axis, CONVERSATION, roles=None)
    rendered = render_chat(tok, CONVERSATION)
    proj = hidden_projection(model, axis, torch.tensor([rendered.input_ids]), 2)[0]
    assert [t.index for t in turns] == [s.index for s in rendered.spans]
    for t, span in zip(turns, rendered.spans, strict=True):
        assert t.n_tokens == span.end - span.start > 0
        assert t.projection == pytest.approx(float(proj[span.start : span.end].mean()), abs=1e-5)
    assistant = project_conversation(model, tok, axis, CONVERSATION)
    assert [t.index for t in assistant] == [1, 3]
    assert all(t.role == "assistant" for t in assistant)


@pytest.mark.parametrize("n,window", [(10, 16), (100, 16), (101, 17), (33, 2), (64, 64), (65, 64)])
def test_windows_tile_the_sequence_with_enough_context(n, window):
    spans = _windows(n, window)
    kept = []
    for win_start, win_end, keep_start, keep_end in spans:
        assert win_end - win_start <= window
        assert win_start <= keep_start < keep_end <= win_end
        # every kept token sees at least half a window of context, or everything before it
        assert keep_start - win_start >= window // 2 or win_start == 0
        kept.extend(range(keep_start, keep_end))
    assert kept == list(range(n))


def test_long_sequences_use_windows_not_truncation(llama_pair):
    model, _ = llama_pair
    axis = random_axis(model)
    ids = torch.randint(10, 200, (60,)).tolist()
    full = token_projections(model, axis, ids)
    windowed = token_projections(model, axis, ids, max_context=16)
    assert windowed.shape == (60,)
    assert torch.isfinite(windowed).all()
    # the first window sees exactly what the full pass sees
    torch.testing.assert_close(windowed[:16], full[:16], rtol=0, atol=1e-5)
    assert not torch.allclose(windowed[16:], full[16:])  # later tokens saw less context


@pytest.mark.real_model
def test_real_model_project_conversation(real_pair):
    model, tok = real_pair
    axis = random_axis(model)
    turns = project_conversation(model, tok, axis, CONVERSATION)
    assert [t.index for t in turns] == [1, 3]
    assert all(t.n_tokens > 3 and torch.isfinite(torch.tensor(t.projection)) for t in turns)


def test_device_buffer_grows_restarts_and_clips():
    from persona_compass.device_buffer import DeviceBuffer

    buf = DeviceBuffer(torch.float32, capacity=2)
    assert buf.row(0, 0, 5).numel() == 0
    assert not buf.append(torch.tensor([[1.0, 2.0]]))
    assert not buf.append(torch.tensor([[3.0, 4.0, 5.0]]))  # grows past the capacity
    assert buf.row(0, 1, 99).tolist() == [2.0, 3.0, 4.0, 5.0]
    assert buf.append(torch.zeros(2, 1))  # a new batch size starts over, and says so
    assert buf.length == 1
    buf.reset()
    assert buf.row(1, 0, 5).numel() == 0
