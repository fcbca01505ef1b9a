"""``load_model``: one entry point for every kind of model spec.

A spec is, in the order tried: a registry alias (``smollm2-135m``), an existing local path (a
Hugging Face folder with ``config.json``, or a ``.gguf`` file), or a Hugging Face hub id
(``org/name``). GGUF files and aliases go through the conversion cache
(:mod:`persona_compass.models.cache`), so only the first load pays for dequantization.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from ..errors import ModelSpecError
from ..layers import find_decoder_blocks
from .cache import _RESOURCE_ERRORS, ensure_alias_cached, ensure_gguf_cached, read_marker
from .registry import DEFAULT_ALIAS, REGISTRY, aliases, get_entry

log = logging.getLogger(__name__)

DTYPE_ENV = "PERSONA_COMPASS_DTYPE"

# Attributes recorded on ``model.config`` so any later code can ask where a model came from.
# ``persona_compass_block_path`` is the override :func:`persona_compass.layers.find_decoder_blocks`
# reads.
DISPLAY_NAME_ATTR = "persona_compass_display_name"
MODEL_ID_ATTR = "persona_compass_model_id"
BLOCK_PATH_ATTR = "persona_compass_block_path"

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SpecKind = Literal["alias", "folder", "gguf", "hub"]


@dataclass(frozen=True)
class ResolvedSpec:
    """What a model spec names.

    Attributes:
        kind: ``alias``, ``folder`` (local HF folder), ``gguf`` (local file) or ``hub`` (HF id).
        value: the alias, the resolved path, or the hub id.
    """

    kind: SpecKind
    value: str


# --------------------------------------------------------------------------------------------
# dtype and device


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bfloat16 instructions (AVX512-BF16, AMX-BF16, Arm BF16).

    Without them bfloat16 matmuls are emulated and slower than float32.
    """
    capability = str(torch.backends.cpu.get_cpu_capability()).lower()
    if "bf16" in capability or "amx" in capability:
        return True
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        # x86 lists "flags", Arm lists "Features".
        if key.strip().lower() in {"flags", "features"}:
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype used when none is given: bfloat16 on CUDA and on CPUs with bf16 instructions,
    float32 otherwise (where bfloat16 is emulated and slower)."""
    dev = torch.device(device) if device is not None else _default_device()
    if dev.type == "cuda":
        return torch.bfloat16
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


def resolve_dtype(
    dtype: torch.dtype | str | None, device: str | torch.device | None = None
) -> torch.dtype | Literal["auto"]:
    """Turn a dtype argument into what ``from_pretrained`` takes.

    Args:
        dtype: a ``torch.dtype``, a name (``"bfloat16"``, ``"bf16"``, ``"float32"``, ``"auto"``
            for the checkpoint's own), or None for ``$PERSONA_COMPASS_DTYPE`` if set, else
            :func:`default_dtype`.
        device: the target device, which decides the default.

    Raises:
        ModelSpecError: for an unknown name, listing the accepted ones.
    """
    source = "dtype"
    if dtype is None:
        env = os.environ.get(DTYPE_ENV, "").strip()
        if not env:
            return default_dtype(device)
        dtype, source = env, f"${DTYPE_ENV}"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise ModelSpecError(
        f"{source}={dtype!r} is not a dtype persona-compass knows; use a torch.dtype or one of "
        f"{', '.join(['auto', *_DTYPE_NAMES])}"
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Spec resolution


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "~", "/", "\\"))
        or spec.lower().endswith(".gguf")
        or spec.count("/") > 1
        or "\\" in spec
        or bool(re.match(r"^[A-Za-z]:[\\/]", spec))
    )


def resolve_spec(spec: str | os.PathLike[str]) -> ResolvedSpec:
    """Work out what a model spec names, without loading anything.

    Raises:
        ModelSpecError: for a missing path, a folder that is not a model, a file that is not a
            ``.gguf``, or a bare name that is not a known alias.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise ModelSpecError(
            f"the model spec is empty; pass an alias ({', '.join(aliases())}), a Hugging Face "
            "id (org/name), a local model folder or a .gguf file"
        )
    if text in REGISTRY:
        return ResolvedSpec("alias", text)
    path = Path(text).expanduser()
    if path.exists():
        resolved = path.resolve()
        if resolved.is_dir():
            if (resolved / "config.json").is_file():
                return ResolvedSpec("folder", str(resolved))
            ggufs = sorted(p.name for p in resolved.glob("*.gguf"))
            hint = (
                f"; to load a GGUF in it pass the file, e.g. {str(resolved / ggufs[0])!r}"
                if ggufs
                else "; pass a folder written by save_pretrained (model and tokenizer)"
            )
            raise ModelSpecError(f"folder {text!r} has no config.json, so it is not a model{hint}")
        if resolved.suffix.lower() == ".gguf":
            return ResolvedSpec("gguf", str(resolved))
        raise ModelSpecError(
            f"{text!r} is a file but not a .gguf; pass a .gguf file or a model folder "
            "with config.json"
        )
    if _looks_like_path(text):
        raise ModelSpecError(
            f"model path {text!r} does not exist; check the path (or use an alias: "
            f"{', '.join(aliases())})"
        )
    if _HUB_ID.match(text):
        return ResolvedSpec("hub", text)
    raise ModelSpecError(
        f"unknown model {text!r}: not an alias ({', '.join(aliases())}), not an existing path, "
        "and not a Hugging Face id of the form org/name; see `persona-compass models list`"
    )


# --------------------------------------------------------------------------------------------
# Loading


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_ALIAS,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    block_path: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from an alias, a folder, a ``.gguf`` file or a hub id.

    Args:
        spec: a registry alias (default ``"smollm2-135m"``; see ``persona-compass models list``),
            a local Hugging Face folder, a ``.gguf`` file, or a hub id such as ``"org/name"``.
        dtype: a ``torch.dtype`` or a name (``"bfloat16"``, ``"float32"``, ``"auto"``). Default:
            bfloat16 on CUDA and on CPUs with bf16 instructions, else float32 (or
            ``$PERSONA_COMPASS_DTYPE``).
        device: where to put the model (``"cpu"``, ``"cuda:0"``); default CUDA when available.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread a big model over
            GPUs); excludes ``device``.
        block_path: dotted path of the decoder-block list, for architectures that
            :mod:`persona_compass.layers` cannot find by itself.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, the tokenizer with a pad token.

    Raises:
        ModelSpecError: the spec cannot be resolved or loaded (the message says how to fix it).
        ModelNotInstalledError: an alias whose weight package is missing.

    Example:
        >>> model, tok = load_model("smollm2-135m")  # doctest: +SKIP
        >>> model_display_name(model)  # doctest: +SKIP
        'SmolLM2-135M-Instruct'
    """
    if device is not None and device_map is not None:
        raise ModelSpecError(
            f"pass either device={device!r} or device_map={device_map!r}, not both"
        )
    resolved = resolve_spec(spec)
    torch_dtype = resolve_dtype(dtype, device)
    if device_map is None:
        target = torch.device(device) if device is not None else _default_device()
        # On CPU no map at all: from_pretrained loads there anyway, and a map adds overhead.
        device_map = None if target.type == "cpu" else {"": str(target)}

    if resolved.kind == "alias":
        entry = get_entry(resolved.value)
        folder = ensure_alias_cached(entry)
        model, tokenizer = _load_folder(folder, torch_dtype, device_map)
        display_name = entry.display_name
    elif resolved.kind == "gguf":
        folder = ensure_gguf_cached(resolved.value)
        model, tokenizer = _load_folder(folder, torch_dtype, device_map)
        display_name = Path(resolved.value).stem
    elif resolved.kind == "folder":
        folder = Path(resolved.value)
        model, tokenizer = _load_folder(folder, torch_dtype, device_map)
        # A cache folder handed in directly keeps the name recorded at conversion.
        marker = read_marker(folder)
        display_name = str((marker or {}).get("display_name") or folder.name)
    else:
        model, tokenizer = _load_hub(resolved.value, torch_dtype, device_map)
        display_name = resolved.value.rsplit("/", 1)[-1]
    _finish(model, tokenizer, display_name=display_name, model_id=resolved.value)
    if block_path is not None:
        find_decoder_blocks(model, block_path)  # fail now, with the layers module's message
        setattr(model.config, BLOCK_PATH_ATTR, block_path)
    return model, tokenizer


def _load_folder(folder: Path, dtype: Any, device_map: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, device_map=device_map
        )
    except _RESOURCE_ERRORS:
        raise  # out of memory is not a problem with the spec: keep torch's own message
    except Exception as exc:  # OSError, ValueError (unknown architecture), safetensors errors
        raise ModelSpecError(
            f"cannot load the model in {str(folder)!r}: {type(exc).__name__}: {exc}; check that "
            "the folder was written by save_pretrained for a causal language model"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except _RESOURCE_ERRORS:
        raise
    except Exception as exc:
        raise ModelSpecError(
            f"cannot load a tokenizer from {str(folder)!r}: {type(exc).__name__}: {exc}; save "
            "one there with tokenizer.save_pretrained(folder)"
        ) from exc
    return model, tokenizer


def _hub_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check that the hub's host answers, so an unreachable hub fails in seconds
    instead of after transformers' retries. Behind a proxy it cannot tell and says True."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not url.hostname:
        return True
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(model_id: str, dtype: Any, device_map: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Offline (by setting or because the host does not answer) only the local HF cache can help.
    local_only = _hub_offline() or not hub_reachable()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=dtype, device_map=device_map, local_files_only=local_only
        )
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=local_only)
    except OSError as exc:
        # transformers reports "not reachable", "not in the cache", "no such repo" and
        # "gated" all as OSError.
        why = "the hub cannot be reached and it is not in the local cache" if local_only else exc
        raise ModelSpecError(
            f"cannot load Hugging Face model {model_id!r}: {why}. Offline, use an installed "
            f"alias (`persona-compass models list`, `persona-compass models pull "
            f"{DEFAULT_ALIAS}`) or a local folder or .gguf file"
        ) from exc
    except _RESOURCE_ERRORS:
        raise
    except Exception as exc:
        raise ModelSpecError(
            f"cannot load Hugging Face model {model_id!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return model, tokenizer


def _finish(model: Any, tokenizer: Any, *, display_name: str, model_id: str) -> None:
    model.eval()
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is not None:
            # Batched generation and recording need padding; eos is the usual stand-in.
            tokenizer.pad_token = tokenizer.eos_token
        else:
            log.warning("tokenizer has neither a pad nor an eos token; batching will fail")
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if display_name:
        setattr(model.config, DISPLAY_NAME_ATTR, display_name)
    setattr(model.config, MODEL_ID_ATTR, model_id)


def _basename(name_or_path: str) -> str:
    return name_or_path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def model_display_name(model: Any, tokenizer: Any = None) -> str:
    """A human name for a model: the registry name when it came from an alias (for example
    ``"SmolLM2-135M-Instruct"``), else the last part of its name or path.

    Used for ``{model_name}`` in prompts and in reports.
    """
    config = getattr(model, "config", None)
    recorded = getattr(config, DISPLAY_NAME_ATTR, None)
    if recorded:
        return str(recorded)
    for owner in (config, tokenizer):
        name = getattr(owner, "name_or_path", None)
        if name:
            return _basename(str(name))
    return type(model).__name__


def model_id(model: Any) -> str:
    """What the model was loaded from (alias, hub id or resolved path), for bundle metadata;
    falls back to ``config.name_or_path``."""
    config = getattr(model, "config", None)
    recorded = getattr(config, MODEL_ID_ATTR, None)
    if recorded:
        return str(recorded)
    return str(getattr(config, "name_or_path", "") or type(model).__name__)
