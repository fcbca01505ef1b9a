"""``persona-compass axis``: inspect bundles and import the research release's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .app import main


@main.group()
def axis() -> None:
    """Inspect axis bundles and import reference axis files."""


def axis_summary(bundle: Any, capping: Any | None) -> dict[str, Any]:
    """The facts a user wants about a bundle, as JSON-ready data."""
    summary: dict[str, Any] = {
        "model_id": bundle.model_id,
        "fingerprint": bundle.fingerprint,
        "n_layers": bundle.n_layers,
        "d_model": bundle.d_model,
        "monitor_layer": bundle.layer,
        "axis_norms": [round(float(n), 4) for n in bundle.directions.norm(dim=-1)],
        "calibrated": bundle.calibration is not None,
        "auroc": bundle.metadata.get("monitor_auroc"),
        "pc1_cosine": bundle.metadata.get("monitor_pc1_cosine"),
        # |cos(axis, PC1..PC5)| at the monitor layer (bundles made before this was recorded: None)
        "pc_cosines": bundle.metadata.get("monitor_pc_cosines"),
        "vectors": sorted(bundle.vectors),
        "metadata": dict(bundle.metadata),
    }
    if capping is not None:
        summary["capping"] = {
            "name": capping.name,
            "form": capping.form,
            "layers": list(capping.layers),
            "thresholds": [round(t, 4) for t in capping.thresholds],
        }
    return summary


@axis.command("show")
@click.argument("bundle_spec", metavar="BUNDLE")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def show(bundle_spec: str, as_json: bool) -> None:
    """Summarise the axis bundle BUNDLE (a folder or a shipped alias)."""
    from ..axis import Axis
    from ..bundles import resolve_bundle
    from ..capping import CappingConfig

    bundle = resolve_bundle(bundle_spec)
    ax = Axis.load(bundle)
    cap = CappingConfig.load_optional(bundle)
    summary = axis_summary(ax, cap)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=str(bundle), show_header=False)
    keys = (
        "model_id",
        "fingerprint",
        "n_layers",
        "d_model",
        "monitor_layer",
        "auroc",
        "pc1_cosine",
        "pc_cosines",
        "calibrated",
    )
    for key in keys:
        table.add_row(key, str(summary[key]))
    table.add_row("vectors", ", ".join(summary["vectors"]) or "-")
    if cap is not None:
        table.add_row("capping", f"{cap.name or '-'} ({cap.form}, layers {list(cap.layers)})")
    Console().print(table)


@axis.command("import")
@click.argument("axis_file", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle folder to write.",
)
@click.option("--model-id", default=None, help="Model spec the axis belongs to.")
@click.option("--monitor-layer", type=int, default=None, help="Monitor layer (default: middle).")
@click.option(
    "--capping",
    "capping_file",
    type=click.Path(path_type=Path),
    default=None,
    help="A research-release capping_config.pt to import with it.",
)
@click.option(
    "--experiment",
    default=None,
    help="The capping experiment id to import, e.g. layers_46:54-p0.25.",
)
def import_(
    axis_file: Path,
    out_dir: Path,
    model_id: str | None,
    monitor_layer: int | None,
    capping_file: Path | None,
    experiment: str | None,
) -> None:
    """Import a research-release axis .pt (and optionally a capping config) into a bundle.

    .pt files are read with torch.load(weights_only=True) only: a file that would run code
    is refused.
    """
    from ..axis import Axis
    from ..capping import CappingConfig

    if (capping_file is None) != (experiment is None):
        raise click.UsageError("--capping and --experiment go together")
    ax = Axis.from_reference(axis_file, model_id=model_id, monitor_layer=monitor_layer)
    ax.save(out_dir)
    if capping_file is not None and experiment is not None:
        cap = CappingConfig.from_reference(capping_file, experiment)
        cap.save(out_dir)
    click.echo(f"bundle written to {out_dir}", err=True)
