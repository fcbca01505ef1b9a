"""``persona-compass chat``: a terminal conversation with a live drift meter and commands."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from .app import main
from .common import alert_rules_option, parse_alert_rules
from .options import (
    BUNDLE_MODEL_DEFAULT,
    axis_option,
    dtype_option,
    max_new_tokens_option,
    model_option,
    seed_option,
    temperature_option,
    trait_option,
)

DEFAULT_AXIS = "smollm2-135m"


@main.command()
@axis_option(default=DEFAULT_AXIS)
@model_option(help_suffix=BUNDLE_MODEL_DEFAULT)
@dtype_option()
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
@max_new_tokens_option(default=128)
@temperature_option(default=0.7)
@seed_option(default=None, help_suffix="Answer n uses seed + n.")
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
@trait_option(help_suffix="Each needle gets its own meter.")
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
    trait_specs: tuple[str, ...],
) -> None:
    """Talk to the model with a live drift meter, capping and steering at hand.

    Each answer streams as it is written, with a meter showing the running percentile of
    the answer so far among the bundle's role-play answers (red: drifted, green:
    Assistant-like; the p25 alert line is marked), then a one-line summary: projection,
    percentile, whether it was capped and how much the cap raised, and any alerts. Each
    --trait needle adds a meter of its own (red: much of the trait; its alert line marked).

    Commands: /cap on|off|adaptive, /steer C [LAYERS] and /steer off, /system [TEXT],
    /save FILE, /load FILE, /chart [FILE.png|FILE.html], /status, /reset, /help, /quit.
    Ctrl-C stops the answer being written; Ctrl-D leaves. Piped input works too: each line
    is a message or a command, and the output is a plain log.
    """
    from ..bundle import Bundle, open_trait_bundles
    from ..chat_ui import ChatUI, pick_transcript
    from ..compass import CompassSession, check_cap_mode
    from ..generation import SamplingConfig
    from ..transcripts import load_transcripts

    status = Console(stderr=True, highlight=False)
    bundle = Bundle.open(axis_path)
    capping_config = bundle.capping
    mode = cap_mode or ("adaptive" if capping_config is not None else "off")
    check_cap_mode(mode, capping_config)
    rules = parse_alert_rules(alert_rules)
    needles = open_trait_bundles(trait_specs, bundle.axis)
    transcript = None
    if load_path is not None:  # read it before the model, so a bad file fails fast
        transcript = pick_transcript(load_transcripts(load_path), None, str(load_path))

    with status.status(f"loading the model for {axis_path}"):
        model, tokenizer = bundle.load_model(model_spec, dtype=dtype)
    spec = bundle.model_spec(model_spec)
    session = CompassSession(
        model,
        tokenizer,
        bundle.axis,
        capping_config,
        mode=mode,
        rules=rules,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
        traits=[needle.axis for needle in needles],
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
