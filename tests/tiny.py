"""Tiny random-weight models and byte-level tokenizers, built in code for tests and benchmarks.

Three chat styles cover the template families persona-compass must handle:
``chatml`` (SmolLM2, Qwen; has a system role), ``llama3`` (header/eot tokens; system role)
and ``gemma`` (no system role: the template raises on one, as Gemma's does).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

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

from persona_compass.axis import Axis, model_fingerprint
from persona_compass.calibration import Calibration
from persona_compass.capping import CappingConfig
from persona_compass.layers import normalize_layers

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


def make_model(
    arch: str = "llama", n_layers: int = 4, seed: int = 0, **overrides: int
) -> torch.nn.Module:
    """A random-weight causal LM of the given architecture, float32, eval mode
    (``overrides`` change config fields, e.g. ``hidden_size``)."""
    kwargs = {**_common(n_layers, seed), **overrides}
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


def make_pair(arch: str = "llama", n_layers: int = 4, seed: int = 0, **overrides: int):
    """(model, tokenizer) for an architecture, with its matching chat style."""
    tok = make_tokenizer(ARCH_STYLE[arch])
    model = make_model(arch, n_layers, seed, **overrides)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


# ---- axes and bundles for a tiny model -------------------------------------------------------


def calibrated_axis(model: torch.nn.Module, *, seed: int = 5, monitor_layer: int = 2) -> Axis:
    """A random axis for ``model`` (``model_id="tiny"``) with a calibration made from the
    model's own token projections on random ids, so percentiles are meaningful."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=g)
    axis = Axis(
        directions,
        model_id="tiny",
        fingerprint=model_fingerprint(model),
        monitor_layer=monitor_layer,
    )
    ids = torch.randint(3, 200, (4, 40), generator=g)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    units = directions / directions.norm(dim=1, keepdim=True)
    samples = torch.stack(
        [
            hidden[layer + 1].float().reshape(-1, cfg.hidden_size) @ units[layer]
            for layer in range(cfg.num_hidden_layers)
        ],
        dim=1,
    )
    return dataclasses.replace(axis, calibration=Calibration.from_projections(samples))


def cap_at(axis: Axis, percentile: float, layers: str = "1:3") -> CappingConfig:
    """A capping config on ``layers`` with each floor at ``percentile`` of the calibration
    (built with :meth:`CappingConfig.from_axis`, so it carries no calibration metadata)."""
    assert axis.calibration is not None
    chosen = normalize_layers(layers, axis.n_layers)
    taus = [axis.calibration.threshold(layer, percentile) for layer in chosen]
    return CappingConfig.from_axis(axis, layers, taus)


def save_tiny_bundle(
    folder: Path, *, arch: str = "qwen2", seed: int = 3, monitor_layer: int = 2
) -> tuple[Path, Path, Axis]:
    """A tiny model saved as a Hugging Face folder and an axis bundle for it.

    The model goes to ``folder / "tiny-model"`` (the axis's ``model_id``); the axis, random
    directions with a calibration of random projections, to ``folder / "bundle"``.
    Returns ``(model_dir, bundle, axis)``.
    """
    model, tok = make_pair(arch)
    model_dir = folder / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=g)
    calibration = Calibration.from_projections(torch.randn(200, cfg.num_hidden_layers, generator=g))
    axis = Axis(
        directions=directions,
        model_id=str(model_dir),
        fingerprint=model_fingerprint(model),
        monitor_layer=monitor_layer,
        calibration=calibration,
    )
    bundle = folder / "bundle"
    axis.save(bundle)
    return model_dir, bundle, axis
