"""The GGUF conversion cache: dequantize a GGUF once, keep it as a plain Hugging Face folder.

transformers dequantizes a GGUF on every load (12 s for SmolLM2-135M, 40 s for Qwen 1.5B on two
CPU cores). Converting once into ``compass_home()/models/<name>-<key>/`` (safetensors, tokenizer
files, and a ``persona_compass.json`` marker) makes later loads take about a second.

Design choices:

- Weights are stored in **float32**. Dequantized GGUF weights are not representable in bfloat16,
  so a float32 copy is the only one that reproduces the GGUF bit for bit at *every* dtype: a
  float32 load gives the GGUF's float32 logits, a bfloat16 load rounds the same numbers the same
  way a bfloat16 GGUF load does. The price is twice the disk of bfloat16 (540 MB for
  SmolLM2-135M); loading still takes under 2 s.
- A cache folder appears whole or not at all: it is written into a temporary sibling by
  :func:`~persona_compass.atomic.atomic_dir`, and the marker is the last file written. A folder
  without a readable marker is never used.
- After saving, the copy is reloaded and must give *identical* float32 logits on a probe input,
  so a transformers change that silently alters the saved weights is caught at conversion time.
- Alias folders are keyed by the registry sha256. A user's ``.gguf`` is keyed by the sha256 of
  its bytes, computed once; a small index keyed by (resolved path, size, mtime) lets later loads
  find the folder without rehashing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_dir, atomic_path, write_json
from ..errors import ModelSpecError
from ..paths import compass_home
from .registry import ModelEntry, part_paths

log = logging.getLogger(__name__)

MARKER = "persona_compass.json"
MARKER_FORMAT = 1
SAVE_DTYPE = torch.float32
GGUF_MAGIC = b"GGUF"
_KEY_LEN = 16  # hex digits of the sha256 in folder names: short, and collisions are negligible
_CHUNK = 8 * 1024 * 1024
# Failures that say nothing about the model file, so they are never rewrapped as spec errors.
_RESOURCE_ERRORS: tuple[type[BaseException], ...] = (
    MemoryError,
    getattr(torch, "OutOfMemoryError", MemoryError),
)

Progress = Callable[[str], None]


def _say(progress: Progress | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)


def models_dir() -> Path:
    """The folder holding converted models: ``compass_home()/models``."""
    folder = compass_home() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def safe_name(name: str) -> str:
    """A file-system-safe version of ``name`` for folder names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:80] or "model"


def cache_dir(name: str, sha256: str) -> Path:
    """The cache folder for a GGUF named ``name`` whose bytes have checksum ``sha256``."""
    return models_dir() / f"{safe_name(name)}-{sha256[:_KEY_LEN]}"


def alias_cache_dir(entry: ModelEntry) -> Path:
    """The cache folder of a registry alias (keyed by its registry sha256)."""
    return cache_dir(entry.alias, entry.sha256)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete cache folder, or None when the folder is not one."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    if not (folder / "config.json").is_file():
        return None
    return data


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion (has a valid marker and a config)."""
    return read_marker(folder) is not None


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_gguf_header(path: Path) -> None:
    """Refuse a file that does not start with the GGUF magic bytes.

    Raises:
        ModelSpecError: naming the file and what to do.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelSpecError(f"cannot read GGUF file {str(path)!r}: {exc}") from None
    if head != GGUF_MAGIC:
        raise ModelSpecError(
            f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes); "
            "check the path, or download the file again if it was cut short"
        )


@contextlib.contextmanager
def _lock(name: str) -> Iterator[bool]:
    """Hold an exclusive per-name lock, so two processes never convert the same model at once.

    Yields whether a real lock is held (False where ``fcntl`` is unavailable).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: conversions may race, atomic_dir still holds
        yield False
        return
    lock_dir = models_dir() / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _sweep_stale_temps(target: Path) -> None:
    # Temporary siblings left by a killed conversion (atomic_dir names them ".<name>.*.tmp").
    # Only called while holding the name's lock, so none of them belongs to a live conversion.
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# GGUF loading and conversion


def load_gguf(path: Path, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a GGUF file directly with transformers, dequantized to ``dtype`` (slow: no cache).

    Args:
        path: the ``.gguf`` file.
        dtype: the dtype the dequantized weights are cast to.

    Returns:
        ``(model, tokenizer)``; the model in eval mode.

    Raises:
        ModelSpecError: when the file is not a readable GGUF or its architecture is unsupported.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_gguf_header(path)
    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        # Force plain dense weights: with the `kernels` package transformers would otherwise keep
        # some weights packed in GGUF blocks, which save_pretrained cannot write.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - transformers versions without GgufConfig
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except _RESOURCE_ERRORS:
        raise
    except Exception as exc:  # transformers raises many types (ValueError, KeyError, struct.error)
        raise ModelSpecError(
            f"cannot load GGUF file {str(path)!r}: {type(exc).__name__}: {exc}; check that the "
            "file is complete and that transformers supports its architecture"
        ) from exc
    return model.eval(), tokenizer


def _probe_logits(model: Any) -> torch.Tensor:
    # A fixed, short token sequence: enough to touch every weight that matters for logits.
    vocab = int(model.config.vocab_size)
    ids = (torch.arange(1, 17, dtype=torch.long) * 7919 % vocab).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _strip_quantizer(model: Any) -> None:
    # transformers 5.x refuses save_pretrained on a GGUF-loaded model while the GGUF quantizer
    # and its quantization_config are attached; the weights are plain tensors by now.
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config


def _save_copy(model: Any, tokenizer: Any, folder: Path) -> None:
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _verify_copy(folder: Path, reference: torch.Tensor, source: str) -> None:
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_pretrained(str(folder), dtype=SAVE_DTYPE).eval()
    logits = _probe_logits(copy)
    del copy
    if logits.shape != reference.shape or not torch.equal(logits, reference):
        diff = (
            (logits - reference).abs().max().item()
            if logits.shape == reference.shape
            else "shape mismatch"
        )
        raise ModelSpecError(
            f"the converted copy of {source} does not reproduce its logits (max diff {diff}); "
            "nothing was cached. This is a transformers incompatibility: please report it, and "
            "meanwhile load the file uncached with persona_compass.models.load_gguf(path)"
        )


def convert_gguf(
    gguf_path: Path,
    target: Path,
    *,
    source: str,
    sha256: str,
    display_name: str,
    verify: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Convert a GGUF file into a plain Hugging Face folder at ``target``, atomically.

    Args:
        gguf_path: the ``.gguf`` file (already checksummed by the caller).
        target: the cache folder to create (replaced whole if it exists).
        source: what the GGUF came from, recorded in the marker (alias or file path).
        sha256: checksum of the GGUF's bytes, recorded in the marker.
        display_name: the model's human name, recorded in the marker.
        verify: reload the copy and require identical float32 logits.
        progress: called with one-line progress messages.

    Returns:
        ``target``.
    """
    import transformers

    _say(progress, f"converting {gguf_path.name} (dequantizing; done once)")
    model, tokenizer = load_gguf(gguf_path, dtype=SAVE_DTYPE)
    reference = _probe_logits(model) if verify else None
    _strip_quantizer(model)
    with atomic_dir(target) as tmp:
        _save_copy(model, tokenizer, tmp)
        # Free the GGUF model before reloading the copy: peak memory stays at one model.
        del model
        gc.collect()
        if reference is not None:
            _say(progress, "checking the converted copy reproduces the GGUF's logits")
            _verify_copy(tmp, reference, source)
        # The marker goes last: its presence is what makes the folder count as complete.
        write_json(
            tmp / MARKER,
            {
                "format": MARKER_FORMAT,
                "source": source,
                "gguf_sha256": sha256,
                "display_name": display_name,
                "weights_dtype": str(SAVE_DTYPE).removeprefix("torch."),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "persona_compass_version": __version__,
                "transformers_version": transformers.__version__,
            },
        )
    _say(progress, f"cached at {target}")
    return target


# --------------------------------------------------------------------------------------------
# Aliases


def assemble_parts(
    parts: Sequence[Path], target: Path, expected_sha256: str, alias: str | None = None
) -> Path:
    """Concatenate GGUF chunks in order into ``target`` atomically, checking the sha256.

    ``alias`` (when the chunks belong to one) goes into the error's suggested fix.

    Raises:
        ModelSpecError: on a checksum mismatch (``target`` is then not created).
    """
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        what = f"the concatenation of {len(parts)} parts"
        _check_sha(digest.hexdigest(), expected_sha256, what, alias)
    return target


def _check_sha(actual: str, expected: str, what: str, alias: str | None = None) -> None:
    if actual != expected:
        fix = (
            f"reinstall with `persona-compass models pull {alias} --force`"
            if alias
            else "download the file again"
        )
        raise ModelSpecError(
            f"sha256 of {what} is {actual}, expected {expected}: the file is corrupt or a "
            f"different version; {fix}"
        )


def ensure_alias_cached(
    entry: ModelEntry, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Return the converted folder of a registry alias, converting it first if needed.

    A complete cache folder is used even when the weight package has since been removed.

    Args:
        entry: the registry entry.
        force: convert again even when a complete folder exists.
        progress: called with one-line progress messages.

    Raises:
        ModelNotInstalledError: when a conversion is needed and a package is missing.
        ModelSpecError: when the installed files fail the sha256 check.
    """
    target = alias_cache_dir(entry)
    if not force and is_complete(target):
        return target
    with _lock(target.name) as locked:
        # Another process may have finished the same conversion while we waited for the lock.
        if not force and is_complete(target):
            return target
        if locked:
            _sweep_stale_temps(target)
        paths = part_paths(entry)
        assembled: Path | None = None
        if entry.multipart:
            assembled = models_dir() / "gguf" / f"{entry.alias}-{entry.sha256[:_KEY_LEN]}.gguf"
            _say(progress, f"assembling {len(paths)} parts into {assembled.name}, checking sha256")
            assemble_parts(paths, assembled, entry.sha256, entry.alias)
            gguf_path = assembled
        else:
            gguf_path = paths[0]
            _say(progress, f"checking sha256 of {gguf_path.name}")
            _check_sha(sha256_file(gguf_path), entry.sha256, str(gguf_path), entry.alias)
        try:
            convert_gguf(
                gguf_path,
                target,
                source=f"alias:{entry.alias}",
                sha256=entry.sha256,
                display_name=entry.display_name,
                progress=progress,
            )
        finally:
            # The assembled GGUF duplicates the package files and the converted folder holds
            # everything a later load needs, so it is not kept.
            if assembled is not None:
                assembled.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------
# User GGUF files


def _index_file(path: Path, stat: os.stat_result) -> Path:
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    return models_dir() / ".index" / f"{key[:32]}.json"


def _lookup_sha(path: Path, stat: os.stat_result) -> str | None:
    try:
        data = json.loads(_index_file(path, stat).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = (
        isinstance(data, dict)
        and data.get("path") == str(path)
        and data.get("size") == stat.st_size
        and data.get("mtime_ns") == stat.st_mtime_ns
    )
    sha = data.get("sha256") if same else None
    return sha if isinstance(sha, str) and len(sha) == 64 else None


def gguf_cache_dir(path: str | os.PathLike[str]) -> Path | None:
    """The complete cache folder of a user GGUF file if one is known without hashing, else None."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return None
    sha = _lookup_sha(resolved, stat)
    if sha is None:
        return None
    folder = cache_dir(resolved.stem, sha)
    return folder if is_complete(folder) else None


def ensure_gguf_cached(
    path: str | os.PathLike[str], *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Return the converted folder of a user's ``.gguf`` file, converting it first if needed.

    The file's sha256 is computed once and remembered under (resolved path, size, mtime), so an
    unchanged file is found again without rehashing; a changed file is hashed and converted anew.

    Raises:
        ModelSpecError: when the file is missing or not a readable GGUF.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ModelSpecError(f"GGUF file {str(path)!r} does not exist; check the path")
    check_gguf_header(resolved)
    stat = resolved.stat()
    sha = _lookup_sha(resolved, stat)
    if sha is not None and not force and is_complete(cache_dir(resolved.stem, sha)):
        return cache_dir(resolved.stem, sha)
    if sha is None:
        _say(progress, f"computing sha256 of {resolved.name}")
        sha = sha256_file(resolved)
        write_json(
            _index_file(resolved, stat),
            {
                "path": str(resolved),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": sha,
            },
        )
    target = cache_dir(resolved.stem, sha)
    with _lock(target.name) as locked:
        if not force and is_complete(target):
            return target
        if locked:
            _sweep_stale_temps(target)
        convert_gguf(
            resolved,
            target,
            source=str(resolved),
            sha256=sha,
            display_name=resolved.stem,
            progress=progress,
        )
    return target
