"""Import a published axis from the Hub into a bundle: ``axis import hf:OWNER/REPO/FOLDER``.

A folder is either laid out like the research release (``assistant_axis.pt``, role and
persona vectors as raw ``(n_layers, d_model)`` ``.pt`` tensors, optionally
``capping_config.pt``) or a persona-compass bundle published with ``axis push``
(``bundle.json``, ``axis.safetensors``...). Every ``.pt`` file is read with
``torch.load(weights_only=True)`` only; a pickle that asks for more is refused and nothing of
it runs. The shapes are checked against the model's config (no weights are loaded), and the
bundle records the requested revision, the commit it resolved to and the sha256 of every
source file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from torch import Tensor

from ..atomic import atomic_dir
from ..axis import Axis, safe_torch_load
from ..bundle import Bundle
from ..bundle_format import BUNDLE_FILE
from ..capping import CappingConfig
from ..errors import AxisFileError, PersonaCompassError, UnsafeFileError
from .download import Snapshot, fetch_folder
from .model_config import ModelShape, model_shape
from .source import DEFAULT_REPO_TYPE, HubError, HubSource, parse_source

logger = logging.getLogger(__name__)

AXIS_NAME = "assistant_axis.pt"
CAPPING_NAME = "capping_config.pt"
MARKERS: tuple[str, ...] = (AXIS_NAME, BUNDLE_FILE)
# Fetched when role vectors are not wanted: the axis, the capping config, a bundle's files.
ESSENTIALS: tuple[str, ...] = (AXIS_NAME, CAPPING_NAME, "*.json", "*.safetensors")
# The paper's best capping settings (REFERENCE.md): the 25th percentile on layers 46-53 of
# Qwen 3 32B and 56-71 of Llama 3.3 70B. Chosen by default when a config holds several.
RECOMMENDED_EXPERIMENTS: tuple[str, ...] = ("layers_46:54-p0.25", "layers_56:72-p0.25")
DEFAULT_VECTOR = "default"


@dataclass(frozen=True)
class ImportResult:
    """What ``import_from_hub`` wrote.

    Attributes:
        bundle: the bundle folder.
        source: the Hub folder it came from.
        commit: the commit hash the revision resolved to.
        axis: the imported axis (with its role vectors).
        capping: the capping config in floor form, or None when the folder has none.
        files: sha256 of every source file, by repository-relative path.
        skipped: ``.pt`` files that are not role vectors of this model, and why.
    """

    bundle: Path
    source: HubSource
    commit: str
    axis: Axis
    capping: CappingConfig | None
    files: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)


def source_digest(files: dict[str, str]) -> str:
    """One sha256 over every file's sha256 and path (``sha256sum`` lines, sorted by path)."""
    lines = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def import_from_hub(
    source: str | HubSource,
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    repo_type: str = DEFAULT_REPO_TYPE,
    monitor_layer: int | None = None,
    experiment: str | None = None,
    role_vectors: bool = True,
    force: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> ImportResult:
    """Fetch a published axis folder and write it as a bundle at ``out``.

    Args:
        source: ``hf:OWNER/REPO[/SUBFOLDER][@REVISION]`` or a :class:`HubSource`.
        model: the model the axis is for (alias, folder, ``.gguf`` or hub id); only its
            config is read, to check the axis' shape.
        out: the bundle folder to write (whole or not at all).
        repo_type: ``"dataset"`` (the research release) or ``"model"``, for a string source.
        monitor_layer: override the monitor layer (default: the middle block, as the paper).
        experiment: the capping experiment of ``capping_config.pt`` to import (default: the
            only one, else the paper's recommended window if present).
        role_vectors: also fetch and import the role/persona vectors.
        force: replace an existing ``out`` folder.
        cache_dir: the Hugging Face cache (default: ``huggingface_hub``'s).
        local_files_only: read the cache only; None: offline when ``HF_HUB_OFFLINE`` is set
            or the Hub does not answer.
        token: for ``huggingface_hub`` (None: its login or ``HF_TOKEN``).

    Raises:
        HubError: a bad source, no such folder or revision, a folder with no axis, an axis of
            another shape than the model, or offline with nothing cached.
        UnsafeFileError: a ``.pt`` file would run code; it was refused and nothing ran.
    """
    src = parse_source(source, repo_type) if isinstance(source, str) else source
    target = _check_out(Path(out), force)
    shape = model_shape(model, local_files_only=local_files_only)
    snapshot = fetch_folder(
        src,
        markers=MARKERS,
        only=None if role_vectors else ESSENTIALS,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
    )
    files = snapshot.digests()
    skipped: dict[str, str] = {}
    if (snapshot.folder / AXIS_NAME).is_file():
        axis, capping, skipped = _from_release(snapshot, shape, monitor_layer, experiment)
    else:
        axis, capping = _from_bundle(snapshot, shape, monitor_layer, experiment)
    hub: dict[str, Any] = {
        "source": str(src),
        "repo_id": src.repo_id,
        "repo_type": src.repo_type,
        "subfolder": src.subfolder,
        "revision": src.revision,
        "commit": snapshot.commit,
        "offline": snapshot.offline,
    }
    metadata = {
        **axis.metadata,
        "hub": hub,
        "source_files": files,
        "source_digest": source_digest(files),
        "imported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "capping_experiment": capping.name if capping is not None else None,
    }
    if skipped:
        metadata["skipped_files"] = skipped
    axis = dataclasses.replace(axis, metadata=metadata)
    with atomic_dir(target) as tmp:  # a failure here leaves out as it was
        axis.save(tmp)
        if capping is not None:
            capping.save(tmp)
    return ImportResult(Path(out), src, snapshot.commit, axis, capping, files, skipped)


def _check_out(out: Path, force: bool) -> Path:
    target = out.resolve() if out.is_symlink() else out
    if target.exists() and not target.is_dir():
        raise HubError(f"`out` {out} is a file; an axis bundle is a folder")
    if target.exists() and not force:
        raise HubError(
            f"`out` {out} already exists; pass `force=True` to replace it, or choose a new folder"
        )
    return target


def _check_shape(axis: Axis, shape: ModelShape, where: str) -> None:
    if (axis.n_layers, axis.d_model) != (shape.n_layers, shape.d_model):
        raise HubError(
            f"the axis in {where} has {axis.n_layers} layers of width {axis.d_model} but the "
            f"model {shape.model_id} has {shape.n_layers} layers of width {shape.d_model}; "
            "import the folder published for this model, or pass the `model` it was made for"
        )


def _from_release(
    snapshot: Snapshot, shape: ModelShape, monitor_layer: int | None, experiment: str | None
) -> tuple[Axis, CappingConfig | None, dict[str, str]]:
    """The research release's layout: ``.pt`` axis, role vectors and capping config."""
    src, folder = snapshot.source, snapshot.folder
    where = f"{src} ({AXIS_NAME})"
    try:
        axis = Axis.from_reference(
            folder / AXIS_NAME, model_id=shape.model_id, monitor_layer=monitor_layer
        )
    except UnsafeFileError:
        raise
    except AxisFileError as exc:
        raise HubError(f"{src}: {exc}") from None
    _check_shape(axis, shape, where)
    vectors, skipped = _role_vectors(snapshot, axis)
    capping = _capping(snapshot, axis, experiment)
    metadata = {**axis.metadata, "source": "hub", "role_vectors": sorted(vectors)}
    axis = dataclasses.replace(
        axis, fingerprint=shape.fingerprint, vectors=vectors, metadata=metadata
    )
    return axis, capping, skipped


def _role_vectors(snapshot: Snapshot, axis: Axis) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every other ``.pt`` file of the folder that holds a tensor of the axis' shape.

    A file ``.../pirate.pt`` becomes ``role/pirate`` (``default.pt``: ``default``, as in an
    extracted bundle); names that two files share keep their folder path to stay apart.
    """
    prefix = f"{snapshot.source.subfolder}/" if snapshot.source.subfolder else ""
    candidates = [
        name
        for name in snapshot.files
        if name.endswith(".pt") and name.removeprefix(prefix) not in (AXIS_NAME, CAPPING_NAME)
    ]
    stems = [PurePosixPath(name).stem for name in candidates]
    vectors: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    expected = (axis.n_layers, axis.d_model)
    for name, stem in zip(candidates, stems, strict=True):
        obj = safe_torch_load(snapshot.path(name), what="role vector file")
        if not isinstance(obj, Tensor) or not obj.is_floating_point():
            skipped[name] = f"holds a {type(obj).__name__}, not a floating tensor"
            continue
        if tuple(obj.shape) != expected:
            skipped[name] = f"has shape {tuple(obj.shape)}, not the axis' {expected}"
            continue
        if stems.count(stem) > 1:
            stem = name.removeprefix(prefix).removesuffix(".pt")
        vectors[DEFAULT_VECTOR if stem == DEFAULT_VECTOR else f"role/{stem}"] = obj
    for name, why in skipped.items():
        logger.warning("%s: not imported as a role vector: it %s", name, why)
    return vectors, skipped


def _capping(snapshot: Snapshot, axis: Axis, experiment: str | None) -> CappingConfig | None:
    """The folder's ``capping_config.pt`` experiment, in floor form on the axis' side."""
    path = snapshot.folder / CAPPING_NAME
    src = snapshot.source
    if not path.is_file():
        if experiment is not None:
            raise HubError(
                f"`experiment` {experiment} asks for a capping config, but {src} has no "
                f"{CAPPING_NAME} (the research release has none for Gemma 2 27B); leave "
                "`experiment` out, and after `axis calibrate` cap at a percentile instead"
            )
        return None
    ids = CappingConfig.reference_ids(path)
    if experiment is None:
        if len(ids) == 1:
            experiment = ids[0]
        else:
            preferred = [i for i in RECOMMENDED_EXPERIMENTS if i in ids]
            if not preferred:
                raise HubError(
                    f"{src}: {CAPPING_NAME} holds {len(ids)} experiments "
                    f"({', '.join(ids) or 'none'}); choose one with `experiment`"
                )
            experiment = preferred[0]
    try:
        cap = CappingConfig.from_reference(path, experiment).to_floor()
    except UnsafeFileError:
        raise
    except PersonaCompassError as exc:
        raise HubError(f"{src}: {exc}") from None
    if cap.d_model != axis.d_model or max(cap.layers) >= axis.n_layers:
        raise HubError(
            f"{src}: the capping config {experiment} (width {cap.d_model}, layers up to "
            f"{max(cap.layers)}) does not fit the axis (width {axis.d_model}, {axis.n_layers} "
            "layers); the folder mixes files of two models"
        )
    prefix = f"{src.subfolder}/" if src.subfolder else ""
    metadata = {**cap.metadata, "experiments": ids, "hub_file": prefix + CAPPING_NAME}
    return dataclasses.replace(cap, metadata=metadata)


def _from_bundle(
    snapshot: Snapshot, shape: ModelShape, monitor_layer: int | None, experiment: str | None
) -> tuple[Axis, CappingConfig | None]:
    """A persona-compass bundle published with ``axis push``: safetensors and JSON only."""
    src = snapshot.source
    if experiment is not None:
        raise HubError(
            f"{src} is a persona-compass bundle: its capping config is imported as it is; "
            "leave `experiment` out"
        )
    try:
        published = Bundle.open(snapshot.folder)
        axis, capping = published.axis, published.capping
    except PersonaCompassError as exc:
        raise HubError(f"{src}: {exc}") from None
    _check_shape(axis, shape, str(src))
    if axis.fingerprint is not None and axis.fingerprint != shape.fingerprint:
        raise HubError(
            f"{src} was made for {axis.model_id} (config fingerprint {axis.fingerprint}) but "
            f"{shape.model_id} has fingerprint {shape.fingerprint}: same shape, another "
            "architecture; pass the `model` the bundle was made for"
        )
    metadata = {**axis.metadata, "published_model_id": axis.model_id}
    axis = dataclasses.replace(
        axis,
        model_id=shape.model_id,
        fingerprint=shape.fingerprint,
        monitor_layer=axis.monitor_layer if monitor_layer is None else monitor_layer,
        metadata=metadata,
    )
    return axis, capping
