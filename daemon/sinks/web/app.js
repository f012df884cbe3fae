// beamlens live page: plain JavaScript, no build step.
// Data: server-sent events from api/stream ("runs", "status", "changed"), buffers from
// api/runs/{uid}/{consumer}/{buffer}.json. Only buffers the server says changed are fetched, one
// request per buffer at a time, so the page keeps up however fast a scan runs.
"use strict";

// viridis, from Matt Zucker's polynomial fit of matplotlib's colour map (CC0, shadertoy.com/view/WlfXRN).
const VIRIDIS = (() => {
  const c = [[0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
    [0.1050930431085774, 1.404613529898575, 1.384590162594685],
    [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
    [-4.634230498983486, -5.799100973351585, -19.33244095627987],
    [6.228269936347081, 14.17993336680509, 56.69055260068105],
    [4.776384997670288, -13.74514537774601, -65.35303263337234],
    [-5.435455855934631, 4.645852612178535, 26.3124352495832]];
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    for (let ch = 0; ch < 3; ch++) {
      let v = c[6][ch];
      for (let k = 5; k >= 0; k--) v = c[k][ch] + t * v;
      lut[3 * i + ch] = Math.round(255 * Math.min(1, Math.max(0, v)));
    }
  }
  return lut;
})();
const EMPTY_RGB = [214, 214, 214];  // points not measured yet
// Okabe & Ito colour-blind-safe palette.
const PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];
const HISTORY = 600;  // samples kept per single-valued buffer

const state = {
  runs: [], selected: null, follow: true,
  cards: new Map(),             // "consumer/buffer" -> card
  hidden: new Set(),            // buffers not drawn on the page (too many dimensions)
  inflight: new Set(), pending: new Set(),
  history: new Map(),           // "run/consumer/buffer" -> {t: [], v: [[...]]}
};

// -- small helpers ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(3);
  let s = v.toPrecision(4);
  if (s.includes(".") && !s.includes("e")) s = s.replace(/0+$/, "").replace(/\.$/, "");
  return s;
}

function tick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e5)) return v.toExponential(1);
  return String(Number(v.toPrecision(3)));
}

function withUnits(v, units) { return units ? `${fmt(v)} ${units}` : fmt(v); }

function finiteRange(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) if (v !== null && Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return lo <= hi ? [lo, hi] : [0, 1];
}

function sizeCanvas(canvas, cssW, cssH) {
  const dpr = window.devicePixelRatio || 1;
  canvas.style.width = `${cssW}px`;
  canvas.style.height = `${cssH}px`;
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return ctx;
}

function caption(spec, name) {
  const cap = el("figcaption", { text: name + (spec.units ? ` (${spec.units})` : "") });
  if (spec.description) cap.append(el("span", { class: "desc", text: spec.description }));
  return cap;
}

// -- maps ------------------------------------------------------------------------------------
class MapCard {
  constructor(key, spec) {
    this.key = key; this.spec = spec; this.channel = 0; this.cursor = null; this.buffer = null;
    this.canvas = el("canvas", { class: "map", tabindex: "0", role: "img", "aria-label": `map of ${key}, no data yet` });
    this.scaleCanvas = el("canvas", { "aria-hidden": "true" });
    this.hi = el("span"); this.lo = el("span");
    this.readout = el("output", { class: "readout", "aria-live": "polite" });
    this.select = null;
    const scale = el("div", { class: "scalebox" }, this.scaleCanvas, el("div", { class: "scale" }, this.hi, this.lo));
    this.fig = el("figure", { class: "card", "data-key": key }, caption(spec, key),
      el("div", { class: "mapwrap" }, this.canvas, scale), this.readout);
    if (spec.extra_shape.length) {
      const n = spec.extra_shape.reduce((a, b) => a * b, 1);
      const id = `ch-${key.replace(/\W/g, "-")}`;
      this.select = el("select", { id });
      for (let i = 0; i < n; i++) this.select.append(el("option", { value: String(i), text: `channel ${i}` }));
      this.select.addEventListener("change", () => { this.channel = Number(this.select.value); this.draw(); });
      this.fig.insertBefore(el("div", {}, el("label", { for: id, text: "Show " }), this.select), this.readout);
    }
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => { hideTooltip(); });
    this.canvas.addEventListener("keydown", (e) => this.key_(e));
  }

  // buffer: {shape: [rows, cols, ...extra], values: Float32Array in C order, NaN = not measured}
  update(buffer) { this.buffer = buffer; this.draw(); }

  get rows() { return this.buffer.shape[0]; }
  get cols() { return this.buffer.shape[1]; }

  value(r, c) {
    const channels = this.buffer.shape.slice(2).reduce((a, b) => a * b, 1);
    const v = this.buffer.values[(r * this.cols + c) * channels + this.channel];
    return Number.isFinite(v) ? v : null;
  }

  draw() {
    const b = this.buffer;
    if (!b) return;
    const rows = this.rows, cols = this.cols;
    const values = new Array(rows * cols);
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) values[r * cols + c] = this.value(r, c);
    const [lo, hi] = finiteRange(values);
    this.range = [lo, hi];
    const img = new ImageData(cols, rows);
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      let rgb = EMPTY_RGB;
      if (v !== null && Number.isFinite(v)) {
        const j = hi > lo ? Math.round(255 * (v - lo) / (hi - lo)) : 128;
        rgb = VIRIDIS.subarray(3 * j, 3 * j + 3);
      }
      img.data[4 * i] = rgb[0]; img.data[4 * i + 1] = rgb[1]; img.data[4 * i + 2] = rgb[2]; img.data[4 * i + 3] = 255;
    }
    const off = document.createElement("canvas");
    off.width = cols; off.height = rows;
    off.getContext("2d").putImageData(img, 0, 0);
    const s = Math.max(1, Math.min(Math.floor(300 / cols), Math.floor(300 / rows)));
    const ctx = sizeCanvas(this.canvas, cols * s, rows * s);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, cols * s, rows * s);
    if (this.cursor) {
      ctx.strokeStyle = "#ff2d2d"; ctx.lineWidth = 2;
      ctx.strokeRect(this.cursor[1] * s, this.cursor[0] * s, s, s);
    }
    const sctx = sizeCanvas(this.scaleCanvas, 14, rows * s);
    for (let y = 0; y < rows * s; y++) {
      const j = Math.round(255 * (1 - y / Math.max(1, rows * s - 1)));
      sctx.fillStyle = `rgb(${VIRIDIS[3 * j]},${VIRIDIS[3 * j + 1]},${VIRIDIS[3 * j + 2]})`;
      sctx.fillRect(0, y, 14, 1);
    }
    this.hi.textContent = withUnits(hi, this.spec.units);
    this.lo.textContent = withUnits(lo, this.spec.units);
    const done = values.filter((v) => v !== null).length;
    this.canvas.setAttribute("aria-label",
      `map of ${this.key}, ${rows} by ${cols} points, ${done} measured, values ${fmt(lo)} to ${fmt(hi)} ${this.spec.units || ""}`);
    if (this.cursor) this.describe(...this.cursor, false);
  }

  cell(e) {
    const rect = this.canvas.getBoundingClientRect();
    const c = Math.floor((e.clientX - rect.left) / rect.width * this.cols);
    const r = Math.floor((e.clientY - rect.top) / rect.height * this.rows);
    return r >= 0 && c >= 0 && r < this.rows && c < this.cols ? [r, c] : null;
  }

  describe(r, c, announce) {
    const text = `${this.key}[${r}, ${c}] = ${withUnits(this.value(r, c), this.spec.units)}`;
    if (announce) this.readout.textContent = text;
    return text;
  }

  hover(e) {
    if (!this.buffer) return;
    const rc = this.cell(e);
    if (!rc) { hideTooltip(); return; }
    showTooltip(this.describe(...rc, true), e.clientX, e.clientY);
  }

  key_(e) {
    if (!this.buffer) return;
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    const m = moves[e.key];
    if (!m) return;
    e.preventDefault();
    const [r, c] = this.cursor || [0, 0];
    this.cursor = this.cursor
      ? [Math.min(this.rows - 1, Math.max(0, r + m[0])), Math.min(this.cols - 1, Math.max(0, c + m[1]))]
      : [0, 0];
    this.draw();
    this.describe(...this.cursor, true);
  }
}

function showTooltip(text, x, y) {
  const tip = document.getElementById("tooltip");
  tip.textContent = text;
  tip.hidden = false;
  tip.style.left = `${x + 12}px`;
  tip.style.top = `${y + 12}px`;
}
function hideTooltip() { document.getElementById("tooltip").hidden = true; }

// -- line plots ------------------------------------------------------------------------------
function drawPlot(canvas, series, xlabel, ylabel) {
  const W = 380, H = 230, L = 62, R = 22, T = 10, B = 40;
  const ctx = sizeCanvas(canvas, W, H);
  ctx.clearRect(0, 0, W, H);
  const xs = series.flatMap((s) => s.x), ys = series.flatMap((s) => s.y);
  let [x0, x1] = finiteRange(xs), [y0, y1] = finiteRange(ys);
  if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 0.5; y1 += Math.abs(y1) * 0.05 || 0.5; }
  const px = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const py = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  ctx.strokeStyle = "#4a525c"; ctx.fillStyle = "#1b1f24"; ctx.lineWidth = 1;
  ctx.font = "11px system-ui, sans-serif";
  ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - R, H - B); ctx.stroke();
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let i = 0; i <= 4; i++) {
    const x = x0 + (x1 - x0) * i / 4;
    ctx.fillText(tick(x), px(x), H - B + 4);
  }
  ctx.fillText(xlabel, L + (W - L - R) / 2, H - 14);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    ctx.fillText(tick(y), L - 4, py(y));
  }
  ctx.save(); ctx.translate(12, T + (H - T - B) / 2); ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center"; ctx.fillText(ylabel, 0, 0); ctx.restore();
  series.forEach((s, k) => {
    ctx.strokeStyle = PALETTE[k % PALETTE.length]; ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    for (let i = 0; i < s.y.length; i++) {
      const y = s.y[i];
      if (y === null || !Number.isFinite(y)) { pen = false; continue; }
      if (pen) ctx.lineTo(px(s.x[i]), py(y)); else ctx.moveTo(px(s.x[i]), py(y));
      pen = true;
    }
    ctx.stroke();
  });
}

class PlotCard {
  // sig buffers (spectra against their axis), 1-D nav buffers (against scan point), and
  // single buffers (each value over time).
  constructor(key, spec, kind) {
    this.key = key; this.spec = spec; this.kind = kind;
    this.canvas = el("canvas", { class: "plot", role: "img", "aria-label": `plot of ${key}, no data yet` });
    this.legend = el("div", { class: "legend" });
    this.current = el("output", { class: "readout" });
    this.fig = el("figure", { class: "card", "data-key": key }, caption(spec, key), this.canvas, this.legend, this.current);
  }

  update(buffer) {
    const ylabel = buffer.units ? `${buffer.name} (${buffer.units})` : buffer.name;
    let series, xlabel;
    if (this.kind === "single") {
      ({ series, xlabel } = this.timeSeries(buffer));
    } else {
      // sig (k, n): k curves against the signal axis; nav (n, k): k curves against scan point
      let rows;
      if (buffer.shape.length > 1 && buffer.kind === "sig") rows = buffer.data.map((r) => [r].flat(Infinity));
      else if (buffer.shape.length === 2 && buffer.kind === "nav") {
        rows = Array.from({ length: buffer.shape[1] }, (_, j) => buffer.data.map((r) => r[j]));
      } else rows = [buffer.data.flat(Infinity)];
      const n = rows[0].length;
      const axis = buffer.axis && buffer.axis.values.length === n ? buffer.axis : null;
      const x = axis ? axis.values : Array.from({ length: n }, (_, i) => i);
      xlabel = axis ? `${axis.name} (${axis.units})` : (buffer.kind === "nav" ? "scan point" : "channel");
      series = rows.map((y, i) => ({ x, y, label: rows.length > 1 ? `${i + 1}` : buffer.name }));  // 1-based, as score_1
      this.current.textContent = "";
    }
    drawPlot(this.canvas, series, xlabel, ylabel);
    this.legend.replaceChildren(...(series.length > 1 ? series.map((s, k) =>
      el("span", {}, el("i", { style: `background:${PALETTE[k % PALETTE.length]}` }), s.label)) : []));
    this.canvas.setAttribute("aria-label", `plot of ${this.key}: ${series.length} series against ${xlabel}`);
  }

  timeSeries(buffer) {
    const id = `${buffer.run}/${this.key}`;
    const h = state.history.get(id) || { t0: Date.now() / 1000, t: [], v: [] };
    state.history.set(id, h);
    const values = [buffer.data].flat(Infinity);
    h.t.push(Date.now() / 1000 - h.t0); h.v.push(values);
    if (h.t.length > HISTORY) { h.t.shift(); h.v.shift(); }
    const series = values.map((_, i) => ({ x: h.t, y: h.v.map((row) => row[i]), label: `${i + 1}` }));
    this.current.textContent = `now: ${values.map((v) => withUnits(v, buffer.units)).join(", ")}`;
    return { series, xlabel: "time on this page (s)" };
  }
}

// -- runs, cards and fetching ----------------------------------------------------------------
// Buffers with more dimensions than a map or a set of curves (per-point lists of defect
// positions, stacks of patches) are left to the JSON API and the run files.
// Scan points analysed: events for document runs, frames for detector runs.
function pointsDone(run) { return Math.max(run.events_done, run.frames_done || 0); }

function cardFor(key, spec, navShape) {
  if (spec.kind === "nav" && navShape.length === 2 && spec.extra_shape.length <= 1) return new MapCard(key, spec);
  if (spec.kind === "sig" && spec.extra_shape.length === 2 && !spec.axis) {
    return new MapCard(key, { ...spec, extra_shape: [] });   // a frame-shaped image, e.g. a density map
  }
  if (spec.kind === "nav" ? spec.extra_shape.length > 1 : spec.extra_shape.length > 2) return null;
  return new PlotCard(key, spec, spec.kind);
}

function ensureCards(run) {
  const maps = document.getElementById("maps"), plots = document.getElementById("plots");
  for (const [consumer, c] of Object.entries(run.consumers)) {
    for (const [name, spec] of Object.entries(c.buffers)) {
      const key = `${consumer}/${name}`;
      if (state.cards.has(key) || state.hidden.has(key)) continue;
      const card = cardFor(key, spec, run.nav_shape);
      if (!card) { state.hidden.add(key); continue; }
      state.cards.set(key, card);
      (card instanceof MapCard ? maps : plots).append(card.fig);
      requestBuffer(run.uid, key);
    }
  }
}

function selectRun(uid) {
  state.selected = uid;
  state.cards.clear();
  state.hidden.clear();
  document.getElementById("maps").replaceChildren();
  document.getElementById("plots").replaceChildren();
  renderRuns();
}

function requestBuffer(uid, key) {
  const id = `${uid}/${key}`;
  if (state.inflight.has(id)) { state.pending.add(id); return; }
  state.inflight.add(id);
  const [consumer, buffer] = key.split("/");
  const card = state.cards.get(key);
  const binary = card instanceof MapCard;  // maps travel as float32, plots as JSON (with their axis)
  const url = `api/runs/${encodeURIComponent(uid)}/${encodeURIComponent(consumer)}/${encodeURIComponent(buffer)}`;
  fetch(`${url}.${binary ? "f32" : "json"}`)
    .then(async (r) => {
      if (!r.ok) return null;
      if (!binary) return r.json();
      const shape = r.headers.get("X-Shape").split(",").map(Number);
      return { shape, values: new Float32Array(await r.arrayBuffer()) };
    })
    .then((b) => {
      if (b && uid === state.selected && state.cards.get(key) === card) card.update(b);
    })
    .catch((err) => console.warn("fetching", id, "failed:", err))
    .finally(() => {
      state.inflight.delete(id);
      if (state.pending.delete(id)) requestBuffer(uid, key);
    });
}

function onRuns(runs) {
  state.runs = runs;
  if (!runs.length) return;
  let run = runs.find((r) => r.uid === state.selected);
  if (state.follow || !run) run = runs.find((r) => r.status === "open") || runs[0];
  if (run.uid !== state.selected) selectRun(run.uid);
  renderRun(run);
  renderRuns();
  ensureCards(run);
}

function onChanged(changed) {
  for (const { run, consumer, buffer } of changed) {
    if (run === state.selected && state.cards.has(`${consumer}/${buffer}`)) requestBuffer(run, `${consumer}/${buffer}`);
  }
}

function runLabel(run) {
  const scan = run.scan_id !== null && run.scan_id !== undefined ? `scan ${run.scan_id}` : "run";
  return `${scan} · ${run.plan_name || "unknown plan"} · ${run.status}`;
}

function renderRun(run) {
  const title = document.getElementById("run-title");
  title.replaceChildren(el("strong", { text: runLabel(run) }), " ",
    el("code", { text: run.uid }), run.joined_midway ? " (joined mid-run)" : "");
  const bar = document.getElementById("progress"), text = document.getElementById("progress-text");
  const expected = run.expected_points;
  if (expected) {
    bar.max = expected;
    bar.value = run.status === "open" ? Math.min(pointsDone(run), expected) : expected;
    text.textContent = `${pointsDone(run)} / ${expected} points (${Math.round(100 * run.progress)} %)`;
  } else {
    bar.removeAttribute("value");
    text.textContent = `${pointsDone(run)} points (length unknown)`;
  }
  if (run.status !== "open") text.textContent += ` · ${run.status}`;
}

function renderRuns() {
  const list = document.getElementById("runs");
  list.replaceChildren(...state.runs.map((run) => {
    const button = el("button", { type: "button", text: runLabel(run), "aria-current": String(run.uid === state.selected) });
    button.addEventListener("click", () => {
      state.follow = false;
      document.getElementById("follow").checked = false;
      selectRun(run.uid);
      onRuns(state.runs);
    });
    const when = new Date(run.opened * 1000).toLocaleTimeString();
    return el("li", { class: `status-${run.status}` }, button, ` · ${pointsDone(run)} points · opened ${when}`);
  }));
}

// -- health ----------------------------------------------------------------------------------
const SECTION_TITLES = { sources: "Sources", queues: "Queues", drops: "Drops and skipped input", errors: "Consumer errors", runs: "Runs" };
const BAD_WHEN_POSITIVE = /dropped|bad_messages|failures|quarantined|skipped/;

function renderHealth(status) {
  const box = document.getElementById("health");
  const tables = [];
  for (const [section, samples] of Object.entries(status)) {
    const table = el("table", { class: "health" }, el("caption", { text: SECTION_TITLES[section] || section }));
    const head = el("tr", {}, el("th", { scope: "col", text: "metric" }), el("th", { scope: "col", text: "labels" }),
      el("th", { scope: "col", text: "value" }));
    table.append(el("thead", {}, head));
    const body = el("tbody");
    if (!samples.length) body.append(el("tr", {}, el("td", { colspan: "3", text: "none yet" })));
    for (const s of samples) {
      const name = s.name.replace(/^beamlens_/, "");
      const labels = Object.entries(s.labels).map(([k, v]) => `${k}=${v}`).join(", ");
      let value = fmt(s.value), bad = false;
      if (s.name.endsWith("_timestamp_seconds")) value = s.value ? `${fmt(Date.now() / 1000 - s.value)} s ago` : "never";
      if (s.name === "beamlens_source_connected") { value = s.value ? "connected" : "DISCONNECTED"; bad = !s.value; }
      if (BAD_WHEN_POSITIVE.test(s.name) && s.value > 0) bad = true;
      body.append(el("tr", {}, el("td", { text: name }), el("td", { text: labels }),
        el("td", { class: bad ? "num bad" : "num", text: value })));
    }
    table.append(body);
    tables.push(table);
  }
  box.replaceChildren(...tables);
}

// -- wiring ----------------------------------------------------------------------------------
function setConnection(text, cls) {
  const p = document.getElementById("connection");
  p.textContent = text;
  p.className = cls;
}

function connect() {
  const source = new EventSource("api/stream");
  source.addEventListener("open", () => setConnection("Live", "live"));
  source.addEventListener("error", () => setConnection("Connection lost, reconnecting…", "lost"));
  source.addEventListener("runs", (e) => onRuns(JSON.parse(e.data)));
  source.addEventListener("status", (e) => renderHealth(JSON.parse(e.data)));
  source.addEventListener("changed", (e) => onChanged(JSON.parse(e.data)));
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("follow").addEventListener("change", (e) => {
    state.follow = e.target.checked;
    onRuns(state.runs);
  });
  connect();
});
