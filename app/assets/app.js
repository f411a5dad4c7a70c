// gridproxy dashboard: polls the control API and draws plots on <canvas>.
// No external scripts: everything is served by gridproxy itself.
"use strict";

const KEEP_MS = 15 * 60 * 1000;
const POOL_COLORS = ["#3e9bff", "#f5a623", "#30a46c", "#b66dff", "#e5484d", "#12a594"];
const state = { points: [], pools: [], lastT: 0, lastSeq: 0, role: null, search: "", polling: false };

// The token lives in this tab's sessionStorage only: not in localStorage
// (it would outlive the session on a shared machine) and never in the URL
// (history, logs, Referer).
function token() { return sessionStorage.getItem("gridproxy.token") || ""; }
function setToken(t) { sessionStorage.setItem("gridproxy.token", t); }
try { localStorage.removeItem("gridproxy.token"); } catch (_) { /* older versions kept it there */ }

async function api(path, opts = {}) {
  const headers = Object.assign({ "Authorization": "Bearer " + token() }, opts.headers || {});
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (r.status === 401) { document.getElementById("login").style.display = "inline"; }
  return { status: r.status, body };
}

// ---------- formatting ----------
function si(v, unit) {
  if (v == null || !isFinite(v)) return "–";
  const a = Math.abs(v);
  const p = [[1e18, "E"], [1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [m, s] of p) if (a >= m) return (v / m).toFixed(a / m >= 100 ? 0 : 1) + " " + s + unit;
  return v.toFixed(a >= 100 ? 0 : 1) + " " + unit;
}
function kw(v) { return v == null || !isFinite(v) ? "–" : (v >= 1000 ? (v / 1000).toFixed(2) + " MW" : v.toFixed(0) + " kW"); }
function clock(t) { const d = new Date(t); return d.toTimeString().slice(0, 8); }
function esc(s) { return String(s == null ? "" : s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

// ---------- plotting ----------
function setupCanvas(c) {
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  return { g, w, h };
}

// series: [{name, color, pts: [[t, v], ...], step, dash, fill}], opts: {fmt, stacked, min0}
function plot(canvas, series, opts) {
  const { g, w, h } = setupCanvas(canvas);
  const L = 58, R = 10, T = 18, B = 22;
  let tmin = Infinity, tmax = -Infinity, vmin = opts.min0 ? 0 : Infinity, vmax = -Infinity, n = 0;
  for (const s of series) for (const [t, v] of s.pts) {
    if (v == null || !isFinite(v)) continue;
    n++; tmin = Math.min(tmin, t); tmax = Math.max(tmax, t); vmin = Math.min(vmin, v); vmax = Math.max(vmax, v);
  }
  canvas.dataset.points = String(n);
  g.font = "11px system-ui, sans-serif";
  if (!n) { g.fillStyle = "#8a97a6"; g.fillText("waiting for data…", L + 10, T + 30); return; }
  if (tmax - tmin < 20000) tmin = tmax - 20000;
  if (vmax <= vmin) vmax = vmin + 1;
  const pad = (vmax - vmin) * 0.08; vmax += pad; if (!opts.min0) vmin -= pad;
  const X = t => L + (t - tmin) / (tmax - tmin) * (w - L - R);
  const Y = v => T + (1 - (v - vmin) / (vmax - vmin)) * (h - T - B);
  // grid
  g.strokeStyle = "#2a3542"; g.fillStyle = "#8a97a6"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = vmin + (vmax - vmin) * i / 4, y = Y(v);
    g.beginPath(); g.moveTo(L, y); g.lineTo(w - R, y); g.stroke();
    g.fillText(opts.fmt(v), 4, y + 4);
  }
  for (let i = 0; i <= 4; i++) {
    const t = tmin + (tmax - tmin) * i / 4, x = X(t);
    g.fillText(clock(t), Math.min(x - 22, w - R - 48), h - 6);
  }
  // series
  let lx = L + 6;
  for (const s of series) {
    const pts = s.pts.filter(p => p[1] != null && isFinite(p[1]));
    g.strokeStyle = s.color; g.fillStyle = s.color; g.lineWidth = s.width || 1.8;
    g.setLineDash(s.dash || []);
    if (pts.length) {
      g.beginPath();
      pts.forEach(([t, v], i) => {
        const x = X(t), y = Y(v);
        if (i === 0) g.moveTo(x, y);
        else if (s.step) { g.lineTo(x, Y(pts[i - 1][1])); g.lineTo(x, y); }
        else g.lineTo(x, y);
      });
      g.stroke();
      if (s.fillTo) {
        const base = s.fillTo;
        g.lineTo(X(pts[pts.length - 1][0]), Y(base(pts.length - 1)));
        for (let i = pts.length - 1; i >= 0; i--) g.lineTo(X(pts[i][0]), Y(base(i)));
        g.closePath(); g.globalAlpha = 0.25; g.fill(); g.globalAlpha = 1;
      }
    }
    g.setLineDash([]);
    g.fillRect(lx, 5, 10, 3); g.fillStyle = "#d8dee6"; g.fillText(s.name, lx + 14, 11);
    lx += 24 + g.measureText(s.name).width;
  }
}

function redraw() {
  const P = state.points;
  const pw = document.getElementById("plot-power");
  plot(pw, [
    { name: "site kW", color: "#f5a623", pts: P.map(p => [p.t, p.site_kw]) },
    { name: "target kW", color: "#e5484d", pts: P.map(p => [p.t, p.target_kw]), step: true, dash: [6, 4] },
    { name: "planned kW", color: "#6e7bff", pts: P.map(p => [p.t, p.expected_kw]), width: 1, dash: [2, 3] },
  ], { fmt: v => v.toFixed(0) + " kW", min0: true });
  plot(document.getElementById("plot-hashrate"), [
    { name: "fleet H/s", color: "#30a46c", pts: P.map(p => [p.t, p.hashrate_hs]) },
  ], { fmt: v => si(v, "H/s"), min0: true });
  plot(document.getElementById("plot-price"), [
    { name: "$/MWh", color: "#3e9bff", pts: P.map(p => [p.t, p.price]), step: true },
  ], { fmt: v => "$" + v.toFixed(0), min0: P.every(p => p.price == null || p.price >= 0) });
  // stacked pool split
  const stacks = state.pools.map(() => []);
  const cum = P.map(() => 0);
  const series = state.pools.map((name, i) => {
    const pts = P.map((p, j) => { const v = (p.pools_hs[i] || 0); const base = cum[j]; cum[j] += v; stacks[i].push(base); return [p.t, cum[j]]; });
    return { name, color: POOL_COLORS[i % POOL_COLORS.length], pts, fillTo: k => stacks[i][k] };
  });
  plot(document.getElementById("plot-pools"), series, { fmt: v => si(v, "H/s"), min0: true });
  const last = P[P.length - 1];
  if (last) {
    const tot = last.pools_hs.reduce((a, b) => a + b, 0) || 1;
    document.getElementById("l-pools").textContent = state.pools.map((n, i) => n + " " + (100 * (last.pools_hs[i] || 0) / tot).toFixed(0) + "%").join(" · ");
    document.getElementById("l-power").textContent = kw(last.site_kw) + (last.target_kw != null ? " / cap " + kw(last.target_kw) : "");
    document.getElementById("l-hash").textContent = si(last.hashrate_hs, "H/s");
    document.getElementById("l-price").textContent = last.price != null ? "$" + last.price.toFixed(0) + "/MWh" : "";
  }
}

// ---------- polling ----------
async function pollHistory() {
  const r = await api("/api/v1/history?since=" + state.lastT);
  if (r.status !== 200 || !r.body) return;
  state.pools = r.body.pools;
  for (const p of r.body.points) { state.points.push(p); state.lastT = Math.max(state.lastT, p.t); }
  const cut = state.lastT - KEEP_MS;
  while (state.points.length && state.points[0].t < cut) state.points.shift();
  redraw();
}

async function pollFleet() {
  const r = await api("/api/v1/fleet");
  if (r.status !== 200 || !r.body) return;
  document.getElementById("login").style.display = "none";
  const f = r.body, s = f.site;
  document.getElementById("c-miners").textContent = f.miners_connected;
  document.getElementById("c-hash").textContent = si(f.hashrate_hs, "H/s");
  document.getElementById("c-kw").textContent = s.attached ? kw(s.site_kw) : "–";
  document.getElementById("c-target").textContent = s.target_kw != null ? kw(s.target_kw) : "none";
  document.getElementById("c-price").textContent = s.price_usd_per_mwh != null ? "$" + s.price_usd_per_mwh.toFixed(0) + "/MWh" : "–";
  document.getElementById("c-mode").textContent = s.mode || "–";
  document.getElementById("c-mode-chip").className = "chip mode-" + (s.mode || "");
  // A failing ledger or a stopped driver is shown, not hidden (as /healthz does).
  const alarm = [];
  if (s.attached && s.driver_running === false) alarm.push("curtailment driver stopped");
  if (s.attached && s.ledger && s.ledger.error) alarm.push("ledger failing " + (s.ledger.failing_secs || 0) + " s: " + s.ledger.error + (s.ledger.fault_engaged ? " (safe state, commands unrecorded)" : ""));
  const al = document.getElementById("alarm");
  al.textContent = alarm.join(" · ");
  al.style.display = alarm.length ? "" : "none";
  document.getElementById("c-curtailed").textContent = s.attached ? s.miners_curtailed + "/" + s.miners_total : "–";
  const rej = Object.values(f.shares.rejected).reduce((a, b) => a + b, 0);
  document.getElementById("c-shares").textContent = f.shares.accepted + " ok / " + rej + " rej";
  const sel = document.getElementById("ct-pool");
  if (sel.options.length !== f.pools.length) {
    sel.innerHTML = f.pools.map(p => `<option value="${esc(p.name)}">${esc(p.name)}</option>`).join("");
  }
}

async function pollEvents() {
  const r = await api("/api/v1/events?after=" + state.lastSeq);
  if (r.status !== 200 || !r.body) return;
  const ev = r.body.events || [];
  const box = document.getElementById("events-active");
  box.innerHTML = ev.length ? ev.map(e => `<div class="ev ${esc(e.state)}"><b>${esc(e.id)}</b> · ${esc(e.state)} · ${esc(e.target)}<br><span class="dim">${clock(e.start_ms)} → ${e.end_ms ? clock(e.end_ms) : "open"}</span></div>`).join("") : '<span class="dim">none</span>';
  document.getElementById("override").textContent = r.body.override ? "override: " + r.body.override : "";
  const log = document.getElementById("log");
  for (const e of r.body.log) {
    state.lastSeq = Math.max(state.lastSeq, e.seq);
    const d = document.createElement("div");
    d.className = "k-" + e.kind;
    d.textContent = clock(e.at_ms) + " " + e.kind + ": " + e.message;
    log.prepend(d);
  }
  while (log.childElementCount > 200) log.lastElementChild.remove();
}

async function pollWorkers() {
  const q = encodeURIComponent(state.search);
  const r = await api("/api/v1/workers?limit=200&q=" + q);
  if (r.status !== 200 || !r.body) return;
  document.getElementById("w-count").textContent = r.body.matched + " of " + r.body.total;
  const rows = r.body.workers.map(w => {
    const st = (w.state || "").split(" ")[0];
    return `<tr><td>${esc(w.name)}</td><td>${esc(w.model || "")}</td><td>${esc(w.firmware || "")}</td>` +
      `<td class="st-${esc(st)}">${esc(w.state || (w.connections ? "connected" : "offline"))}</td>` +
      `<td class="num">${w.power_w != null ? w.power_w.toFixed(0) : ""}</td><td class="num">${si(w.hashrate_hs, "")}</td>` +
      `<td class="num">${w.accepted}</td><td class="num">${w.rejected}</td></tr>`;
  });
  document.querySelector("#workers tbody").innerHTML = rows.join("");
}

async function whoami() {
  const r = await api("/api/v1/whoami");
  document.getElementById("role").textContent = r.status === 200 ? r.body.name + " (" + r.body.role + ")" : "";
  state.role = r.status === 200 ? r.body.role : null;
}

let tick = 0;
async function loop() {
  if (state.polling) return;
  state.polling = true;
  try {
    await pollHistory();
    await pollFleet();
    await pollEvents();
    if (tick % 2 === 0) await pollWorkers();
  } catch (e) { console.error(e); }
  state.polling = false;
  tick++;
}

// ---------- controls ----------
document.getElementById("token-save").addEventListener("click", () => {
  setToken(document.getElementById("token").value.trim());
  document.getElementById("token").value = "";
  whoami(); loop();
});
let searchTimer = null;
document.getElementById("worker-search").addEventListener("input", e => {
  state.search = e.target.value;
  clearTimeout(searchTimer); searchTimer = setTimeout(pollWorkers, 200);
});
document.getElementById("curtail-form").addEventListener("submit", async e => {
  e.preventDefault();
  const action = document.getElementById("ct-action").value;
  const body = { action };
  if (["park", "unpark", "move", "unpin"].includes(action)) body.workers = document.getElementById("ct-workers").value.trim();
  if (action === "move") body.pool = document.getElementById("ct-pool").value;
  if (action === "cap_kw" || action === "shed_kw") body.kw = parseFloat(document.getElementById("ct-kw").value);
  const out = document.getElementById("curtail-result");
  out.className = ""; out.textContent = "…";
  const r = await api("/api/v1/curtail", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (r.status === 200) { out.className = "ok"; out.textContent = "✓ " + r.body.message; }
  else { out.className = "bad"; out.textContent = r.status + ": " + (r.body && r.body.error || "failed"); }
  loop();
});
window.addEventListener("resize", redraw);

whoami();
loop();
setInterval(loop, 2000);
