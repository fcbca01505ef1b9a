"""``persona-compass monitor``: per-turn positions on the axis for transcript files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .app import main
from .common import load_axis_and_model


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--axis", "axis_path", required=True, help="Axis bundle folder.")
@click.option(
    "--model",
    "model_spec",
    default=None,
    help="Model spec (default: the bundle's model, else smollm2-135m).",
)
@click.option("--layer", type=int, default=None, help="Block to read (default: the bundle's).")
@click.option("--dtype", default=None, help="Model dtype, e.g. bfloat16 or float32.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a PNG chart of the per-turn trajectories.",
)
def monitor(
    files: tuple[Path, ...],
    axis_path: str,
    model_spec: str | None,
    layer: int | None,
    dtype: str | None,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Project each assistant turn of transcript FILES on the Assistant Axis.

    FILES may be research-release transcripts ({"conversation": [...]}), OpenAI message
    lists or bodies, or JSONL. Each assistant turn gets the mean projection of its content
    tokens at the monitor layer (higher = more Assistant-like) and, when the bundle is
    calibrated, its percentile among role-play answers (5 = more drifted than 95% of them).
    """
    from ..monitor import project_conversation
    from ..transcripts import load_transcripts

    transcripts = [t for f in files for t in load_transcripts(f)]  # validate all before loading
    axis, model, tokenizer, model_name = load_axis_and_model(axis_path, model_spec, dtype)
    used_layer = axis.layer if layer is None else layer
    results: list[dict[str, Any]] = []
    for tr in transcripts:
        turns = project_conversation(model, tokenizer, axis, tr.messages, layer=used_layer)
        rows = []
        for t in turns:
            row = t.to_dict()
            pct = None
            if axis.calibration is not None and not math.isnan(t.projection):
                pct = float(axis.calibration.percentile_of(t.projection, used_layer))
            row["percentile"] = pct
            rows.append(row)
        results.append({"file": tr.source, "model": model_name, "layer": used_layer, "turns": rows})

    if as_json:
        payload: Any = results[0] if len(results) == 1 else results
        if len(results) == 1:
            payload = {k: v for k, v in results[0].items() if k != "file"}
        click.echo(json.dumps(payload, indent=2))
    else:
        console = Console()
        for res in results:
            table = Table(title=f"{res['file']}  (layer {res['layer']}, {res['model']})")
            for col in ("turn", "role", "projection", "percentile", "tokens"):
                table.add_column(col, justify="right" if col != "role" else "left")
            for row in res["turns"]:
                pct_text = "-" if row["percentile"] is None else f"{row['percentile']:.0f}"
                table.add_row(
                    str(row["index"]),
                    row["role"],
                    f"{row['projection']:.2f}",
                    pct_text,
                    str(row["n_tokens"]),
                )
            console.print(table)
    if plot is not None:
        from ..plots import plot_trajectories

        series = {Path(r["file"]).name: [t["projection"] for t in r["turns"]] for r in results}
        bands = _calibration_bands(axis, used_layer)
        plot_trajectories(series, plot, bands=bands)
        click.echo(f"chart written to {plot}", err=True)


def _calibration_bands(axis: Any, layer: int) -> dict[str, float] | None:
    if axis.calibration is None:
        return None
    return {f"p{p}": float(axis.calibration.threshold(layer, p)) for p in (5, 25, 50)}
