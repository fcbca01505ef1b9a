"""``persona-compass demo``: a drifting conversation, uncapped, capped and adaptive."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from .app import main
from .options import DEFAULT_MODEL, max_new_tokens_option, model_option, seed_option

if TYPE_CHECKING:
    from ..demo import DemoTurn


@main.command()
@model_option(
    default=DEFAULT_MODEL,
    help_suffix="Without a shipped bundle for it, the demo builds and caches a quick axis.",
)
@click.option(
    "--out",
    "out_dir",
    default="demo-out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the chart and transcripts.",
)
@max_new_tokens_option(default=48)
@seed_option(default=0, help_suffix="The same for the three runs.")
@click.option(
    "--rebuild-axis",
    is_flag=True,
    help="Ignore the shipped/cached bundle and build a quick contrast axis now.",
)
def demo(
    model_spec: str, out_dir: Path, max_new_tokens: int, seed: int, rebuild_axis: bool
) -> None:
    """Play a scripted conversation that pulls the model into a persona: uncapped, capped, adaptive.

    Uses the bundle shipped for the model (smollm2-135m has one, made by `extract --preset
    quick`); for other models it builds once, then caches, a quick contrast axis. Capping is
    the bundle's recommended config: a floor at the 25th percentile of role-play projections
    on an upper-middle layer window. The same user turns are played three times with the same
    seeds: uncapped, always capped, and with adaptive capping (the cap engages after a drift
    alert). Each answer's live position on the axis is printed with its percentile among
    role-play answers. Writes demo.png, demo.html and the three transcripts (with readings)
    to --out.
    """
    from ..demo import DRIFT_SCRIPT, load_or_build_quick_bundle, play
    from ..generation import SamplingConfig
    from ..html_chart import Point, Series, calibration_bands, write_trajectory_html
    from ..models import load_model, model_display_name
    from ..plots import plot_trajectories
    from ..transcripts import save_transcript

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

    def show(turn: DemoTurn) -> None:
        r = turn.reading
        pct = "" if r.percentile is None else f" (p{r.percentile:.0f})"
        flags = (" capped" if r.capped else "") + "".join(f" ALERT {a.kind}" for a in r.alerts)
        console.print(f"  turn {turn.turn}: {r.projection:8.2f}{pct}{flags}  {turn.answer[:60]!r}")

    runs = []
    for condition, mode in (("uncapped", "off"), ("capped", "on"), ("adaptive", "adaptive")):
        console.print(f"[bold]Playing the conversation {condition}[/]")
        runs.append(
            play(
                model,
                tokenizer,
                axis,
                DRIFT_SCRIPT,
                condition=condition,
                cap=cap,
                mode=mode,
                sampling=sampling,
                on_turn=show,
            )
        )

    table = Table(title=f"Position on the Assistant Axis, layer {layer} (higher = more Assistant)")
    table.add_column("turn", justify="right")
    table.add_column("user says")
    for run in runs:
        table.add_column(f"{run.condition}\nprojection (pct)", justify="right")
    for i, user in enumerate(DRIFT_SCRIPT):
        cells = [_cell(run.turns[i]) for run in runs]
        table.add_row(str(i + 1), user[:48] + ("…" if len(user) > 48 else ""), *cells)
    Console().print(table)
    Console().print("* capped answer   ! drift alert raised on this answer")

    out_dir.mkdir(parents=True, exist_ok=True)
    series = [
        Series(
            run.condition,
            [
                Point(
                    t.turn,
                    t.projection,
                    t.percentile,
                    t.answer,
                    alert=bool(t.reading.alerts),
                    note="capped" if t.reading.capped else "",
                )
                for t in run.turns
            ],
        )
        for run in runs
    ]
    bands = calibration_bands(axis.calibration, layer, suffix=" role-play") or {}
    title = f"{name}: drifting conversation, layer {layer}"
    chart = plot_trajectories(series, out_dir / "demo.png", bands=bands, title=title)
    page = write_trajectory_html(series, out_dir / "demo.html", bands=bands, title=title)
    for run in runs:
        save_transcript(
            out_dir / f"{run.condition}.json",
            run.messages,
            model=model_spec,
            readings=run.readings(),
            metadata={"condition": run.condition, "layer": layer, "capping": cap.name},
        )
    console.print(
        f"charts: {chart}, {page}; transcripts: {out_dir}/uncapped.json, capped.json, "
        f"adaptive.json ({time.perf_counter() - started:.0f} s)"
    )


def _cell(turn: DemoTurn) -> str:
    r = turn.reading
    pct = "" if r.percentile is None else f" ({r.percentile:.0f})"
    marks = ("*" if r.capped else "") + ("!" if r.alerts else "")
    return f"{r.projection:.2f}{pct}{marks}"
