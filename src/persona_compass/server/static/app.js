// persona-compass web page: chat over /v1/chat/completions (streamed) with a live drift chart.
// Plain browser JavaScript, no dependencies. Model and user text only ever goes through
// textContent; the chart is SVG built with DOM calls.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const el = {
    modelInfo: $("model-info"),
    capSwitch: $("cap-switch"),
    adaptive: $("adaptive-state"),
    key: $("api-key"),
    reset: $("reset"),
    banner: $("alert-banner"),
    alertList: $("alert-list"),
    error: $("error"),
    log: $("log"),
    form: $("composer"),
    message: $("message"),
    send: $("send"),
    live: $("live-reading"),
    chart: $("chart"),
    traitPanel: $("trait-panel"),
    traitChart: $("trait-chart"),
    traitLegend: $("trait-legend"),
  };
  const SVG_NS = el.chart.namespaceURI; // the SVG namespace, without writing its URL here
  const KEY_STORE = "persona-compass-api-key";

  // Everything the page knows; tests read it as window.compassState.
  const state = {
    model: null,
    monitorLayer: null,
    bands: { p5: null, p25: null, p50: null },
    messages: [], // the conversation, sent whole with every request
    points: [], // one per assistant turn: {turn, index, projection, percentile, capped, alert, live, traits}
    traits: [], // the server's trait needles: names, in GET /v1/compass order
    traitAlertAt: 75, // the percentile above which a trait's turn alert fires
    capEngagedNext: false,
    busy: false,
    controller: null,
  };
  window.compassState = state;

  // ---- small helpers ------------------------------------------------------------------

  function ordinal(n) {
    const v = Math.round(n);
    const tens = v % 100;
    if (tens >= 11 && tens <= 13) return v + "th";
    return v + ({ 1: "st", 2: "nd", 3: "rd" }[v % 10] || "th");
  }

  function percentileText(p) {
    return p === null || p === undefined ? "uncalibrated" : ordinal(p) + " percentile";
  }

  function num(x) {
    return typeof x === "number" && isFinite(x) ? x : null;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = el.key.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function capMode() {
    const checked = el.capSwitch.querySelector("input:checked");
    return checked ? checked.value : "off";
  }

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = !text;
  }

  // A readable sentence for a failed API response (OpenAI-style {"error": {"message"}} body).
  async function describeFailure(res) {
    let message = "";
    let retry = res.headers.get("Retry-After");
    try {
      const body = await res.json();
      const err = body && (body.error || body.detail);
      if (typeof err === "string") message = err;
      else if (err && typeof err.message === "string") message = err.message;
      if (err && err.retry_after !== undefined && retry === null) retry = String(err.retry_after);
    } catch (_) {
      /* not JSON: keep the status line */
    }
    if (res.status === 429) {
      const wait = retry !== null && retry !== "" ? Math.ceil(Number(retry)) : null;
      return "The server is busy" + (wait !== null && isFinite(wait) ? ", retry in " + wait + " s." : ", retry shortly.");
    }
    if (res.status === 401 || res.status === 403) {
      return "Not authorised: enter the server's API key above." + (message ? " (" + message + ")" : "");
    }
    return "Error " + res.status + (message ? ": " + message : " " + res.statusText);
  }

  // ---- server-sent events over fetch --------------------------------------------------

  // Calls onEvent(parsedJson) for each `data:` event until `data: [DONE]` or the end.
  async function readEvents(body, onEvent) {
    const reader = body.getReader();
    try {
      return await pump(reader, onEvent);
    } finally {
      reader.releaseLock();
    }
  }

  async function pump(reader, onEvent) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const parts = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : parts.pop();
      for (const part of parts) {
        const data = part
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
      if (done) return;
    }
  }

  async function readAll(body, onEvent) {
    try {
      await readEvents(body, onEvent);
    } finally {
      body.cancel().catch(() => {});
    }
  }

  // ---- the conversation log -----------------------------------------------------------

  function addBubble(role, text) {
    const li = document.createElement("li");
    li.className = "msg " + role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    li.append(who, body, meta);
    el.log.append(li);
    li.scrollIntoView({ block: "end" });
    return { li, body, meta };
  }

  function readingText(p) {
    const parts = [];
    if (p.projection !== null) parts.push("projection " + p.projection.toFixed(2));
    parts.push(percentileText(p.percentile));
    if (p.capped) {
      const eng = num(p.engagement);
      parts.push("capped" + (eng !== null ? " (engaged on " + Math.round(eng * 100) + "% of activations)" : ""));
    }
    return parts.join(" · ");
  }

  // ---- the chart ----------------------------------------------------------------------

  function svg(tag, attrs, parent) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (parent) parent.append(node);
    return node;
  }

  function drawChart() {
    const W = 480, H = 300, left = 48, right = 40, top = 14, bottom = 34;
    const chart = el.chart;
    chart.replaceChildren();
    const pts = state.points.filter((p) => p.projection !== null);
    const bands = state.bands;
    const ys = pts.map((p) => p.projection).concat(
      [bands.p5, bands.p25, bands.p50].filter((v) => v !== null));
    let lo = ys.length ? Math.min(...ys) : -1;
    let hi = ys.length ? Math.max(...ys) : 1;
    const pad = (hi - lo) * 0.12 || Math.abs(hi) * 0.1 || 1;
    lo -= pad;
    hi += pad;
    const nTurns = Math.max(4, state.points.length);
    const x = (turn) => left + ((turn - 0.5) / nTurns) * (W - left - right);
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (H - top - bottom);

    // Calibration bands: shaded below p5 and p5..p25, dashed lines at p5, p25, p50.
    const clampY = (v) => Math.min(H - bottom, Math.max(top, y(v)));
    if (bands.p5 !== null) {
      svg("rect", { class: "band-low", x: left, width: W - left - right,
        y: clampY(bands.p5), height: H - bottom - clampY(bands.p5) }, chart);
    }
    if (bands.p5 !== null && bands.p25 !== null) {
      svg("rect", { class: "band-mid", x: left, width: W - left - right,
        y: clampY(bands.p25), height: clampY(bands.p5) - clampY(bands.p25) }, chart);
    }
    for (const name of ["p5", "p25", "p50"]) {
      const v = bands[name];
      if (v === null) continue;
      svg("line", { class: "band-line " + name, x1: left, x2: W - right, y1: y(v), y2: y(v) }, chart);
      svg("text", { class: "band-label", x: W - right + 4, y: y(v) + 4 }, chart).textContent = name;
    }

    // Axes with a few ticks.
    svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom }, chart);
    svg("line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }, chart);
    const digits = Math.min(3, Math.max(0, 1 - Math.floor(Math.log10((hi - lo) / 4))));
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      const label = v.toFixed(digits);
      svg("text", { class: "tick", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, chart)
        .textContent = Number(label) === 0 ? (0).toFixed(digits) : label;
    }
    const step = Math.ceil(nTurns / 10);
    for (let t = 1; t <= nTurns; t += step) {
      svg("text", { class: "tick", x: x(t), y: H - bottom + 16, "text-anchor": "middle" }, chart)
        .textContent = String(t);
    }
    svg("text", { class: "axis-title", x: (left + W - right) / 2, y: H - 4, "text-anchor": "middle" },
      chart).textContent = "assistant turn";

    // The turns: a line through them, circles, diamonds for capped turns, a hollow live point.
    if (pts.length > 1) {
      svg("polyline", { class: "trace", points: pts.map((p) => x(p.turn) + "," + y(p.projection)).join(" ") },
        chart);
    }
    for (const p of pts) {
      const cx = x(p.turn), cy = y(p.projection);
      const cls = "point" + (p.capped ? " capped" : "") + (p.alert ? " alert" : "") + (p.live ? " live" : "");
      const mark = p.capped
        ? svg("rect", { class: cls, x: cx - 6, y: cy - 6, width: 12, height: 12,
          transform: "rotate(45 " + cx + " " + cy + ")" }, chart)
        : svg("circle", { class: cls, cx: cx, cy: cy, r: 6 }, chart);
      svg("title", {}, mark).textContent = "turn " + p.turn + ": " + readingText(p) + (p.live ? " (streaming)" : "");
    }

    const exposed = state.points.map((p) => ({
      turn: p.turn, index: p.index, projection: p.projection, percentile: p.percentile,
      capped: p.capped, alert: p.alert, live: p.live,
    }));
    chart.dataset.points = JSON.stringify(exposed);
    chart.dataset.live = String(state.points.some((p) => p.live));
    drawTraitChart();
  }

  // One line per trait needle on the percentile scale (each trait has its own units, so
  // percentiles are what the needles share).
  function drawTraitChart() {
    el.traitPanel.hidden = state.traits.length === 0;
    if (!state.traits.length) return;
    const W = 480, H = 220, left = 48, right = 40, top = 10, bottom = 30;
    const chart = el.traitChart;
    chart.replaceChildren();
    const nTurns = Math.max(4, state.points.length);
    const x = (turn) => left + ((turn - 0.5) / nTurns) * (W - left - right);
    const y = (v) => top + (1 - v / 100) * (H - top - bottom);
    svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom }, chart);
    svg("line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }, chart);
    for (const v of [0, 25, 50, 75, 100]) {
      svg("text", { class: "tick", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, chart)
        .textContent = String(v);
    }
    svg("line", { class: "alert-line", x1: left, x2: W - right, y1: y(state.traitAlertAt),
      y2: y(state.traitAlertAt) }, chart);
    const step = Math.ceil(nTurns / 10);
    for (let t = 1; t <= nTurns; t += step) {
      svg("text", { class: "tick", x: x(t), y: H - bottom + 16, "text-anchor": "middle" }, chart)
        .textContent = String(t);
    }
    state.traits.forEach((name, i) => {
      const cls = "needle-" + (i % 5);
      const pts = state.points.filter((p) => p.traits && num(p.traits[name]) !== null);
      if (pts.length > 1) {
        svg("polyline", { class: "needle-line " + cls,
          points: pts.map((p) => x(p.turn) + "," + y(p.traits[name])).join(" ") }, chart);
      }
      for (const p of pts) {
        const mark = svg("circle", { class: "needle-point " + cls, cx: x(p.turn), cy: y(p.traits[name]),
          r: p.live ? 3 : 4.5 }, chart);
        svg("title", {}, mark).textContent = name + ", turn " + p.turn + ": " +
          percentileText(p.traits[name]) + (p.live ? " (streaming)" : "");
      }
    });
    chart.dataset.points = JSON.stringify(state.points.map((p) => ({
      turn: p.turn, live: p.live, traits: p.traits || {},
    })));
  }

  function traitPercentiles(traits) {
    const out = {};
    for (const [name, r] of Object.entries(traits || {})) out[name] = num(r && r.percentile);
    return out;
  }

  // ---- banner and cap state -----------------------------------------------------------

  function showAlerts(pc) {
    const alerts = (pc && pc.alert && (pc.alerts || (pc.turn && pc.turn.alerts))) || [];
    el.alertList.replaceChildren();
    for (const a of alerts) {
      const li = document.createElement("li");
      li.textContent = a.message || a.kind;
      el.alertList.append(li);
    }
    if (pc && pc.alert && !alerts.length) {
      const li = document.createElement("li");
      li.textContent = "The last answer drifted away from the Assistant persona.";
      el.alertList.append(li);
    }
    el.banner.hidden = !(pc && pc.alert);
  }

  function showAdaptive() {
    el.adaptive.hidden = !(state.capEngagedNext && capMode() === "adaptive");
  }

  // ---- sending ------------------------------------------------------------------------

  async function send(text) {
    showError("");
    state.busy = true;
    el.send.textContent = "Stop";
    el.message.value = "";
    const conv = state.messages; // a reset during the request leaves these behind
    const points = state.points;
    conv.push({ role: "user", content: text });
    addBubble("user", text);
    const answer = addBubble("assistant", "");
    answer.li.classList.add("streaming");
    const point = {
      turn: points.length + 1, index: conv.length, projection: null,
      percentile: null, capped: false, alert: false, engagement: null, live: true, traits: {},
    };
    points.push(point);
    let content = "";
    let final = null;
    let finish = null;
    state.controller = new AbortController();
    try {
      const res = await fetch("v1/chat/completions", {
        method: "POST",
        headers: headers(),
        signal: state.controller.signal,
        body: JSON.stringify({
          model: state.model || "persona-compass",
          messages: conv,
          stream: true,
          persona_compass: { cap: capMode() },
        }),
      });
      if (!res.ok) throw new Error(await describeFailure(res));
      await readAll(res.body, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
        const choice = (chunk.choices || [])[0];
        if (choice && choice.delta && choice.delta.content) {
          content += choice.delta.content;
          answer.body.textContent = content;
        }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        const pc = chunk.persona_compass;
        if (!pc) return;
        if (pc.turn) {
          final = pc;
        } else if (num(pc.projection) !== null) {
          point.projection = pc.projection;
          point.percentile = num(pc.percentile);
          if (pc.traits) point.traits = traitPercentiles(pc.traits);
          el.live.textContent = "Streaming: " + readingText(point) + " after " + pc.n_tokens + " tokens";
          drawChart();
        }
      });
      if (!final) throw new Error("The answer stream ended before its final reading.");
      settle(point, final, answer, finish);
      conv.push({ role: "assistant", content: content });
    } catch (err) {
      // Drop the failed exchange from the conversation; give the text back to retry.
      conv.pop();
      points.pop();
      answer.li.classList.add("failed");
      answer.meta.textContent = err.name === "AbortError" ? "stopped" : "failed";
      el.message.value = text;
      showError(err.name === "AbortError" ? "" : (err.message || String(err)));
      el.live.textContent = state.points.length ? el.live.textContent : "No answers yet.";
    } finally {
      answer.li.classList.remove("streaming");
      state.busy = false;
      state.controller = null;
      el.send.textContent = "Send";
      drawChart();
      showAdaptive();
      el.message.focus();
    }
  }

  function settle(point, pc, answer, finish) {
    const t = pc.turn;
    point.live = false;
    point.index = t.index;
    point.projection = num(t.projection);
    point.percentile = num(t.percentile);
    point.capped = Boolean(t.capped);
    point.engagement = num(t.cap_engagement);
    point.alert = Boolean(t.alerts && t.alerts.length);
    point.traits = traitPercentiles(pc.traits || t.traits);
    state.capEngagedNext = Boolean(pc.cap && pc.cap.engaged_next);
    answer.meta.textContent = readingText(point) + (finish === "length" ? " · cut off at the token limit" : "");
    if (point.capped) answer.li.classList.add("capped");
    if (point.alert) answer.li.classList.add("alert");
    el.live.textContent = "Last answer: " + readingText(point) + ", " + t.n_tokens + " tokens.";
    showAlerts(pc);
  }

  // ---- start-up -----------------------------------------------------------------------

  async function loadCompass() {
    try {
      const res = await fetch("v1/compass", { headers: headers() });
      if (!res.ok) {
        el.modelInfo.textContent = await describeFailure(res);
        return;
      }
      const info = await res.json();
      state.model = info.model || null;
      state.monitorLayer = info.monitor_layer;
      const b = info.bands || {};
      state.bands = { p5: num(b.p5), p25: num(b.p25), p50: num(b.p50) };
      const layer = info.monitor_layer === undefined ? "?" : info.monitor_layer;
      el.modelInfo.textContent = (info.model || "model") + " · monitor layer " + layer;
      state.traits = (info.traits || []).map((t) => t.name);
      const rule = info.rules && num(info.rules.turn_percentile);
      state.traitAlertAt = rule === null || rule === undefined ? 75 : 100 - rule;
      el.traitLegend.replaceChildren();
      state.traits.forEach((name, i) => {
        const li = document.createElement("li");
        const key = document.createElement("span");
        key.className = "needle-key needle-" + (i % 5);
        li.append(key, document.createTextNode(" " + name));
        el.traitLegend.append(li);
      });
      const canCap = Boolean(info.capping);
      for (const input of el.capSwitch.querySelectorAll("input")) {
        input.disabled = input.value !== "off" && !canCap;
        if (input.value === info.cap_mode) input.checked = true;
      }
      if (!canCap) el.capSwitch.title = "The server has no capping config; capping is unavailable.";
      drawChart();
    } catch (err) {
      el.modelInfo.textContent = "Could not reach the server: " + (err.message || err);
    }
  }

  el.key.value = sessionStorage.getItem(KEY_STORE) || "";
  el.key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, el.key.value.trim());
    loadCompass();
  });
  el.capSwitch.addEventListener("change", showAdaptive);
  $("settings").addEventListener("submit", (ev) => ev.preventDefault());
  el.form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (state.busy) {
      if (state.controller) state.controller.abort();
      return;
    }
    const text = el.message.value.trim();
    if (text) send(text);
  });
  el.message.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      if (!state.busy) el.form.requestSubmit();
    }
  });
  el.reset.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    state.points = [];
    state.capEngagedNext = false;
    el.log.replaceChildren();
    el.live.textContent = "No answers yet.";
    showAlerts(null);
    showAdaptive();
    showError("");
    drawChart();
  });

  drawChart();
  loadCompass();
})();
