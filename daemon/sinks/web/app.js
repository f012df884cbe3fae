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

const state = {
  runs: [], selected: null, follow: true,
  cards: new Map(),             // "consumer/buffer" -> card
  hidden: new Set(),            // buffers not drawn on the page (too many dimensions)
  inflight: new Set(), pending: new Set(),
  run: null,                    // summary of the selected run
  point: null,                  // [row, col] clicked, or null
};

// -- small helpers ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "style") Object.assign(node.style, v);  // CSSOM: the CSP forbids style attributes
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
// Maps are drawn as bluesky's LiveGrid draws them: the fast (second) scan axis across, the slow
// (first) one up, each increasing to the right / upwards in motor units. Without motor axes, row
// index 0 is at the bottom (LiveGrid's default).
function mapAxes(run, rows, cols) {
  const byDim = [0, 1].map((d) => (run.axes || []).find((a) => a.dim === d));
  return [[byDim[0], rows], [byDim[1], cols]].map(([a, n]) => (a && a.num === n && a.start !== null && a.stop !== null)
    ? a : { name: "", units: "", motor: false, num: n, start: 0, stop: n - 1, values: null });
}
function axisValue(a, i) {
  if (a.values && a.values.length === a.num && a.values[i] !== null) return a.values[i];
  return a.num > 1 ? a.start + (a.stop - a.start) * i / (a.num - 1) : a.start;
}
// tick labels with as many decimals as the axis span needs (motor positions like -4709.95 mm)
function axisTick(v, a) {
  const span = Math.abs(a.stop - a.start) || 1;
  if (Math.abs(v) >= 1e6 || (Math.abs(v) < 1e-3 && v !== 0 && span < 1e-3)) return v.toExponential(2);
  return v.toFixed(Math.min(6, Math.max(0, Math.ceil(-Math.log10(span / 4)) + 1)));
}
function axisTitle(a, fallback) { return a.motor ? (a.units ? `${a.name} (${a.units})` : a.name) : fallback; }

function percentile(sorted, p) {
  if (!sorted.length) return NaN;
  const x = (sorted.length - 1) * p / 100, i = Math.floor(x), f = x - i;
  return i + 1 < sorted.length ? sorted[i] * (1 - f) + sorted[i + 1] * f : sorted[i];
}

class MapCard {
  constructor(key, spec, run) {
    this.key = key; this.spec = spec; this.run = run; this.channel = 0; this.cursor = null; this.buffer = null;
    this.canvas = el("canvas", { class: "map", tabindex: "0", role: "img", "aria-label": `map of ${key}, no data yet` });
    this.scaleCanvas = el("canvas", { "aria-hidden": "true" });
    this.hi = el("span"); this.lo = el("span");
    this.readout = el("output", { class: "readout", "aria-live": "polite" });
    this.select = null;
    const id = key.replace(/\W/g, "-");
    this.mode = el("select", { id: `cs-${id}`, class: "cmode" },
      el("option", { value: "auto", text: "min–max" }), el("option", { value: "pct", text: "percentiles" }),
      el("option", { value: "fixed", text: "fixed" }));
    this.loIn = el("input", { type: "number", step: "any", class: "clim", "aria-label": `${key} colour scale low` });
    this.hiIn = el("input", { type: "number", step: "any", class: "clim", "aria-label": `${key} colour scale high` });
    this.mode.addEventListener("change", () => this.modeChanged());
    for (const input of [this.loIn, this.hiIn]) input.addEventListener("change", () => this.draw());
    this.loIn.hidden = this.hiIn.hidden = true;
    const controls = el("div", { class: "climbox" }, el("label", { for: `cs-${id}`, text: "Colour scale " }), this.mode,
      " ", this.loIn, " ", this.hiIn);
    const scale = el("div", { class: "scalebox" }, this.scaleCanvas, el("div", { class: "scale" }, this.hi, this.lo));
    this.fig = el("figure", { class: "card", "data-key": key }, caption(spec, key),
      el("div", { class: "mapwrap" }, this.canvas, scale), controls, this.readout);
    if (spec.extra_shape.length) {
      const n = spec.extra_shape.reduce((a, b) => a * b, 1);
      this.select = el("select", { id: `ch-${id}` });
      for (let i = 0; i < n; i++) this.select.append(el("option", { value: String(i), text: `channel ${i}` }));
      this.select.addEventListener("change", () => { this.channel = Number(this.select.value); this.draw(); });
      this.fig.insertBefore(el("div", {}, el("label", { for: `ch-${id}`, text: "Show " }), this.select), controls);
    }
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => { hideTooltip(); });
    // a frame-shaped image (sig buffer) is not a scan point: only maps of the scan pick one
    this.canvas.addEventListener("click", (e) => { const rc = this.cell(e); if (rc && !this.spec.sigImage) pickPoint(rc); });
    this.canvas.addEventListener("keydown", (e) => this.key_(e));
    // Take the drawn size now, from the run's nav shape, so that maps filling in one after the
    // other do not move each other (and the point under a pending click) as they first draw.
    const nav = run && run.nav_shape;
    if (!spec.sigImage && nav && nav.length === 2 && nav[0] > 0 && nav[1] > 0) {
      const g = this.geometry(nav[0], nav[1]);
      sizeCanvas(this.canvas, g.W, g.H);
    }
  }

  modeChanged() {
    const m = this.mode.value;
    this.loIn.hidden = this.hiIn.hidden = m === "auto";
    if (m === "pct") { this.loIn.value = "2"; this.hiIn.value = "98"; }
    if (m === "fixed" && this.range) { this.loIn.value = fmt(this.range[0]); this.hiIn.value = fmt(this.range[1]); }
    this.draw();
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

  limits(values) {
    const m = this.mode.value;
    const finite = values.filter((v) => v !== null);
    if (m === "fixed") {
      const lo = Number(this.loIn.value), hi = Number(this.hiIn.value);
      if (Number.isFinite(lo) && Number.isFinite(hi) && hi > lo) return [lo, hi];
    } else if (m === "pct" && finite.length) {
      const sorted = Float64Array.from(finite).sort();
      const p0 = Math.min(100, Math.max(0, Number(this.loIn.value))), p1 = Math.min(100, Math.max(0, Number(this.hiIn.value)));
      const lo = percentile(sorted, Math.min(p0, p1)), hi = percentile(sorted, Math.max(p0, p1));
      if (hi > lo) return [lo, hi];
    }
    return finiteRange(finite);
  }

  // display geometry: which canvas cell a map index [r, c] lands in (y up, x right, in motor units)
  geometry(rows = this.rows, cols = this.cols) {
    const [ya, xa] = this.spec.sigImage ? [{ start: 1, stop: 0, num: rows }, { start: 0, stop: 1, num: cols }]
      : mapAxes(this.run, rows, cols);
    const s = Math.max(1, Math.min(Math.floor(300 / cols), Math.floor(300 / rows)));
    const L = this.spec.sigImage ? 4 : 72, B = this.spec.sigImage ? 4 : 40, T = 6, R = this.spec.sigImage ? 4 : 26;
    return { ya, xa, s, L, B, T, R, W: L + cols * s + R, H: T + rows * s + B,
      flipX: xa.stop < xa.start, flipY: ya.stop < ya.start };
  }
  toScreen(g, r, c) {
    const dc = g.flipX ? this.cols - 1 - c : c;
    const dr = g.flipY ? r : this.rows - 1 - r;
    return [g.L + dc * g.s, g.T + dr * g.s];
  }

  draw() {
    const b = this.buffer;
    if (!b) return;
    const rows = this.rows, cols = this.cols;
    const values = new Array(rows * cols);
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) values[r * cols + c] = this.value(r, c);
    const [lo, hi] = this.limits(values);
    this.range = [lo, hi];
    const g = this.geometry();
    this.g = g;
    const img = new ImageData(cols, rows);
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
      const v = values[r * cols + c];
      let rgb = EMPTY_RGB;
      if (v !== null && Number.isFinite(v)) {
        const t = hi > lo ? Math.min(1, Math.max(0, (v - lo) / (hi - lo))) : 0.5;
        const j = Math.round(255 * t);
        rgb = VIRIDIS.subarray(3 * j, 3 * j + 3);
      }
      const dc = g.flipX ? cols - 1 - c : c, dr = g.flipY ? r : rows - 1 - r;
      const i = dr * cols + dc;
      img.data[4 * i] = rgb[0]; img.data[4 * i + 1] = rgb[1]; img.data[4 * i + 2] = rgb[2]; img.data[4 * i + 3] = 255;
    }
    const off = document.createElement("canvas");
    off.width = cols; off.height = rows;
    off.getContext("2d").putImageData(img, 0, 0);
    const ctx = sizeCanvas(this.canvas, g.W, g.H);
    ctx.clearRect(0, 0, g.W, g.H);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, g.L, g.T, cols * g.s, rows * g.s);
    if (!this.spec.sigImage) this.drawAxes(ctx, g);
    for (const [rc, colour] of [[state.point, "#ffffff"], [this.cursor, "#ff2d2d"]]) {
      if (!rc || rc[0] >= rows || rc[1] >= cols) continue;
      const [x, y] = this.toScreen(g, rc[0], rc[1]);
      ctx.strokeStyle = colour; ctx.lineWidth = 2;
      ctx.strokeRect(x, y, g.s, g.s);
    }
    const sctx = sizeCanvas(this.scaleCanvas, 14, rows * g.s);
    for (let y = 0; y < rows * g.s; y++) {
      const j = Math.round(255 * (1 - y / Math.max(1, rows * g.s - 1)));
      sctx.fillStyle = `rgb(${VIRIDIS[3 * j]},${VIRIDIS[3 * j + 1]},${VIRIDIS[3 * j + 2]})`;
      sctx.fillRect(0, y, 14, 1);
    }
    this.hi.textContent = withUnits(hi, this.spec.units);
    this.lo.textContent = withUnits(lo, this.spec.units);
    const done = values.filter((v) => v !== null).length;
    this.canvas.setAttribute("aria-label",
      `map of ${this.key}, ${rows} by ${cols} points, ${done} measured, values ${fmt(lo)} to ${fmt(hi)} ${this.spec.units || ""}`);
    this.canvas.dataset.clim = `${lo},${hi}`;
    this.canvas.dataset.geometry = JSON.stringify({ L: g.L, T: g.T, s: g.s, flipX: g.flipX, flipY: g.flipY, W: g.W, H: g.H });
    if (this.cursor) this.describe(...this.cursor, false);
  }

  drawAxes(ctx, g) {
    const w = this.cols * g.s, h = this.rows * g.s;
    ctx.strokeStyle = "#4a525c"; ctx.fillStyle = "#1b1f24"; ctx.lineWidth = 1;
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeRect(g.L - 0.5, g.T - 0.5, w + 1, h + 1);
    const ticks = (a, n) => { const k = Math.min(4, n - 1); return k > 0 ? Array.from({ length: k + 1 }, (_, i) => Math.round(i * (n - 1) / k)) : [0]; };
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (const c of ticks(g.xa, this.cols)) {
      const [x] = this.toScreen(g, 0, c);
      ctx.fillText(axisTick(axisValue(g.xa, c), g.xa), x + g.s / 2, g.T + h + 4);
    }
    ctx.fillText(axisTitle(g.xa, "column index (fast axis)"), g.L + w / 2, g.T + h + 22);
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (const r of ticks(g.ya, this.rows)) {
      const [, y] = this.toScreen(g, r, 0);
      ctx.fillText(axisTick(axisValue(g.ya, r), g.ya), g.L - 4, y + g.s / 2);
    }
    ctx.save(); ctx.translate(11, g.T + h / 2); ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center"; ctx.fillText(axisTitle(g.ya, "row index (slow axis)"), 0, 0); ctx.restore();
  }

  cell(e) {
    if (!this.buffer || !this.g) return null;
    const g = this.g, rect = this.canvas.getBoundingClientRect();
    const x = (e.clientX - rect.left) * g.W / rect.width - g.L, y = (e.clientY - rect.top) * g.H / rect.height - g.T;
    let c = Math.floor(x / g.s), dr = Math.floor(y / g.s);
    if (c < 0 || dr < 0 || c >= this.cols || dr >= this.rows) return null;
    if (g.flipX) c = this.cols - 1 - c;
    const r = g.flipY ? dr : this.rows - 1 - dr;
    return [r, c];
  }

  where(r, c) {
    if (this.spec.sigImage) return "";
    const [ya, xa] = [this.g.ya, this.g.xa];
    const parts = [[xa, c], [ya, r]].filter(([a]) => a.motor).map(([a, i]) => `${a.name} = ${axisTick(axisValue(a, i), a)}${a.units ? " " + a.units : ""}`);
    return parts.length ? ` (${parts.join(", ")})` : "";
  }

  describe(r, c, announce) {
    const text = `${this.key}[${r}, ${c}] = ${withUnits(this.value(r, c), this.spec.units)}${this.where(r, c)}`;
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
    // arrow keys move on the screen: up is towards higher slow-axis positions when the map is drawn y up
    const g = this.g;
    const up = g && g.flipY ? -1 : 1, right = g && g.flipX ? -1 : 1;
    const moves = { ArrowUp: [up, 0], ArrowDown: [-up, 0], ArrowLeft: [0, -right], ArrowRight: [0, right] };
    if (e.key === "Enter" && this.cursor) { if (!this.spec.sigImage) pickPoint(this.cursor); return; }
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
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }

// Returns the plot's geometry {x0, x1, L, R, W} (for clicks); ``marker``: an x drawn as a line.
function drawPlot(canvas, series, xlabel, ylabel, xfmt = tick, marker = null) {
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
    ctx.fillText(xfmt(x), px(x), H - B + 4);
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
  if (marker !== null && Number.isFinite(marker) && marker >= x0 && marker <= x1) {
    ctx.strokeStyle = "#ff2d2d"; ctx.lineWidth = 1.5;
    ctx.beginPath(); ctx.moveTo(px(marker), T); ctx.lineTo(px(marker), H - B); ctx.stroke();
  }
  const g = { x0, x1, L, R, W };
  canvas.dataset.geometry = JSON.stringify(g);
  return g;
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
    this.buffer = null; this.g = null;
    // a per-point curve of a 1-D run (a frame series: one point per frame) picks the point clicked
    this.canvas.addEventListener("click", (e) => { const i = this.pointAt(e); if (i !== null) pickPoint([i]); });
  }

  pickable() { return this.kind === "nav" && this.buffer && state.run && state.run.nav_shape.length === 1; }

  // the scan point nearest to a click, or null
  pointAt(e) {
    if (!this.pickable() || !this.g) return null;
    const g = this.g, rect = this.canvas.getBoundingClientRect();
    const x = g.x0 + ((e.clientX - rect.left) * g.W / rect.width - g.L) / (g.W - g.L - g.R) * (g.x1 - g.x0);
    const n = this.buffer.shape[0];
    const i = Math.round(x);
    return i >= 0 && i < n ? i : null;
  }

  draw() { if (this.buffer) this.update(this.buffer); }

  update(buffer) {
    this.buffer = buffer;
    const units = this.spec.units;
    const ylabel = units ? `${this.key.split("/")[1]} (${units})` : this.key.split("/")[1];
    let series, xlabel, xfmt = tick;
    if (this.kind === "single") {
      // history recorded by the server on wall-clock time (api/.../history): survives a reload
      const n = buffer.values.length ? buffer.values[buffer.values.length - 1].length : 0;
      series = Array.from({ length: n }, (_, i) => ({ x: buffer.t, y: buffer.values.map((row) => row[i]), label: `${i + 1}` }));
      xlabel = "time (server clock)"; xfmt = clock;
      const now = buffer.values.length ? buffer.values[buffer.values.length - 1] : [];
      this.current.textContent = now.length ? `now: ${now.map((v) => withUnits(v, units)).join(", ")}` : "";
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
    const marker = this.pickable() && state.point && state.point.length === 1 ? state.point[0] : null;
    this.g = drawPlot(this.canvas, series, xlabel, ylabel, xfmt, marker);
    this.legend.replaceChildren(...(series.length > 1 ? series.map((s, k) =>
      el("span", {}, el("i", { style: { background: PALETTE[k % PALETTE.length] } }), s.label)) : []));
    this.canvas.setAttribute("aria-label", `plot of ${this.key}: ${series.length} series against ${xlabel}`);
  }
}

// -- the newest detector frame with its defects -------------------------------------------------
// A consumer publishing "frame" (binned picture), "frame_defects" (row, col, class in frame px)
// and "frame_bin" (frame px per picture pixel) gets one card: the frame in grey, each defect a
// circle in its class colour.
class FrameCard {
  constructor(key, spec, consumer) {
    this.key = key; this.spec = spec; this.consumer = consumer; this.kind = "frame";
    this.canvas = el("canvas", { class: "frame", role: "img", "aria-label": `newest frame of ${consumer}, none yet` });
    this.legend = el("div", { class: "legend" });
    this.fig = el("figure", { class: "card", "data-key": key },
      el("figcaption", { text: `${consumer}: newest frame` }, el("span", { class: "desc", text: "defects circled in their class colour" })),
      this.canvas, this.legend);
  }

  update(b) {
    const [rows, cols] = b.frame.shape;
    const [lo, hi] = finiteRange(b.frame.values);
    const img = new ImageData(cols, rows);
    for (let i = 0; i < rows * cols; i++) {
      const v = b.frame.values[i];
      const g = Number.isFinite(v) && hi > lo ? Math.round(255 * (v - lo) / (hi - lo)) : 0;
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = g; img.data[4 * i + 3] = 255;
    }
    const off = document.createElement("canvas");
    off.width = cols; off.height = rows;
    off.getContext("2d").putImageData(img, 0, 0);
    const s = Math.max(1, Math.min(400 / cols, 400 / rows));
    const ctx = sizeCanvas(this.canvas, cols * s, rows * s);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, cols * s, rows * s);
    const f = (b.bin.data && b.bin.data[0]) || 1;
    const classes = new Map();
    ctx.lineWidth = 2;
    for (const [r, c, k] of b.defects.data) {
      if (r === null || c === null || k === null) continue;
      classes.set(k, (classes.get(k) || 0) + 1);
      ctx.strokeStyle = PALETTE[k % PALETTE.length];
      ctx.beginPath(); ctx.arc((c / f + 0.5) * s, (r / f + 0.5) * s, Math.max(4, 6 * s / f + 3), 0, 2 * Math.PI); ctx.stroke();
    }
    const n = [...classes.values()].reduce((a, x) => a + x, 0);
    this.canvas.setAttribute("aria-label", `newest frame of ${this.consumer}: ${n} defects circled`);
    this.canvas.dataset.defects = String(n);
    this.legend.replaceChildren(...[...classes.keys()].sort().map((k) =>
      el("span", {}, el("i", { style: { background: PALETTE[k % PALETTE.length] } }), `class ${k}: ${classes.get(k)}`)));
  }
}

function requestFrame(uid, key, card) {
  const base = `api/runs/${encodeURIComponent(uid)}/${encodeURIComponent(card.consumer)}`;
  return Promise.all([
    fetch(`${base}/frame.f32`).then(async (r) => (r.ok ? { shape: r.headers.get("X-Shape").split(",").map(Number), values: new Float32Array(await r.arrayBuffer()) } : null)),
    fetch(`${base}/frame_defects.json`).then((r) => (r.ok ? r.json() : null)),
    fetch(`${base}/frame_bin.json`).then((r) => (r.ok ? r.json() : null)),
  ]).then(([frame, defects, bin]) => (frame && defects && bin ? { frame, defects, bin } : null));
}

// -- the clicked scan point --------------------------------------------------------------------
// For every consumer with a spectral model, the model spectrum at that point (api/.../point)
// beside the components it is made of, and the point's value in every map.
function pickPoint(rc) {
  state.point = rc;
  for (const card of state.cards.values()) if (card instanceof MapCard || card instanceof PlotCard) card.draw();
  loadPoint();
}

// A per-point list of (row, col, class) rows (the defects of one frame, in frame px) drawn as
// circles in their class colours on the frame's extent (rows down, as the newest-frame card).
function listCard(consumer, name, list, nav, extent) {
  const [H, W] = extent;
  const s = Math.min(300 / W, 300 / H);
  const canvas = el("canvas", { class: "frame", role: "img", "data-consumer": consumer, "data-list": name,
    "aria-label": `${consumer}/${name} at point ${nav}: ${list.rows.length} rows` });
  canvas.dataset.rows = String(list.rows.length);
  const ctx = sizeCanvas(canvas, W * s, H * s);
  ctx.fillStyle = "#f4f4f4"; ctx.fillRect(0, 0, W * s, H * s);
  ctx.strokeStyle = "#4a525c"; ctx.lineWidth = 1; ctx.strokeRect(0.5, 0.5, W * s - 1, H * s - 1);
  const classes = new Map();
  ctx.lineWidth = 2;
  for (const [r, c, k] of list.rows) {
    if (r === null || c === null) continue;
    const cls = k === null || k === undefined ? 0 : k;
    classes.set(cls, (classes.get(cls) || 0) + 1);
    ctx.strokeStyle = PALETTE[cls % PALETTE.length];
    ctx.beginPath(); ctx.arc((c + 0.5) * s, (r + 0.5) * s, 4, 0, 2 * Math.PI); ctx.stroke();
  }
  const legend = el("div", { class: "legend" }, ...[...classes.keys()].sort().map((k) =>
    el("span", {}, el("i", { style: { background: PALETTE[k % PALETTE.length] } }), `class ${k}: ${classes.get(k)}`)));
  return el("figure", { class: "card point-card", "data-consumer": consumer, "data-list": name },
    el("figcaption", { text: `${consumer}: ${name} at [${nav}]` },
      el("span", { class: "desc", text: `${list.rows.length} listed${list.units ? ` (${list.units})` : ""}` })),
    canvas, legend);
}

// The extent (rows, cols) a consumer's per-point lists are drawn on: its frame picture's shape
// times the picture's bin when it publishes one, else the largest row/col listed.
function listExtent(uid, consumer, lists) {
  const spec = state.run && state.run.consumers[consumer] && state.run.consumers[consumer].buffers.frame;
  const fallback = () => {
    let h = 1, w = 1;
    for (const l of Object.values(lists)) for (const [r, c] of l.rows) { if (r !== null) h = Math.max(h, r + 1); if (c !== null) w = Math.max(w, c + 1); }
    return [Math.ceil(h), Math.ceil(w)];
  };
  if (!spec || spec.extra_shape.length !== 2) return Promise.resolve(fallback());
  return fetch(`api/runs/${encodeURIComponent(uid)}/${encodeURIComponent(consumer)}/frame_bin.json`)
    .then((r) => (r.ok ? r.json() : null)).catch(() => null)
    .then((b) => {
      const f = b && b.data && b.data[0];
      return f ? [spec.extra_shape[0] * f, spec.extra_shape[1] * f] : fallback();
    });
}

// x values and label of a spectrum answered by the point API (its axis, else channel index)
function spectrumAxis(axis, n) {
  const x = axis && axis.values.length === n ? axis.values : Array.from({ length: n }, (_, i) => i);
  return [x, axis && axis.values.length === n ? `${axis.name} (${axis.units})` : "channel"];
}

// A plot card of the clicked point: the figure with its caption, canvas and legend.
function pointPlotCard(attrs, caption, desc, label, series, xlabel, ylabel) {
  const canvas = el("canvas", { class: "plot", role: "img", "aria-label": label, "data-consumer": attrs["data-consumer"] });
  const fig = el("figure", { class: "card point-card", ...attrs },
    el("figcaption", { text: caption }, el("span", { class: "desc", text: desc })),
    canvas, el("div", { class: "legend" }, ...series.map((s, k) =>
      el("span", {}, el("i", { style: { background: PALETTE[k % PALETTE.length] } }), s.label))));
  requestAnimationFrame(() => drawPlot(canvas, series, xlabel, ylabel));
  canvas.__series = series;
  return fig;
}

// The model spectrum at the point beside the weighted components it is made of.
function modelCard(a, nav) {
  const m = a.model;
  const [x, xlabel] = spectrumAxis(m.axis, m.spectrum.length);
  const series = [{ x, y: m.spectrum, label: "model at this point" },
    ...m.components.map((y, i) => ({ x, y: y.map((v) => (v === null ? null : v * m.weights[i])), label: `${fmt(m.weights[i])} × component ${i + 1}` }))];
  return pointPlotCard({ "data-consumer": a.consumer }, `${a.consumer}: spectrum at [${nav}]`,
    m.mean ? "mean + Σ score × component" : "Σ abundance × component",
    `model spectrum of ${a.consumer} at point ${nav}`, series, xlabel, m.units || "model");
}

// The measured spectrum at the point, as the consumer analysed it (after its preprocessing),
// with the model spectrum over it when both run along the same channels.
function measuredCard(a, nav) {
  const s = a.measured, n = s.spectrum.length;
  const [x, xlabel] = spectrumAxis(s.axis, n);
  const how = s.preprocessed ? "preprocessed, as analysed" : "as analysed";
  const series = [{ x, y: s.spectrum, label: `measured (${how})` }];
  if (a.model && a.model.spectrum.length === n) series.push({ x, y: a.model.spectrum, label: "model at this point" });
  return pointPlotCard({ "data-consumer": a.consumer, "data-measured": s.source, class: "card point-card measured-card" },
    `${a.consumer}: measured spectrum at [${nav}]`,
    s.preprocessed ? "preprocessed as analysed (the consumer's normalisation, window and derivative), not raw counts"
      : "as analysed (this consumer does not preprocess)",
    `measured spectrum of ${a.consumer} at point ${nav}, ${how}`, series, xlabel, s.units || "measured");
}

function loadPoint() {
  const run = state.run, box = document.getElementById("point");
  if (!run || !state.point) return;
  const nav = state.point.join(",");
  const consumers = Object.keys(run.consumers);
  Promise.all(consumers.map((c) => fetch(`api/runs/${encodeURIComponent(run.uid)}/${encodeURIComponent(c)}/point?nav=${nav}`)
    .then((r) => (r.ok ? r.json() : null)).catch(() => null)))
    .then((answers) => {
      if (!state.run || state.run.uid !== run.uid || state.point.join(",") !== nav) return;
      const cards = [];
      const values = [];
      answers.forEach((a) => {
        if (!a) return;
        for (const [name, v] of Object.entries(a.values)) {
          values.push(el("tr", {}, el("td", { text: `${a.consumer}/${name}` }),
            el("td", { class: "num", text: [v.value].flat().map((x) => withUnits(x, v.units)).join(", ") })));
        }
        if (a.model) cards.push(modelCard(a, nav));
        if (a.measured) cards.push(measuredCard(a, nav));
      });
      const table = el("table", { class: "health" }, el("caption", { text: `Values at [${nav}]` }), el("tbody", {}, ...values));
      const lists = answers.filter((a) => a && a.lists && Object.values(a.lists).some((l) => l.rows.length && l.rows[0].length >= 2));
      return Promise.all(lists.map((a) => listExtent(run.uid, a.consumer, a.lists).then((extent) =>
        Object.entries(a.lists).filter(([, l]) => l.rows.length && l.rows[0].length >= 2)
          .map(([name, l]) => listCard(a.consumer, name, l, nav, extent)))))
        .then((listCards) => {
          if (!state.run || state.run.uid !== run.uid || !state.point || state.point.join(",") !== nav) return;
          box.replaceChildren(el("div", { class: "cards" }, ...cards, ...listCards.flat(), el("div", {}, table)));
        });
    });
}

class ForecastCard extends PlotCard {
  // A trend's GP forecast (rows x, mean, lower, upper, threshold: the trends/features consumers'
  // <series>_forecast) with the points it is conditioned on (<series>_points, fetched beside it).
  constructor(key, spec) { super(key, spec, "forecast"); }

  update(buffer) {
    const [x, mean, lower, upper, thr] = buffer.data;
    const [consumer, name] = this.key.split("/");
    const series = name.replace(/_forecast$/, "");
    const draw = (pts) => {
      const curves = [{ x, y: mean, label: "mean" }, { x, y: lower, label: "-2σ" }, { x, y: upper, label: "+2σ" }];
      if (thr.some((v) => Number.isFinite(v))) curves.push({ x, y: thr, label: "threshold" });
      if (pts) curves.push({ x: pts[0], y: pts[1], label: "points" });
      drawPlot(this.canvas, curves, "x", this.spec.units ? `${series} (${this.spec.units})` : series);
      this.legend.replaceChildren(...curves.map((s, k) =>
        el("span", {}, el("i", { style: { background: PALETTE[k % PALETTE.length] } }), s.label)));
      this.canvas.setAttribute("aria-label", `forecast of ${series}: ${curves.length} curves against x`);
    };
    const url = `api/runs/${encodeURIComponent(state.selected)}/${encodeURIComponent(consumer)}/${encodeURIComponent(series + "_points")}.json`;
    fetch(url).then((r) => (r.ok ? r.json() : null)).then((b) => draw(b && b.data)).catch(() => draw(null));
  }
}

// -- runs, cards and fetching ----------------------------------------------------------------
// Buffers with more dimensions than a map or a set of curves (per-point lists of defect
// positions, stacks of patches) are left to the JSON API and the run files.
// Scan points analysed: events for document runs, frames for detector runs.
function pointsDone(run) { return Math.max(run.events_done, run.frames_done || 0); }

function cardFor(key, spec, run) {
  const navShape = run.nav_shape;
  if (spec.kind === "single" && spec.extra_shape.length === 2 && spec.extra_shape[0] === 5 && key.endsWith("_forecast")) {
    return new ForecastCard(key, spec);
  }
  if (spec.kind === "single" && spec.extra_shape.length === 2 && key.endsWith("_points")) return null;  // drawn by its forecast
  if (spec.kind === "nav" && navShape.length === 2 && spec.extra_shape.length <= 1) return new MapCard(key, spec, run);
  if (spec.kind === "sig" && spec.extra_shape.length === 2 && !spec.axis) {
    return new MapCard(key, { ...spec, extra_shape: [], sigImage: true }, run);   // a frame-shaped image, e.g. a density map
  }
  if (spec.kind === "nav" ? spec.extra_shape.length > 1 : spec.extra_shape.length > 2) return null;
  return new PlotCard(key, spec, spec.kind);
}

function ensureCards(run) {
  const maps = document.getElementById("maps"), plots = document.getElementById("plots");
  for (const [consumer, c] of Object.entries(run.consumers)) {
    for (const [name, spec] of Object.entries(c.buffers)) {
      const key = `${consumer}/${name}`;
      if (state.cards.has(key)) { state.cards.get(key).run = run; continue; }
      if (state.hidden.has(key)) continue;
      if (["frame_defects", "frame_bin"].includes(name) && c.buffers.frame) { state.hidden.add(key); continue; }
      const card = name === "frame" && c.buffers.frame_defects ? new FrameCard(key, spec, consumer) : cardFor(key, spec, run);
      if (!card) { state.hidden.add(key); continue; }
      state.cards.set(key, card);
      (card instanceof MapCard || card instanceof FrameCard ? maps : plots).append(card.fig);
      requestBuffer(run.uid, key);
    }
  }
}

function selectRun(uid) {
  state.selected = uid;
  state.point = null;
  state.cards.clear();
  state.hidden.clear();
  document.getElementById("maps").replaceChildren();
  document.getElementById("plots").replaceChildren();
  document.getElementById("point").replaceChildren(el("p", { class: "hint", text: "Click a map (or press Enter on it), or a per-frame curve of a frame series, to see that point." }));
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
  const history = card.kind === "single";  // single values: their history, kept by the server
  const got = card instanceof FrameCard ? requestFrame(uid, key, card) : fetch(history ? `${url}/history` : `${url}.${binary ? "f32" : "json"}`)
    .then(async (r) => {
      if (!r.ok) return null;
      if (!binary) return r.json();
      const shape = r.headers.get("X-Shape").split(",").map(Number);
      return { shape, values: new Float32Array(await r.arrayBuffer()) };
    });
  got.then((b) => {
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
  if (state.follow || !run) run = runs.find((r) => r.status === "open" || r.status === "finishing") || runs[0];
  if (run.uid !== state.selected) selectRun(run.uid);
  state.run = run;
  renderRun(run);
  renderRuns();
  ensureCards(run);
}

function onChanged(changed) {
  let mine = false;
  for (const { run, consumer, buffer } of changed) {
    if (run !== state.selected) continue;
    mine = true;
    const key = ["frame_defects", "frame_bin"].includes(buffer) ? `${consumer}/frame` : `${consumer}/${buffer}`;
    if (state.cards.has(key)) requestBuffer(run, key);
  }
  if (mine && state.point) loadPoint();
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

function chooseRun(uid) {
  state.follow = false;
  document.getElementById("follow").checked = false;
  selectRun(uid);
  onRuns(state.runs);
}

function renderRuns() {
  const picker = document.getElementById("run-picker");
  picker.replaceChildren(...state.runs.map((run) => el("option", { value: run.uid, text: `${runLabel(run)} · ${run.uid.slice(0, 8)}` })));
  if (state.selected) picker.value = state.selected;
  const list = document.getElementById("runs");
  list.replaceChildren(...state.runs.map((run) => {
    const button = el("button", { type: "button", text: runLabel(run), "aria-current": String(run.uid === state.selected) });
    button.addEventListener("click", () => chooseRun(run.uid));
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
  document.getElementById("run-picker").addEventListener("change", (e) => chooseRun(e.target.value));
  document.getElementById("follow").addEventListener("change", (e) => {
    state.follow = e.target.checked;
    onRuns(state.runs);
  });
  connect();
});
