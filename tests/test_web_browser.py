"""The web page (``GET /``) in a real headless Chromium, against a real uvicorn server.

A tiny random-weight model answers; the page streams the answer, plots each assistant turn
on its drift chart (live while streaming, then settled) and marks capped turns. Needs
Debian's ``chromium`` and ``chromium-driver`` (``make browser``); set
``PERSONA_COMPASS_SKIP_BROWSER=1`` to skip the browser tests deliberately.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from tiny import calibrated_axis, cap_at, make_pair

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from persona_compass.alerts import AlertRules  # noqa: E402
from persona_compass.server.web import ASSETS, router  # noqa: E402

API_KEY = "test-key-123"
EXTERNAL = re.compile(r"https?://", re.IGNORECASE)


# ---- a tiny model with a calibrated axis (as in test_compass.py) ------------------------------


def tiny_setup():
    model, tok = make_pair("llama")
    return model, tok, calibrated_axis(model, seed=5, monitor_layer=2)


# ---- a real server on a free loopback port ----------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving ``app`` in a daemon thread; ``url`` ends with a slash."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# Every assistant turn raises an alert (so adaptive capping engages after the first answer).
ALWAYS = AlertRules(token_run=0, turn_percentile=100, turn_run=1, trend_turns=0)


def make_app(api_key: str | None = None, rules: AlertRules | None = None):
    from persona_compass.server.app import ServerConfig, create_app

    model, tok, axis = tiny_setup()
    config = ServerConfig(
        model_name="tiny-web",
        cap_mode="off",
        api_key=api_key,
        max_tokens_limit=64,
        default_max_tokens=16,
        rules=rules,
    )
    return create_app(model, tok, axis, cap_at(axis, 90), config)


@pytest.fixture(scope="module")
def server():
    with LiveServer(make_app()) as live:
        yield live


@pytest.fixture(scope="module")
def keyed_server():
    with LiveServer(make_app(api_key=API_KEY, rules=ALWAYS)) as live:
        yield live


# ---- headless Chromium ------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    debian = Path("/usr/bin") / name
    return str(debian) if debian.exists() else None


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = find_tool("chromium"), find_tool("chromedriver")
    if not (chromium and chromedriver):
        missing = " and ".join(
            n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if not p
        )
        if os.environ.get("PERSONA_COMPASS_SKIP_BROWSER") == "1":
            pytest.skip(f"{missing} not installed and PERSONA_COMPASS_SKIP_BROWSER=1")
        pytest.fail(
            f"{missing} not found: run `make browser` to install Chromium and chromedriver "
            "(or set PERSONA_COMPASS_SKIP_BROWSER=1 to skip the browser tests)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


def wait_for(driver, condition, timeout: float = 60.0, what: str = "condition"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        error = driver.execute_script("return document.getElementById('error').textContent")
        pytest.fail(f"timed out waiting for {what}; page error: {error!r}")


def chart_points(driver) -> list[dict]:
    return json.loads(driver.find_element("id", "chart").get_attribute("data-points"))


def settled(n: int):
    def check(driver):
        # One script reads all three at once: separate reads can straddle the page's settle step.
        points_json, live, busy = driver.execute_script(
            "const c = document.getElementById('chart');"
            "return [c.dataset.points, c.dataset.live, window.compassState.busy];"
        )
        points = json.loads(points_json)
        if len(points) == n and live == "false" and not busy:
            return points
        return False

    return check


def artifacts_dir(tmp_path: Path) -> Path:
    env = os.environ.get("PERSONA_COMPASS_ARTIFACTS")
    out = Path(env) if env else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---- the page's assets, without a browser -----------------------------------------------------


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]


def test_page_and_assets_are_self_contained():
    app = fastapi.FastAPI()
    app.include_router(router)
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    parser = _Refs()
    parser.feed(page.text)
    assert {"static/app.js", "static/style.css"} <= set(parser.refs)
    for ref in parser.refs:
        assert not EXTERNAL.search(ref) and not ref.startswith("//"), ref
    assert not EXTERNAL.search(page.text)
    for name, media_type in ASSETS.items():
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-type"] == media_type
        assert not EXTERNAL.search(asset.text), f"{name} names an external URL"
    assert "innerHTML" not in client.get("/static/app.js").text
    for bad in ("nope.js", "..%2Fweb.py", "index.html"):
        assert client.get(f"/static/{bad}").status_code == 404


# ---- the page in Chromium ---------------------------------------------------------------------


def test_chat_streams_and_charts_capped_turns(driver, server, tmp_path):
    driver.get(server.url)
    wait_for(
        driver,
        lambda d: "tiny-web" in d.find_element("id", "model-info").text,
        what="the page to load /v1/compass",
    )
    bands = driver.execute_script("return window.compassState.bands")
    assert all(isinstance(bands[k], (int, float)) for k in ("p5", "p25", "p50")), bands
    assert driver.find_elements("css selector", "#chart line.band-line.p5")

    # Every data-points value the chart takes, to see the live point move while streaming.
    driver.execute_script(
        """
        window.__chartSeen = [];
        const chart = document.getElementById('chart');
        new MutationObserver(() => window.__chartSeen.push(chart.dataset.points))
          .observe(chart, {attributes: true, attributeFilter: ['data-points']});
        """
    )
    box = driver.find_element("id", "message")
    first = "Hello <b>there</b> & tell me about the sea."
    box.send_keys(first)
    box.send_keys("\n")  # Enter sends
    [p1] = wait_for(driver, settled(1), what="the first answer")

    bubbles = driver.find_elements("css selector", "#log .msg")
    assert [b.get_attribute("class").split()[1] for b in bubbles] == ["user", "assistant"]
    user_text = bubbles[0].find_element("css selector", ".text")
    assert user_text.text == first  # shown literally, not as markup
    assert not driver.find_elements("css selector", "#log b")
    answer = bubbles[1].find_element("css selector", ".text").get_attribute("textContent")
    assert answer, "the answer text is empty"
    meta = bubbles[1].find_element("css selector", ".meta").text
    assert re.search(r"\d+(st|nd|rd|th) percentile", meta), meta
    assert "percentile" in driver.find_element("id", "live-reading").text

    assert p1["turn"] == 1 and not p1["capped"] and not p1["live"]
    assert isinstance(p1["projection"], (int, float)) and math.isfinite(p1["projection"])
    assert 0 <= p1["percentile"] <= 100
    seen = [json.loads(s) for s in driver.execute_script("return window.__chartSeen")]
    assert any(pts and pts[-1]["live"] for pts in seen), "no live point while streaming"
    assert driver.find_elements("css selector", "#chart circle.point")
    assert not driver.find_elements("css selector", "#chart .point.capped")

    # Cap on, and the second turn is drawn as a capped point.
    driver.find_element("css selector", "#cap-switch input[value=on]").click()
    box.send_keys("And the stars?\n")
    p1_again, p2 = wait_for(driver, settled(2), what="the second answer")
    assert p1_again == p1
    assert p2["turn"] == 2 and p2["index"] > p1["index"] and p2["capped"] and not p2["live"]
    assert len(driver.find_elements("css selector", "#chart .point.capped")) == 1
    assert "capped" in driver.find_elements("css selector", "#log .msg.assistant .meta")[1].text
    state = driver.execute_script("return window.compassState.messages")
    assert [m["role"] for m in state] == ["user", "assistant", "user", "assistant"]
    assert state[1]["content"] == answer
    assert driver.find_element("id", "error").get_attribute("hidden") is not None

    # Only the page's own origin was ever contacted, and nothing was logged as an error.
    origins = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert set(origins) <= {server.url.rstrip("/")}, origins
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    shot = artifacts_dir(tmp_path) / "web.png"
    assert driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")


def test_api_key_alerts_and_adaptive_cap(driver, keyed_server):
    driver.get(keyed_server.url)
    info = driver.find_element("id", "model-info")
    wait_for(driver, lambda d: "API key" in info.text, what="the missing-key message")
    key = driver.find_element("id", "api-key")
    key.send_keys(API_KEY)
    key.send_keys("\t")  # change event: stored for the session, compass reloaded with it
    wait_for(driver, lambda d: "tiny-web" in info.text, what="the compass with the key")
    stored = driver.execute_script("return sessionStorage.getItem('persona-compass-api-key')")
    assert stored == API_KEY
    driver.get_log("browser")  # drop the expected 401 from before the key

    # Adaptive: the first answer is uncapped but alerts, so the cap engages for the next one.
    banner = driver.find_element("id", "alert-banner")
    badge = driver.find_element("id", "adaptive-state")
    assert not banner.is_displayed() and not badge.is_displayed()
    driver.find_element("css selector", "#cap-switch input[value=adaptive]").click()
    box = driver.find_element("id", "message")
    box.send_keys("Hi!\n")
    [p1] = wait_for(driver, settled(1), what="the first adaptive answer")
    assert not p1["capped"] and p1["alert"]
    assert banner.is_displayed() and banner.get_attribute("aria-live") == "assertive"
    messages = [li.text for li in banner.find_elements("css selector", "li")]
    assert messages and all(messages), messages
    assert badge.is_displayed() and "engaged" in badge.text
    assert driver.find_elements("css selector", "#chart .point.alert")

    box.send_keys("Go on.\n")
    _, p2 = wait_for(driver, settled(2), what="the second adaptive answer")
    assert p2["capped"]
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


# ---- trait needles: a second chart, one line per needle ------------------------------------------


def make_trait_app():
    import dataclasses

    from persona_compass.server.app import ServerConfig, create_app

    model, tok, axis = tiny_setup()
    needles = [
        dataclasses.replace(
            calibrated_axis(model, seed=seed, monitor_layer=layer),
            metadata={"kind": "trait", "trait": name},
        )
        for seed, layer, name in ((7, 1, "malice"), (9, 2, "sycophancy"))
    ]
    config = ServerConfig(model_name="tiny-traits", max_tokens_limit=64, default_max_tokens=16)
    return create_app(model, tok, axis, cap_at(axis, 90), config, traits=needles)


def test_trait_chart_draws_one_line_per_needle(driver):
    with LiveServer(make_trait_app()) as live:
        driver.get(live.url)
        wait_for(
            driver,
            lambda d: d.execute_script("return window.compassState.traits.length") == 2,
            what="the page to load the needles from /v1/compass",
        )
        assert driver.find_element("id", "trait-panel").get_attribute("hidden") is None
        legend = driver.find_element("id", "trait-legend").text
        assert "malice" in legend and "sycophancy" in legend
        box = driver.find_element("id", "message")
        for text in ("Hello there.", "Tell me more.\n"):
            box.send_keys(text if text.endswith("\n") else text + "\n")
            wait_for(
                driver,
                settled(1 if text == "Hello there." else 2),
                what=f"the answer to {text!r}",
            )
        points = json.loads(driver.find_element("id", "trait-chart").get_attribute("data-points"))
        assert [p["turn"] for p in points] == [1, 2]
        for p in points:
            assert set(p["traits"]) == {"malice", "sycophancy"}
            assert all(0 <= v <= 100 for v in p["traits"].values())
        assert len(driver.find_elements("css selector", "#trait-chart polyline.needle-line")) == 2
        assert len(driver.find_elements("css selector", "#trait-chart circle.needle-point")) == 4
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe


def test_trait_panel_is_hidden_without_needles(driver, server):
    driver.get(server.url)
    wait_for(
        driver,
        lambda d: "tiny-web" in d.find_element("id", "model-info").text,
        what="the page to load /v1/compass",
    )
    assert driver.find_element("id", "trait-panel").get_attribute("hidden") is not None
