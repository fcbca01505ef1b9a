"""``persona-compass axis import hf:...``, ``axis calibrate`` and ``axis push``: published axes.

The ``import`` command itself lives in :mod:`.axis_cmd` (one command for a local ``.pt`` and
an ``hf:`` source); this module gives it the Hub options and does the Hub import, and holds
the ``calibrate`` and ``push`` commands that :mod:`.axis_cmd` attaches to the ``axis`` group.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .options import dtype_option, max_new_tokens_option, model_option, seed_option

F = TypeVar("F", bound=Callable[..., Any])

HUB_OPTION_NAMES = ("model_spec", "repo_type", "cache_dir", "offline", "role_vectors")


def hub_import_options(func: F) -> F:
    """The options that only an ``hf:`` source takes (added to ``axis import``)."""
    options = [
        model_option(
            help_suffix="hf: sources: the model the axis is for; only its config is read, to "
            "check the axis' shape. Required for hf:.",
        ),
        click.option(
            "--repo-type",
            type=click.Choice(["dataset", "model"]),
            default="dataset",
            show_default=True,
            help="hf: sources: the kind of Hub repository (the research release is a dataset).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="hf: sources: the Hugging Face cache [default: huggingface_hub's, HF_HUB_CACHE].",
        ),
        click.option(
            "--offline",
            is_flag=True,
            help="hf: sources: read the local Hugging Face cache only (also with HF_HUB_OFFLINE=1 "
            "or when the Hub does not answer).",
        ),
        click.option(
            "--role-vectors/--no-role-vectors",
            default=True,
            show_default=True,
            help="hf: sources: also fetch and import the folder's role/persona vectors.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def check_local_import(hub: dict[str, Any]) -> None:
    """Refuse ``hf:``-only options on the import of a local ``.pt`` file."""
    given = [
        flag
        for key, flag in (
            ("model_spec", "--model"),
            ("cache_dir", "--cache-dir"),
            ("offline", "--offline"),
        )
        if hub.get(key)
    ]
    if hub.get("repo_type", "dataset") != "dataset":
        given.append("--repo-type")
    if hub.get("role_vectors") is False:
        given.append("--no-role-vectors")
    if given:
        raise click.UsageError(
            f"{', '.join(given)} only apply to hf: sources; a local .pt file takes --model-id "
            "to record its model"
        )


def run_hub_import(
    source: str,
    *,
    out_dir: Path,
    model_id: str | None,
    monitor_layer: int | None,
    capping_file: Path | None,
    experiment: str | None,
    force: bool,
    model_spec: str | None,
    repo_type: str,
    cache_dir: Path | None,
    offline: bool,
    role_vectors: bool,
) -> None:
    """``axis import hf:...``: fetch, check against the model's config, write the bundle."""
    from ..hub import import_from_hub

    if model_id is not None:
        raise click.UsageError("hf: sources take --model SPEC (checked), not --model-id")
    if capping_file is not None:
        raise click.UsageError(
            "--capping is for a local file; an hf: folder's capping_config.pt comes with it "
            "(choose its experiment with --experiment)"
        )
    if not model_spec:
        raise click.UsageError(
            "hf: sources need --model SPEC, the model the axis is for (e.g. Qwen/Qwen3-32B); "
            "its config is read to check the axis' shape"
        )
    result = import_from_hub(
        source,
        model_spec,
        out_dir,
        repo_type=repo_type,
        monitor_layer=monitor_layer,
        experiment=experiment,
        role_vectors=role_vectors,
        force=force,
        cache_dir=cache_dir,
        local_files_only=True if offline else None,
    )
    ax, cap = result.axis, result.capping
    roles = sum(1 for name in ax.vectors if name.startswith("role/"))
    capped = (
        f"capping {cap.name} (floor, layers {list(cap.layers)})" if cap else "no capping config"
    )
    click.echo(
        f"bundle written to {out_dir} from {result.source} (commit {result.commit[:12]}): axis "
        f"{ax.n_layers} x {ax.d_model}, monitor layer {ax.layer}, {roles} role vectors, {capped}",
        err=True,
    )
    for name, why in result.skipped.items():
        click.echo(f"  not imported: {name}: {why}", err=True)
    if ax.calibration is None:
        click.echo(
            f"not calibrated yet: run `persona-compass axis calibrate {out_dir} --model "
            f"{model_spec}` for percentiles, alerts and calibrated capping",
            err=True,
        )


@click.command("calibrate")
@click.argument("bundle_spec", metavar="BUNDLE")
@model_option(required=True, help_suffix="The bundle's model.")
@click.option(
    "--engine",
    type=click.Choice(["hf", "vllm"]),
    default="hf",
    show_default=True,
    help="hf: the model's own generate in this process. vllm: vLLM's continuous batches "
    "with the extraction's capture plugin (needs the vllm extra).",
)
@click.option(
    "--roles",
    type=click.IntRange(min=1),
    default=24,
    show_default=True,
    help="Catalogue roles to role-play (spread over the categories).",
)
@click.option(
    "--questions",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Questions each prompt answers (spread over the themes).",
)
@click.option(
    "--prompts-per-role",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="System prompts per role.",
)
@max_new_tokens_option(default=128)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Answers committed together (and generated together by hf).",
)
@seed_option(default=0)
@click.option(
    "--work",
    "work_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Resumable work folder; a rerun continues it [default: BUNDLE.calibration beside "
    "the bundle].",
)
@dtype_option()
@click.option(
    "--device-map",
    default=None,
    help='hf: spread a large model over GPUs, e.g. "auto" (needs accelerate).',
)
@click.option(
    "--eager/--compile",
    default=None,
    help="vllm: skip torch.compile (starts in seconds instead of minutes) [default: --eager]. "
    "On a GPU, --compile's CUDA graphs cannot record the per-token projections: it is refused.",
)
@click.option(
    "--max-num-seqs",
    type=click.IntRange(min=1),
    default=None,
    help="vllm: answers generated at once [default: 64].",
)
@click.option("--force", is_flag=True, help="Replace the bundle's existing calibration.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def calibrate(
    bundle_spec: str,
    model_spec: str,
    engine: str,
    roles: int,
    questions: int,
    prompts_per_role: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    work_dir: Path | None,
    dtype: str | None,
    device_map: str | None,
    eager: bool | None,
    max_num_seqs: int | None,
    force: bool,
    as_json: bool,
) -> None:
    """Calibrate the bundle BUNDLE (an imported one has no calibration).

    Generates a few default and role-play answers from the shipped catalogue (defaults: 24
    roles x 1 prompt x 5 questions = 120 role-play answers, plus 5 default prompts x 5
    questions = 25 default answers, 128 tokens each), records every answer's response-mean
    projection on every layer, and writes calibration.json: the role-play answers'
    percentiles, as extraction calibrates. Percentiles, alerts and calibrated capping then
    work. In the same pass it records the answers' per-token projections (a share of each
    answer's tokens, at most 1 MB per role) for the per-token tables that the capping rules
    token-default and token-roleplay read (CappingConfig.calibrate, evaluate --rules).
    Reports the answers it took and the bootstrap 95% interval of the 25th percentile at the
    monitor layer. Resumable: rerun the same command to continue; a rerun with other settings
    is refused.
    """
    from ..hub import CalibrateSettings, calibrate_bundle

    options: dict[str, Any] | None = None
    if engine == "vllm":
        options = {"enforce_eager": True if eager is None else eager}
        options["max_num_seqs"] = max_num_seqs or 64
        if dtype is not None:
            options["dtype"] = dtype
        if device_map is not None:
            raise click.UsageError("--device-map places the hf model; vLLM places its own")
    elif eager is not None or max_num_seqs is not None:
        raise click.UsageError("--eager/--compile and --max-num-seqs only apply to --engine vllm")
    settings = CalibrateSettings(
        roles=roles,
        questions=questions,
        prompts_per_role=prompts_per_role,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    run = calibrate_bundle(
        bundle_spec,
        model_spec,
        engine=engine,
        settings=settings,
        work_dir=work_dir,
        force=force,
        dtype=dtype if engine == "hf" else None,
        device_map=device_map,
        engine_options=options,
    )
    if as_json:
        click.echo(json.dumps(run.summary(), indent=2))
        return
    lo, hi = run.p25_interval
    plo, phi = run.p25_interval_percentiles
    click.echo(
        f"calibrated {run.bundle} on {run.n_answers} answers ({run.n_role_answers} role-play "
        f"with content, {run.n_default_answers} default; {run.generated_now} generated now, "
        f"{run.engine} engine)"
    )
    click.echo(
        f"monitor layer {run.monitor_layer}: p25 = {run.p25:.4g} (bootstrap 95% interval "
        f"{lo:.4g} .. {hi:.4g}, i.e. percentiles {plo:.1f} .. {phi:.1f}), p75 = {run.p75:.4g}"
    )
    if run.default_auroc is not None:
        click.echo(
            f"default vs role-play answers at the monitor layer: AUROC {run.default_auroc:.3f} "
            "(1.0: every default answer reads higher)"
        )
    if run.n_role_tokens or run.n_default_tokens:
        click.echo(
            f"per-token tables: {run.n_role_tokens} role-play and {run.n_default_tokens} "
            f"default tokens (up to {run.tokens_per_answer} per answer), for the capping rules "
            "token-roleplay and token-default"
        )
    if run.answers_without_tokens:
        click.echo(
            f"{run.answers_without_tokens} answers of an earlier version have no per-token "
            "projections; rerun with --force and a new --work folder to record them all"
        )
    click.echo(f"answers and projections: {run.work_dir} (delete it when you no longer need it)")


@click.command("push")
@click.argument("bundle_spec", metavar="BUNDLE")
@click.argument("target", metavar="hf:OWNER/REPO[/SUBFOLDER][@BRANCH]")
@click.option(
    "--repo-type",
    type=click.Choice(["dataset", "model"]),
    default="dataset",
    show_default=True,
    help="The kind of Hub repository (created if it does not exist).",
)
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--message", default=None, help="The commit message.")
@click.option(
    "--dry-run",
    "dry_run",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Write the upload folder (files and model card) to DIR instead of uploading.",
)
def push(
    bundle_spec: str,
    target: str,
    repo_type: str,
    private: bool,
    message: str | None,
    dry_run: Path | None,
) -> None:
    """Publish the bundle BUNDLE on the Hugging Face Hub.

    Uploads the bundle's safetensors and JSON files (no pickles) and a generated model card
    (README.md with the bundle's numbers) in one commit, into SUBFOLDER of the repository
    (created if needed) on BRANCH (default: the default branch). Uses huggingface_hub's
    login (`hf auth login`) or HF_TOKEN. Anyone can then `axis import` it.
    """
    from ..hub import push_bundle

    result = push_bundle(
        bundle_spec,
        target,
        repo_type=repo_type,
        private=True if private else None,
        message=message,
        dry_run=dry_run,
    )
    names = ", ".join([*sorted(result.files), "README.md"])
    if result.folder is not None:
        click.echo(f"dry run: the upload folder is {result.folder} ({names})", err=True)
    else:
        click.echo(f"pushed {names} to {result.target}: {result.commit_url or ''}", err=True)
