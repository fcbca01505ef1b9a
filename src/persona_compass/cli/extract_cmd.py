"""``persona-compass extract``: role play -> judged rollouts -> a calibrated axis bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from .app import main
from .options import (
    DEFAULT_MODEL,
    dtype_option,
    max_new_tokens_option,
    model_option,
    seed_option,
    temperature_option,
    top_p_option,
)


@main.command()
@model_option(default=DEFAULT_MODEL)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Run folder (resumable); the bundle lands in OUT/bundle.",
)
@click.option(
    "--preset",
    type=click.Choice(["quick", "standard", "paper"]),
    default="quick",
    show_default=True,
    help="Run size; every knob below overrides it.",
)
@click.option(
    "--roles",
    "roles_path",
    default=None,
    help="roles.json, or a folder in the research release's layout.",
)
@click.option("--questions", "questions_path", default=None, help="Questions JSONL.")
@click.option(
    "--judge",
    default="heuristic",
    show_default=True,
    help="none | heuristic | model:SPEC | model:self | openai:URL[#model].",
)
@click.option(
    "--generator",
    default=None,
    help="openai:URL[#model]: take answers from an OpenAI-compatible server and "
    "record activations locally in a second pass.",
)
@click.option(
    "--trait",
    default=None,
    help="Extract a trait axis instead of the Assistant Axis: a shipped trait (sycophancy, "
    "malice, confabulation) or a trait catalogue file (.json). Every question is answered "
    "under both prompts of every pair; the axis is mean(elicited answers judged to show the "
    "trait) - mean(suppressed answers judged not to).",
)
@click.option(
    "--compare",
    "compare_specs",
    multiple=True,
    help="--trait: a bundle (folder or alias) whose cosine with the trait axis the report "
    "gives; repeatable [default: the shipped bundles of the same model].",
)
@click.option("--n-roles", type=int, default=None, help="Roles to use (spread over categories).")
@click.option(
    "--prompts-per-role",
    type=int,
    default=None,
    help="System prompts per role (--trait: prompt pairs, default all).",
)
@click.option(
    "--n-questions", type=int, default=None, help="Questions per prompt (--trait: default all)."
)
@max_new_tokens_option(
    default=None, help_suffix="[default: the preset's: quick 64, standard 128, paper 512]"
)
@click.option("--batch-size", type=int, default=None, help="Rollouts per generate call.")
@temperature_option(default=None, help_suffix="[default: 0.7]")
@top_p_option(default=None, help_suffix="[default: 0.9]")
@click.option(
    "--min-role-count", type=int, default=None, help="Score-3 rollouts a role needs to count (5)."
)
@click.option(
    "--samples-per-role",
    type=int,
    default=None,
    help="Rollouts per role that keep per-rollout activations (20).",
)
@click.option("--percentile", type=float, default=None, help="Capping percentile (25).")
@click.option(
    "--layers",
    default=None,
    help="Decoder blocks to record: all (default), '16:24' (half-open), '-8:' (the last 8), "
    "'3,5,16:20'. Fewer blocks = less memory and storage; unrecorded blocks get a zero axis "
    "row and the monitor layer and capping window are chosen among recorded ones.",
)
@seed_option(default=None, help_suffix="[default: 0]")
@dtype_option()
@click.option(
    "--device-map",
    default=None,
    help='Spread a large model over GPUs, e.g. "auto" (needs accelerate).',
)
@click.option(
    "--engine",
    type=click.Choice(["hf", "vllm"]),
    default="hf",
    show_default=True,
    help="hf: the model's own generate in this process, one batch at a time. vllm: rollouts "
    "stream through vLLM's continuous batches and their activations are summed inside the "
    "engine in the same pass (needs the vllm extra; `make install` has it).",
)
@click.option(
    "--eager/--compile",
    default=None,
    help="vllm: skip torch.compile (starts in seconds instead of minutes) [default: --eager].",
)
@click.option(
    "--max-num-seqs",
    type=int,
    default=None,
    help="vllm: rollouts generated at once [default: 64].",
)
@click.option(
    "--rejudge",
    is_flag=True,
    help="Re-score a finished run in --out with --judge (no regeneration) and rebuild its bundle.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def extract(
    model_spec: str,
    out_dir: Path,
    preset: str,
    roles_path: str | None,
    questions_path: str | None,
    judge: str,
    generator: str | None,
    trait: str | None,
    compare_specs: tuple[str, ...],
    n_roles: int | None,
    prompts_per_role: int | None,
    n_questions: int | None,
    max_new_tokens: int | None,
    batch_size: int | None,
    temperature: float | None,
    top_p: float | None,
    min_role_count: int | None,
    samples_per_role: int | None,
    percentile: float | None,
    layers: str | None,
    seed: int | None,
    dtype: str | None,
    device_map: str | None,
    engine: str,
    eager: bool | None,
    max_num_seqs: int | None,
    rejudge: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Extract the Assistant Axis of a model from role play, resumably.

    The model answers every question under each role's system prompts and under the neutral
    default prompts; activations are captured while it generates (one pass), a judge scores
    role adherence 0-3, and running sums per role and score are committed after every batch.
    Rerun the same command after any crash to continue. The result is an axis bundle with
    calibration, a recommended monitor layer and capping config, and report.md.
    """
    from ..atomic import read_json_object
    from ..axis import BUNDLE_FILE
    from ..errors import AxisFileError
    from ..models import load_model, model_display_name
    from ..models import model_id as model_id_of
    from ..persona_space.extract import ExtractSettings, command_line, run_extraction

    console = Console(stderr=True)
    engine_options = _engine_options(engine, eager, max_num_seqs, dtype, device_map, rejudge)
    settings = ExtractSettings.from_preset(
        model_spec,
        preset,
        roles_path=roles_path,
        questions_path=questions_path,
        judge=judge,
        generator=generator,
        n_roles=n_roles,
        prompts_per_role=prompts_per_role,
        n_questions=n_questions,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_p=top_p,
        min_role_count=min_role_count,
        samples_per_role=samples_per_role,
        percentile=percentile,
        seed=seed,
        layers=layers,
        engine=engine,
        trait=trait,
        command=command_line(),
    )
    if dry_run:  # plan without loading the model: the catalogue alone fixes the counts
        from ..persona_space.extract import plan_run

        _, _, plan = plan_run(settings, "MODEL")
        plan.update(_dry_run_layers(model_spec, settings.layers))
        plan["out"] = str(out_dir)
        click.echo(json.dumps(plan, indent=2))
        return
    if engine == "vllm":  # fail before loading anything when vLLM cannot serve this model
        from ..engines.vllm_engine import _import_vllm, model_folder

        _import_vllm()
        model_folder(model_spec)
    console.print(f"[bold]Loading {model_spec}[/]")
    model, tokenizer = load_model(model_spec, dtype=dtype, device_map=device_map)

    def show_plan(plan: dict) -> None:
        if "trait" in plan:
            console.print(
                f"plan: trait {plan['trait']}, {plan['pairs']} prompt pairs x 2 sides x "
                f"{plan['questions']} questions = {plan['rollouts']} rollouts, up to "
                f"{plan['max_new_tokens']} tokens each; layers {plan['layers']}"
            )
            return
        console.print(
            f"plan: {plan['roles']} roles + default, {plan['questions']} questions, "
            f"{plan['rollouts']} rollouts, up to {plan['max_new_tokens']} tokens each; "
            f"layers {plan['layers']} ({plan['n_recorded_layers']} of {plan['n_layers']} recorded)"
        )

    if rejudge:
        from ..persona_space.extract import rejudge as rejudge_run

        result = rejudge_run(
            out_dir,
            judge,
            model=model,
            tokenizer=tokenizer,
            model_id=model_id_of(model),
            compare_with=_comparison_axes(compare_specs, model) if trait else (),
        )
    else:
        result = run_extraction(
            settings,
            out_dir,
            model=model,
            tokenizer=tokenizer,
            model_id=model_id_of(model),
            model_name=model_display_name(model, tokenizer),
            on_plan=show_plan,
            engine_options=engine_options,
            compare_with=_comparison_axes(compare_specs, model) if trait else (),
        )
    meta = result.summary
    summary = {
        "bundle": str(result.bundle_dir),
        "rollouts": result.planned,
        "generated_now": result.generated_now,
        "monitor_layer": read_json_object(result.bundle_dir / BUNDLE_FILE, AxisFileError)[
            "monitor_layer"
        ]
        if result.bundle_dir
        else None,
        "monitor_auroc": meta.get("monitor_auroc"),
        "monitor_pc1_cosine": meta.get("monitor_pc1_cosine"),
        "capping_window": meta.get("capping_window"),
        "roles_used": len(meta.get("roles", {})),
        "roles_dropped": len(meta.get("dropped_roles", {})),
        "layers": meta.get("layers", "all"),
        "storage_bytes_per_role_max": meta.get("storage_bytes_per_role_max"),
    }
    if meta.get("kind") == "trait":
        summary = {
            "bundle": summary["bundle"],
            "trait": meta["trait"],
            "rollouts": result.planned,
            "generated_now": result.generated_now,
            "monitor_layer": summary["monitor_layer"],
            "monitor_auroc": meta.get("monitor_auroc"),
            "answers_in_axis": {"shows": meta.get("n_shows"), "avoids": meta.get("n_avoids")},
            "cosines": meta.get("cosines"),
        }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            console.print(f"{key:>28}: {value}")


def _comparison_axes(specs: tuple[str, ...], model: Any) -> list[Any]:
    """The axes a trait report compares with: ``--compare`` bundles, else every shipped
    bundle extracted from this very model (same fingerprint)."""
    from ..axis import model_fingerprint
    from ..bundle import Bundle
    from ..bundles import shipped_bundles

    if specs:
        return [Bundle.open(spec).axis for spec in specs]
    fingerprint = model_fingerprint(model)
    axes = [Bundle.open(folder).axis for folder in shipped_bundles().values()]
    return [axis for axis in axes if axis.fingerprint == fingerprint]


def _engine_options(
    engine: str,
    eager: bool | None,
    max_num_seqs: int | None,
    dtype: str | None,
    device_map: str | None,
    rejudge: bool,
) -> dict[str, Any] | None:
    """vLLM's options for ``--engine vllm``; options that do not apply are refused."""
    if engine != "vllm":
        if eager is not None or max_num_seqs is not None:
            raise click.UsageError(
                "--eager/--compile and --max-num-seqs only apply to --engine vllm"
            )
        return None
    if rejudge:
        raise click.UsageError(
            "--rejudge generates nothing (it re-scores stored answers with the hf model): "
            "drop --engine vllm"
        )
    if device_map is not None:
        raise click.UsageError(
            "--device-map places the hf model; vLLM places its own copy: drop --device-map "
            "or use --engine hf"
        )
    if max_num_seqs is not None and max_num_seqs < 1:
        raise click.UsageError(f"--max-num-seqs {max_num_seqs} must be at least 1")
    options: dict[str, Any] = {
        "enforce_eager": True if eager is None else eager,
        "max_num_seqs": max_num_seqs or 64,
    }
    if dtype is not None:
        options["dtype"] = dtype
    return options


def _dry_run_layers(model_spec: str, spec: str) -> dict[str, Any]:
    """The layer selection for the dry-run plan, resolved when the model's depth is at hand.

    A local model folder's config.json gives the block count without loading weights, so an
    out-of-range selection fails here already; for other specs the selection is shown as
    given (its syntax checked) and resolved when the run loads the model.
    """
    from ..errors import ModelSpecError
    from ..models.loader import resolve_spec
    from ..persona_space.extract import layers_text, resolve_layers

    n_layers = None
    try:
        resolved = resolve_spec(model_spec)
        if resolved.kind == "folder":
            config = json.loads((Path(resolved.value) / "config.json").read_text("utf-8"))
            config = config.get("text_config") or config
            n_layers = config.get("num_hidden_layers")
    except (ModelSpecError, OSError, ValueError, AttributeError):
        n_layers = None
    if not isinstance(n_layers, int) or n_layers < 1:
        return {"layers": spec, "n_recorded_layers": None, "n_layers": None}
    chosen = resolve_layers(spec, n_layers)
    return {
        "layers": layers_text(chosen, n_layers),
        "n_recorded_layers": len(chosen),
        "n_layers": n_layers,
    }
