// healthmesh web page: polls this agent's JSON and draws the mesh, verdicts, history and
// the agent's health. Plain DOM; no library, no network but this origin.
"use strict";

const $ = (id) => document.getElementById(id);
const RTT_STEPS = [0.5, 2, 10, 50, 200]; // ms: rtt-0 .. rtt-5
const STATE_NAMES = { r: "reachable", u: "unreachable", d: "degraded", "?": "unknown", "-": "not measured" };
const PAGE_SIZES = { s: 100, m: 40, l: 20 };
const SVG = "http://www.w3.org/2000/svg";

const view = {
  agent: null, matrix: null, lastOk: 0, error: null, selected: null,
  rowPage: 0, colPage: 0, timer: null, shown: new WeakMap(),
};

function display(name) {
  const s = String(name);
  return s.startsWith("default/") ? s.slice(8) : s;
}

function clusterOf(name) {
  const s = String(name);
  const i = s.indexOf("/");
  return i < 0 ? "default" : s.slice(0, i);
}

function hms(value) {
  const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (isNaN(d.getTime())) return String(value);
  return d.toLocaleTimeString([], { hour12: false });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

async function getJSON(path) {
  // A frozen agent accepts connections and answers nothing: give up after a while.
  const limit = Math.max(5000, 2 * (view.agent ? view.agent.poll_s * 1000 : 2000));
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), limit);
  try {
    const response = await fetch(path, { cache: "no-store", credentials: "same-origin",
                                         signal: abort.signal });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return await response.json();
  } catch (err) {
    if (err.name === "AbortError") throw new Error(`${path}: no answer within ${limit / 1000} s`);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

// -- polling ---------------------------------------------------------------------------------

async function poll() {
  try {
    const [agent, matrix] = await Promise.all([getJSON("api/agent"), getJSON("api/matrix")]);
    if (!view.matrix && matrix.targets.length <= 20) $("zoom").value = "l"; // a small mesh: big cells
    // The matrix changes once a round; polls in between only move the clock.
    const changed = !view.matrix || matrix.timestamp !== view.matrix.timestamp ||
      agent.timestamp !== view.agent.timestamp;
    view.agent = agent;
    view.matrix = matrix;
    view.lastOk = Date.now();
    view.error = null;
    if (changed) render();
    if (view.selected) await renderDetail();
  } catch (err) {
    view.error = err.message || String(err);
  }
  renderStale();
  const every = view.agent ? view.agent.poll_s * 1000 : 2000;
  view.timer = setTimeout(poll, every);
}

function ageSeconds() {
  // The agent's own clock says how old its last round is (the browser's may differ),
  // plus the time since that answer.
  const a = view.agent;
  const ts = Date.parse(a.timestamp);
  if (isNaN(ts)) return 0;
  return a.served_at - ts / 1000 + (Date.now() - view.lastOk) / 1000;
}

function renderStale() {
  const banner = $("stale");
  let text = "";
  if (!view.agent) {
    text = view.error ? `Cannot reach the agent: ${view.error}` : "";
  } else {
    const age = ageSeconds();
    const since = `data from ${hms(view.agent.timestamp)}`;
    if (view.error) {
      text = `Stale: cannot reach the agent (${view.error}); ${since}.`;
    } else if (age > view.agent.stale_after_s) {
      text = `Stale: the agent's last probe round is ${Math.round(age)} s old ` +
        `(more than 3 probe intervals); ${since}.`;
    }
  }
  banner.textContent = text;
  banner.hidden = !text;
  document.body.classList.toggle("is-stale", Boolean(text));
}

// -- rendering -------------------------------------------------------------------------------

function render() {
  const started = performance.now();
  const a = view.agent;
  const m = view.matrix;
  $("local-name").textContent = a.local ? display(`${a.local.cluster}/${a.local.name}`) : "";
  const s = a.summary || {};
  $("summary").textContent = `${s.reachable ?? "?"}/${s.nodes ?? "?"} nodes reachable` +
    (s.unreachable ? `, ${s.unreachable} unreachable` : "") +
    (m.local_only ? " · this node's view only" : ` · ${m.observers.length} observers`);
  const updated = $("updated-at");
  updated.textContent = hms(m.timestamp || a.timestamp);
  updated.setAttribute("datetime", m.timestamp || a.timestamp || "");
  renderVerdicts(m.verdicts || []);
  renderHeatmap();
  renderAgent();
  const took = Math.round(performance.now() - started);
  $("footer").textContent = `healthmesh ${a.version} · served by this agent only · drawn in ${took} ms`;
  $("footer").dataset.renderMs = String(took);
}

function verdictText(v) {
  const subj = Array.isArray(v.subject) ? v.subject.map(display) : [display(v.subject)];
  const port = view.agent ? view.agent.http_port : 4240;
  switch (v.kind) {
    case "node-down": return `${subj[0]} is down: no observer reaches it`;
    case "agent-down": return `the agent on ${subj[0]} is down (the node still answers ping)`;
    case "observer-isolated": return `${subj[0]} is isolated: it reaches no peer`;
    case "link": return `link ${subj[0]} ↔ ${subj[1]} cut`;
    case "port-filtered": return `port ${port} filtered on ${subj[0]}`;
    case "icmp-filtered": return `ICMP filtered on ${subj[0]}`;
    case "asymmetric":
      return `asymmetric: ${subj[0]} → ${subj[1]} fails while ${subj[1]} → ${subj[0]} works`;
    case "degraded": return `${subj.join(" → ")} degraded`;
    default: return `${v.kind}: ${subj.join(", ")}`;
  }
}

function renderVerdicts(verdicts) {
  const list = $("verdicts");
  list.replaceChildren();
  for (const v of verdicts) {
    const since = v.since ? ` since ${hms(v.since)}` : "";
    const meta = [];
    if (typeof v.confidence === "number") meta.push(`confidence ${Math.round(v.confidence * 100)}%`);
    if (v.evidence) meta.push(v.evidence);
    list.append(el("li", { class: `verdict k-${v.kind}` },
      el("span", { class: "v-text", text: verdictText(v) + since }),
      meta.length ? el("span", { class: "v-meta", text: ` — ${meta.join("; ")}` }) : ""));
  }
  $("no-verdicts").hidden = verdicts.length > 0;
  $("no-verdicts").textContent = view.matrix.local_only && !view.agent.mesh_feature
    ? "No verdicts: this agent shows its own row only (the mesh view is not available)."
    : "No verdicts: every measured path is as expected.";
}

function rttClass(rtt) {
  if (rtt === null || rtt === undefined) return "rtt-2";
  let i = 0;
  while (i < RTT_STEPS.length && rtt >= RTT_STEPS[i]) i++;
  return `rtt-${i}`;
}

function letterClass(letter) {
  return { r: "s-r", u: "s-u", d: "s-d", "?": "s-q", "-": "s-n" }[letter] || "s-q";
}

const failing = (c) => c === "u" || c === "d";

// Rows and columns after search, the failing filter and cluster aggregation. An entry is
// {label, name, idx: [indices into observers or targets]}.
function axes() {
  const m = view.matrix;
  const q = $("search").value.trim().toLowerCase();
  let rows = m.observers.map((name, i) => ({ name, idx: [i] }));
  let cols = m.targets.map((name, j) => ({ name, idx: [j] }));
  if (q) {
    const match = (e) => e.name.toLowerCase().includes(q);
    if (rows.some(match)) rows = rows.filter(match);
    if (cols.some(match)) cols = cols.filter(match);
  }
  if ($("failing").checked) {
    const badCols = new Set();
    const keepRows = rows.filter((r) => {
      let bad = false;
      for (const c of cols) if (failing(m.rows[r.idx[0]][c.idx[0]])) { bad = true; badCols.add(c.idx[0]); }
      return bad;
    });
    rows = keepRows;
    cols = cols.filter((c) => badCols.has(c.idx[0]));
  }
  if ($("by-cluster").checked) {
    const group = (list) => {
      const out = new Map();
      for (const e of list) {
        const k = clusterOf(e.name);
        if (!out.has(k)) out.set(k, { name: k, idx: [], cluster: true });
        out.get(k).idx.push(e.idx[0]);
      }
      return [...out.values()];
    };
    rows = group(rows);
    cols = group(cols);
  }
  return { rows, cols };
}

// One cell of the table: the worst state over the (aggregated) cells, the highest RTT.
function cellOf(row, col) {
  const m = view.matrix;
  let letters = "";
  let rtt = null;
  let loss = null;
  for (const i of row.idx) {
    for (const j of col.idx) {
      letters += m.rows[i][j];
      const r = m.rtt_ms[i][j];
      if (r !== null && (rtt === null || r > rtt)) rtt = r;
      const l = m.loss_pct[i][j];
      if (l !== null && (loss === null || l > loss)) loss = l;
    }
  }
  let letter = "r";
  if ([...letters].every((c) => c === "-")) letter = "-";
  else if ([...letters].every((c) => c === "u" || c === "-")) letter = "u";
  else if ([...letters].some(failing)) letter = "d";
  else if ([...letters].some((c) => c === "?")) letter = "?";
  const bad = [...letters].filter(failing).length;
  return { letter, rtt, loss, bad, count: letters.length };
}

function renderHeatmap() {
  const m = view.matrix;
  const zoom = $("zoom").value;
  const size = PAGE_SIZES[zoom] || 40;
  const { rows, cols } = axes();
  const rowPages = Math.max(1, Math.ceil(rows.length / size));
  const colPages = Math.max(1, Math.ceil(cols.length / size));
  view.rowPage = Math.min(view.rowPage, rowPages - 1);
  view.colPage = Math.min(view.colPage, colPages - 1);
  const shownRows = rows.slice(view.rowPage * size, (view.rowPage + 1) * size);
  const shownCols = cols.slice(view.colPage * size, (view.colPage + 1) * size);
  $("rows-page").textContent = `${view.rowPage + 1}/${rowPages}`;
  $("cols-page").textContent = `${view.colPage + 1}/${colPages}`;
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  $("mesh-size").textContent = `${plural(m.observers.length, "observer")} × ${plural(m.targets.length, "target")}` +
    ` · showing ${shownRows.length} × ${shownCols.length}`;
  const local = view.agent.local ? `${view.agent.local.cluster}/${view.agent.local.name}` : "";

  const table = $("heatmap");
  table.className = `zoom-${zoom}`;
  view.shown = new WeakMap(); // cell -> [row, col], for the one click handler on the table
  const head = el("tr", {}, el("th", { class: "corner", text: "observer ↓ target →" }));
  for (const c of shownCols) {
    head.append(el("th", { scope: "col", title: c.name, text: c.cluster ? `${c.name} (${c.idx.length})` : display(c.name) }));
  }
  const body = el("tbody");
  for (const r of shownRows) {
    const tr = el("tr", {}, el("th", {
      scope: "row", title: r.name, class: r.name === local ? "local" : "",
      text: r.cluster ? `${r.name} (${r.idx.length})` : display(r.name),
    }));
    for (const c of shownCols) {
      const cell = cellOf(r, c);
      const state = STATE_NAMES[cell.letter];
      let title = `${display(r.name)} → ${display(c.name)}: ${state}`;
      if (cell.rtt !== null) title += `, RTT ${cell.rtt} ms`;
      if (cell.loss !== null) title += `, loss ${cell.loss}%`;
      if (cell.count > 1) title += ` (${cell.bad} of ${cell.count} paths failing)`;
      const td = el("td", {
        class: `cell ${letterClass(cell.letter)} ${cell.letter === "r" ? rttClass(cell.rtt) : ""}`,
        title, "data-obs": r.name, "data-tgt": c.name, "data-state": state,
      });
      if (cell.count > 1 && cell.bad && zoom !== "s") td.textContent = String(cell.bad);
      const sel = view.selected;
      if (sel && sel.obs === r.name && sel.tgt === c.name) td.classList.add("selected");
      view.shown.set(td, [r, c]);
      tr.append(td);
    }
    body.append(tr);
  }
  table.replaceChildren(el("thead", {}, head), body);
}

function select(row, col) {
  if (row.cluster || col.cluster) {
    // An aggregated cell: narrow the view to those clusters instead.
    $("by-cluster").checked = false;
    $("search").value = col.cluster ? `${col.name}/` : col.name;
    view.selected = null;
    $("detail").hidden = true;
    render();
    return;
  }
  view.selected = { obs: row.name, tgt: col.name };
  renderHeatmap();
  renderDetail();
}

async function renderDetail() {
  const sel = view.selected;
  const box = $("detail");
  box.hidden = false;
  $("detail-title").textContent = `${display(sel.obs)} → ${display(sel.tgt)}`;
  const q = (o) => new URLSearchParams(o).toString();
  let cell = null;
  try { cell = await getJSON(`api/cell?${q({ observer: sel.obs, target: sel.tgt })}`); } catch (e) { cell = null; }
  const parts = [];
  if (cell) {
    parts.push(`state ${cell.state}`);
    for (const [k, st] of Object.entries(cell.kinds || {})) parts.push(`${k} ${st}`);
    if (cell.rtt_ms !== null && cell.rtt_ms !== undefined) parts.push(`RTT ${cell.rtt_ms} ms`);
    if (cell.loss_pct !== null && cell.loss_pct !== undefined) parts.push(`loss ${cell.loss_pct}%`);
  }
  $("detail-cell").textContent = parts.join(" · ");
  const hist = $("detail-history");
  const local = `${view.agent.local.cluster}/${view.agent.local.name}`;
  if (sel.obs !== local) {
    hist.replaceChildren(el("p", { class: "muted",
      text: `History is kept by each observer's own agent: open ${display(sel.obs)}'s page for it.` }));
    return;
  }
  let data;
  try { data = await getJSON(`api/history?${q({ node: sel.tgt })}`); } catch (e) { return; }
  const grid = el("div", { class: "paths" });
  for (const p of data.paths) grid.append(pathBox(p));
  if (!data.paths.length) grid.append(el("p", { class: "muted", text: "No history yet." }));
  hist.replaceChildren(grid);
}

function pathBox(p) {
  const pts = p.points;
  const rtts = pts.rtt_ms.filter((v) => v !== null);
  const last = rtts.length ? rtts[rtts.length - 1] : null;
  const maxRtt = rtts.length ? Math.max(...rtts) : 0;
  const losses = pts.loss_pct.filter((v) => v !== null);
  const box = el("div", { class: "path", "data-kind": p.kind, "data-address": p.address },
    el("h3", { text: `${p.address} (${p.role}) · ${p.kind}` }),
    sparkline(pts.rtt_ms, pts.state, "line"),
    el("p", { class: "spark-label",
      text: `RTT over ${pts.t.length} rounds: last ${last ?? "—"} ms, max ${maxRtt} ms` }),
    sparkline(pts.loss_pct, pts.state, "loss", 100),
    el("p", { class: "spark-label",
      text: `loss: last ${losses.length ? losses[losses.length - 1] : "—"}% (red marks: unreachable)` }));
  const list = el("ul", { class: "transitions" });
  for (const t of [...p.transitions].reverse()) {
    list.append(el("li", { text: `${hms(t.at)} ${t.from} → ${t.to}${t.error ? ` (${t.error})` : ""}` }));
  }
  if (!p.transitions.length) list.append(el("li", { class: "muted", text: "no state change in memory" }));
  box.append(list);
  return box;
}

// An SVG sparkline of values (null: a gap), scaled to [0, max] (default: the largest value).
function sparkline(values, states, cls, fixedMax) {
  const w = 300;
  const h = 40;
  const n = values.length;
  const s = svg("svg", { class: "spark", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
  if (!n) return s;
  const max = fixedMax || Math.max(1e-3, ...values.filter((v) => v !== null));
  const x = (i) => (n === 1 ? w / 2 : (i * w) / (n - 1));
  let run = [];
  const flush = () => {
    if (run.length > 1) s.append(svg("polyline", { class: cls, points: run.join(" ") }));
    else if (run.length === 1) s.append(svg("circle", { class: cls, cx: run[0].split(",")[0], cy: run[0].split(",")[1], r: 1.5 }));
    run = [];
  };
  values.forEach((v, i) => {
    if (v === null) { flush(); return; }
    run.push(`${x(i).toFixed(1)},${(h - 2 - (Math.min(v, max) / max) * (h - 4)).toFixed(1)}`);
  });
  flush();
  states.forEach((st, i) => {
    if (st === "unreachable") s.append(svg("rect", { class: "down", x: Math.max(0, x(i) - 1), y: h - 4, width: 2, height: 4 }));
  });
  return s;
}

function renderAgent() {
  const a = view.agent;
  const facts = $("agent-facts");
  const rows = [
    ["node", a.local ? display(`${a.local.cluster}/${a.local.name}`) : "?"],
    ["probe interval", `${a.interval_s} s`],
    ["probe kinds", (a.probe_kinds || []).join(", ") || "—"],
  ];
  if (a.round) {
    rows.push(["rounds completed", String(a.round.completed ?? "—")]);
    if (a.round.duration_s !== null && a.round.duration_s !== undefined) rows.push(["last round", `${a.round.duration_s} s`]);
    for (const [k, v] of Object.entries(a.round)) {
      if (k.includes("lag")) rows.push([`scheduler ${k.replace(/_/g, " ")}`, String(v)]);
    }
  }
  for (const [k, v] of Object.entries(a)) {
    if (k.includes("lag")) rows.push([`scheduler ${k.replace(/_/g, " ")}`, typeof v === "object" ? JSON.stringify(v) : String(v)]);
  }
  if (a.scheduler && typeof a.scheduler === "object") {
    for (const [k, v] of Object.entries(a.scheduler)) {
      rows.push([`scheduler ${k.replace(/_/g, " ")}`, typeof v === "object" ? JSON.stringify(v) : String(v)]);
    }
  }
  if (!rows.some((r) => r[0].startsWith("scheduler"))) rows.push(["scheduler lag", "not reported by this agent"]);
  const h = a.history || {};
  rows.push(["history", `${h.points_per_path} points per path and kind (${Math.round((h.seconds || 0) / 60)} min), ` +
    `${h.paths} paths, ${Math.round((h.bytes || 0) / 1024)} KiB`]);
  facts.replaceChildren();
  for (const [k, v] of rows) facts.append(el("dt", { text: k }), el("dd", { text: v }));
  const tbody = $("components").tBodies[0];
  tbody.replaceChildren();
  for (const c of a.components || []) {
    tbody.append(el("tr", {},
      el("td", { text: c.name }), el("td", { class: `st-${c.state}`, text: c.state }),
      el("td", { text: c.since ? hms(c.since) : "" }), el("td", { text: String(c.restarts ?? 0) }),
      el("td", { text: c.message || "" })));
  }
}

// -- controls --------------------------------------------------------------------------------

function wire() {
  const rerender = () => { if (view.matrix) renderHeatmap(); };
  for (const id of ["search", "failing", "by-cluster", "zoom"]) {
    $(id).addEventListener("input", () => { view.rowPage = 0; view.colPage = 0; rerender(); });
  }
  const step = (key, d) => () => { view[key] = Math.max(0, view[key] + d); rerender(); };
  $("rows-prev").addEventListener("click", step("rowPage", -1));
  $("rows-next").addEventListener("click", step("rowPage", 1));
  $("cols-prev").addEventListener("click", step("colPage", -1));
  $("cols-next").addEventListener("click", step("colPage", 1));
  $("heatmap").addEventListener("click", (event) => {
    const td = event.target.closest("td.cell");
    const found = td && view.shown.get(td);
    if (found) select(found[0], found[1]);
  });
  setInterval(renderStale, 1000);
  poll();
}

document.addEventListener("DOMContentLoaded", wire);
