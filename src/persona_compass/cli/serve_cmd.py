"""``persona-compass serve``: the OpenAI-compatible server with capping and drift telemetry."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import click

from .app import main
from .common import alert_rules_option, parse_alert_rules
from .options import (
    BUNDLE_MODEL_DEFAULT,
    axis_option,
    dtype_option,
    model_option,
    trait_option,
)
from .param_flags import with_flags

API_KEY_ENV = "PERSONA_COMPASS_API_KEY"


def allowed_hosts(host: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    """Host names the server answers to: this machine's, the bound address and ``extra``;
    any name for a server bound to every interface without ``extra``."""
    from ..server.config import LOCAL_HOSTS

    bound = host.strip().strip("[]").lower()
    everywhere = bound in ("", "0.0.0.0", "::")
    if everywhere and not extra:
        return ("*",)
    # ServerConfig normalises the names (case, brackets); here they are only gathered.
    return tuple(dict.fromkeys([*LOCAL_HOSTS, *extra, *(() if everywhere else (bound,))]))


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@main.command()
@axis_option(required=True)
@model_option(help_suffix=BUNDLE_MODEL_DEFAULT)
@click.option(
    "--cap",
    "cap_mode",
    type=click.Choice(["off", "on", "adaptive"]),
    default="off",
    show_default=True,
    help="Default cap mode; a request may choose another with persona_compass.cap.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    default=None,
    envvar=API_KEY_ENV,
    help=f"Require 'Authorization: Bearer KEY' (also read from ${API_KEY_ENV}).",
)
@click.option(
    "--max-tokens",
    "max_tokens",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="The largest max_tokens a request may ask for.",
)
@click.option(
    "--default-max-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="max_tokens for requests that give none (at most --max-tokens).",
)
@click.option(
    "--queue",
    "queue_size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Requests that may wait for the model; more get 429 with Retry-After.",
)
@dtype_option()
@click.option(
    "--engine",
    type=click.Choice(["hf", "vllm"]),
    default="hf",
    show_default=True,
    help="hf: Hugging Face generate in this process, one answer at a time. vllm: vLLM's "
    "continuous batching (needs the vllm extra; `make install` has it), every request "
    "with its own cap mode, capping, steering and alerts.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="vllm: answers generated together (vLLM's max_num_seqs) [default: 8]; --queue more "
    "wait, and beyond that requests get 429. The hf engine generates one at a time.",
)
@click.option(
    "--max-model-len",
    type=click.IntRange(min=16),
    default=None,
    help="vllm: the longest conversation in tokens (prompt + answer) [default: 2048].",
)
@click.option(
    "--eager/--compile",
    default=False,
    show_default=True,
    help="vllm: skip torch.compile (starts in seconds instead of minutes, decodes slower).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
    help="uvicorn's log level.",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    help="Another host name the Host header may carry (repeatable); localhost, 127.0.0.1, "
    "::1 and the --host address are always allowed. A server bound to every interface "
    "(0.0.0.0, ::) allows any name unless this is given.",
)
@alert_rules_option
@trait_option(
    help_suffix="The telemetry gains a traits object and the web page one line per needle."
)
def serve(
    axis_path: str,
    model_spec: str | None,
    cap_mode: str,
    host: str,
    port: int,
    api_key: str | None,
    max_tokens: int,
    default_max_tokens: int,
    queue_size: int,
    dtype: str | None,
    engine: str,
    max_concurrency: int | None,
    max_model_len: int | None,
    eager: bool,
    log_level: str,
    alert_rules: str | None,
    allow_hosts: tuple[str, ...],
    trait_specs: tuple[str, ...],
) -> None:
    """Serve the model behind an OpenAI-compatible API with capping and drift telemetry.

    POST /v1/chat/completions (streaming too) answers with a persona_compass object: the
    answer's position on the Assistant Axis, its percentile, alerts and the cap state.
    GET / is a chat page with a live drift chart; GET /metrics is Prometheus text.
    The model and axis load before the server accepts connections.

    With --engine vllm, concurrent requests are batched by vLLM's scheduler (continuous
    batching), each with its own compass settings; the API and telemetry are the same.
    """
    try:
        import uvicorn  # noqa: F401

        from ..server.app import ServerConfig, create_app_from_specs
    except ImportError as exc:  # the server extra is not installed
        raise click.ClickException(
            f"the server needs fastapi and uvicorn ({exc}); pip install 'persona-compass[server]'"
        ) from None
    from ..bundle import Bundle, open_trait_bundles
    from ..compass import check_cap_mode

    # fail before the model loads (requests can still send a capping window with --cap off)
    bundle = Bundle.open(axis_path)
    check_cap_mode(cap_mode, bundle.capping)
    needles = open_trait_bundles(trait_specs, bundle.axis)  # fails before any model loads
    engine_options: dict[str, Any] = {}
    if engine == "vllm":
        if max_model_len is not None:
            engine_options["max_model_len"] = max_model_len
        if eager:
            engine_options["enforce_eager"] = True
    else:
        used = [
            flag
            for flag, value in (
                ("--max-concurrency", max_concurrency),
                ("--max-model-len", max_model_len),
                ("--eager", eager or None),
            )
            if value is not None
        ]
        if used:
            raise click.UsageError(
                f"{', '.join(used)} only apply to --engine vllm (the hf engine generates one "
                "answer at a time, in the model's own context length)"
            )
    key = (api_key or "").strip() or None  # a blank key is no key
    if not is_loopback(host) and key is None:
        click.echo(
            f"warning: binding {host} without an API key: anyone who can reach this address "
            f"can use the model; pass --api-key or set ${API_KEY_ENV}",
            err=True,
        )
    config = ServerConfig(
        model_name=model_spec or "",
        cap_mode=cap_mode,
        api_key=key,
        max_tokens_limit=max_tokens,
        default_max_tokens=min(default_max_tokens, max_tokens),
        queue_size=queue_size,
        max_concurrency=max_concurrency or 8,
        rules=parse_alert_rules(alert_rules),
        allowed_hosts=allowed_hosts(host, allow_hosts),
    )
    app = create_app_from_specs(
        bundle,
        model_spec,
        config,
        dtype=dtype,
        engine=engine,
        engine_options=engine_options,
        traits=needles,
    )
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"persona-compass serve: loading, then listening on http://{shown}:{port}", err=True)
    run_server(app, host=host, port=port, log_level=log_level)


def run_server(app: Any, *, host: str, port: int, log_level: str) -> None:
    """Run uvicorn until it stops; a loading error becomes one line and exit code 1."""
    import uvicorn

    from ..server.protocol import HeaderDeadlineProtocol

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        http=HeaderDeadlineProtocol,  # closes connections whose headers never finish
    )
    server = uvicorn.Server(config)

    def quiet(record: logging.LogRecord) -> bool:
        # once loading failed, uvicorn's traceback and "startup failed" lines add nothing
        return getattr(app.state, "startup_error", None) is None

    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run()
    except SystemExit:  # uvicorn exits on a failed startup; say why in one line below
        pass
    error = getattr(app.state, "startup_error", None)
    if error is not None:  # stored while loading, never raised through the group: map here
        ctx = click.get_current_context(silent=True)
        raise click.ClickException(
            str(error) if ctx is None else with_flags(str(error), ctx.command)
        )
    if not server.started:
        raise click.ClickException("the server did not start (see the log above)")
