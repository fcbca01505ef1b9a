"""The evaluation report: tables, charts and every number, from the files of a run folder.

:func:`collect_results` reads ``DIR/settings.json`` and the unit files and computes
everything (no model needed); :func:`write_report` writes

* ``DIR/results.json`` - settings, per-run metrics, aggregates, contrasts, capability,
  sweep, caveats, trait needles (``traits``, :mod:`.trait_metrics`): everything,
  machine-readable;
* ``DIR/report.md`` - the tables, the charts and the caveats, stating the model, the bundle,
  the settings and every n;
* ``DIR/charts/*.png`` - mean per-turn percentile per domain (one line per condition), harm
  rate by condition, identity drift rate by condition (when the answers were judged for it),
  capability difference by condition; with trait needles, one mean per-turn trajectory per
  trait (one line per condition, :mod:`.report_traits`);
* ``DIR/report.html`` - an interactive chart of the mean trajectories (self-contained).

The report states measurements: means, differences and their intervals. It does not
conclude beyond them. Folders and ``results.json`` files written before a measure existed
(identity drift, the capability check's ``unchanged_share``) still report: the missing
numbers show as ``-`` and their chart is left out.

Code: :mod:`.report_results` collects the numbers, :mod:`.report_markdown` writes the tables,
:mod:`.report_charts` draws the PNG charts and the HTML page; this module writes the files and
re-exports the public names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_text
from .report_charts import CHARTS_DIR, render_html, write_charts
from .report_markdown import render_markdown
from .report_results import HIGH_DOMAINS, LOW_DOMAINS, collect_results

__all__ = ["CHARTS_DIR", "HIGH_DOMAINS", "LOW_DOMAINS", "collect_results", "write_report"]


def write_report(out_dir: str | Path, results: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write results.json, report.md, report.html and the charts into ``out_dir``.

    Args:
        out_dir: the evaluation folder.
        results: precomputed :func:`collect_results` output (computed when None).

    Returns:
        ``{"results", "report", "html", <chart titles>...}`` -> paths written.
    """
    out = Path(out_dir)
    data = dict(results) if results is not None else collect_results(out)
    charts = write_charts(data, out)
    written: dict[str, Path] = {}
    data["charts"] = dict(charts)
    write_json(out / "results.json", _clean(data))
    written["results"] = out / "results.json"
    write_text(out / "report.md", render_markdown(data, charts))
    written["report"] = out / "report.md"
    page = render_html(data)
    if page is not None:
        write_text(out / "report.html", page)
        written["html"] = out / "report.html"
    for title, rel in charts.items():
        written[title] = out / rel
    return written


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
