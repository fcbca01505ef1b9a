"""``persona-compass monitor``: per-turn positions on the axis for transcript files."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from .app import main
from .common import load_axis_and_model
from .options import (
    BUNDLE_MODEL_DEFAULT,
    axis_option,
    dtype_option,
    model_option,
    trait_option,
)
from .param_flags import with_flags

TRANSCRIPT_SUFFIXES = (".json", ".jsonl")


def expand_inputs(
    paths: Sequence[Path], *, recursive: bool = False
) -> list[tuple[Path, str | None]]:
    """Files named directly, plus every ``*.json``/``*.jsonl`` in folders (sorted), in order.

    Returns ``(path, None)`` for each file to read (duplicates dropped) and ``(path, error
    message)`` where an argument is neither a file nor a folder holding transcript files.
    """
    out: list[tuple[Path, str | None]] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append((path, None))

    for path in paths:
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(
                p for p in path.glob(pattern) if p.is_file() and p.suffix in TRANSCRIPT_SUFFIXES
            )
            if not found:
                hint = "" if recursive else " (add --recursive to look in subfolders)"
                out.append((path, f"{path}: no .json or .jsonl files in this folder{hint}"))
            for f in found:
                add(f)
        elif path.is_file():
            add(path)
        else:
            out.append((path, f"{path}: no such file or folder"))
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


# 65,536 tokens: 16 windows of SmolLM2's 8,192-token context, several minutes on 2 CPU cores.
DEFAULT_MAX_TOKENS = 65_536
MAX_FILE_MB = 16


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@axis_option(required=True)
@model_option(help_suffix=BUNDLE_MODEL_DEFAULT)
@click.option("--layer", type=int, default=None, help="Block to read (default: the bundle's).")
@trait_option(help_suffix="Each turn gains the trait's projection and percentile.")
@dtype_option()
@click.option(
    "-r",
    "--recursive",
    is_flag=True,
    help="Also read *.json/*.jsonl files in subfolders of folder arguments.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a PNG chart of the per-turn trajectories with the calibration bands.",
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a self-contained HTML chart (tooltips, alerts, no network references).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="Refuse a conversation longer than this many tokens (files over "
    f"{MAX_FILE_MB} MB are refused before reading). Longer inputs are read in windows of the "
    "model's context, in time linear in the length, with a progress bar.",
)
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Stop at the first unreadable file without processing any "
    "(default: process every good file, then exit 1 listing the bad ones).",
)
def monitor(
    files: tuple[Path, ...],
    axis_path: str,
    model_spec: str | None,
    layer: int | None,
    trait_specs: tuple[str, ...],
    dtype: str | None,
    recursive: bool,
    as_json: bool,
    plot: Path | None,
    html_out: Path | None,
    max_tokens: int,
    fail_fast: bool,
) -> None:
    """Project each assistant turn of transcript FILES on the Assistant Axis.

    FILES are transcript files and/or folders (every *.json and *.jsonl inside, sorted;
    subfolders with --recursive). Accepted layouts: research-release transcripts
    ({"conversation": [...]}), case-study pairs ({"unsteered": {...}, "capped": {...}} or a
    list of transcripts), OpenAI message lists or bodies, JSONL. Each assistant turn gets the
    mean projection of its content tokens at the monitor layer (higher = more
    Assistant-like) and, when the bundle is calibrated, its percentile among role-play
    answers (5 = more drifted than 95% of them). Transcripts written by persona-compass also
    show their stored live readings (live projection, capping, alerts).

    A file that cannot be read or measured gets one error line; the other files are still
    processed (use --fail-fast to stop instead) and the exit status is 1.
    """
    from ..errors import LayerError, PersonaCompassError, TranscriptError
    from ..monitor import project_conversation
    from ..transcripts import Transcript, load_transcripts

    command = click.get_current_context().command
    errors: list[tuple[str, str]] = []
    loaded: list[tuple[Path, Transcript]] = []
    for path, problem in expand_inputs(files, recursive=recursive):
        # read and validate every file before loading the model
        try:
            if problem is not None:
                raise TranscriptError(problem)
            size = path.stat().st_size
            if size > MAX_FILE_MB * 1024 * 1024:
                raise TranscriptError(
                    f"{path} is {size / 1024 / 1024:.1f} MB, over the {MAX_FILE_MB} MB limit for "
                    "one transcript file; split it into several files"
                )
            loaded.extend((path, tr) for tr in load_transcripts(path))
        except PersonaCompassError as exc:
            if fail_fast:
                raise
            errors.append((str(path), with_flags(str(exc), command)))
    if not loaded:
        _exit_with_errors(errors, processed=0)

    axis, model, tokenizer, model_name = load_axis_and_model(axis_path, model_spec, dtype)
    traits = _load_traits(trait_specs, model)
    used_layer = axis.layer if layer is None else layer
    if not 0 <= used_layer < axis.n_layers:
        raise LayerError(f"--layer {used_layer} is out of range: the axis has {axis.n_layers}")
    results: list[dict[str, Any]] = []
    kept: list[Transcript] = []
    for path, tr in loaded:
        try:
            turns = project_conversation(
                model,
                tokenizer,
                axis,
                tr.messages,
                layer=used_layer,
                max_tokens=max_tokens,
                progress=not as_json,
                traits=traits,
            )
        except PersonaCompassError as exc:
            if fail_fast:
                raise
            errors.append((str(path), f"{tr.source}: {with_flags(str(exc), command)}"))
            continue
        live = {r["index"]: r for r in tr.readings} if tr.readings is not None else None
        rows = []
        for t in turns:
            row = t.to_dict()
            pct = None
            if axis.calibration is not None and math.isfinite(t.projection):
                pct = float(axis.calibration.percentile_of(t.projection, used_layer))
            row["percentile"] = pct
            if traits:
                row["traits"] = _trait_readings(t.traits, traits)
            if live is not None:
                row["live"] = live.get(t.index)
            rows.append(row)
        results.append(
            {
                "file": str(path),
                "source": tr.source,
                "label": tr.label,
                "model": model_name,
                "layer": used_layer,
                "turns": rows,
            }
        )
        kept.append(tr)

    single = len(files) == 1 and not files[0].is_dir() and len(results) == 1 and len(loaded) == 1
    if as_json:
        if single:  # one conversation from one file: the original object shape
            res = results[0]
            payload: Any = {"model": res["model"], "layer": res["layer"], "turns": res["turns"]}
            if res["label"] is not None:
                payload["label"] = res["label"]
        else:
            payload = results
        click.echo(json.dumps(_clean(payload), indent=2))
    else:
        _print_tables(results)

    if (plot is not None or html_out is not None) and results:
        _write_charts(results, kept, axis, used_layer, model_name, plot, html_out)
    if errors:
        _exit_with_errors(errors, processed=len({r["file"] for r in results}))


def _load_traits(specs: tuple[str, ...], model: Any) -> list[Any]:
    """The ``--trait`` bundles, each checked against the model."""
    from ..bundle import Bundle

    return [Bundle.open(spec, model=model).axis for spec in specs]


def _trait_readings(means: Mapping[str, float], traits: list[Any]) -> dict[str, Any]:
    """``{name: {"projection", "percentile"}}`` of one turn's trait needles."""
    from ..monitor import needle_names, trait_reading

    return {
        name: {
            "projection": means[name],
            "percentile": trait_reading(trait, means[name]).percentile,
        }
        for name, trait in zip(needle_names(traits), traits, strict=True)
    }


def _exit_with_errors(errors: list[tuple[str, str]], *, processed: int) -> None:
    """One line per bad file on stderr, then exit 1 (with a summary if others were done)."""
    if not errors:
        return
    if processed == 0 and len(errors) == 1:
        raise click.ClickException(errors[0][1])
    for _, message in errors[:-1] if processed == 0 else errors:
        click.echo(f"Error: {message}", err=True)
    if processed == 0:
        raise click.ClickException(errors[-1][1])
    bad = sorted({name for name, _ in errors})
    raise click.ClickException(
        f"{len(bad)} input(s) failed ({', '.join(bad)}); {processed} file(s) were processed"
    )


def _fmt_capped(reading: dict[str, Any]) -> str:
    if not reading["capped"]:
        return "no"
    eng = reading["cap_engagement"]
    return "yes" if eng is None or not math.isfinite(eng) else f"yes ({eng:.0%})"


def _fmt_alerts(reading: dict[str, Any]) -> str:
    return "; ".join(f"{a['kind']}: {a['message']}" for a in reading["alerts"])


def _print_tables(results: list[dict[str, Any]]) -> None:
    console = Console()
    for res in results:
        label = f" [{res['label']}]" if res["label"] else ""
        if res["source"].endswith(f"#{res['label']}"):
            label = ""  # the source already ends with the label (a case-study pair)
        title = f"{res['source']}{label}  (layer {res['layer']}, {res['model']})"
        table = Table(title=rich_escape(title))
        has_live = any("live" in row for row in res["turns"])
        cols = ["turn", "role", "projection", "percentile", "tokens"]
        needles = list(res["turns"][0].get("traits", {})) if res["turns"] else []
        cols += [f"{name} pct" for name in needles]
        if has_live:
            cols += ["live", "live pct", "capped", "alerts"]
        for col in cols:
            table.add_column(col, justify="left" if col in ("role", "alerts") else "right")
        for row in res["turns"]:
            pct_text = "-" if row["percentile"] is None else f"{row['percentile']:.0f}"
            cells = [
                str(row["index"]),
                row["role"],
                f"{row['projection']:.2f}",
                pct_text,
                str(row["n_tokens"]),
            ]
            for name in needles:
                pct = row["traits"][name]["percentile"]
                cells.append("-" if pct is None else f"{pct:.0f}")
            if has_live:
                r = row.get("live")
                if r is None:
                    cells += ["-", "-", "-", ""]
                else:
                    cells += [
                        f"{r['projection']:.2f}",
                        "-" if r["percentile"] is None else f"{r['percentile']:.0f}",
                        _fmt_capped(r),
                        rich_escape(_fmt_alerts(r)),
                    ]
            table.add_row(*cells)
        console.print(table)


def _series_label(res: dict[str, Any], several_files: bool) -> str:
    name = Path(res["file"]).name
    rest = res["source"][len(res["file"]) :] if res["source"].startswith(res["file"]) else ""
    if rest.startswith(":"):  # one line of a JSONL file: keep its line number
        name += rest.split("#", 1)[0]
    if res["label"]:
        return f"{name} · {res['label']}" if several_files else res["label"]
    return name


def _write_charts(
    results: list[dict[str, Any]],
    transcripts: list[Any],
    axis: Any,
    layer: int,
    model_name: str,
    plot: Path | None,
    html_out: Path | None,
) -> None:
    from ..html_chart import Point, Series, calibration_bands, snippet, write_trajectory_html

    several_files = len({r["file"] for r in results}) > 1
    labels: list[str] = []
    for res in results:
        label = _series_label(res, several_files)
        n = sum(1 for x in labels if x == label or x.startswith(f"{label} ("))
        labels.append(label if n == 0 else f"{label} ({n + 1})")
    series = []
    for res, tr, label in zip(results, transcripts, labels, strict=True):
        points = []
        for k, row in enumerate(res["turns"], 1):
            notes = [f"message {row['index']}, {row['n_tokens']} tokens"]
            live = row.get("live")
            alert = False
            if live is not None:
                live_pct = "" if live["percentile"] is None else f" (pct {live['percentile']:.0f})"
                capped = "capped" if live["capped"] else "not capped"
                if live["capped"] and live["cap_engagement"] is not None:
                    capped += f", {live['cap_engagement']:.0%} raised"
                notes.append(f"live {live['projection']:.2f}{live_pct}, {capped}")
                for a in live["alerts"]:
                    notes.append(f"alert {a['kind']}: {a['message']}")
                alert = bool(live["alerts"])
            points.append(
                Point(
                    turn=k,
                    projection=row["projection"],
                    percentile=row["percentile"],
                    text=snippet(tr.messages[row["index"]]["content"]),
                    alert=alert,
                    note="\n".join(notes),
                )
            )
        series.append(Series(label, points))
    bands = calibration_bands(axis.calibration, layer, suffix=" role-play")
    title = f"Position on the Assistant Axis, layer {layer} ({model_name})"
    if plot is not None:
        from ..plots import plot_trajectories

        plot_trajectories(series, plot, bands=bands, title=title)
        click.echo(f"chart written to {plot}", err=True)
    if html_out is not None:
        description = (
            "Each point is one assistant turn: the mean projection of its content tokens on "
            "the axis (higher = more Assistant-like). "
            + (
                "Dashed lines: percentiles of the bundle's role-play calibration projections "
                "at this layer; the shading deepens toward the drifted end."
                if bands
                else "The bundle has no calibration, so no percentile bands are drawn."
            )
        )
        write_trajectory_html(series, html_out, bands, title, description=description)
        click.echo(f"HTML chart written to {html_out}", err=True)
