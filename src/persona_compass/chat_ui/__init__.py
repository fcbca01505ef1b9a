"""The terminal chat behind ``persona-compass chat``: the logic, apart from click.

:class:`ChatUI` runs a :class:`~persona_compass.compass.CompassSession` in a terminal. Each
answer streams as it is generated; on a terminal a live drift meter under it shows the
running percentile of the answer so far (red = drifted, green = Assistant-like, the alert
threshold marked), and every answer ends with a one-line summary (projection, percentile,
capping, cap engagement) plus any alerts, highlighted. Lines starting with ``/`` are
commands (``/help`` lists them). Ctrl-C during an answer stops that answer and keeps the
chat; Ctrl-D (end of input) or ``/quit`` leaves.

When the output is not a terminal (a pipe, a test), there is no animation: the answer text
is written as it arrives, followed by the summary, so ``persona-compass chat < script.txt``
gives a readable log.

Modules: :mod:`.render` (meter, summary, alert lines, chart table, live view),
:mod:`.commands` (the slash-command table and its helpers), :mod:`.ui` (:class:`ChatUI`).
"""

from .commands import (
    ALIASES,
    CHART_SUFFIXES,
    COMMANDS,
    Command,
    CommandError,
    pick_transcript,
)
from .render import (
    COLOUR_STOPS,
    EMPTY,
    FILLED,
    MARK,
    METER_WIDTH,
    LiveAnswer,
    alert_lines,
    chart_table,
    drift_meter,
    percentile_colour,
    summary_text,
    trajectory_series,
)
from .ui import ANSWER_LABEL, PROMPT_PLAIN, ChatUI, interrupt_sets

__all__ = [
    "ALIASES",
    "ANSWER_LABEL",
    "CHART_SUFFIXES",
    "COLOUR_STOPS",
    "COMMANDS",
    "EMPTY",
    "FILLED",
    "MARK",
    "METER_WIDTH",
    "PROMPT_PLAIN",
    "ChatUI",
    "Command",
    "CommandError",
    "LiveAnswer",
    "alert_lines",
    "chart_table",
    "drift_meter",
    "interrupt_sets",
    "percentile_colour",
    "pick_transcript",
    "summary_text",
    "trajectory_series",
]
