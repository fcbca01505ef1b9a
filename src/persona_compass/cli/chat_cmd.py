"""``persona-compass chat``: a terminal conversation with a live drift meter and commands."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from .app import main
from .common import (
    alert_rules_option,
    load_axis_and_model,
    parse_alert_rules,
)

DEFAULT_AXIS = "smollm2-135m"


@main.command()
@click.option(
    "--axis",
    "axis_path",
    default=DEFAULT_AXIS,
    show_default=True,
    help="Axis bundle folder, or the alias of a shipped bundle.",
)
@click.option(
    "--model",
    "model_spec",
    default=None,
    help="Model spec (default: the bundle's model, else smollm2-135m).",
)
@click.option("--dtype", default=None, help="Model dtype, e.g. bfloat16 or float32.")
@click.option(
    "--cap",
    "cap_mode",
    type=click.Choice(["on", "off", "adaptive"]),
    default=None,
    help="Activation capping: always on, off, or adaptive (engaged after an alert, released "
    "once the answers recover). Default: adaptive when the bundle has a capping config, "
    "else off.",
)
@click.option("--system", "system_prompt", default=None, help="System prompt to start with.")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Most tokens per answer.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.7,
    show_default=True,
    help="Sampling temperature (0: greedy).",
)
@click.option("--seed", type=int, default=None, help="Sampling seed (answer n uses seed + n).")
@click.option(
    "--load",
    "load_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Continue from this transcript (its readings are kept).",
)
@click.option(
    "--save",
    "save_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the transcript, with live readings, here after every answer and at the end.",
)
@alert_rules_option
def chat(
    axis_path: str,
    model_spec: str | None,
    dtype: str | None,
    cap_mode: str | None,
    system_prompt: str | None,
    max_new_tokens: int,
    temperature: float,
    seed: int | None,
    load_path: Path | None,
    save_path: Path | None,
    alert_rules: str | None,
) -> None:
    """Talk to the model with a live drift meter, capping and steering at hand.

    Each answer streams as it is written, with a meter showing the running percentile of
    the answer so far among the bundle's role-play answers (red: drifted, green:
    Assistant-like; the p25 alert line is marked), then a one-line summary: projection,
    percentile, whether it was capped and how much the cap raised, and any alerts.

    Commands: /cap on|off|adaptive, /steer C [LAYERS] and /steer off, /system [TEXT],
    /save FILE, /load FILE, /chart [FILE.png|FILE.html], /status, /reset, /help, /quit.
    Ctrl-C stops the answer being written; Ctrl-D leaves. Piped input works too: each line
    is a message or a command, and the output is a plain log.
    """
    from ..bundles import resolve_bundle
    from ..capping import CappingConfig
    from ..chat_ui import ChatUI, pick_transcript
    from ..compass import CompassSession, check_cap_mode
    from ..generation import SamplingConfig
    from ..transcripts import load_transcripts

    status = Console(stderr=True, highlight=False)
    capping_config = CappingConfig.load_optional(resolve_bundle(axis_path))
    mode = cap_mode or ("adaptive" if capping_config is not None else "off")
    check_cap_mode(mode, capping_config)
    rules = parse_alert_rules(alert_rules)
    transcript = None
    if load_path is not None:  # read it before the model, so a bad file fails fast
        transcript = pick_transcript(load_transcripts(load_path), None, str(load_path))

    with status.status(f"loading the model for {axis_path}"):
        axis, model, tokenizer, spec = load_axis_and_model(axis_path, model_spec, dtype)
    session = CompassSession(
        model,
        tokenizer,
        axis,
        capping_config,
        mode=mode,
        rules=rules,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
    )
    ui = ChatUI(
        session,
        console=Console(highlight=False),
        model_name=spec,
        axis_label=axis_path,
        save_path=save_path,
    )
    ui.banner()
    if system_prompt is not None and transcript is None:
        ui.cmd_system(system_prompt)
    if transcript is not None:
        ui.attempt(lambda: ui.load_transcript(transcript, system_prompt=system_prompt))
    ui.run(banner=False)
