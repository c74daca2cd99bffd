// Helpers shared by the runs page and the run page (no framework, no build step).
"use strict";
const RY = {
  fmtDuration(s) {
    if (s === null || s === undefined) return "";
    if (s < 60) return s.toFixed(1) + "s";
    let m = Math.floor(s / 60), sec = Math.floor(s % 60), h = Math.floor(m / 60);
    m = m % 60;
    const p = (n) => String(n).padStart(2, "0");
    return h ? `${h}h${p(m)}m${p(sec)}s` : `${m}m${p(sec)}s`;
  },
  fmtTime(ts) {
    if (!ts) return "";
    const d = new Date(ts * 1000), p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  },
  el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  },
  async getJSON(url) {
    const r = await fetch(url, {headers: {"Accept": "application/json"}, credentials: "same-origin"});
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  },
  // Poll `fn` every `ms`, never two at once; a failed poll is retried on the next tick.
  poll(fn, ms) {
    let busy = false;
    const tick = async () => {
      if (busy) return;
      busy = true;
      try { await fn(); } catch (e) { console.warn(e); } finally { busy = false; }
    };
    tick();
    return setInterval(tick, ms);
  },
};
// A submitted action form is disabled at once: the server refuses repeats anyway (see actions.py).
document.addEventListener("submit", (ev) => {
  const b = ev.target.querySelector("button");
  if (b) { setTimeout(() => { b.disabled = true; }, 0); }
});
