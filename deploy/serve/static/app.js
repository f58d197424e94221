// The nsn-serve page: the governor live (a server-sent event stream read with fetch, so the API key
// travels in a header, never in a URL), a playground whose tokens show the rank they ran at, and
// the manual rank ceiling. Every model- or user-provided string is shown with textContent, never as
// HTML. No inline script: the Content-Security-Policy allows only this file.
"use strict";

const KEY_STORE = "nsn-api-key";
const HISTORY_S = 300; // the timeline's span
const page = { status: null, ticks: [], keyRequired: false, maxRank: 1, levels: [], stream: null };

const $ = (id) => document.getElementById(id);

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function headers(json) {
  const result = {};
  if (json) result["Content-Type"] = "application/json";
  if (apiKey()) result.Authorization = "Bearer " + apiKey();
  return result;
}

function say(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(Boolean(options.body)) });
  if (response.status === 401) {
    showKeyBox("The server refused the key: enter the right one.");
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (error) {
    return response.statusText;
  }
}

// Server-sent events from a fetch response: one block ("event: ...\ndata: ...") at a time.
async function* sseBlocks(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      yield buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
    }
  }
}

// ---- the API key ----------------------------------------------------------------------------
function showKeyBox(message) {
  $("key-box").hidden = false;
  say($("key-message"), message || "", Boolean(message));
}

function setUpKeyBox() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key-input").value = "";
    say($("key-message"), "Key kept for this tab.");
    start();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    say($("key-message"), "Key forgotten.");
  });
}

// ---- status ---------------------------------------------------------------------------------
function renderStatus(status) {
  page.status = status;
  page.maxRank = status.max_rank || 1;
  page.levels = status.levels || [];
  const uptime = Math.round(status.uptime_s || 0);
  const parts = [
    "model " + status.model,
    status.runtime || "loading",
    "levels " + (page.levels.join(", ") || "—"),
    "up " + Math.floor(uptime / 60) + " min " + (uptime % 60) + " s",
    "requests served: " + (status.requests_served || 0),
    governorState(status),
  ];
  $("status-line").textContent = parts.join(" · ");
  const slider = $("override-rank");
  slider.max = String(page.maxRank);
  if (!slider.dataset.touched) slider.value = String(status.ceiling || page.maxRank);
  $("override-value").textContent = slider.value;
  $("max-rank").max = String(page.maxRank);
  $("min-rank").max = String(page.maxRank);
  renderSensors(status);
  const encoder = status.task === "feature-extraction";
  $("prompt").placeholder = encoder ? "Texts to embed, one per line"
    : status.chat ? "A message to the model (chat)" : "A prompt to continue (completion)";
  // Embeddings have no tokens to count: the figure is the latest batch's rank, and there is no max_tokens.
  $("last-rank-label").textContent = encoder ? "last batch" : "last token";
  $("max-tokens-label").hidden = encoder;
}

// What the governor can do here: thermal control needs a trip point (or a policy's target).
function governorState(status) {
  if (!status.governor) return "no governor (fixed rank)";
  const control = (status.sensors || {}).thermal_control;
  return control && !control.on ? "governor on, thermal control off" : "governor on";
}

function renderSensors(status) {
  const list = $("sensors-found");
  list.replaceChildren();
  const sensors = status.sensors || {};
  for (const [zone, info] of Object.entries(sensors.thermal_zones || {})) {
    const trips = Object.entries(info.trips_c || {}).map(([k, v]) => k + " " + v + " °C").join(", ");
    addItem(list, "thermal zone " + zone + (trips ? " (trips: " + trips + ")" : ""));
  }
  for (const [name, kind] of Object.entries(sensors.power_supplies || {})) addItem(list, kind + " " + name);
  for (const rail of sensors.rails || []) addItem(list, "power rail " + rail);
  const absent = sensors.absent || [];
  $("sensors-absent").textContent = absent.length ? "absent: " + absent.join(", ") : "";
  const control = sensors.thermal_control;
  const notes = (status.notes || []).slice();
  if (control) notes.unshift("thermal control " + (control.on ? "on" : "off") + ": " + control.reason);
  $("notes").textContent = notes.join(" · ");
}

function addItem(list, text) {
  const item = document.createElement("li");
  item.textContent = text;
  list.appendChild(item);
}

async function refreshStatus() {
  const response = await api("/v1/nsn/status");
  if (response.ok) renderStatus(await response.json());
}

// ---- the governor's ticks -------------------------------------------------------------------
function renderTick(tick) {
  page.ticks.push(tick);
  const oldest = tick.time - HISTORY_S;
  while (page.ticks.length && page.ticks[0].time < oldest) page.ticks.shift();
  $("rank-now").textContent = tick.ceiling == null ? "—" : String(tick.ceiling);
  $("last-rank").textContent = tick.rank == null ? "—" : String(tick.rank);
  $("tps-now").textContent = String(tick.tokens_per_s);
  $("queue-now").textContent = String(tick.waiting);
  $("batch-now").textContent = tick.batch ? String(tick.batch) : "—";
  $("policy-now").textContent = tick.policy || (page.status && !page.status.governor ? "none (no governor)" : "none");
  $("profiles").hidden = tick.profile_switches == null;
  $("profile-switches").textContent = String(tick.profile_switches ?? 0);
  $("reason-now").textContent = tick.reason || "—";
  $("level").hidden = !tick.level || tick.level.levels !== "on";
  if (tick.level && tick.level.levels === "on") $("level-now").textContent = levelText(tick.level);
  if (!$("override-rank").dataset.touched) {
    $("override-rank").value = String(tick.ceiling);
    $("override-value").textContent = String(tick.ceiling);
  }
  drawCharts();
}

function levelText(level) {
  const layers = level.products + " of " + level.layers + " layers as dense products";
  return level.runs_on + (level.runs_on === "level" ? " (" + layers + ", " + level.level_mib + " MiB)" : "");
}

async function followEvents() {
  if (page.stream) return;
  page.stream = true;
  try {
    const response = await api("/v1/nsn/events");
    if (!response.ok || !response.body) throw new Error("the event stream answered " + response.status);
    for await (const block of sseBlocks(response)) handleEvent(block);
  } catch (error) {
    say($("reason-now"), "event stream interrupted: " + error.message, true);
  } finally {
    page.stream = null;
  }
  if (!page.keyRequired || apiKey()) setTimeout(followEvents, 2000);
}

function handleEvent(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data.push(line.slice(6));
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (kind === "status") renderStatus(payload);
  else if (kind === "tick") renderTick(payload);
}

// ---- charts ---------------------------------------------------------------------------------
const COLORS = ["#2459c5", "#c0392b", "#16a085", "#8e44ad", "#d35400", "#2c3e50"];

function drawCharts() {
  const ticks = page.ticks;
  const times = ticks.map((t) => t.time);
  const temps = {};
  for (const tick of ticks) {
    for (const [zone, value] of Object.entries(tick.temps_c || {})) (temps[zone] = temps[zone] || []);
  }
  for (const zone of Object.keys(temps)) temps[zone] = ticks.map((t) => (t.temps_c || {})[zone] ?? null);
  const trip = page.status && (page.status.sensors || {}).trip_c;
  drawChart($("chart-rank"), times, [{ name: "ceiling", values: ticks.map((t) => t.ceiling), step: true },
    { name: "latest token", values: ticks.map((t) => t.rank), step: true, dashed: true }],
  { min: 1, max: page.maxRank, marks: page.levels });
  drawChart($("chart-temp"), times, Object.entries(temps).map(([name, values]) => ({ name, values })),
    { marks: trip ? [trip] : [], markColor: "#c0392b" });
  drawChart($("chart-power"), times, [{ name: "power W", values: ticks.map((t) => t.power_w ?? null) },
    { name: "battery %", values: ticks.map((t) => t.battery_pct ?? null) }], { min: 0 });
  drawChart($("chart-load"), times, [{ name: "tokens/s", values: ticks.map((t) => t.tokens_per_s) },
    { name: "waiting", values: ticks.map((t) => t.waiting), step: true }], { min: 0 });
}

function drawChart(canvas, times, series, options) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = Number(canvas.getAttribute("height"));
  canvas.width = Math.round(width * ratio);
  canvas.style.height = height + "px";
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.scale(ratio, ratio);
  context.clearRect(0, 0, width, height);
  const values = series.flatMap((s) => s.values).filter((v) => v != null).concat(options.marks || []);
  let low = options.min ?? Math.min(...values);
  let high = options.max ?? Math.max(...values);
  if (!values.length) { low = 0; high = 1; }
  if (high <= low) high = low + 1;
  const now = times.length ? times[times.length - 1] : 0;
  // The span grows with the history, from half a minute to HISTORY_S, so a young page is readable.
  const span = Math.min(HISTORY_S, Math.max(30, times.length ? now - times[0] : 0));
  const left = 34, right = width - 6, top = 6, bottom = height - 16;
  const x = (t) => right - ((now - t) / span) * (right - left);
  const y = (v) => bottom - ((v - low) / (high - low)) * (bottom - top);
  context.font = "10px system-ui, sans-serif";
  context.fillStyle = "#5b6474";
  context.fillText(String(Math.round(high * 10) / 10), 2, top + 8);
  context.fillText(String(Math.round(low * 10) / 10), 2, bottom);
  context.fillText(span >= 120 ? "−" + Math.round(span / 60) + " min" : "−" + Math.round(span) + " s", left, height - 3);
  context.fillText("now", right - 18, height - 3);
  for (const mark of options.marks || []) {
    context.strokeStyle = options.markColor || "#b8bfca";
    context.setLineDash([3, 3]);
    context.beginPath();
    context.moveTo(left, y(mark));
    context.lineTo(right, y(mark));
    context.stroke();
  }
  series.forEach((s, index) => {
    context.strokeStyle = COLORS[index % COLORS.length];
    context.setLineDash(s.dashed ? [5, 3] : []);
    context.lineWidth = 1.6;
    context.beginPath();
    let started = false;
    let previous = null;
    s.values.forEach((v, i) => {
      if (v == null) { started = false; return; }
      if (!started) context.moveTo(x(times[i]), y(v));
      else if (s.step) context.lineTo(x(times[i]), y(previous));
      if (started) context.lineTo(x(times[i]), y(v));
      started = true;
      previous = v;
    });
    context.stroke();
    context.fillStyle = COLORS[index % COLORS.length];
    context.fillText(s.name, left + 4 + index * 70, top + 8);
  });
  if (!series.some((s) => s.values.some((v) => v != null))) {
    context.fillStyle = "#8a93a3";
    context.fillText("no reading on this device", (left + right) / 2 - 60, (top + bottom) / 2);
  }
  canvas.dataset.samples = String(times.length);
  const last = series[0] && series[0].values.length ? series[0].values[series[0].values.length - 1] : null;
  canvas.dataset.last = last == null ? "" : String(last);
}

// ---- the playground -------------------------------------------------------------------------
function rankColor(rank) {
  const share = page.maxRank > 1 ? (rank - 1) / (page.maxRank - 1) : 1;
  return "hsl(" + Math.round(share * 220) + ", 70%, 82%)"; // red (low rank) to blue (full rank)
}

function addToken(text, rank, seen, drafted) {
  const span = document.createElement("span");
  span.className = drafted ? "token drafted" : "token";
  span.textContent = text;
  span.dataset.rank = String(rank);
  span.style.backgroundColor = rankColor(rank);
  span.title = "rank " + rank + (drafted ? " · drafted by a lower rank and kept" : "");
  $("output").appendChild(span);
  if (!seen.has(rank)) {
    seen.add(rank);
    renderLegend(seen);
  }
}

function renderLegend(seen) {
  const legend = $("legend");
  legend.replaceChildren(document.createTextNode("ranks:"));
  for (const rank of [...seen].sort((a, b) => a - b)) {
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = rankColor(rank);
    swatch.dataset.rank = String(rank);
    legend.appendChild(swatch);
    legend.appendChild(document.createTextNode(String(rank)));
  }
}

function nsnOptions() {
  const nsn = {};
  const max = parseInt($("max-rank").value, 10);
  const min = parseInt($("min-rank").value, 10);
  if (max > 0) nsn.max_rank = max;
  if (min > 0) nsn.min_rank = min;
  return nsn;
}

function showResult(nsn, usage) {
  const ranks = nsn.ranks || {};
  const parts = ["ranks first " + ranks.first + ", last " + ranks.last + ", min " + ranks.min + ", mean " + ranks.mean,
    "FLOPs " + Math.round((nsn.flops_fraction || 0) * 100) + " % of dense", "governor: " + nsn.governor];
  if (usage) parts.push(usage.completion_tokens + " tokens");
  if (nsn.speculative) {
    const spec = nsn.speculative;
    parts.push("drafted by rank " + spec.draft_rank + ": " + spec.accepted + " of " + spec.drafted + " kept (outlined)"
      + (spec.switched_off ? ", then switched off" : ""));
  }
  if (nsn.note) parts.push(nsn.note);
  say($("result"), parts.join(" · "));
  $("result-nsn").textContent = JSON.stringify(nsn);
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || !page.status) return;
  $("send").disabled = true;
  $("output").replaceChildren();
  $("legend").replaceChildren();
  say($("result"), "…");
  try {
    if (page.status.task === "feature-extraction") await embed(text);
    else await complete(text);
  } catch (error) {
    say($("result"), "failed: " + error.message, true);
  } finally {
    $("send").disabled = false;
  }
}

async function complete(text) {
  const chat = page.status.chat;
  // greedy: the same prompt at the same rank gives the same reply, so ranks can be compared
  const body = { model: page.status.model, max_tokens: parseInt($("max-tokens").value, 10) || 48, stream: true,
    temperature: 0, stream_options: { include_usage: true }, nsn: nsnOptions() };
  if (chat) body.messages = [{ role: "user", content: text }];
  else body.prompt = text;
  const response = await api(chat ? "/v1/chat/completions" : "/v1/completions",
    { method: "POST", body: JSON.stringify(body) });
  if (!response.ok) {
    say($("result"), "refused (" + response.status + "): " + await errorText(response), true);
    return;
  }
  const seen = new Set();
  let final = null, usage = null;
  for await (const line of sseBlocks(response)) {
    if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
    const chunk = JSON.parse(line.slice(6));
    if (chunk.error) { say($("result"), "failed: " + chunk.error.message, true); return; }
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;
    const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
    if (choice.finish_reason == null && chunk.nsn) addToken(piece, chunk.nsn.rank, seen, chunk.nsn.drafted);
    else if (piece) addToken(piece, chunk.nsn && chunk.nsn.ranks ? chunk.nsn.ranks.last : page.maxRank, seen);
    if (choice.finish_reason != null) final = chunk.nsn;
  }
  if (final) showResult(final, usage);
}

async function embed(text) {
  const inputs = text.split("\n").filter((line) => line.trim());
  const response = await api("/v1/embeddings", { method: "POST",
    body: JSON.stringify({ model: page.status.model, input: inputs, encoding_format: "float", nsn: nsnOptions() }) });
  if (!response.ok) {
    say($("result"), "refused (" + response.status + "): " + await errorText(response), true);
    return;
  }
  const body = await response.json();
  const seen = new Set();
  body.data.forEach((item, index) => {
    const head = item.embedding.slice(0, 4).map((v) => v.toFixed(3)).join(", ");
    addToken(inputs[index] + " → [" + head + ", …] (" + item.embedding.length + " dims)\n", body.nsn.ranks.first, seen);
  });
  showResult(body.nsn, null);
}

// ---- the manual ceiling ---------------------------------------------------------------------
async function override(rank) {
  const message = $("override-message");
  const response = await api("/v1/nsn/override", { method: "POST", body: JSON.stringify({ rank }) });
  if (response.ok) {
    say(message, rank == null ? "Released: the governor decides." : "Ceiling set to rank " + rank + ".");
    if (rank == null) delete $("override-rank").dataset.touched;
  } else if (response.status === 401) {
    say(message, "Refused: this server needs its API key for the override; enter it above.", true);
  } else {
    say(message, "Refused (" + response.status + "): " + await errorText(response), true);
  }
}

function setUpControls() {
  $("prompt-form").addEventListener("submit", send);
  const slider = $("override-rank");
  slider.addEventListener("input", () => {
    slider.dataset.touched = "1";
    $("override-value").textContent = slider.value;
  });
  $("override-apply").addEventListener("click", () => override(parseInt(slider.value, 10)));
  $("override-release").addEventListener("click", () => override(null));
  window.addEventListener("resize", drawCharts);
}

// ---- start ----------------------------------------------------------------------------------
async function start() {
  if (page.keyRequired && !apiKey()) {
    showKeyBox("");
    return;
  }
  $("key-box").hidden = !page.keyRequired;
  await refreshStatus();
  followEvents();
}

async function boot() {
  setUpKeyBox();
  setUpControls();
  const response = await fetch("/nsn/page");
  const config = await response.json();
  page.keyRequired = Boolean(config.key_required);
  await start();
  setInterval(() => { if (!page.keyRequired || apiKey()) refreshStatus(); }, 5000);
}

boot();
