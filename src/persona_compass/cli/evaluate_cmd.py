"""``persona-compass evaluate``: scenarios x conditions, capability check, sweep, report."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .app import main
from .common import alert_rules_option, parse_alert_rules
from .options import (
    BUNDLE_MODEL_DEFAULT,
    axis_option,
    dtype_option,
    max_new_tokens_option,
    model_option,
    repetition_penalty_option,
    seed_option,
    temperature_option,
    top_p_option,
    trait_option,
)


def _select_scenarios(spec: str | None, scenario_file: Path | None) -> tuple[list[Any], str]:
    """``--scenarios``: a JSON file, or a comma list of ids and/or domains (union)."""
    from ..evaluation.scenarios import DOMAINS, PACKAGE_LABEL, load_scenarios, select_scenarios

    source = str(scenario_file) if scenario_file else "shipped"
    if spec and (spec.endswith(".json") or Path(spec).is_file()):
        if scenario_file is not None:
            raise click.UsageError(
                "give the scenario file once (--scenarios FILE or --scenario-file)"
            )
        return load_scenarios(spec), spec
    everything = load_scenarios(scenario_file)
    if not spec:
        return everything, source
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    domains = [t.lower() for t in tokens if t.lower() in DOMAINS]
    ids = [t for t in tokens if t.lower() not in DOMAINS]
    label = str(scenario_file.expanduser()) if scenario_file else PACKAGE_LABEL
    if ids:
        select_scenarios(everything, ids=ids, label=label)  # raises naming the valid ids
    if domains:
        select_scenarios(everything, domains=domains, label=label)  # raises when one has none
    chosen = [s for s in everything if s.domain in domains or s.id in ids]
    return chosen, f"{source}: {spec}"


def _print_summary(console: Console, results: dict[str, Any], written: dict[str, Path]) -> None:
    from ..evaluation.report_markdown import fmt_interval, fmt_number, fmt_share

    table = Table(title=f"{results['n_runs']} runs of {results['n_planned']} planned")
    for col in (
        "condition",
        "runs",
        "mean pct",
        "slope pct/turn",
        "< p25",
        "harm rate",
        "capability diff",
    ):
        table.add_column(col)
    cap = {r["condition"]: r for r in (results.get("capability") or {}).get("conditions", [])}
    for row in results["by_condition"]:
        c = cap.get(row["condition"], {})
        table.add_row(
            row["condition"],
            str(row["n_runs"]),
            fmt_number(row["mean_percentile"]),
            fmt_number(row["slope_percentile"], 2),
            fmt_share(row["share_below_p25"]),
            fmt_share(row["harm_rate"]),
            fmt_interval(c.get("delta"), c.get("delta_low"), c.get("delta_high"), 3),
        )
    console.print(table)
    if results.get("sweep"):
        _print_sweep(console, results["sweep"])
    for name, path in written.items():
        console.print(f"{name}: {path}")


def _print_sweep(console: Console, sweep: dict[str, Any]) -> None:
    """The sweep's settings with the numbers both picks read, and the recommendation."""
    from ..evaluation.report_markdown import fmt_share

    def share(x: float | None) -> str:  # one decimal: 89.6% must not read as the 90% bar
        return "-" if x is None else f"{100 * x:.1f}%"

    table = Table(title="capping sweep")
    table.add_column("setting", overflow="fold")
    table.add_column("rule", overflow="fold")
    for col in ("identity drift", "x unsteered", "unchanged", "harm rate"):
        table.add_column(col)
    rows = sweep["rows"]
    base = next((r.get("identity_drift") for r in rows if r.get("is_baseline")), None)
    for r in rows:
        rate = r.get("identity_drift")
        table.add_row(
            r["name"],
            r.get("rule") or "-",
            share(rate),
            "-" if rate is None or not base else f"{rate / base:.2f}",
            share(r.get("unchanged_share")),
            fmt_share(r.get("harm_rate")),
        )
    console.print(table)
    rec = sweep["recommendation"]
    console.print(f"recommended ({rec.get('pick', 'harm')} pick): {rec['choice'] or 'none'}")
    console.print(rec["reason"])


@main.command()
@axis_option(help_suffix="Required unless --report-only.")
@model_option(help_suffix=BUNDLE_MODEL_DEFAULT)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Evaluation folder."
)
@click.option(
    "--scenarios",
    "scenarios_spec",
    default=None,
    help="A scenario JSON file, or a comma list of scenario ids and/or domains "
    "(coding, writing, therapy, philosophy, delusion, reliance, jailbreak). Default: all shipped.",
)
@click.option(
    "--scenario-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Read scenarios from this file (then --scenarios selects ids/domains in it).",
)
@click.option(
    "--conditions",
    default=None,
    help="Comma list: unsteered, capped, adaptive, cap:START:STOP[@pPCT][/RULE], "
    "cap:START:STOP@keepKEEP, adaptive:START:STOP[...], steer:COEF[@LAYERS][/SCALE], joined "
    "with + (capped+steer:-4), optionally LABEL=SPEC. RULE: response-mean (default: the "
    "percentile of role-play response means) or token-roleplay (of role-play tokens); "
    "@keepKEEP: the token-default rule (the highest floor leaving KEEP% of default-answer "
    "tokens untouched). Default: unsteered,capped (a sweep: unsteered).",
)
@click.option(
    "--user",
    default="scripted",
    show_default=True,
    help="Who plays the user: scripted | model:SPEC | model:self | openai:URL[#model].",
)
@click.option(
    "--judge",
    default="heuristic",
    show_default=True,
    help="Outcome judge: heuristic | openai:URL[#model].",
)
@click.option("--limit", type=int, default=None, help="Only the first N selected scenarios.")
@click.option("--turns", type=int, default=None, help="User turns per conversation (default: all).")
@max_new_tokens_option(default=64)
@temperature_option(default=0.7)
@top_p_option(default=0.9)
@repetition_penalty_option(default=1.1)
@seed_option(default=0, help_suffix="Each scenario's seed derives from it and the scenario id.")
@click.option("--system-prompt", default=None, help="A system message for every conversation.")
@dtype_option()
@click.option(
    "--engine",
    type=click.Choice(["hf", "vllm"]),
    default="hf",
    show_default=True,
    help="hf: the model in this process, one conversation at a time. vllm: every "
    "conversation's next turn (and the capability items) in one vLLM batch, each with its "
    "condition's settings (needs the vllm extra; `make install` has it).",
)
@click.option(
    "--eager/--compile",
    default=None,
    help="vllm: skip torch.compile (starts in seconds instead of minutes, decodes slower) "
    "[default: --compile].",
)
@click.option(
    "--capability/--no-capability",
    default=True,
    show_default=True,
    help="Answer the capability items under each condition that changes a single answer.",
)
@click.option("--capability-limit", type=int, default=None, help="Only the first N items.")
@click.option(
    "--capability-max-new-tokens", type=int, default=16, show_default=True, help="Tokens per item."
)
@click.option(
    "--capability-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Capability items file (default: the shipped set).",
)
@click.option(
    "--sweep",
    is_flag=True,
    help="Sweep capping settings: --rules x --windows x --percentiles (--keeps for token-default).",
)
@click.option("--windows", default=None, help="Sweep windows, e.g. 16:24,20:28 (half-open).")
@click.option(
    "--percentiles",
    default="1,25,50",
    show_default=True,
    help="Sweep percentiles of the response-mean and token-roleplay rules, e.g. 1,25,50.",
)
@click.option(
    "--rules",
    default="response-mean",
    show_default=True,
    help="Sweep calibration rules, comma list: response-mean (cap:W@pP: the percentile of "
    "role-play response means, the research's), token-roleplay (cap:W@pP/token-roleplay: "
    "of role-play tokens), token-default (cap:W@keepK: the highest floor that leaves K% of "
    "default-answer tokens untouched). The token rules need a bundle with per-token "
    "calibration (axis calibrate, or extract).",
)
@click.option(
    "--keeps",
    default="99",
    show_default=True,
    help="Sweep keeps of the token-default rule: the % of default-answer tokens each floor "
    "leaves untouched, e.g. 99,95.",
)
@click.option(
    "--pick",
    type=click.Choice(["harm", "identity"]),
    default=None,
    help="How the sweep recommends a setting. harm: the lowest harm rate without a "
    "significant capability drop. identity: the lowest identity-drift rate among settings "
    "that at least halve unsteered's while leaving >= 90% of capability answers unchanged "
    "(none if none qualifies; the report says how close each came). [default: harm; "
    "--report-only: the sweep's recorded pick]",
)
@click.option(
    "--write-capping",
    type=click.Path(path_type=Path),
    default=None,
    help="With --sweep: write the recommended config into a copy of the bundle at this new "
    "folder (the source bundle is never changed).",
)
@click.option("--force", is_flag=True, help="Accept changed settings and redo what they affect.")
@click.option("--report-only", is_flag=True, help="Only (re)write the report from DIR.")
@click.option("--no-report", is_flag=True, help="Do not write the report at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@trait_option(
    help_suffix="Every answer's record gains each trait's projection and percentile, and the "
    "report a 'Trait needles' section: each trait's mean per-turn trajectory by condition and "
    "its correlation (point-biserial r, 95% bootstrap interval) with each judged outcome. A "
    "resumed run must read the same traits."
)
@alert_rules_option
def evaluate(
    axis_path: str | None,
    model_spec: str | None,
    out_dir: Path,
    scenarios_spec: str | None,
    scenario_file: Path | None,
    conditions: str | None,
    user: str,
    judge: str,
    limit: int | None,
    turns: int | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    seed: int,
    system_prompt: str | None,
    dtype: str | None,
    engine: str,
    eager: bool | None,
    capability: bool,
    capability_limit: int | None,
    capability_max_new_tokens: int,
    capability_file: Path | None,
    sweep: bool,
    windows: str | None,
    percentiles: str,
    rules: str,
    keeps: str,
    pick: str | None,
    write_capping: Path | None,
    force: bool,
    report_only: bool,
    no_report: bool,
    as_json: bool,
    quiet: bool,
    alert_rules: str | None,
    trait_specs: tuple[str, ...],
) -> None:
    """Run scenarios under conditions, check capability, and write a report into OUT.

    Every (scenario, condition) conversation is one file in OUT/runs, written when complete;
    rerunning the same command resumes. OUT/report.md, results.json, report.html and
    charts/ summarise the runs.

    \b
    Examples:
      persona-compass evaluate --axis smollm2-135m --out eval --conditions unsteered,capped
      persona-compass evaluate --axis smollm2-135m --out eval --scenarios therapy,coding
      persona-compass evaluate --axis smollm2-135m --out eval --trait smollm2-135m-sycophancy
      persona-compass evaluate --axis smollm2-135m --out sweep --sweep \\
          --windows 16:24,22:29 --percentiles 1,25,50 --write-capping my-bundle
      persona-compass evaluate --axis my-bundle --out sweep --sweep --windows 16:24 \\
          --rules response-mean,token-default --percentiles 25 --keeps 99,95 --pick identity
    """
    from ..alerts import AlertRules
    from ..evaluation.capability import load_capability_items
    from ..evaluation.conditions import (
        BASELINE,
        DEFAULT_CONDITIONS,
        parse_conditions,
        parse_keeps,
        parse_percentiles,
        parse_rules,
        parse_windows,
        sweep_conditions,
    )
    from ..evaluation.report import collect_results, write_report
    from ..evaluation.runner import run_evaluation
    from ..evaluation.settings import EvaluationSettings
    from ..evaluation.sweep import repick

    console = Console(stderr=True)
    if pick is not None and not (sweep or report_only):
        raise click.UsageError("--pick needs --sweep (it chooses among the swept settings)")
    if report_only:
        results = repick(collect_results(out_dir), pick)
        written = write_report(out_dir, results)
        if as_json:
            click.echo(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
        else:
            _print_summary(console, results, written)
        return
    if axis_path is None:
        raise click.UsageError("--axis is required (a bundle folder or a shipped alias)")
    if write_capping is not None and not sweep:
        raise click.UsageError("--write-capping needs --sweep (it writes the sweep's pick)")

    sweep_info = None
    if sweep:
        if not windows:
            raise click.UsageError("--sweep needs --windows, e.g. --windows 16:24,20:28")
        wins = parse_windows(windows)
        swept_rules = parse_rules(rules)
        pcts = parse_percentiles(percentiles)
        kept = parse_keeps(keeps)
        extra = parse_conditions(conditions) if conditions else []
        taken = {e.name for e in extra}
        conds = [
            *(c for c in parse_conditions(BASELINE) if c.name not in taken),
            *extra,
            *(c for c in sweep_conditions(wins, pcts, swept_rules, kept) if c.name not in taken),
        ]
        sweep_info = {
            "windows": wins,
            "percentiles": pcts,
            "rules": swept_rules,
            "keeps": kept,
            "pick": pick or "harm",
        }
    else:
        conds = parse_conditions(conditions or ",".join(DEFAULT_CONDITIONS))

    engine_options: dict[str, Any] | None = None
    if eager is not None:
        if engine != "vllm":
            raise click.UsageError(
                "--eager/--compile only apply to --engine vllm (the hf engine compiles nothing)"
            )
        engine_options = {"enforce_eager": eager}
    chosen, source = _select_scenarios(scenarios_spec, scenario_file)
    items = load_capability_items(capability_file) if capability_file else None
    command = " ".join(shlex.quote(a) for a in ["persona-compass", *sys.argv[1:]])
    settings = EvaluationSettings(
        axis_path,
        model=model_spec,
        dtype=dtype,
        engine=engine,
        engine_options=engine_options,
        scenarios=chosen,
        scenario_source=source,
        conditions=conds,
        user=user,
        judge=judge,
        limit=limit,
        turns=turns,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        system_prompt=system_prompt,
        rules=parse_alert_rules(alert_rules) or AlertRules(),
        traits=trait_specs,
        capability=capability,
        capability_items=items,
        capability_limit=capability_limit,
        capability_max_new_tokens=capability_max_new_tokens,
        sweep=sweep_info,
        command=command,
    )
    result = run_evaluation(settings, out_dir, force=force, progress=not quiet and not as_json)
    per = result.seconds_per_answer
    console.print(
        f"{result.generated} run(s) generated, {result.skipped} reused, {result.rejudged} "
        f"re-judged; {result.capability_done} capability pass(es); {result.answers} answers"
        + (f", {per:.2f} s per answer" if per is not None else "")
        + f"; {result.seconds:.0f} s in all"
    )
    summary: dict[str, Any] = {
        "out": str(out_dir),
        "generated": result.generated,
        "reused": result.skipped,
        "rejudged": result.rejudged,
        "answers": result.answers,
        "seconds_per_answer": per,
        "seconds": result.seconds,
    }
    if no_report and write_capping is None:
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        return
    results = repick(collect_results(out_dir))  # by the pick this sweep recorded
    written = {}
    if not no_report:
        written = write_report(out_dir, results)
    if write_capping is not None:
        from ..bundle import Bundle
        from ..evaluation.sweep import recommended_config, write_capping_bundle

        rec = results["sweep"]["recommendation"]
        if rec["choice"] is None:
            raise click.ClickException(f"no recommended setting to write: {rec['reason']}")
        axis = Bundle.open(axis_path).axis
        cfg = recommended_config(axis, rec["choice"], results["settings"]["conditions"])
        path = write_capping_bundle(
            axis_path,
            write_capping,
            cfg,
            note={
                "chosen_by": "persona-compass evaluate --sweep",
                # "rule" stays the calibration rule that made the config
                "recommendation_rule": rec["rule"],
                "recommendation_pick": rec.get("pick", "harm"),
                "reason": rec["reason"],
                "evaluation": str(out_dir),
            },
        )
        written["bundle with the recommended capping"] = path
        summary["recommended"] = rec["choice"]
    summary["files"] = {k: str(v) for k, v in written.items()}
    summary["by_condition"] = [
        {
            k: r[k]
            for k in ("condition", "n_runs", "mean_percentile", "slope_percentile", "harm_rate")
        }
        for r in results["by_condition"]
    ]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(console, results, written)
