"""The :class:`ChatUI` class: the read-answer loop, commands, and transcript files."""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..alerts import AlertRules
from ..compass import (
    CAP_MODES,
    Answer,
    CompassError,
    CompassSession,
    Delta,
    Steering,
)
from ..errors import PersonaCompassError
from ..html_chart import snippet
from ..transcripts import Transcript, load_transcripts, save_transcript
from .commands import (
    CHART_SUFFIXES,
    CommandError,
    command_name,
    help_table,
    pick_transcript,
    steer_text,
    usage_error,
)
from .render import (
    METER_WIDTH,
    LiveAnswer,
    alert_lines,
    chart_table,
    summary_text,
    trait_meters,
    trajectory_series,
    turn_number,
)

logger = logging.getLogger(__name__)

PROMPT_PLAIN = "you> "
ANSWER_LABEL = "assistant> "


@contextmanager
def interrupt_sets(event: threading.Event) -> Iterator[bool]:
    """While inside, Ctrl-C (SIGINT) sets ``event`` instead of raising KeyboardInterrupt.

    Yields whether the handler is installed (only possible in the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    except ValueError:  # pragma: no cover - not the main interpreter
        yield False
        return
    try:
        yield True
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_folder(path: str, command: str) -> None:
    """Commands write only into folders that exist: a typo must not create folders."""
    folder = Path(path).expanduser().parent
    if not folder.is_dir():
        raise usage_error(command, f"folder {folder} does not exist; create it first")


class ChatUI:
    """A terminal conversation on a :class:`CompassSession`, with commands and a drift meter.

    Args:
        session: the conversation (its model, axis, capping config and settings).
        console: where to write (a rich Console; record one to capture the output).
        model_name: the model spec written into saved transcripts.
        axis_label: the bundle (alias or folder), for the banner and saved transcripts.
        live: animate each answer with rich Live (default: when the console is a terminal).
        echo_input: write each line read as ``you> ...`` (for piped input, so the output
            reads as a conversation; default: when stdin is not a terminal).
        save_path: write the transcript here after every answer and at the end.
        meter_width: width of the drift bar.
    """

    def __init__(
        self,
        session: CompassSession,
        *,
        console: Console | None = None,
        model_name: str | None = None,
        axis_label: str = "",
        live: bool | None = None,
        echo_input: bool | None = None,
        save_path: str | Path | None = None,
        meter_width: int = METER_WIDTH,
    ) -> None:
        self.session = session
        self.console = console or Console(highlight=False)
        self.model_name = model_name
        self.axis_label = axis_label
        self.live = self.console.is_terminal if live is None else live
        self.echo_input = (not _stdin_is_tty()) if echo_input is None else echo_input
        self.save_path = Path(save_path) if save_path is not None else None
        self.meter_width = meter_width

    # -- small helpers ----------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """The percentile marked on the meter: the alert rules' turn threshold (p25)."""
        rules = self.session.rules or AlertRules()
        return float(rules.turn_percentile)

    def info(self, message: str | Text, style: str | None = None) -> None:
        text = message if isinstance(message, Text) else Text(message, style=style or "")
        self.console.print(text, soft_wrap=True)

    def error(self, message: str) -> None:
        """One line, never a traceback."""
        self.console.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)

    def _fresh_session(self, system_prompt: str | None) -> CompassSession:
        old = self.session
        return CompassSession(
            old.model,
            old.tokenizer,
            old.axis,
            old.capping_config,
            mode=old.mode,
            rules=old.rules,
            policy=old.adaptive.policy,
            sampling=old.sampling,
            system_prompt=system_prompt,
            steer=old.steer,
            on_alert=old.on_alert,
            traits=old.traits,
        )

    @property
    def system_prompt(self) -> str | None:
        messages = self.session.messages
        if messages and messages[0]["role"] == "system":
            return messages[0]["content"]
        return None

    def _cap_state(self) -> str:
        s = self.session
        if s.mode == "adaptive":
            return f"adaptive ({'engaged' if s.cap_engaged else 'released'})"
        return s.mode

    # -- the loop ---------------------------------------------------------------------------
    def banner(self) -> None:
        s = self.session
        cap = s.capping_config.name if s.capping_config is not None else "none in the bundle"
        self.info(
            Text.assemble(
                ("persona-compass chat", "bold"),
                f" · model {self.model_name or '?'} · axis {self.axis_label or '?'} "
                f"(layer {s.axis.layer}) · capping {self._cap_state()} [{cap}]",
            )
        )
        if s.axis.calibration is None:
            self.info("the bundle has no calibration: the meter shows projections only", "yellow")
        self.info(
            "type a message; /help lists the commands; Ctrl-C stops an answer, Ctrl-D leaves",
            "dim",
        )

    def run(self, read_line: Callable[[], str] | None = None, *, banner: bool = True) -> None:
        """Read lines until ``/quit`` or end of input, answering each; then autosave.

        ``read_line`` returns one line (without its newline) and raises EOFError at the end;
        default: the terminal prompt, or stdin's lines when stdin is not a terminal.
        """
        read = read_line or self._default_reader()
        if banner:
            self.banner()
        try:
            while True:
                try:
                    line = read()
                except EOFError:
                    if not self.echo_input:
                        self.console.print()
                    break
                except KeyboardInterrupt:
                    self.console.print()
                    self.info("(Ctrl-C stops an answer; /quit or Ctrl-D leaves)", "dim")
                    continue
                try:
                    if not self.handle(line):
                        break
                except KeyboardInterrupt:  # during a command (an answer cancels instead)
                    self.console.print()
                    self.info("interrupted", "yellow")
        finally:
            if self.save_path is not None and self.session.messages:
                self._autosave(final=True)

    def _default_reader(self) -> Callable[[], str]:
        if _stdin_is_tty():
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:  # pragma: no cover - platform dependent
                pass

            def ask_terminal() -> str:
                return self.console.input("[bold cyan]you>[/] ")

            return ask_terminal

        def read_stdin() -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            line = line.rstrip("\r\n")
            if self.echo_input:
                self.info(Text.assemble((PROMPT_PLAIN, "bold cyan"), line))
            return line

        return read_stdin

    def handle(self, line: str) -> bool:
        """Act on one input line; return False when the chat should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("//"):  # a message that starts with "/"
            self.attempt(lambda: self.ask(text[1:]))
        elif text.startswith("/"):
            return self.attempt(lambda: self.command(text)) is not False
        else:
            self.attempt(lambda: self.ask(text))
        return True

    def attempt(self, action: Callable[[], Any]) -> Any:
        """Run ``action``; a failure is one error line (never a traceback) and gives None."""
        try:
            return action()
        except PersonaCompassError as exc:
            self.error(str(exc))
        except (ValueError, OSError) as exc:
            self.error(str(exc) or type(exc).__name__)
        except Exception as exc:  # keep the conversation alive; -v shows the traceback
            logger.info("chat: unexpected error", exc_info=True)
            self.error(f"{type(exc).__name__}: {exc} (run with -v for details)")
        return None

    # -- answers ----------------------------------------------------------------------------
    def ask(self, text: str, cancel: threading.Event | None = None) -> Answer | None:
        """Send one user message; stream the answer with the meter; print the summary."""
        cancel = cancel if cancel is not None else threading.Event()
        session = self.session
        view = LiveAnswer(self.threshold, session.cap_engaged)
        started = [False]

        def stream_plain(delta: Delta) -> None:
            chunk = delta.text
            if not started[0]:
                chunk = chunk.lstrip()
                if not chunk:
                    return
                started[0] = True
                self.console.out(ANSWER_LABEL, end="", style="bold magenta", highlight=False)
            self.console.out(chunk, end="", highlight=False)

        try:
            with interrupt_sets(cancel):
                if self.live:
                    with Live(
                        view,
                        console=self.console,
                        transient=True,
                        refresh_per_second=12,
                        redirect_stdout=False,
                        redirect_stderr=False,
                    ):
                        answer = session.reply(
                            text, on_delta=self._on_delta(view, None), cancel=cancel
                        )
                else:
                    answer = session.reply(
                        text, on_delta=self._on_delta(view, stream_plain), cancel=cancel
                    )
        except KeyboardInterrupt:  # the handler could not be installed (not the main thread)
            if started[0]:
                self.console.print()
            self.info("answer interrupted; nothing was kept", "yellow")
            return None
        except Exception:
            if started[0]:  # end the half-written line before the error line
                self.console.print()
            raise
        if self.live:
            self.info(Text("assistant", style="bold magenta"))
            body = Text(answer.text) if answer.text else Text("(empty answer)", style="dim")
            self.console.print(body, soft_wrap=True)
        elif started[0]:
            self.console.print()
        else:
            self.info(Text.assemble((ANSWER_LABEL, "bold magenta"), ("(empty answer)", "dim")))
        self._print_summary(answer)
        if self.save_path is not None:
            self._autosave()
        return answer

    def _on_delta(
        self, view: LiveAnswer, plain: Callable[[Delta], None] | None
    ) -> Callable[[Delta], None]:
        def on_delta(delta: Delta) -> None:
            view.update(delta)
            if plain is not None:
                plain(delta)

        return on_delta

    def _print_summary(self, answer: Answer) -> None:
        session = self.session
        reading = answer.reading
        cap_next = None
        if session.mode == "adaptive":
            cap_next = "on" if answer.cap_engaged_next else "off"
        self.info(
            summary_text(
                reading,
                turn=turn_number(session.messages, reading.index),
                threshold=self.threshold,
                finish_reason=answer.finish_reason,
                cap_next=cap_next,
                steer=session.steer,
                width=16,
            )
        )
        for line in trait_meters(reading.traits, threshold=self.threshold, width=16, indent="    "):
            self.info(line)
        for line in alert_lines(reading.alerts):
            self.info(line)

    # -- commands ---------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run one slash command; return False for ``/quit``."""
        head, _, rest = line.partition(" ")
        name = command_name(head)
        rest = rest.strip()
        if name == "/system":  # the text is taken as typed
            self.cmd_system(rest)
            return True
        try:
            args = shlex.split(rest)
        except ValueError as exc:
            raise usage_error(name, f"cannot read the arguments ({exc})") from None
        if name == "/quit":
            if args:
                raise usage_error(name, "/quit takes no arguments")
            return False
        handler: Callable[[list[str]], None] = getattr(self, "cmd_" + name[1:])
        handler(args)
        return True

    def cmd_help(self, args: list[str]) -> None:
        self.console.print(help_table())

    def cmd_cap(self, args: list[str]) -> None:
        if not args:
            self.info(f"capping: {self._cap_state()}")
            return
        if len(args) != 1 or args[0].lower() not in CAP_MODES:
            raise usage_error("/cap", f"unknown capping mode {' '.join(args)!r}")
        try:
            self.session.set_mode(args[0].lower())
        except CompassError as exc:
            raise usage_error("/cap", str(exc)) from None
        self.info(f"capping: {self._cap_state()}", "cyan")

    def cmd_steer(self, args: list[str]) -> None:
        if not args:
            steer = self.session.steer
            self.info("steering: off" if steer is None else f"steering: {steer_text(steer)}")
            return
        if len(args) == 1 and args[0].lower() == "off":
            self.session.steer = None
            self.info("steering: off", "magenta")
            return
        if len(args) > 2:
            raise usage_error("/steer", "too many arguments")
        try:
            coefficient = float(args[0])
        except ValueError:
            raise usage_error("/steer", f"C must be a number, got {args[0]!r}") from None
        layers: tuple[int, ...] | None = None
        if len(args) == 2:
            from ..layers import parse_layer_spec

            try:
                layers = tuple(parse_layer_spec(args[1], self.session.axis.n_layers))
            except PersonaCompassError as exc:
                raise usage_error("/steer", str(exc)) from None
        try:  # Steering holds the one bound (NaN, infinity, past MAX_STEERING)
            steer = Steering(coefficient, layers)
        except CompassError as exc:
            raise usage_error("/steer", str(exc)) from None
        self.session.steer = steer
        self.info(f"steering: {steer_text(steer)}", "magenta")

    def cmd_system(self, text: str) -> None:
        self.session.set_system_prompt(text or None)  # readings keep their messages
        self.info(f"system prompt set: {text}" if text else "system prompt removed", "cyan")

    def cmd_save(self, args: list[str]) -> None:
        if len(args) != 1:
            raise usage_error("/save", "name one file")
        _check_folder(args[0], "/save")
        path = self.save(args[0])
        self.info(f"saved {path}", "green")

    def cmd_load(self, args: list[str]) -> None:
        if len(args) not in (1, 2):
            raise usage_error("/load", "name one file (and optionally which conversation)")
        self.load(args[0], args[1] if len(args) == 2 else None)

    def cmd_chart(self, args: list[str]) -> None:
        if len(args) > 1:
            raise usage_error("/chart", "name at most one file")
        if args and Path(args[0]).suffix.lower() not in CHART_SUFFIXES:
            raise usage_error("/chart", f"{args[0]}: write a .png or .html file")
        if not any(r.role == "assistant" for r in self.session.turns):
            self.info("no answers yet: nothing to chart", "dim")
            return
        if not args:
            self.console.print(
                chart_table(
                    self.session.turns,
                    self.session.messages,
                    threshold=self.threshold,
                    width=min(self.meter_width, 16),
                )
            )
            return
        _check_folder(args[0], "/chart")
        path = self.write_chart(args[0])
        self.info(f"chart written to {path}", "green")

    def cmd_status(self, args: list[str]) -> None:
        s = self.session
        sampling = s.sampling
        cap = s.capping_config.name if s.capping_config is not None else "none"
        steer = "off" if s.steer is None else steer_text(s.steer)
        n_answers = sum(1 for m in s.messages if m["role"] == "assistant")
        rows = [
            ("model", self.model_name or "?"),
            ("axis", f"{self.axis_label} (monitor layer {s.axis.layer} of {s.axis.n_layers})"),
            ("capping", f"{self._cap_state()}; config {cap}"),
            ("steering", steer),
            ("system", self.system_prompt or "(none)"),
            (
                "sampling",
                f"max {sampling.max_new_tokens} tokens, temperature {sampling.temperature:g}, "
                f"seed {sampling.seed}",
            ),
            ("conversation", f"{n_answers} answers, {len(s.alerts)} alerts"),
            ("autosave", str(self.save_path) if self.save_path else "off"),
        ]
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, Text(value))
        self.console.print(table)

    def cmd_reset(self, args: list[str]) -> None:
        if args:
            raise usage_error("/reset", "/reset takes no arguments")
        self.session = self._fresh_session(self.system_prompt)
        self.info("new conversation (system prompt and settings kept)", "cyan")

    # -- files ------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The chat's settings, stored under ``"chat"`` in saved transcripts."""
        s = self.session
        steer = None
        if s.steer is not None:
            layers = list(s.steer.layers) if s.steer.layers is not None else None
            steer = {"coefficient": s.steer.coefficient, "layers": layers, "scale": s.steer.scale}
        return {
            "axis": self.axis_label,
            "monitor_layer": s.axis.layer,
            "cap_mode": s.mode,
            "capping": s.capping_config.name if s.capping_config is not None else None,
            "steering": steer,
            "sampling": {
                "max_new_tokens": s.sampling.max_new_tokens,
                "temperature": s.sampling.temperature,
                "top_p": s.sampling.top_p,
                "seed": s.sampling.seed,
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write the conversation and its readings as a transcript (see transcripts)."""
        if not self.session.messages:
            raise CommandError("nothing to save yet: the conversation is empty")
        readings = sorted(self.session.readings(), key=lambda r: r["index"])
        return save_transcript(
            Path(path).expanduser(),
            self.session.messages,
            model=self.model_name,
            readings=readings,
            metadata={"chat": self.settings()},
        )

    def _autosave(self, *, final: bool = False) -> None:
        assert self.save_path is not None
        try:
            path = self.save(self.save_path)
        except (PersonaCompassError, OSError) as exc:
            self.error(f"autosave to {self.save_path} failed: {exc}")
            return
        if final:
            self.info(f"transcript saved to {path}", "green")

    def write_chart(self, path: str | Path) -> Path:
        """Write the trajectory so far as a PNG or HTML chart with the calibration bands."""
        from ..html_chart import calibration_bands

        out = Path(path).expanduser()
        s = self.session
        label = Path(self.model_name).name if self.model_name else ""
        series = trajectory_series(s.turns, s.messages, label or "chat")
        bands = calibration_bands(s.axis.calibration, s.axis.layer, suffix=" role-play")
        title = f"Chat on the Assistant Axis, layer {s.axis.layer} ({self.model_name or 'model'})"
        if out.suffix.lower() == ".png":
            from ..plots import plot_trajectories

            return plot_trajectories(series, out, bands=bands, title=title)
        from ..html_chart import write_trajectory_html

        description = (
            "Each point is one assistant answer: the mean projection of its tokens on the axis "
            "as measured live while it was written (higher = more Assistant-like); the tooltip "
            "says whether it was capped and lists its alerts."
        )
        return write_trajectory_html(series, out, bands, title, description=description)

    def load(self, path: str | Path, which: str | None = None) -> None:
        """Continue from a transcript file: its messages and readings replace the chat."""
        transcripts = load_transcripts(Path(path).expanduser())
        self.load_transcript(pick_transcript(transcripts, which, str(path)))

    def load_transcript(self, transcript: Transcript, *, system_prompt: str | None = None) -> None:
        """Continue from a transcript (see :meth:`load`); a last user turn is answered now.

        Readings stored in the file are kept; assistant turns without one are measured now
        (one forward pass, uncapped), so the chart, the alert rules and adaptive capping
        continue from the loaded conversation. ``system_prompt`` replaces the transcript's.
        """
        messages = [dict(m) for m in transcript.messages]
        pending = messages.pop()["content"] if messages[-1]["role"] == "user" else None
        session = self._fresh_session(None)
        stored, measured = session.restore(messages, transcript.readings or [])
        self.session = session
        n_answers = sum(1 for m in messages if m["role"] == "assistant")
        where = transcript.source
        details = []
        if stored:
            details.append(f"{stored} stored readings")
        if measured:
            details.append(f"{measured} measured now")
        extra = f" ({', '.join(details)})" if details else ""
        self.info(f"loaded {where}: {len(messages)} messages, {n_answers} answers{extra}", "green")
        if transcript.model and self.model_name and transcript.model != self.model_name:
            self.info(
                f"(recorded with {transcript.model}; continuing with {self.model_name})", "dim"
            )
        for m in messages[-2:]:
            if m["role"] != "system":
                self.info(Text.assemble((f"{m['role']}> ", "bold"), snippet(m["content"], 300)))
        if system_prompt is not None:
            self.cmd_system(system_prompt)
        if session.mode == "adaptive" and session.cap_engaged:
            self.info("adaptive capping is engaged after the loaded turns", "cyan")
        if pending is not None:
            self.info(Text.assemble(("the transcript ends with a user turn: ", "dim"), "answering"))
            self.info(Text.assemble((PROMPT_PLAIN, "bold cyan"), snippet(pending, 300)))
            self.ask(pending)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False
