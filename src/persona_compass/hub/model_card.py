"""The README.md published with a bundle: what it is for, its numbers, how to use it.

Every number comes from the bundle itself (``bundle.json``, ``calibration.json``,
``capping.json``) or from the files being uploaded (their sha256); nothing is estimated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..axis import Axis
from ..capping import CappingConfig
from .source import HubSource


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _roles(metadata: Mapping[str, Any], axis: Axis) -> str:
    roles = metadata.get("roles")
    if isinstance(roles, Mapping) and roles:
        counts = [v for v in roles.values() if isinstance(v, int)]
        total = f", {sum(counts)} score-3 rollouts" if counts else ""
        return f"{len(roles)} roles{total}"
    named = sorted(name for name in axis.vectors if name.startswith("role/"))
    if named:
        return f"{len(named)} role vectors"
    return "-"


def _source(metadata: Mapping[str, Any]) -> str:
    hub = metadata.get("hub")
    if isinstance(hub, Mapping):
        commit = str(hub.get("commit") or "")[:12]
        return f"imported from `{hub.get('source')}` (commit `{commit}`)"
    if metadata.get("method"):
        preset = metadata.get("preset")
        judge = metadata.get("judge")
        return f"{metadata['method']}, preset `{preset}`, judge `{judge}`"
    if metadata.get("source") == "reference":
        return f"research release file `{metadata.get('reference_file')}`"
    return "-"


def model_card(
    axis: Axis,
    capping: CappingConfig | None,
    files: Mapping[str, str],
    target: HubSource,
) -> str:
    """The model card of a bundle published at ``target``.

    Args:
        axis: the bundle's axis (with its calibration and metadata).
        capping: the bundle's capping config, if any.
        files: sha256 of every file uploaded beside the card, by file name.
        target: where it is published (the card shows the import command for it).
    """
    meta = axis.metadata
    layer = axis.layer
    rows: list[tuple[str, str]] = [
        ("model", f"`{axis.model_id or '-'}`"),
        ("config fingerprint", f"`{axis.fingerprint or '-'}`"),
        ("layers x width", f"{axis.n_layers} x {axis.d_model}"),
        ("monitor layer", str(layer)),
        ("roles", _roles(meta, axis)),
        ("held-out AUROC at the monitor layer", _fmt(meta.get("monitor_auroc"))),
    ]
    cal = axis.calibration
    if cal is not None:
        rows += [
            ("calibration", f"{cal.n_samples} samples: {cal.source or '-'}"),
            (
                "p25 / p75 at the monitor layer",
                f"{_fmt(cal.threshold(layer, 25.0))} / {_fmt(cal.threshold(layer, 75.0))}",
            ),
        ]
        run = meta.get("calibration_run")
        if isinstance(run, Mapping) and isinstance(run.get("p25_interval"), list):
            lo, hi = run["p25_interval"]
            rows.append(("p25 bootstrap 95% interval", f"{_fmt(lo)} .. {_fmt(hi)}"))
    else:
        rows.append(("calibration", "none (run `persona-compass axis calibrate` after import)"))
    if capping is not None:
        taus = capping.thresholds
        rows.append(
            (
                "capping",
                f"`{capping.name or '-'}` ({capping.form}), layers {_layer_text(capping.layers)}, "
                f"thresholds {_fmt(min(taus))} .. {_fmt(max(taus))}",
            )
        )
    else:
        rows.append(("capping", "none"))
    rows += [
        ("source", _source(meta)),
        ("persona-compass version", axis.library_version),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    digests = "\n".join(f"{files[name]}  {name}" for name in sorted(files))
    repo_type = "" if target.repo_type == "dataset" else f" --repo-type {target.repo_type}"
    source = HubSource(target.repo_id, target.subfolder, None, target.repo_type)
    model = axis.model_id or "MODEL"
    cap = " --cap on" if capping is not None else ""
    return f"""---
tags:
- persona-compass
- assistant-axis
---

# Assistant Axis bundle for `{model}`

An axis bundle for persona-compass: the model's Assistant Axis (one direction per decoder
block, Lu et al., "The Assistant Axis", 2026) and, where present, its calibration and
capping config, in safetensors and JSON (no pickles).

## Use it

```bash
persona-compass axis import {source}{repo_type} --model {model} --out bundle
persona-compass serve --axis bundle --model {model} --engine vllm{cap}
```

## Numbers

| | |
|---|---|
{table}

## Files (sha256)

```text
{digests}
```
"""


def _layer_text(layers: tuple[int, ...]) -> str:
    unique = sorted(set(layers))
    if unique == list(range(unique[0], unique[-1] + 1)):
        return f"{unique[0]}-{unique[-1]}"
    return ", ".join(str(x) for x in unique)
