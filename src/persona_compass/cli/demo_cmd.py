"""``persona-compass demo``: a drifting conversation, uncapped then capped, side by side."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .app import main


@main.command()
@click.option(
    "--model",
    "model_spec",
    default="smollm2-135m",
    show_default=True,
    help="Offline model alias (the demo builds and caches a quick axis for it).",
)
@click.option(
    "--out",
    "out_dir",
    default="demo-out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the chart and transcripts.",
)
@click.option("--max-new-tokens", default=48, show_default=True, help="Tokens per answer.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed (same for both runs).")
@click.option(
    "--rebuild-axis",
    is_flag=True,
    help="Ignore the shipped/cached bundle and build a quick contrast axis now.",
)
def demo(
    model_spec: str, out_dir: Path, max_new_tokens: int, seed: int, rebuild_axis: bool
) -> None:
    """Play a scripted conversation that pulls the model into a persona, uncapped and capped.

    Uses the bundle shipped for the model (smollm2-135m has one, made by `extract --preset
    quick`); for other models it builds once, then caches, a quick contrast axis. Capping is
    the bundle's recommended config: a floor at the 25th percentile of role-play projections
    on an upper-middle layer window. The same user turns are played twice with the same
    seeds, and each answer's live position on the axis is printed. Writes demo.png and the
    two transcripts to --out.
    """
    from ..demo import DRIFT_SCRIPT, load_or_build_quick_bundle, play
    from ..generation import SamplingConfig
    from ..models import load_model, model_display_name
    from ..plots import plot_trajectories

    console = Console(stderr=True)
    started = time.perf_counter()
    console.print(f"[bold]Loading {model_spec}[/]")
    model, tokenizer = load_model(model_spec)
    name = model_display_name(model, tokenizer)
    axis, cap, source = load_or_build_quick_bundle(
        model, tokenizer, model_spec, name, rebuild=rebuild_axis
    )
    layer = axis.layer
    console.print(
        f"axis: {source}; monitor layer {layer} of {axis.n_layers}; capping {cap.name} "
        f"(floor on the axis at the 25th percentile of role-play projections)"
    )
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, seed=seed)
    runs = []
    for condition, config in (("uncapped", None), ("capped", cap)):
        console.print(f"[bold]Playing the conversation {condition}[/]")
        runs.append(
            play(
                model,
                tokenizer,
                axis,
                DRIFT_SCRIPT,
                condition=condition,
                cap=config,
                sampling=sampling,
                on_turn=lambda r: console.print(
                    f"  turn {r.turn}: {r.projection:8.2f}  {r.answer[:70]!r}"
                ),
            )
        )

    table = Table(title=f"Position on the Assistant Axis, layer {layer} (higher = more Assistant)")
    table.add_column("turn", justify="right")
    table.add_column("user says")
    for run in runs:
        table.add_column(f"{run.condition}\nprojection (pct)", justify="right")
    for i, user in enumerate(DRIFT_SCRIPT):
        cells = []
        for run in runs:
            t = run.turns[i]
            pct = "" if t.percentile is None else f" ({t.percentile:.0f})"
            cells.append(f"{t.projection:.2f}{pct}")
        table.add_row(str(i + 1), user[:48] + ("…" if len(user) > 48 else ""), *cells)
    Console().print(table)

    out_dir.mkdir(parents=True, exist_ok=True)
    bands = {}
    if axis.calibration is not None:
        bands = {f"p{p} role-play": axis.calibration.threshold(layer, p) for p in (5, 25, 50)}
    chart = plot_trajectories(
        {run.condition: [t.projection for t in run.turns] for run in runs},
        out_dir / "demo.png",
        bands=bands,
        title=f"{name}: drifting conversation, layer {layer}",
    )
    from ..atomic import write_json

    for run in runs:
        conversation = []
        for t in run.turns:
            conversation += [
                {"role": "user", "content": t.user},
                {"role": "assistant", "content": t.answer},
            ]
        write_json(
            out_dir / f"{run.condition}.json",
            {
                "model": model_spec,
                "conversation": conversation,
                "condition": run.condition,
                "layer": layer,
                "projections": [t.projection for t in run.turns],
                "percentiles": [t.percentile for t in run.turns],
            },
        )
    console.print(
        f"chart: {chart}; transcripts: {out_dir}/uncapped.json, capped.json "
        f"({time.perf_counter() - started:.0f} s)"
    )
