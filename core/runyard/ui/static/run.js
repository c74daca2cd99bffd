// The run page: fold the run's events into a model of its steps and attempts, draw the
// timeline on a canvas (only the rows in view, so 5,000 steps cost what 30 do), and keep
// polling for new events and the chosen step's output.
"use strict";
(function () {
  const runId = document.body.dataset.runId;
  const api = "/api/runs/" + encodeURIComponent(runId);
  const ROW = 18, AXIS = 20, LABEL = 220;
  const COLORS = {success: "#2e9e4f", failure: "#d0383b", retry: "#f08c00", running: "#2f74d0",
                  canceled: "#8a8f98", skipped: "#c9ccd1", pending: "#e8eaed"};
  const steps = new Map();   // key -> {key, state, attempts: [{n, start, end, outcome}], failure, skippedAt}
  const order = [];          // step keys, first seen first
  let shown = order;         // after the "find a step" filter
  let run = null, lastId = 0, serverSkew = 0, selected = null, logLast = 0;
  let graph = null;          // [[key, [upstream]]] once loaded
  window.__runyard = {steps}; // the page's model, read by the browser tests and the benchmark

  const $ = (id) => document.getElementById(id);
  function step(key) {
    let s = steps.get(key);
    if (!s) { s = {key, state: "pending", attempts: [], failure: null}; steps.set(key, s); order.push(key); }
    return s;
  }
  function lastAttempt(s, ts, n) {
    if (!s.attempts.length) s.attempts.push({n: n || 1, start: ts, end: null, outcome: "running"});
    return s.attempts[s.attempts.length - 1];
  }

  // -- folding events ---------------------------------------------------------------------
  // Events are [id, {type, step_key, attempt, timestamp, message, data}] (Event.to_dict).
  const logEvents = [];
  let changed = true;
  function fold(id, e) {
    const type = e.type, key = e.step_key, ts = e.timestamp, data = e.data || {};
    changed = true;
    if (key !== undefined && type.startsWith("STEP_")) {
      const s = step(key);
      if (type === "STEP_START") { s.attempts.push({n: e.attempt || s.attempts.length + 1, start: ts, end: null, outcome: "running"}); s.state = "running"; }
      else if (type === "STEP_SUCCESS") { const a = lastAttempt(s, ts, e.attempt); a.end = ts; a.outcome = "success"; s.state = "success"; }
      else if (type === "STEP_FAILURE") { const a = lastAttempt(s, ts, e.attempt); a.end = ts; a.outcome = "failure"; s.state = "failed"; s.failure = data.failure || {message: e.message}; }
      else if (type === "STEP_RETRY") { const a = lastAttempt(s, ts, e.attempt); a.outcome = "retry"; s.state = "retrying"; }
      else if (type === "STEP_SKIPPED") { s.state = "skipped"; s.skippedAt = ts; }
      return;
    }
    if (type === "RUN_CANCELED" || type === "RUN_FAILURE") {
      // Attempts still open when the run ended were stopped with it.
      for (const s of steps.values()) for (const a of s.attempts) if (a.end === null) { a.end = ts; a.outcome = "canceled"; if (s.state === "running") s.state = "canceled"; }
    }
    if (key === undefined || type === "ENGINE") logEvents.push([id, e]);
  }

  // -- the event log ----------------------------------------------------------------------
  function drawEventLog() {
    const ol = $("event-log");
    while (logEvents.length) {
      const [id, e] = logEvents.shift();
      const failure = (e.data || {}).failure;
      const text = e.message || (failure && failure.message) || "";
      ol.append(RY.el("li", {"data-type": e.type, "data-id": id}, RY.el("span", {class: "muted"}, RY.fmtTime(e.timestamp)), " ",
        RY.el("b", {}, e.type), e.step_key ? ` [${e.step_key}] ` : " ", text));
    }
  }

  // -- the timeline -------------------------------------------------------------------------
  const canvas = $("gantt"), scroller = $("gantt-scroll"), spacer = $("gantt-spacer");
  let pending = false;
  function redraw() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; drawGantt(); }); } }

  function span() {
    let t0 = Infinity, t1 = -Infinity;
    for (const s of steps.values()) for (const a of s.attempts) {
      t0 = Math.min(t0, a.start); t1 = Math.max(t1, a.end === null ? nowServer() : a.end);
    }
    if (run && run.started_at) t0 = Math.min(t0, run.started_at);
    if (!isFinite(t0)) { t0 = nowServer() - 1; t1 = nowServer(); }
    if (t1 <= t0) t1 = t0 + 1;
    return [t0, t1];
  }
  function nowServer() { return Date.now() / 1000 + serverSkew; }

  function drawGantt() {
    const dpr = window.devicePixelRatio || 1;
    const w = scroller.clientWidth;
    spacer.style.height = (AXIS + shown.length * ROW) + "px";
    scroller.style.height = Math.min(420, AXIS + Math.max(shown.length, 3) * ROW + 4) + "px";
    const h = scroller.clientHeight;
    if (canvas.width !== w * dpr || canvas.height !== h * dpr) {
      canvas.width = w * dpr; canvas.height = h * dpr; canvas.style.width = w + "px"; canvas.style.height = h + "px";
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const [t0, t1] = span(), plot = Math.max(50, w - LABEL - 10);
    const x = (t) => LABEL + (t - t0) / (t1 - t0) * plot;
    const top = scroller.scrollTop, first = Math.floor(top / ROW), count = Math.ceil(h / ROW) + 1;
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    for (let i = first; i < Math.min(shown.length, first + count); i++) {
      const s = steps.get(shown[i]), y = AXIS + i * ROW - top;
      if (y < AXIS - ROW) continue;
      if (s.key === selected) { ctx.fillStyle = "#fff3bf"; ctx.fillRect(0, y, w, ROW); }
      ctx.fillStyle = "#222";
      ctx.fillText(s.key.length > 30 ? s.key.slice(0, 29) + "…" : s.key, 4, y + ROW / 2);
      if (s.state === "skipped") {
        ctx.fillStyle = COLORS.skipped; ctx.fillRect(x(s.skippedAt || t0) - 2, y + 5, 4, ROW - 10);
      }
      for (const a of s.attempts) {
        const x0 = x(a.start), x1 = Math.max(x0 + 2, x(a.end === null ? nowServer() : a.end));
        ctx.fillStyle = COLORS[a.outcome] || COLORS.pending;
        ctx.fillRect(x0, y + 3, x1 - x0, ROW - 6);
        if (s.attempts.length > 1 && x1 - x0 > 14) { ctx.fillStyle = "#fff"; ctx.fillText("#" + a.n, x0 + 2, y + ROW / 2); }
      }
    }
    // The time axis stays on top of the rows.
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, AXIS);
    ctx.fillStyle = "#555"; ctx.strokeStyle = "#ddd";
    for (let k = 0; k <= 4; k++) {
      const t = t0 + (t1 - t0) * k / 4, xx = x(t);
      ctx.fillText("+" + RY.fmtDuration(t - t0), Math.min(xx, w - 50), AXIS / 2);
      ctx.beginPath(); ctx.moveTo(xx, AXIS); ctx.lineTo(xx, h); ctx.stroke();
    }
    const counts = {};
    for (const s of steps.values()) counts[s.state] = (counts[s.state] || 0) + 1;
    $("timeline-summary").textContent = `${steps.size} step(s): ` +
      Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ");
    document.body.dataset.timeline = "drawn";
    // When the first full view was drawn (the UI benchmark reads it).
    if (lastId > 0 && !document.body.dataset.drawnAt) document.body.dataset.drawnAt = String(performance.now());
    document.body.dataset.steps = String(steps.size);
  }
  scroller.addEventListener("scroll", redraw);
  window.addEventListener("resize", redraw);
  canvas.addEventListener("click", (ev) => {
    const r = canvas.getBoundingClientRect(), y = ev.clientY - r.top;
    const i = Math.floor((y - AXIS + scroller.scrollTop) / ROW);
    if (y > AXIS && i >= 0 && i < shown.length) select(shown[i]);
  });
  $("step-filter").addEventListener("input", (ev) => {
    const q = ev.target.value.trim().toLowerCase();
    shown = q ? order.filter((k) => k.toLowerCase().includes(q)) : order;
    redraw();
  });

  // -- the chosen step ----------------------------------------------------------------------
  function drawStep() {
    if (!selected) return;
    const s = steps.get(selected);
    $("step-name").textContent = selected;
    const st = $("step-state");
    st.textContent = s ? s.state : "pending"; st.className = "status step-" + (s ? s.state : "pending");
    const f = s && s.failure;
    $("step-failure").hidden = !f;
    if (f) { $("step-failure-message").textContent = `${f.kind || ""} ${f.error_class || ""}: ${f.message || ""}`; $("step-traceback").textContent = f.traceback || ""; }
  }
  async function select(key) {
    selected = key; logLast = 0;
    $("logs").replaceChildren();
    drawStep(); redraw();
    await pollLogs();
  }
  async function pollLogs() {
    if (!selected) return;
    const key = selected;
    for (;;) {
      const data = await RY.getJSON(`${api}/logs?step=${encodeURIComponent(key)}&after=${logLast}`);
      if (key !== selected) return;
      const frag = document.createDocumentFragment();
      for (const [id, e] of data.logs) {
        if (id <= logLast) continue;
        logLast = id;
        const text = e.type === "STEP_LOG" ? (e.message || "") + "\n" : (e.data || {}).text || "";
        frag.append(RY.el("span", {class: "log-" + e.type}, text));
      }
      $("logs").append(frag);
      if (!data.more) return;
    }
  }

  // -- failed steps -------------------------------------------------------------------------
  function drawFailures() {
    const failed = order.filter((k) => steps.get(k).state === "failed");
    $("failures-section").hidden = !failed.length;
    const box = $("failures");
    if (box.dataset.count === String(failed.length)) return;
    box.dataset.count = String(failed.length);
    box.replaceChildren(...failed.slice(0, 50).map((k) => {
      const f = steps.get(k).failure || {};
      const d = RY.el("details", {class: "failure", "data-step": k},
        RY.el("summary", {}, RY.el("code", {}, k), ` ${f.kind || ""}: ${f.message || ""}`),
        RY.el("pre", {}, f.traceback || "(no traceback)"));
      return d;
    }));
    if (failed.length > 50) box.append(RY.el("p", {class: "muted"}, `… and ${failed.length - 50} more`));
  }

  // -- the step graph -----------------------------------------------------------------------
  async function loadGraph() {
    const data = await RY.getJSON(api + "/graph");
    if (data.error) { $("graph-note").textContent = data.error; return; }
    graph = data.steps;
    for (const [k] of graph) step(k);
    $("graph-note").textContent = `${graph.length} step(s); click one to see it.`;
    redraw();
  }
  let graphLayout = null;
  function drawGraph() {
    if (!graph) return;
    const c = $("graph");
    if (!graphLayout) {
      const depth = new Map(), cols = [];
      for (const [k, ups] of graph) {
        let d = 0;
        for (const u of ups) d = Math.max(d, (depth.get(u) ?? -1) + 1);
        depth.set(k, d);
        (cols[d] = cols[d] || []).push(k);
      }
      const pos = new Map();
      cols.forEach((keys, d) => keys.forEach((k, i) => pos.set(k, [d, i])));
      const rows = Math.max(...cols.map((c) => c.length));
      const scale = Math.min(1, 16000 / (rows * 28), 16000 / (cols.length * 190));
      graphLayout = {pos, rows, cols: cols.length, scale};
      c.width = Math.ceil(cols.length * 190 * scale) + 10; c.height = Math.ceil(rows * 28 * scale) + 10;
      c.addEventListener("click", (ev) => {
        const r = c.getBoundingClientRect();
        const gx = (ev.clientX - r.left) / scale, gy = (ev.clientY - r.top) / scale;
        const d = Math.floor(gx / 190), i = Math.floor(gy / 28);
        const key = (cols[d] || [])[i];
        if (key) select(key);
      });
    }
    const {pos, scale} = graphLayout, ctx = c.getContext("2d");
    ctx.setTransform(scale, 0, 0, scale, 0, 0);
    ctx.clearRect(0, 0, c.width / scale, c.height / scale);
    ctx.strokeStyle = "#aab"; ctx.beginPath();
    for (const [k, ups] of graph) {
      const [d, i] = pos.get(k);
      for (const u of ups) { const [du, iu] = pos.get(u) || [0, 0]; ctx.moveTo(du * 190 + 150, iu * 28 + 11); ctx.lineTo(d * 190, i * 28 + 11); }
    }
    ctx.stroke();
    ctx.font = "12px system-ui, sans-serif"; ctx.textBaseline = "middle";
    for (const [k] of graph) {
      const [d, i] = pos.get(k), s = steps.get(k);
      const state = s ? s.state : "pending";
      const color = {success: COLORS.success, failed: COLORS.failure, retrying: COLORS.retry, running: COLORS.running,
                     canceled: COLORS.canceled, skipped: COLORS.skipped}[state] || COLORS.pending;
      ctx.fillStyle = color; ctx.fillRect(d * 190, i * 28, 150, 22);
      if (k === selected) { ctx.strokeStyle = "#000"; ctx.strokeRect(d * 190, i * 28, 150, 22); }
      if (scale > 0.5) { ctx.fillStyle = ["pending", "skipped"].includes(state) ? "#222" : "#fff"; ctx.fillText(k.length > 22 ? k.slice(0, 21) + "…" : k, d * 190 + 4, i * 28 + 11); }
    }
  }

  // -- the run --------------------------------------------------------------------------------
  function drawRun() {
    if (!run) return;
    const st = $("run-status");
    st.textContent = run.status; st.className = "status status-" + run.status;
    $("run-duration").textContent = RY.fmtDuration(run.duration);
    $("run-started").textContent = RY.fmtTime(run.started_at);
    const finished = ["SUCCESS", "FAILURE", "CANCELED"].includes(run.status);
    $("cancel-form").hidden = finished || run.status === "CANCELING";
    $("reexecute-form").hidden = !["FAILURE", "CANCELED"].includes(run.status);
  }

  async function pollEvents() {
    for (;;) {
      const data = await RY.getJSON(`${api}/events?after=${lastId}`);
      serverSkew = data.now - Date.now() / 1000;
      run = data.run;
      for (const [id, e] of data.events) fold(id, e);
      lastId = data.last;
      if (!data.more) break;
    }
    drawRun();
    // Redraw what depends on the steps only when something happened; a running step's bar
    // grows with the clock, so the timeline is redrawn while the run goes on.
    if (changed) { changed = false; drawEventLog(); drawStep(); drawFailures(); drawGraph(); redraw(); }
    else if (!["SUCCESS", "FAILURE", "CANCELED"].includes(run.status)) redraw();
  }
  // ?step=KEY opens the page on that step (a link to one step's logs).
  const linked = new URLSearchParams(location.search).get("step");
  if (linked) { selected = linked; drawStep(); }
  let graphAsked = false, idle = 0;
  RY.poll(async () => {
    // A finished run changes rarely (an action's note, a deletion): look every ~2 s.
    if (run && ["SUCCESS", "FAILURE", "CANCELED"].includes(run.status) && ++idle % 7) return;
    await pollEvents();
    if (!graphAsked) {  // after the timeline: the plan recorded with the run, read once
      graphAsked = true;
      loadGraph().then(() => { changed = true; drawGraph(); }).catch((e) => { $("graph-note").textContent = String(e); });
    }
    await pollLogs();
  }, 300);
})();
