"""Span-mean recording: exact algebra against hidden_states, padding invariance, hook hygiene."""

from __future__ import annotations

import pytest
import torch

from persona_compass.chat import render_chat
from persona_compass.errors import LayerError
from persona_compass.layers import find_decoder_blocks
from persona_compass.record import SpanMeanRecorder, generated_content_mask, record_span_means

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Arr, matey! Welcome aboard the ship."},
    ],
    [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "Short."},
        {"role": "user", "content": "Tell me more, please."},
        {"role": "assistant", "content": "A much longer answer 🎉 with\nseveral lines of text."},
    ],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]


def by_hand(model, tok, messages, roles=("assistant",)) -> torch.Tensor:
    """(n_turns, n_layers, d) means from output_hidden_states, one unpadded forward.

    HF applies the final norm to the LAST entry of hidden_states, so the last block's raw
    output is recovered differently: see test_last_layer_is_the_raw_block_output.
    """
    rc = render_chat(tok, messages)
    with torch.no_grad():
        hs = model(torch.tensor([rc.input_ids]), output_hidden_states=True).hidden_states
    n = len(hs) - 1
    return torch.stack(
        [
            torch.stack([hs[layer + 1][0, s.start : s.end].mean(0) for layer in range(n)])
            for s in rc.spans
            if s.role in roles
        ]
    )


def test_matches_hidden_states(tiny_pair):
    model, tok = tiny_pair
    got = record_span_means(model, tok, CONVERSATIONS, roles=("user", "assistant"))
    for conv, means in zip(CONVERSATIONS, got, strict=True):
        want = by_hand(model, tok, conv, roles=("user", "assistant"))
        assert means.dtype == torch.float32
        assert means.shape == want.shape == (len(want), 4, 64)
        # All but the last layer: HF's last hidden state is post final norm.
        torch.testing.assert_close(means[:, :-1], want[:, :-1], atol=1e-5, rtol=1e-5)


def test_last_layer_is_the_raw_block_output(tiny_pair):
    """One span per token gives per-token outputs; the final norm maps them to HF's last."""
    model, tok = tiny_pair
    rc = render_chat(tok, CONVERSATIONS[0])
    ids = torch.tensor([rc.input_ids])
    seq = ids.shape[1]
    with torch.no_grad(), SpanMeanRecorder(model, layers=[-1]) as rec:
        rec.set_mask(torch.eye(seq).unsqueeze(0))  # (1, seq spans, seq)
        out = model(ids, output_hidden_states=True)
    per_token = rec.means()[0, :, 0]  # (seq, d)
    torch.testing.assert_close(model.model.norm(per_token), out.hidden_states[-1][0])


@pytest.mark.parametrize("batch_size", [2, 3])
def test_left_right_and_unbatched_agree(tiny_pair, batch_size):
    model, tok = tiny_pair
    one = record_span_means(model, tok, CONVERSATIONS, batch_size=1)
    right = record_span_means(model, tok, CONVERSATIONS, batch_size=batch_size)
    left = record_span_means(model, tok, CONVERSATIONS, batch_size=batch_size, padding_side="left")
    for a, b, c in zip(one, right, left, strict=True):
        assert torch.isfinite(c).all()
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)


def test_roles_selection_and_empty_results(llama_pair):
    model, tok = llama_pair
    convs = [CONVERSATIONS[1], [{"role": "user", "content": "no answer yet"}]]
    got = record_span_means(model, tok, convs, roles=("assistant",))
    assert got[0].shape == (2, 4, 64)
    assert got[1].shape == (0, 4, 64)
    users = record_span_means(model, tok, convs, roles=("user",), layers=[1, 2])
    assert [t.shape for t in users] == [(2, 2, 64), (1, 2, 64)]
    assert record_span_means(model, tok, [convs[1]], roles="assistant")[0].shape == (0, 4, 64)


def test_empty_turn_gives_zeros(llama_pair):
    model, tok = llama_pair
    conv = [
        *CONVERSATIONS[2],
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": ""},
    ]
    means = record_span_means(model, tok, [conv])[0]
    assert means.shape == (2, 4, 64)
    assert means[0].abs().sum() > 0
    assert torch.equal(means[1], torch.zeros(4, 64))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"roles": ("bot",)}, "roles"),
        ({"roles": ()}, "roles"),
        ({"batch_size": 0}, "batch_size"),
        ({"padding_side": "middle"}, "padding_side"),
    ],
)
def test_record_span_means_rejects_bad_arguments(llama_pair, kwargs, fragment):
    model, tok = llama_pair
    with pytest.raises(ValueError, match=fragment):
        record_span_means(model, tok, CONVERSATIONS, **kwargs)


def _ids(seq: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(10, 200, (batch, seq))


def test_recorder_multi_span_and_weighted_masks(llama_pair):
    model, _ = llama_pair
    ids = _ids(9)
    mask = torch.zeros(2, 3, 9)
    mask[:, 0, 1:4] = 1.0
    mask[0, 1, 5:9] = 1.0
    mask[1, 1, 0] = 1.0
    mask[:, 2, 2:6] = torch.tensor([0.5, 1.0, 2.0, 0.5])  # weighted; span 2 of row 1 stays...
    mask[1, 2] = 0.0  # ...empty: zeros, reported by counts
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        with SpanMeanRecorder(model, layers=[0, 2]) as rec:
            rec.set_mask(mask)
            model(ids)
    assert rec.layers == [0, 2]
    assert rec.sums.shape == (2, 3, 2, 64)
    torch.testing.assert_close(rec.counts, mask.sum(-1))
    means = rec.means()
    assert torch.isfinite(means).all()
    assert torch.equal(means[1, 2], torch.zeros(2, 64))
    for j, layer in enumerate([0, 2]):
        h = hs[layer + 1]
        for b in range(2):
            for k in range(2 if b == 1 else 3):
                w = mask[b, k]
                want = (w[:, None] * h[b]).sum(0) / w.sum()
                torch.testing.assert_close(means[b, k, j], want, atol=1e-5, rtol=1e-5)


def test_recorder_two_dim_mask_and_bool(llama_pair):
    model, _ = llama_pair
    ids = _ids(7)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 6] = True
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        with SpanMeanRecorder(model, layers=1) as rec:
            rec.set_mask(mask)
            model(ids)
    assert rec.means().shape == (2, 1, 64)
    assert rec.counts.tolist() == [3.0, 1.0]
    torch.testing.assert_close(rec.means()[0, 0], hs[2][0, 2:5].mean(0))
    torch.testing.assert_close(rec.means()[1, 0], hs[2][1, 6])


def test_unmasked_forwards_add_nothing_and_masked_ones_accumulate(llama_pair):
    model, _ = llama_pair
    ids = _ids(6)
    mask = torch.ones(2, 6)
    with torch.no_grad(), SpanMeanRecorder(model) as rec:
        rec.set_mask(mask)
        model(ids)
        once = rec.sums.clone()
        model(ids)  # no mask pending: contributes nothing
        model(ids[:, :3])  # nor does a forward of another length
        assert torch.equal(rec.sums, once)
        rec.set_mask(mask)
        model(ids)
        torch.testing.assert_close(rec.sums, 2 * once)
        assert rec.counts.tolist() == [12.0, 12.0]
        torch.testing.assert_close(rec.means(), once / 6)
        rec.reset()
        with pytest.raises(RuntimeError, match="nothing recorded"):
            _ = rec.sums
        rec.set_mask(torch.ones(1, 4))  # a new shape is fine after reset
        model(ids[:1, :4])
        assert rec.sums.shape == (1, 4, 64)


def test_sums_shape_does_not_grow_with_sequence_length(llama_pair):
    model, _ = llama_pair
    shapes = []
    with torch.no_grad(), SpanMeanRecorder(model, layers="1:3") as rec:
        for seq in (5, 50, 200):
            rec.reset()
            rec.set_mask(torch.ones(2, 3, seq))
            model(_ids(seq))
            shapes.append((tuple(rec.sums.shape), tuple(rec.counts.shape)))
            assert rec.sums.dtype == torch.float32
    assert shapes == [((2, 3, 2, 64), (2, 3))] * 3


def test_mask_shape_checks(llama_pair):
    model, _ = llama_pair
    blocks = find_decoder_blocks(model)
    with SpanMeanRecorder(model) as rec:
        rec.set_mask(torch.ones(2, 8))
        with pytest.raises(ValueError, match="must match the next forward"):
            model(_ids(6))
        model(_ids(8))  # the rejected mask was dropped, not kept for this forward
        with pytest.raises(RuntimeError, match="nothing recorded"):
            _ = rec.sums
        rec.reset()
        rec.set_mask(torch.ones(3, 6))
        with pytest.raises(ValueError, match="must match the next forward"):
            model(_ids(6))  # batch 2 vs 3
        rec.reset()
        rec.set_mask(torch.ones(2, 6))
        with pytest.raises(ValueError, match="reset"):
            rec.set_mask(torch.ones(2, 2, 6))
        with pytest.raises(ValueError, match="batch, seq"):
            rec.set_mask(torch.ones(6))
    assert all(not b._forward_hooks for b in blocks)


def test_hooks_removed_on_exit_and_on_exception(tiny_pair):
    model, _ = tiny_pair
    blocks = find_decoder_blocks(model)
    ids = _ids(8)
    with torch.no_grad():
        before = model(ids).logits.clone()
        with SpanMeanRecorder(model) as rec:
            assert all(len(b._forward_hooks) == 1 for b in blocks)
            rec.set_mask(torch.ones(2, 8))
            during = model(ids).logits
        assert torch.equal(during, before)  # recording never changes the forward
        assert all(not b._forward_hooks for b in blocks)
        with pytest.raises(KeyError), SpanMeanRecorder(model, layers=[0, 3]):
            raise KeyError("boom")
        assert all(not b._forward_hooks for b in blocks)
        assert torch.equal(model(ids).logits, before)


def test_recorder_refuses_nesting_and_remove_is_idempotent(llama_pair):
    model, _ = llama_pair
    rec = SpanMeanRecorder(model)
    with rec, pytest.raises(RuntimeError, match="already active"):
        rec.__enter__()
    rec.remove()
    assert all(not b._forward_hooks for b in find_decoder_blocks(model))


@pytest.mark.parametrize(
    ("layers", "want"),
    [(None, [0, 1, 2, 3]), ("all", [0, 1, 2, 3]), ([2, 0], [0, 2]), (-1, [3]), ([-1, -4], [0, 3])],
)
def test_layer_selection(llama_pair, layers, want):
    model, _ = llama_pair
    rec = SpanMeanRecorder(model, layers)
    assert rec.layers == want
    with torch.no_grad(), rec:
        rec.set_mask(torch.ones(1, 5))
        model(_ids(5, batch=1))
    assert rec.sums.shape == (1, len(want), 64)


def test_bad_layer_selection(llama_pair):
    model, _ = llama_pair
    with pytest.raises(LayerError, match="out of range"):
        SpanMeanRecorder(model, layers=[4])


def test_unused_positions_with_nan_do_not_poison_means(llama_pair):
    """Padding rows can hold NaN with some attention kernels; 0 * NaN must not leak in."""
    model, _ = llama_pair
    block = find_decoder_blocks(model)[0]

    def poison(module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        hidden = hidden.clone()
        hidden[:, 0] = float("nan")
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    handle = block.register_forward_hook(poison)  # runs before the recorder's hook
    try:
        mask = torch.zeros(2, 6)
        mask[:, 1:] = 1.0
        with torch.no_grad(), SpanMeanRecorder(model, layers=[0]) as rec:
            rec.set_mask(mask)
            model(_ids(6))
        assert torch.isfinite(rec.means()).all()
    finally:
        handle.remove()


def test_generated_content_mask():
    new = torch.tensor([[5, 6, 2, 7, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0], [5, 3, 6, 0, 0]])
    got = generated_content_mask(new, eos_token_ids=[2, 3], pad_token_id=0)
    assert got.dtype == torch.bool
    assert got.tolist() == [
        [True, True, False, False, False],
        [True, True, True, True, True],
        [False] * 5,
        [True, False, False, False, False],
    ]
    assert generated_content_mask(new, 2)[3].tolist() == [True] * 5
    assert generated_content_mask(new, None).all()
    assert generated_content_mask(new, None, pad_token_id=0)[0].tolist() == [True] * 4 + [False]


@pytest.fixture
def real_model_pair(request):
    try:
        return request.getfixturevalue("real_pair")
    except ImportError as exc:  # the model loader is not available in this checkout
        pytest.skip(f"persona_compass.models.load_model unavailable: {exc}")


@pytest.mark.real_model
def test_real_smollm2_span_means(real_model_pair):
    model, tok = real_model_pair
    got = record_span_means(model, tok, CONVERSATIONS[:2], batch_size=2, padding_side="left")
    assert [t.shape for t in got] == [(1, 30, 576), (2, 30, 576)]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in got)
    assert all(t.abs().sum() > 0 for t in got)
