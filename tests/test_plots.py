"""Trajectory charts: the shared Series model, the self-contained HTML and the PNG."""

from __future__ import annotations

import base64
import hashlib
import math
import re

import pytest
import torch

from persona_compass.calibration import Calibration
from persona_compass.html_chart import (
    Point,
    Series,
    as_series,
    calibration_bands,
    snippet,
    trajectory_html,
    write_trajectory_html,
)
from persona_compass.plots import plot_trajectories

EVIL = "</script><img src=x onerror=alert(1)><script>alert(2)</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BANDS = {"p5": -20.0, "p25": -5.0, "p50": 3.0}


def two_series(text: str = "Hello there") -> list[Series]:
    return [
        Series(
            "unsteered",
            [
                Point(1, 10.0, 90.0, text),
                Point(2, -8.0, 20.0, "drifting", alert=True, note="alert drift: below p25"),
                Point(3, -30.0, 2.0, "gone"),
            ],
        ),
        Series("capped", [Point(1, 11.0, 92.0), Point(2, 1.0, 45.0), Point(3, -4.0, 27.0)]),
    ]


def test_html_is_self_contained():
    page = trajectory_html(two_series(), BANDS, "Pair")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http://" not in page and "https://" not in page
    assert "//" not in page  # no protocol-relative reference either
    assert not re.search(r"<[^<>]*\b(src|href)\s*=", page, re.I)
    assert "@import" not in page and "url(" not in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp and "default-src 'none'" in csp.group(1)
    # the only script allowed is the page's own, pinned by its hash
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp.group(1)


def test_html_draws_series_bands_alerts_and_tooltips():
    page = trajectory_html(two_series(), BANDS, "Pair")
    assert page.count('class="series"') == 2
    assert "unsteered" in page and "capped" in page
    for label in BANDS:
        assert f"{label} (" in page
    assert page.count('class="band"') == 3
    assert page.count('class="pt alert"') == 1
    assert page.count("<title>") == 1 + 6  # the page title, one tooltip per point
    assert "projection -8.00 (percentile 20)" in page
    assert "alert drift: below p25" in page and "drifting" in page


def test_html_escapes_every_user_text():
    series = [Series(EVIL, [Point(1, 1.0, None, EVIL, alert=True, note=EVIL)])]
    page = trajectory_html(series, {EVIL: 0.5}, EVIL, description=EVIL, ylabel=EVIL)
    assert "<img" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert page.count("<script>") == 1 and page.count("</script>") == 1
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page


def test_html_handles_gaps_empty_series_and_mappings():
    gap = Series("g", [Point(1, 1.0), Point(2, math.nan), Point(3, 2.0), Point(4, 3.0)])
    page = trajectory_html([gap])
    assert page.count("<polyline") == 1  # 1 then a gap, then the segment 3-4
    assert page.count('class="pt"') == 3
    assert "no turns to show" in trajectory_html([Series("empty")])
    from_mapping = trajectory_html({"a": [1.0, 2.0]}, None, "t")
    assert from_mapping.count('class="pt"') == 2 and 'class="band"' not in from_mapping


def test_write_trajectory_html(tmp_path):
    out = write_trajectory_html(two_series(), tmp_path / "sub" / "c.html", BANDS, "T")
    assert out.read_text(encoding="utf-8") == trajectory_html(two_series(), BANDS, "T")


def test_series_helpers():
    s = Series.from_values("x", [1, 2.5])
    assert s.points == (Point(1, 1.0), Point(2, 2.5))
    assert as_series({"x": [1, 2.5]}) == [s]
    with pytest.raises(TypeError):
        as_series([{"label": "x"}])  # type: ignore[list-item]
    assert snippet("  a\n\n b  ") == "a b"
    assert snippet("x" * 300, 10) == "x" * 9 + "…"


def test_calibration_bands():
    cal = Calibration.from_projections(
        torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    )
    bands = calibration_bands(cal, 1)
    assert list(bands) == ["p5", "p25", "p50"]
    assert bands["p25"] == pytest.approx(cal.threshold(1, 25))
    assert bands["p5"] < bands["p25"] < bands["p50"]
    assert list(calibration_bands(cal, 1, (25,), suffix=" role-play")) == ["p25 role-play"]
    assert calibration_bands(None, 1) is None


@pytest.mark.parametrize("bands", [None, BANDS])
def test_png_from_series(tmp_path, bands):
    out = plot_trajectories(two_series(EVIL), tmp_path / "c.png", bands=bands, title="t")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]


def test_png_from_mapping_keeps_the_old_api(tmp_path):
    out = plot_trajectories(
        {"a": [1.0, 2.0, float("nan")], "b": [0.5]}, tmp_path / "m.png", bands={"p25": 0.0}
    )
    assert out.read_bytes()[:8] == PNG_MAGIC
