"""``persona-compass axis``: inspect bundles and import the research release's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .app import main
from .axis_hub_cmd import calibrate, check_local_import, hub_import_options, push, run_hub_import


@main.group()
def axis() -> None:
    """Inspect, import, calibrate and publish axis bundles."""


axis.add_command(calibrate)
axis.add_command(push)


def axis_summary(bundle: Any, capping: Any | None) -> dict[str, Any]:
    """The facts a user wants about a bundle, as JSON-ready data."""
    from ..axis_verdict import bundle_verdict

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
        # strong / usable / weak, with the measured values and thresholds behind it
        **bundle_verdict(bundle, capping).to_dict(),
    }
    if bundle.metadata.get("kind") == "trait":  # a trait axis has no persona space (no PCs)
        summary = {"kind": "trait", "trait": bundle.metadata.get("trait"), **summary}
        for key in ("pc1_cosine", "pc_cosines"):
            del summary[key]
        summary["cosines"] = bundle.metadata.get("cosines")
    if capping is not None:
        summary["capping"] = {
            "name": capping.name,
            "form": capping.form,
            "layers": list(capping.layers),
            "thresholds": [round(t, 4) for t in capping.thresholds],
            "rule": capping.rule,  # the calibration rule that made it; None when unrecorded
        }
    return summary


@axis.command("show")
@click.argument("bundle_spec", metavar="BUNDLE")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def show(bundle_spec: str, as_json: bool) -> None:
    """Summarise the axis bundle BUNDLE (a folder or a shipped alias)."""
    from ..bundle import Bundle

    bundle = Bundle.open(bundle_spec)
    cap = bundle.capping
    summary = axis_summary(bundle.axis, cap)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=str(bundle.folder), show_header=False)
    keys: tuple[str, ...] = (
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
    if summary.get("kind") == "trait":
        keys = ("trait", *(k for k in keys if k in summary), "cosines")
    for key in keys:
        table.add_row(key, str(summary[key]))
    table.add_row("vectors", ", ".join(summary["vectors"]) or "-")
    if cap is not None:
        rule = f", rule {cap.rule}" if cap.rule else ""
        table.add_row("capping", f"{cap.name or '-'} ({cap.form}, layers {list(cap.layers)}{rule})")
    table.add_row("verdict", summary["verdict"])
    table.add_row("verdict reasons", "\n".join(summary["verdict_reasons"]))
    Console().print(table)


@axis.command("import")
@click.argument("axis_file", metavar="AXIS_FILE|hf:OWNER/REPO[/SUBFOLDER][@REVISION]")
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
@click.option("--force", is_flag=True, help="Replace an existing --out folder (whole).")
@hub_import_options
def import_(
    axis_file: str,
    out_dir: Path,
    model_id: str | None,
    monitor_layer: int | None,
    capping_file: Path | None,
    experiment: str | None,
    force: bool,
    **hub: Any,
) -> None:
    """Import a research-release axis .pt (and optionally a capping config) into a bundle.

    AXIS_FILE is a local .pt file, or a folder on the Hugging Face Hub,
    `hf:OWNER/REPO[/SUBFOLDER][@REVISION]`, e.g.
    `hf:lu-christina/assistant-axis-vectors/qwen-3-32b`: its assistant_axis.pt, role
    vectors and capping_config.pt (or a bundle published with `axis push`) are fetched
    through huggingface_hub's cache, checked against --model's config, and the revision's
    commit and every file's sha256 are recorded in the bundle.

    .pt files are read with torch.load(weights_only=True) only: a file that would run code
    is refused. The bundle is written whole or not at all: every input is read and checked
    first, the bundle is built in a temporary folder and then takes --out's place in one
    rename. An existing --out is replaced only with --force (nothing of the old bundle
    stays); an --out that is a symbolic link keeps the link and replaces the folder it
    points to.
    """
    from ..atomic import atomic_dir
    from ..axis import Axis
    from ..capping import CappingConfig
    from ..hub import is_hub_source

    if is_hub_source(axis_file):
        run_hub_import(
            axis_file,
            out_dir=out_dir,
            model_id=model_id,
            monitor_layer=monitor_layer,
            capping_file=capping_file,
            experiment=experiment,
            force=force,
            **hub,
        )
        return
    check_local_import(hub)
    if (capping_file is None) != (experiment is None):
        raise click.UsageError("--capping and --experiment go together")
    target = out_dir.resolve() if out_dir.is_symlink() else out_dir
    if target.exists() and not force:
        raise click.UsageError(
            f"--out {out_dir} already exists; pass --force to replace it, or choose a new folder"
        )
    if target.exists() and not target.is_dir():
        raise click.UsageError(f"--out {out_dir} is a file; an axis bundle is a folder")
    ax = Axis.from_reference(Path(axis_file), model_id=model_id, monitor_layer=monitor_layer)
    cap = None
    if capping_file is not None and experiment is not None:
        cap = CappingConfig.from_reference(capping_file, experiment)
        if cap.d_model != ax.d_model or max(cap.layers) >= ax.n_layers:
            raise click.UsageError(
                f"the capping config {experiment} (width {cap.d_model}, layers up to "
                f"{max(cap.layers)}) does not fit the axis (width {ax.d_model}, "
                f"{ax.n_layers} layers); pass the capping file of the same model"
            )
    with atomic_dir(target) as tmp:  # a failure here leaves --out as it was
        ax.save(tmp)
        if cap is not None:
            cap.save(tmp)
    click.echo(f"bundle written to {out_dir}", err=True)
