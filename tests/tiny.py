"""Tiny random-weight models and byte-level tokenizers, built in code for tests and benchmarks.

Three chat styles cover the template families persona-compass must handle:
``chatml`` (SmolLM2, Qwen; has a system role), ``llama3`` (header/eot tokens; system role)
and ``gemma`` (no system role: the template raises on one, as Gemma's does).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIALS = [
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{% else %}"
    "{{ '<think>' }}{% endif %}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

STYLES = {
    # style: (template, bos, eos)
    "chatml": (CHATML_TEMPLATE, None, "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA_TEMPLATE, "<bos>", "<end_of_turn>"),
}

VOCAB_SIZE = 256 + len(SPECIALS)


def make_tokenizer(style: str = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte symbols + chat specials) with a chat template."""
    template, bos, eos = STYLES[style]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_input_names=["input_ids", "attention_mask"],
        pad_token="<pad>",
        eos_token=eos,
        bos_token=bos,
    )
    tok.chat_template = template
    return tok


def _common(n_layers: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


def make_model(arch: str = "llama", n_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A random-weight causal LM of the given architecture, float32, eval mode."""
    kwargs = _common(n_layers, seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=16, **kwargs))
    else:
        raise ValueError(arch)
    return model.eval()


# Which template each tiny architecture uses in tests.
ARCH_STYLE = {"llama": "llama3", "qwen2": "chatml", "gemma2": "gemma"}


def make_pair(arch: str = "llama", n_layers: int = 4, seed: int = 0):
    """(model, tokenizer) for an architecture, with its matching chat style."""
    tok = make_tokenizer(ARCH_STYLE[arch])
    model = make_model(arch, n_layers, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok
