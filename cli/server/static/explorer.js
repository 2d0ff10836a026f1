// The Layerbase explorer: plain JavaScript over the JSON API (no framework, no CDN, so that
// it works offline). Every text from the warehouse goes in through textContent, never HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { run: null, cell: null };
const CELL_MAX = 28;
const MARGIN = { left: 56, top: 18, right: 12, bottom: 44 };

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) {
    const detail = body.error || (body.detail && JSON.stringify(body.detail)) || response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

// viridis, sampled at five stops and interpolated
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(t) {
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  const c = STOPS[i].map((v, k) => Math.round(v + f * (STOPS[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function onDiagonal(run, i, j) {
  // i, j: 1-based row and column; rows are model A's layers. The generalized diagonal is
  // defined with the deeper model's layers as rows (0 <= i - j <= n - m).
  const n = run.layers_a.length, m = run.layers_b.length;
  return n >= m ? (i - j >= 0 && i - j <= n - m) : (j - i >= 0 && j - i <= m - n);
}

function geometry(run) {
  const rows = run.layers_a.length, cols = run.layers_b.length;
  const size = Math.max(6, Math.min(CELL_MAX, Math.floor(560 / Math.max(rows, cols))));
  return { rows, cols, size, width: MARGIN.left + cols * size + MARGIN.right, height: MARGIN.top + rows * size + MARGIN.bottom };
}

function drawHeatmap(run) {
  const canvas = $("heatmap");
  const g = geometry(run);
  canvas.width = g.width;
  canvas.height = g.height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, g.width, g.height);
  const flat = run.scores.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat);
  run.scores.forEach((row, r) => row.forEach((score, c) => {
    ctx.fillStyle = colour(hi > lo ? (score - lo) / (hi - lo) : 0.5);
    ctx.fillRect(MARGIN.left + c * g.size, MARGIN.top + r * g.size, g.size, g.size);
  }));
  // the generalized diagonal: a dashed edge wherever a diagonal cell meets a cell off it
  ctx.strokeStyle = "#fff";
  ctx.setLineDash([3, 2]);
  ctx.lineWidth = 1.2;
  ctx.beginPath();
  for (let r = 0; r < g.rows; r++) {
    for (let c = 0; c < g.cols; c++) {
      if (!onDiagonal(run, r + 1, c + 1)) continue;
      const x = MARGIN.left + c * g.size, y = MARGIN.top + r * g.size;
      if (c === 0 || !onDiagonal(run, r + 1, c)) { ctx.moveTo(x, y); ctx.lineTo(x, y + g.size); }
      if (c === g.cols - 1 || !onDiagonal(run, r + 1, c + 2)) { ctx.moveTo(x + g.size, y); ctx.lineTo(x + g.size, y + g.size); }
      if (r === 0 || !onDiagonal(run, r, c + 1)) { ctx.moveTo(x, y); ctx.lineTo(x + g.size, y); }
      if (r === g.rows - 1 || !onDiagonal(run, r + 2, c + 1)) { ctx.moveTo(x, y + g.size); ctx.lineTo(x + g.size, y + g.size); }
    }
  }
  ctx.stroke();
  ctx.setLineDash([]);
  // the max-similarity path: for each layer of A, its most similar layer of B
  ctx.strokeStyle = "#e53935";
  ctx.lineWidth = 2;
  ctx.beginPath();
  run.path.forEach((p, k) => {
    const r = run.layers_a.indexOf(p.layer_a), c = run.layers_b.indexOf(p.layer_b);
    const x = MARGIN.left + (c + 0.5) * g.size, y = MARGIN.top + (r + 0.5) * g.size;
    if (k === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  // axes
  ctx.fillStyle = "#222";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "right";
  const every = Math.ceil(12 / g.size);
  run.layers_a.forEach((layer, r) => {
    if (r % every === 0) ctx.fillText(String(layer), MARGIN.left - 4, MARGIN.top + (r + 0.75) * g.size);
  });
  ctx.textAlign = "center";
  run.layers_b.forEach((layer, c) => {
    if (c % every === 0) ctx.fillText(String(layer), MARGIN.left + (c + 0.5) * g.size, MARGIN.top + g.rows * g.size + 13);
  });
  ctx.fillText(`${run.model_b} layer`, MARGIN.left + (g.cols * g.size) / 2, g.height - 8);
  ctx.save();
  ctx.translate(12, MARGIN.top + (g.rows * g.size) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText(`${run.model_a} layer`, 0, 0);
  ctx.restore();
  canvas.dataset.rendered = "true";
}

function cellAt(event) {
  const run = state.run;
  if (!run) return null;
  const g = geometry(run);
  const rect = $("heatmap").getBoundingClientRect();
  const c = Math.floor((event.clientX - rect.left - MARGIN.left) / g.size);
  const r = Math.floor((event.clientY - rect.top - MARGIN.top) / g.size);
  if (r < 0 || c < 0 || r >= g.rows || c >= g.cols) return null;
  return { r, c, layerA: run.layers_a[r], layerB: run.layers_b[c], score: run.scores[r][c] };
}

function hover(event) {
  const cell = cellAt(event);
  const tip = $("tooltip");
  if (!cell) { tip.hidden = true; return; }
  const run = state.run;
  tip.textContent = `${run.model_a} L${cell.layerA} (depth ${run.depths_a[cell.r].toFixed(2)}) × ` +
    `${run.model_b} L${cell.layerB} (depth ${run.depths_b[cell.c].toFixed(2)}): ${cell.score.toFixed(4)}`;
  tip.style.left = `${event.offsetX + 14}px`;
  tip.style.top = `${event.offsetY + 10}px`;
  tip.hidden = false;
}

function neighbourList(title, side) {
  const column = element("div", undefined, "column");
  column.appendChild(element("h4", title));
  column.appendChild(element("div", `answered by: ${side.path}`, "muted"));
  const list = element("ol", undefined, "neighbors");
  for (const n of side.neighbors) {
    const item = element("li", undefined, n.shared ? "shared" : "");
    item.appendChild(element("span", `[${n.position}] `));
    item.appendChild(element("span", `${n.distance.toFixed(8)} `, "distance"));
    item.appendChild(element("span", n.text.replace(/\s+/g, " ").slice(0, 140)));
    item.dataset.position = n.position;
    list.appendChild(item);
  }
  column.appendChild(list);
  return column;
}

async function showOverlap() {
  const cell = state.cell, run = state.run;
  if (!cell || !run) return;
  showError("");
  $("cell").textContent = `${run.model_a} layer ${cell.layerA} × ${run.model_b} layer ${cell.layerB}`;
  const params = new URLSearchParams({
    prompt: $("prompt").value, k: $("k").value,
    model_a: run.model_a, layer_a: cell.layerA, dataset_a: run.dataset_a,
    model_b: run.model_b, layer_b: cell.layerB, dataset_b: run.dataset_b,
  });
  try {
    const both = await api(`/api/overlap?${params}`);
    const box = $("overlap");
    box.replaceChildren(
      neighbourList(`${run.model_a} layer ${cell.layerA}`, both.first),
      neighbourList(`${run.model_b} layer ${cell.layerB}`, both.second),
    );
    box.appendChild(element("p", `Shared: ${both.shared.length} of ${$("k").value} (highlighted). Query: ${both.first.query}`, "muted"));
  } catch (error) { showError(error.message); }
}

async function loadRun(id) {
  try {
    state.run = await api(`/api/affinity/${id}`);
    const run = state.run, t = run.test;
    const test = !t ? "no diagonal test" : t.t === null ? `no test: ${t.undefined_reason}`
      : `diagonal test t = ${t.t.toFixed(2)}, log10 p = ${t.log10_p.toFixed(1)}`;
    const chance = run.chance === null ? "no null level" : `chance ${run.chance.toFixed(4)}`;
    const about = run.describe_parameters ? ` (${run.describe_parameters})` : "";
    const intervals = run.bootstrap.map((i) => `${i.statistic === "cell" ? `cell ${i.layer_a}:${i.layer_b}` : i.statistic.replace("_", " ")} [${i.low.toFixed(3)}, ${i.high.toFixed(3)}]`);
    $("run-about").textContent = `${run.label}${about} on ${run.dataset_a}, |D| = ${run.n_prompts}, ${chance}; ${test}` + (intervals.length ? `; bootstrap ${intervals.join(", ")}` : "");
    drawHeatmap(run);
  } catch (error) { showError(error.message); }
}

async function textNeighbours() {
  const run = state.run, cell = state.cell;
  if (!run || !cell) { showError("choose a cell first: the text is looked up at model A's layer"); return; }
  showError("");
  try {
    const answer = await api("/api/neighbors", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: run.model_a, dataset: run.dataset_a, layer: cell.layerA, text: $("text").value, k: Number($("k").value) }),
    });
    $("text-result").replaceChildren(neighbourList(`${answer.model} layer ${answer.layer}: ${answer.query}`, answer));
  } catch (error) { showError(error.message); }
}

async function generate() {
  showError("");
  const name = $("vector").value;
  if (!name) { showError("no steering vector is stored"); return; }
  try {
    const out = await api(`/api/steering/${encodeURIComponent(name)}/generate`, {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ prompt: $("steer-prompt").value, coefficient: Number($("coefficient").value), max_new_tokens: Number($("tokens").value) }),
    });
    const column = (title, text) => {
      const c = element("div", undefined, "column");
      c.appendChild(element("h4", title));
      c.appendChild(element("div", out.prompt + text, "generation"));
      return c;
    };
    $("steer-result").replaceChildren(column("unsteered", out.unsteered), column(`steered (${out.coefficient} × ${name})`, out.steered));
  } catch (error) { showError(error.message); }
}

async function start() {
  try {
    const health = await api("/api/health");
    $("health").textContent = `PostgreSQL ${health.server}, pgvector ${health.pgvector}`;
    const runs = (await api("/api/affinity")).filter((r) => r.is_current);
    const select = $("run");
    for (const r of runs) {
      // the run's parameters, as "k = 10, permutations = 10" (the preprocessing only when not none)
      const parameters = Object.entries(r.parameters || {})
        .filter(([key, value]) => key !== "seed" && !(key === "preprocess" && value === "none"))
        .map(([key, value]) => `${key} = ${value}`).join(", ");
      const option = element("option", `${r.run_id}: ${r.model_a} × ${r.model_b} on ${r.dataset_a}, ${r.measure}` + (parameters ? ` (${parameters})` : ""));
      option.value = r.run_id;
      select.appendChild(option);
    }
    select.addEventListener("change", () => loadRun(select.value));
    if (runs.length) await loadRun(runs[0].run_id);
    else $("run-about").textContent = "no affinity run is stored yet: run `layerbase affinity` first";
    for (const v of await api("/api/steering")) {
      const option = element("option", `${v.name} (${v.model}, layer ${v.layer})`);
      option.value = v.name;
      $("vector").appendChild(option);
    }
  } catch (error) { showError(error.message); }
  const canvas = $("heatmap");
  canvas.addEventListener("mousemove", hover);
  canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  canvas.addEventListener("click", (event) => {
    const cell = cellAt(event);
    if (cell) { state.cell = cell; showOverlap(); }
  });
  $("prompt").addEventListener("change", showOverlap);
  $("k").addEventListener("change", showOverlap);
  $("text-go").addEventListener("click", textNeighbours);
  $("steer-go").addEventListener("click", generate);
}

start();
