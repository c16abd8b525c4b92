// deltatune ui: one page, hash routes, plain DOM; charts are SVG drawn here (no library, nothing fetched online).
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const view = () => $("#view");
let timers = [];
let meta = null;
const COLORS = ["#2f6f8f", "#d1495b", "#66a182", "#edae49", "#8d5fd3", "#00798c", "#9c6644", "#52575d", "#e07a5f", "#3d405b"];

function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }
function clearTimers() { timers.forEach(clearInterval); timers = []; }

async function api(path, opts = {}) {
  const init = { headers: {}, credentials: "same-origin", ...opts };
  if (opts.json !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.json);
  }
  const r = await fetch(path, init);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (r.status === 401 && !path.startsWith("/api/playground")) { location.href = "/login"; }
  if (!r.ok) throw new Error((body && body.error) || `HTTP ${r.status}`);
  return body;
}

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "html") el.innerHTML = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fmt(v, key = "") {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (/bytes/.test(key)) return fmtBytes(v);
  if (/params/.test(key)) return fmtCount(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(3);
  return Number(v.toPrecision(4)).toString();
}
function fmtBytes(n) {
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${Number(n.toPrecision(3))} ${u[i]}`;
}
function fmtCount(n) {
  if (n >= 1e9) return `${Number((n / 1e9).toPrecision(3))}B`;
  if (n >= 1e6) return `${Number((n / 1e6).toPrecision(3))}M`;
  if (n >= 1e3) return `${Number((n / 1e3).toPrecision(3))}K`;
  return String(n);
}
function age(s) {
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}
function badge(status) {
  const cls = String(status || "").split(/[ ,]/)[0];
  return h("span", { class: `badge ${cls}`, "data-status": status }, status);
}
function runLink(r) {
  const page = r.kind === "compare" ? "compare" : "run";
  return r.kind === "foreign" || r.kind === "starting" ? h("span", {}, r.name) : h("a", { href: `#/${page}?path=${encodeURIComponent(r.path)}` }, r.path || r.name);
}
function shortPath(p) {
  if (!p) return "–";
  const s = String(p);
  return s.length > 38 ? "…" + s.slice(-37) : s;
}

// ---- charts ---------------------------------------------------------------------------------------------
function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) { const d = Math.abs(lo) || 1; lo -= d / 2; hi += d / 2; }
  const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= step0) || step0;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}
const SVGNS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// series: [{name, points: [[x, y], ...], color, dash}]
function lineChart(title, series, { logY = false, xLabel = "step", id = null } = {}) {
  const W = 420, H = 220, L = 52, R = 12, T = 10, B = 28;
  const box = h("div", { class: "chart", "data-chart": id || title });
  box.append(h("h3", {}, title));
  const pts = series.flatMap(sr => sr.points).filter(p => Number.isFinite(p[1]) && (!logY || p[1] > 0));
  box.setAttribute("data-points", String(pts.length));
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  box.append(svg);
  if (!pts.length) { svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet")); return box; }
  const fy = v => logY ? Math.log10(v) : v;
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  if (x1 === x0) { x1 = x0 + 1; }
  let y0 = Math.min(...pts.map(p => fy(p[1]))), y1 = Math.max(...pts.map(p => fy(p[1])));
  const yt = logY ? (() => { const a = Math.floor(y0), b = Math.ceil(y1 === y0 ? y0 + 1 : y1); const t = []; for (let i = a; i <= b; i++) t.push(i); return t; })() : niceTicks(y0, y1);
  y0 = Math.min(y0, yt[0]); y1 = Math.max(y1, yt[yt.length - 1]);
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = y => T + (1 - (y - y0) / ((y1 - y0) || 1)) * (H - T - B);
  for (const t of yt) {
    svg.append(s("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), class: "grid" }));
    svg.append(s("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end" }, logY ? fmt(Math.pow(10, t)) : fmt(t)));
  }
  for (const t of niceTicks(x0, x1, 6).filter(t => t >= x0 && t <= x1)) {
    svg.append(s("text", { x: X(t), y: H - 10, "text-anchor": "middle" }, fmt(t)));
  }
  svg.append(s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  svg.append(s("text", { x: W - R, y: H - 1, "text-anchor": "end" }, xLabel));
  const legend = h("div", { class: "legend" });
  series.forEach((sr, i) => {
    const color = sr.color || COLORS[i % COLORS.length];
    const p = sr.points.filter(q => Number.isFinite(q[1]) && (!logY || q[1] > 0));
    if (!p.length) return;
    const d = p.map((q, j) => `${j ? "L" : "M"}${X(q[0]).toFixed(1)},${Y(fy(q[1])).toFixed(1)}`).join("");
    svg.append(s("path", { d, fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": sr.dash || "", "vector-effect": "non-scaling-stroke" }));
    if (p.length <= 40) p.forEach(q => {
      const c = s("circle", { cx: X(q[0]), cy: Y(fy(q[1])), r: 2.5, fill: color });
      c.append(s("title", {}, `${sr.name} @ ${q[0]}: ${fmt(q[1])}`));
      svg.append(c);
    });
    legend.append(h("span", {}, h("i", { style: `background:${color}` }), `${sr.name} (${fmt(p[p.length - 1][1])})`));
  });
  box.append(legend);
  return box;
}

// items: [{name, value, color}]
function barChart(title, items, { logY = false, id = null } = {}) {
  const W = 420, H = 220, L = 58, R = 10, T = 10, B = 40;
  const box = h("div", { class: "chart", "data-chart": id || title });
  box.append(h("h3", {}, title + (logY ? " (log)" : "")));
  const ok = items.filter(it => Number.isFinite(it.value) && (!logY || it.value > 0));
  box.setAttribute("data-points", String(ok.length));
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  box.append(svg);
  if (!ok.length) { svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data")); return box; }
  const fy = v => logY ? Math.log10(v) : v;
  let hi = Math.max(...ok.map(it => fy(it.value))), lo = logY ? Math.floor(Math.min(...ok.map(it => fy(it.value)))) : Math.min(0, ...ok.map(it => it.value));
  if (!logY) hi = hi + (hi - lo) * 0.12;  // room for the value labels above the bars
  const ticks = logY ? (() => { const t = []; for (let i = lo; i <= Math.ceil(hi + 0.15); i++) t.push(i); return t; })() : niceTicks(lo, hi);
  hi = Math.max(hi, ticks[ticks.length - 1]); lo = Math.min(lo, ticks[0]);
  const Y = y => T + (1 - (y - lo) / ((hi - lo) || 1)) * (H - T - B);
  for (const t of ticks) {
    svg.append(s("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), class: "grid" }));
    svg.append(s("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end" }, logY ? fmt(Math.pow(10, t), id || "") : fmt(t)));
  }
  const bw = (W - L - R) / ok.length;
  ok.forEach((it, i) => {
    const x = L + i * bw + bw * 0.15, y = Y(fy(it.value)), base = Y(Math.max(lo, 0));
    const r = s("rect", { x, y: Math.min(y, base), width: bw * 0.7, height: Math.max(1, Math.abs(base - y)), fill: it.color || COLORS[i % COLORS.length] });
    r.append(s("title", {}, `${it.name}: ${fmt(it.value)}`));
    svg.append(r);
    svg.append(s("text", { x: x + bw * 0.35, y: Math.min(y, base) - 3, "text-anchor": "middle" }, fmt(it.value, id || "")));
    svg.append(s("text", { x: x + bw * 0.35, y: H - B + 14, "text-anchor": "middle" }, it.name));
  });
  svg.append(s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  return box;
}

// ---- runs list -------------------------------------------------------------------------------------------
async function pageRuns() {
  const v = view();
  v.replaceChildren(h("h1", {}, "Runs"), h("div", { id: "runs-box" }, h("p", { class: "muted" }, "loading…")));
  every(2000, async () => {
    let data;
    try { data = await api("/api/runs"); } catch (e) { $("#runs-box").replaceChildren(h("p", { class: "error" }, e.message)); return; }
    $("#root").textContent = data.root;
    if (!data.runs.length) {
      $("#runs-box").replaceChildren(h("p", { class: "muted" }, `No runs under ${data.root} yet. `, h("a", { href: "#/launch" }, "Launch one"), "."));
      return;
    }
    const rows = data.runs.map(r => h("tr", { "data-path": r.path, "data-kind": r.kind, class: r.problems && r.problems.length ? "problem" : "" },
      h("td", {}, runLink(r)),
      h("td", {}, r.kind),
      h("td", {}, badge(r.status)),
      h("td", {}, r.method || "–"),
      h("td", { title: r.model || "" }, shortPath(r.model)),
      h("td", { title: r.data || "" }, shortPath(r.data)),
      h("td", { class: "num" }, r.best ? `${r.best.name.replace("eval_", "")} ${fmt(r.best.value)}` + (r.best.method ? ` (${r.best.method})` : "") : "–"),
      h("td", { class: "num" }, age(r.age_s)),
      h("td", { class: "warn notes", title: (r.problems || []).join("\n") }, (r.problems || []).length ? "⚠ " + r.problems.join("; ") : ""),
    ));
    $("#runs-box").replaceChildren(h("div", { class: "scroll" }, h("table", { id: "runs-table" },
      h("thead", {}, h("tr", {}, ["run", "kind", "status", "method", "model", "data", "best eval", "age", "notes"].map(t => h("th", { class: ["best eval", "age"].includes(t) ? "num" : "" }, t)))),
      h("tbody", {}, rows))));
  });
}

// ---- one train run ---------------------------------------------------------------------------------------
const CURVES = [
  ["loss", "loss", ["train_loss", "train_loss_smoothed", "eval_loss"], false],
  ["eval", "eval metric", ["eval_accuracy", "eval_f1", "eval_perplexity"], false],
  ["tokens", "real tokens/s", ["tokens_per_s"], false],
  ["samples", "samples/s", ["samples_per_s"], false],
  ["memory", "memory (MB)", ["peak_mem_mb", "mem_mb", "memory_mb", "gpu_mem_mb"], false],
  ["lr", "learning rate", ["lr"], false],
  ["grad", "gradient norm", ["grad_norm"], false],
];

async function pageRun(params) {
  const path = params.get("path");
  const v = view();
  const state = { rows: [], next: 0, overlay: {} };
  const head = h("div", { id: "run-head" }), charts = h("div", { class: "charts", id: "run-charts" }), extra = h("div");
  v.replaceChildren(h("h1", {}, "Run ", h("code", {}, path)), head, charts, extra);
  let info;
  try { info = await api(`/api/run?path=${encodeURIComponent(path)}`); } catch (e) { head.replaceChildren(h("p", { class: "error" }, e.message)); return; }
  const others = (await api("/api/runs")).runs.filter(r => r.kind === "train" && r.path !== path);
  const overlaySel = h("select", { id: "overlay", multiple: true, size: Math.min(4, Math.max(2, others.length)), onchange: async () => {
    state.overlay = {};
    for (const o of overlaySel.selectedOptions) state.overlay[o.value] = (await api(`/api/metrics?path=${encodeURIComponent(o.value)}`)).rows;
    draw();
  } }, others.map(r => h("option", { value: r.path }, r.path)));
  function renderHead() {
    const c = info.config || {};
    head.replaceChildren(h("div", { class: "card" },
      h("div", { class: "row" }, badge(info.status), h("span", { id: "run-steps" }, `step ${info.steps}${info.total_steps ? " / " + info.total_steps : ""}`),
        info.resumable && info.status !== "running" ? h("button", { id: "resume", onclick: resume }, "Resume") : null),
      h("div", { class: "kv", style: "margin-top:8px" },
        ["method", "model", "data", "task"].flatMap(k => [h("b", {}, k), h("span", {}, String(c[k] ?? info[k] ?? "–"))]),
        h("b", {}, "lr"), h("span", {}, c.lr ?? "method default"),
        h("b", {}, "checkpoints"), h("span", {}, (info.checkpoints || []).join(", ") || "none"),
        h("b", {}, "best"), h("span", {}, info.best ? `${info.best.name} ${fmt(info.best.value)} at step ${info.best.step}` : "–")),
      (info.problems || []).length ? h("p", { class: "warn" }, "⚠ " + info.problems.join("; ")) : null));
  }
  async function resume() {
    try { const job = await api("/api/jobs", { json: { kind: "train", resume: path } }); location.hash = `#/job?id=${job.id}`; }
    catch (e) { head.append(h("p", { class: "error" }, e.message)); }
  }
  function draw() {
    const out = [];
    for (const [id, title, keys, logY] of CURVES) {
      const series = keys.filter(k => state.rows.some(r => typeof r[k] === "number")).map(k => ({ name: k, points: state.rows.filter(r => typeof r[k] === "number").map(r => [r.step, r[k]]) }));
      if (id === "loss") for (const [p, rows] of Object.entries(state.overlay)) series.push({ name: `${p}: train_loss`, dash: "4 3", points: rows.filter(r => typeof r.train_loss === "number").map(r => [r.step, r.train_loss]) });
      if (series.length || id === "loss") out.push(lineChart(title, series, { id, logY }));
    }
    charts.replaceChildren(...out);
  }
  renderHead();
  if (others.length) extra.append(h("h2", {}, "Overlay other runs' loss"), overlaySel);
  if (info.summary) extra.append(h("h2", {}, "Summary"), h("div", { class: "card kv", id: "summary" }, Object.entries(info.summary).filter(([, x]) => typeof x !== "object" || x === null).flatMap(([k, x]) => [h("b", {}, k), h("span", {}, fmt(x, k))])));
  every(1000, async () => {
    let m;
    try { m = await api(`/api/metrics?path=${encodeURIComponent(path)}&since=${state.next}`); } catch (e) { return; }
    const grew = m.rows.length > 0 || m.status !== info.status;
    state.rows.push(...m.rows); state.next = m.next;
    if (m.status !== info.status) { info = await api(`/api/run?path=${encodeURIComponent(path)}`); renderHead(); }
    else if (m.rows.length) { info.steps = Math.max(info.steps, ...m.rows.map(r => r.step)); $("#run-steps").textContent = `step ${info.steps}${info.total_steps ? " / " + info.total_steps : ""}`; }
    if (grew || !charts.children.length) draw();
  });
}

// ---- a compare folder ------------------------------------------------------------------------------------
const LOG_METRICS = new Set(["trainable_params", "total_params", "checkpoint_bytes"]);
const CHART_METRICS = ["eval_accuracy", "eval_f1", "eval_perplexity", "eval_loss", "train_loss", "samples_per_s", "steps_per_s", "runtime_s", "peak_mem_mb", "trainable_params", "checkpoint_bytes", "latency_ms.b1", "latency_ms.b1_merged", "latency_ms.b32"];

function flatRecord(rec) {
  const out = {};
  for (const [k, v] of Object.entries(rec)) {
    if (typeof v === "number") out[k] = v;
    else if (v && typeof v === "object" && !Array.isArray(v)) for (const [k2, v2] of Object.entries(v)) if (typeof v2 === "number") out[`${k}.${k2}`] = v2;
  }
  return out;
}

async function pageCompare(params) {
  const path = params.get("path");
  const v = view();
  v.replaceChildren(h("h1", {}, "Compare ", h("code", {}, path)), h("p", { class: "muted" }, "loading…"));
  let info;
  try { info = await api(`/api/run?path=${encodeURIComponent(path)}`); } catch (e) { v.append(h("p", { class: "error" }, e.message)); return; }
  const res = info.results;
  const head = h("div", { class: "card" }, h("div", { class: "row" }, badge(info.status),
    h("span", {}, `model ${info.model || "–"}, data ${info.data || "–"}, task ${info.task || "–"}`)),
    (info.problems || []).length ? h("p", { class: "warn" }, "⚠ " + info.problems.join("; ")) : null);
  if (!res) {
    v.replaceChildren(h("h1", {}, "Compare ", h("code", {}, path)), head, h("p", { class: "muted" }, "No results.json yet (still running, or stopped). Methods started: " + (info.runs || []).join(", ")));
    if (info.status === "running") timers.push(setTimeout(() => pageCompare(params), 3000));
    return;
  }
  const records = res.methods.filter(r => r && typeof r === "object");
  const flat = records.map(flatRecord);
  const keys = [...new Set(flat.flatMap(Object.keys))];
  const order = k => { const i = CHART_METRICS.indexOf(k); return i < 0 ? 100 : i; };
  keys.sort((a, b) => order(a) - order(b));
  const on = Object.fromEntries(records.map(r => [r.method, true]));
  const toggles = h("div", { class: "checks", id: "method-toggles" }, records.map((r, i) => h("label", {},
    h("input", { type: "checkbox", checked: true, value: r.method, onchange: e => { on[r.method] = e.target.checked; draw(); } }),
    h("span", { style: `color:${COLORS[i % COLORS.length]}` }, " ■ "), r.method)));
  const table = h("table", { id: "compare-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "method"), h("th", {}, "status"), keys.map(k => h("th", { class: "num" }, k)))),
    h("tbody", {}, records.map((r, i) => h("tr", { "data-method": r.method },
      h("td", {}, h("b", { style: `color:${COLORS[i % COLORS.length]}` }, r.method)),
      h("td", {}, r.status === "ok" || !r.status ? badge("completed") : h("span", { title: r.error || "" }, badge("failed"), " ", (r.error || "").slice(0, 60))),
      keys.map(k => h("td", { class: "num", "data-key": k, "data-value": flat[i][k] ?? "" }, fmt(flat[i][k], k)))))));
  const charts = h("div", { class: "charts", id: "compare-charts" });
  const curves = h("div", { class: "charts", id: "compare-curves" });
  v.replaceChildren(h("h1", {}, "Compare ", h("code", {}, path)), head, h("h2", {}, "Methods"), toggles,
    h("div", { class: "scroll", style: "margin-top:8px" }, table), h("h2", {}, "Charts"), charts, h("h2", {}, "Training curves"), curves);
  const curveRows = {};
  for (const sub of info.runs || []) {
    try { curveRows[sub] = (await api(`/api/metrics?path=${encodeURIComponent(path + "/" + sub)}`)).rows; } catch (e) { /* a method without metrics */ }
  }
  function draw() {
    const colorOf = Object.fromEntries(records.map((r, i) => [r.method, COLORS[i % COLORS.length]]));
    for (const tr of table.tBodies[0].rows) tr.style.opacity = on[tr.dataset.method] ? 1 : 0.35;
    charts.replaceChildren(...keys.filter(k => CHART_METRICS.includes(k) || k.startsWith("latency_ms.")).map(k => barChart(k, records.map((r, i) => ({ name: r.method, value: flat[i][k], color: colorOf[r.method] })).filter(it => on[it.name]), { logY: LOG_METRICS.has(k), id: k })));
    const series = (key) => Object.entries(curveRows).filter(([m]) => on[m]).map(([m, rows]) => ({ name: m, color: colorOf[m], points: rows.filter(r => typeof r[key] === "number").map(r => [r.step, r[key]]) }));
    curves.replaceChildren(lineChart("train loss", series("train_loss"), { id: "curve-train_loss" }), lineChart("samples/s", series("samples_per_s"), { id: "curve-samples_per_s" }));
  }
  draw();
}

// ---- launch form -----------------------------------------------------------------------------------------
async function pageLaunch(params) {
  meta = meta || await api("/api/meta");
  const v = view();
  const kind = params.get("kind") || "compare";
  const f = (name, input, help) => [h("label", { for: name }, name.replace("_", " ")), h("div", {}, input, help ? h("div", { class: "muted" }, help) : null)];
  const methodChecks = h("div", { class: "checks", id: "methods" }, meta.methods.map(m => h("label", {}, h("input", { type: "checkbox", name: "methods", value: m, checked: meta.compare_methods.includes(m) }), " ", m)));
  const methodSel = h("select", { id: "method", name: "method" }, meta.methods.map(m => h("option", { value: m, selected: m === "lora" }, m)));
  const trackers = h("div", { class: "checks" }, meta.trackers.map(t => h("label", {}, h("input", { type: "checkbox", name: "report_to", value: t }), " ", t)));
  const err = h("div", { id: "launch-error" });
  const form = h("form", { class: "grid", id: "launch-form", onsubmit: submit },
    h("label", {}, "command"), h("div", { class: "row" },
      h("label", {}, h("input", { type: "radio", name: "kind", value: "compare", checked: kind === "compare", onchange: () => { location.hash = "#/launch?kind=compare"; } }), " deltatune compare"),
      h("label", {}, h("input", { type: "radio", name: "kind", value: "train", checked: kind === "train", onchange: () => { location.hash = "#/launch?kind=train"; } }), " deltatune train")),
    f("model", h("input", { type: "text", id: "model", name: "model", value: meta.default_model, list: "models" }), "a Hugging Face model folder, a hub name, or embedded:minilm"),
    f("data", h("input", { type: "text", id: "data", name: "data", value: "builtin:spam" }), "JSONL/CSV/Parquet/text file, a save_to_disk folder, or builtin:spam|quotes"),
    f("task", h("select", { id: "task", name: "task" }, h("option", { value: "seq-cls" }, "seq-cls (classification)"), h("option", { value: "causal-lm" }, "causal-lm"))),
    kind === "compare" ? f("methods", methodChecks) : f("method", methodSel),
    f("steps", h("input", { type: "number", id: "steps", name: "steps", value: kind === "compare" ? 60 : 40, min: 1 })),
    f("lr", h("input", { type: "text", id: "lr", name: "lr", placeholder: kind === "compare" ? "lora=1e-3,full=5e-5 (default: each method's own)" : "default: the method's own" })),
    f("batch_size", h("input", { type: "number", id: "batch_size", name: "batch_size", placeholder: "8", min: 1 })),
    f("name", h("input", { type: "text", id: "name", name: "name", placeholder: "output folder under the runs folder (default: a dated name)" })),
    f("report_to", trackers),
    h("span"), h("div", {}, h("button", { type: "submit", id: "launch-submit" }, `Start deltatune ${kind}`)),
    h("span"), err);
  v.replaceChildren(h("h1", {}, "Launch"), h("datalist", { id: "models" }, (meta.models || []).map(m => h("option", { value: m }))), h("div", { class: "card" }, form));
  async function submit(e) {
    e.preventDefault();
    const fd = new FormData(form);
    const body = { kind };
    for (const [k, val] of fd.entries()) {
      if (k === "methods" || k === "report_to") (body[k] = body[k] || []).push(val);
      else if (k !== "kind") body[k] = val;
    }
    err.replaceChildren();
    $("#launch-submit").disabled = true;
    try { const job = await api("/api/jobs", { json: body }); location.hash = `#/job?id=${job.id}`; }
    catch (x) { err.replaceChildren(h("div", { class: "error" }, x.message)); }
    finally { const b = $("#launch-submit"); if (b) b.disabled = false; }
  }
}

// ---- jobs ------------------------------------------------------------------------------------------------
function terminal(text) {
  // progress bars rewrite their line with \r: keep what the line shows last
  return text.split("\n").map(line => { const parts = line.split("\r").filter(p => p.length); return parts.length ? parts[parts.length - 1] : ""; }).join("\n");
}

function outLink(job) {
  const root = $("#root").textContent;
  const rel = root && job.out.startsWith(root) ? job.out.slice(root.length + 1) : job.out;
  return h("a", { href: `#/${job.kind === "compare" ? "compare" : "run"}?path=${encodeURIComponent(rel)}`, id: "job-out" }, rel);
}

async function pageJob(params) {
  const id = params.get("id");
  const v = view();
  let raw = "", offset = 0, done = false;
  const pre = h("pre", { class: "log", id: "job-log" });
  const head = h("div", { class: "card", id: "job-head" });
  v.replaceChildren(h("h1", {}, "Job ", h("code", {}, id)), head, pre);
  if (!$("#root").textContent) { try { $("#root").textContent = (await api("/api/runs")).root; } catch (e) { /* shown below */ } }
  async function stop() { try { await api(`/api/jobs/${id}/stop`, { method: "POST" }); } catch (e) { head.append(h("p", { class: "error" }, e.message)); } }
  every(700, async () => {
    if (done) return;
    let j;
    try { j = await api(`/api/jobs/${encodeURIComponent(id)}?offset=${offset}`); } catch (e) { head.replaceChildren(h("p", { class: "error" }, e.message)); done = true; return; }
    raw += j.text; offset = j.offset;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
    pre.textContent = terminal(raw);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    head.replaceChildren(h("div", { class: "row" }, h("span", { id: "job-status" }, badge(j.status)), h("code", {}, j.command),
      j.status === "running" ? h("button", { class: "danger", id: "job-stop", onclick: stop }, "Stop (saves a checkpoint)") : null),
      h("p", {}, "output: ", outLink(j), j.returncode !== null ? `  (exit code ${j.returncode})` : ""));
    if (!["running", "stopping"].includes(j.status)) done = true;
  });
}

async function pageJobs() {
  const v = view();
  v.replaceChildren(h("h1", {}, "Jobs started here"), h("div", { id: "jobs-box" }));
  every(2000, async () => {
    const { jobs } = await api("/api/jobs");
    $("#jobs-box").replaceChildren(jobs.length ? h("table", {}, h("thead", {}, h("tr", {}, ["job", "status", "command"].map(t => h("th", {}, t)))),
      h("tbody", {}, jobs.map(j => h("tr", {}, h("td", {}, h("a", { href: `#/job?id=${j.id}` }, j.id)), h("td", {}, badge(j.status)), h("td", {}, h("code", {}, j.command))))))
      : h("p", { class: "muted" }, "No jobs yet. ", h("a", { href: "#/launch" }, "Launch one"), "."));
  });
}

// ---- playground ------------------------------------------------------------------------------------------
async function pagePlayground() {
  const v = view();
  const { adapters } = await api("/api/adapters");
  const opt = a => h("option", { value: a.path, "data-base": a.base_model || "" }, `${a.run} (${a.method || "?"}, ${a.task_type || "?"})`);
  const a1 = h("select", { id: "adapter1" }, h("option", { value: "" }, "— none —"), adapters.map(opt));
  const a2 = h("select", { id: "adapter2" }, h("option", { value: "" }, "— none —"), adapters.map(opt));
  const base = h("input", { type: "text", id: "base", placeholder: "default: the base the first adapter names", list: "bases" });
  const prompt = h("textarea", { id: "prompt", placeholder: "a prompt to continue, or a text to classify" });
  const maxNew = h("input", { type: "number", id: "max_new_tokens", value: 40, min: 1, max: 256 });
  const temp = h("input", { type: "number", id: "temperature", value: 0, min: 0, step: 0.1 });
  const out = h("div", { id: "answers", class: "answers" });
  const go = h("button", { id: "play-run", onclick: run }, "Answer");
  v.replaceChildren(h("h1", {}, "Playground"),
    h("datalist", { id: "bases" }, [...new Set(adapters.map(a => a.base_model).filter(Boolean))].map(b => h("option", { value: b }))),
    h("div", { class: "card" }, h("form", { class: "grid", onsubmit: e => { e.preventDefault(); run(); } },
      h("label", {}, "base model"), base, h("label", {}, "adapter 1"), a1, h("label", {}, "adapter 2"), a2,
      h("label", {}, "prompt / text"), prompt, h("label", {}, "max new tokens"), maxNew,
      h("label", {}, "temperature"), h("div", {}, temp, h("div", { class: "muted" }, "0 = greedy, the same answer as deltatune generate")),
      h("span"), h("div", {}, go))),
    ...(adapters.length ? [] : [h("p", { class: "muted" }, "No adapters under the runs folder yet: train one first.")]), out);
  async function run() {
    go.disabled = true;
    out.replaceChildren(h("p", { class: "muted", id: "play-wait" }, "loading the model and answering…"));
    try {
      const r = await api("/api/playground", { json: { base: base.value, adapters: [a1.value, a2.value].filter(Boolean), prompt: prompt.value, max_new_tokens: Number(maxNew.value), temperature: Number(temp.value) } });
      out.replaceChildren(...r.answers.map(a => h("div", { class: "card answer", "data-name": a.name },
        h("h3", {}, a.name), h("div", { class: "muted", style: "font-size:12px" }, a.path),
        a.text !== undefined ? h("div", { class: "text" }, a.text)
          : h("div", {}, a.scores.map((p, i) => h("div", { class: "row", style: "margin:3px 0" }, h("span", { style: "width:90px" }, (a.labels || [])[i] ?? i), h("div", { class: "bar", style: `width:${Math.round(p * 200)}px` }), h("span", { class: "score" }, p.toFixed(3))))))));
    } catch (e) { out.replaceChildren(h("div", { class: "error", id: "play-error" }, e.message)); }
    finally { go.disabled = false; }
  }
}

// ---- routing ---------------------------------------------------------------------------------------------
const ROUTES = { "": pageRuns, run: pageRun, compare: pageCompare, launch: pageLaunch, job: pageJob, jobs: pageJobs, playground: pagePlayground };
async function route() {
  clearTimers();
  const [page, query] = location.hash.replace(/^#\/?/, "").split("?");
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.nav === (page || "runs") || (page === "run" || page === "compare") && a.dataset.nav === "runs" || page === "job" && a.dataset.nav === "jobs");
  const fn = ROUTES[page] || pageRuns;
  try { await fn(new URLSearchParams(query || "")); } catch (e) { view().append(h("p", { class: "error" }, e.message)); }
}
window.addEventListener("hashchange", route);
route();
