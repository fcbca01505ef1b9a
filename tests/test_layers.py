"""Decoder-block discovery and layer-index normalisation."""

from __future__ import annotations

import pytest
import torch
from tiny import make_model
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
)

from persona_compass.errors import LayerError
from persona_compass.layers import (
    block_output,
    find_decoder_blocks,
    normalize_layer,
    normalize_layers,
    parse_layer_spec,
    replace_block_output,
)

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)


@pytest.mark.parametrize(
    "build,path",
    [
        (lambda: make_model("llama", 3), "model.layers"),
        (lambda: make_model("qwen2", 3), "model.layers"),
        (lambda: make_model("gemma2", 3), "model.layers"),
        (lambda: MistralForCausalLM(MistralConfig(**SMALL)), "model.layers"),
        (lambda: Gemma3ForCausalLM(Gemma3TextConfig(head_dim=8, **SMALL)), "model.layers"),
        (
            lambda: GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100)),
            "transformer.h",
        ),
    ],
)
def test_finds_blocks_of_each_family(build, path):
    model = build()
    blocks = find_decoder_blocks(model)
    assert len(blocks) == 3
    expected = model
    for name in path.split("."):
        expected = getattr(expected, name)
    assert blocks is expected


def test_block_outputs_are_the_hidden_states(llama_pair):
    """Layer l's block output is HF hidden_states[l + 1] (the convention everywhere)."""
    model, _ = llama_pair
    blocks = find_decoder_blocks(model)
    seen = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, block_output(o)))
        for i, b in enumerate(blocks)
    ]
    try:
        ids = torch.randint(10, 200, (1, 6))
        out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for i in range(len(blocks)):
        if i < len(blocks) - 1:  # the last entry of hidden_states has the final norm applied
            assert torch.equal(seen[i], out.hidden_states[i + 1])


def test_explicit_override_and_errors():
    model = make_model("llama", 2)
    assert len(find_decoder_blocks(model, "model.layers")) == 2
    with pytest.raises(LayerError, match="block_path='nope.layers'"):
        find_decoder_blocks(model, "nope.layers")
    with pytest.raises(LayerError, match="cannot find the decoder blocks.*block_path"):
        find_decoder_blocks(torch.nn.Linear(2, 2))
    model.config.persona_compass_block_path = "model.layers"
    assert len(find_decoder_blocks(model)) == 2


def test_normalize_layers():
    assert normalize_layer(-1, 30) == 29
    assert normalize_layers(5, 30) == [5]
    assert normalize_layers([3, -1, 3], 30) == [3, 29]
    assert normalize_layers("16:24", 30) == list(range(16, 24))
    assert normalize_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layer_spec("1, 3, 5:7", 10) == [1, 3, 5, 6]
    assert parse_layer_spec("-4:", 10) == [6, 7, 8, 9]
    for bad, match in [
        ("30", "out of range"),
        ("5:5", "empty"),
        ("x", "cannot read"),
        ("2:40", "past the end"),
    ]:
        with pytest.raises(LayerError, match=match):
            normalize_layers(bad, 30)
    with pytest.raises(LayerError, match="empty"):
        normalize_layers([], 30)
    with pytest.raises(LayerError, match="integer"):
        normalize_layer(True, 30)  # type: ignore[arg-type]


def test_replace_block_output_keeps_tuple_tail():
    h, other = torch.zeros(1), torch.ones(1)
    new = torch.full((1,), 2.0)
    assert replace_block_output(h, new) is new
    out = replace_block_output((h, other), new)
    assert isinstance(out, tuple) and out[0] is new and out[1] is other
