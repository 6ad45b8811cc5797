// The lockgate web console: polls the admin endpoint's JSON (/ui/api/...) and draws it.
// No framework, no build step, nothing fetched from elsewhere. Everything that comes from a
// message or a handler is inserted as text (textContent), never as HTML.
"use strict";

const SAMPLES = 90;          // points kept per chart (one per status poll)
const STATUS_EVERY = 1000;   // ms
const LETTERS_EVERY = 4000;  // ms
const SVG = "http://www.w3.org/2000/svg";

let token = "";
const history = new Map();   // route -> [{t, received, succeeded, dead_lettered, in_flight}]
const selected = new Set();  // dead-letter positions
let openPosition = null;

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function when(ms) {
  if (!ms) return "-";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function stateClass(s) {
  if (s === "running" || s === "closed") return "badge ok";
  if (s === "paused" || s === "half_open" || s === "connecting" || s === "starting") return "badge warn";
  return "badge bad";
}

async function getJson(path) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const r = await fetch(path, { cache: "no-store", headers });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`HTTP ${r.status}: ${body.error || r.statusText}`);
  return body;
}

// --- charts -------------------------------------------------------------------------------

function chart(caption, series, names) {
  const fig = el("figure", { class: "chart" });
  fig.style.margin = "0";
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 100 100");
  svg.setAttribute("preserveAspectRatio", "none");
  const max = Math.max(1, ...series.flat());
  // The last SAMPLES points, right-aligned; at least 10 slots so a young chart is not a smear.
  const slots = Math.max(10, ...series.map((p) => p.length));
  const x = (i, len) => ((slots - len + i) / (slots - 1)) * 100;
  const y = (v) => 100 - (v / max) * 92 - 4;
  series.forEach((points, i) => {
    if (!points.length) return;
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.map((v, j) => `${x(j, points.length)},${y(v)}`).join(" "));
    line.setAttribute("class", `s${i}`);
    svg.append(line);
  });
  const legend = el("div", { class: "legend" });
  const fmt = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1));
  names.forEach((n, i) => {
    const last = series[i].length ? series[i][series[i].length - 1] : 0;
    legend.append(el("i", { class: `l${i}`, text: `${n} ${fmt(last)}` }));
  });
  fig.append(el("figcaption", { text: `${caption} (max ${fmt(max)})` }), svg, legend);
  return fig;
}

function rates(samples, field) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = (samples[i].t - samples[i - 1].t) / 1000;
    const dv = samples[i][field] - samples[i - 1][field];
    out.push(dt > 0 && dv >= 0 ? dv / dt : 0);
  }
  return out;
}

// --- routes, failures, reloads --------------------------------------------------------------

function routeCard(r) {
  const samples = history.get(r.route) || [];
  const counter = (name, label) =>
    el("div", {}, el("span", { text: label }), el("b", { "data-counter": name, text: String(r[name]) }));
  const card = el("div", { class: "card", "data-route": r.route },
    el("div", { class: "title" },
      el("b", { text: r.route }),
      el("span", { class: stateClass(r.state), "data-field": "state", text: r.state }),
      el("span", { class: stateClass(r.breaker), "data-field": "breaker", text: `breaker ${r.breaker}` }),
      el("span", { class: "muted", title: r.module_hash, text: `${r.handler} @ ${r.handler_version}` })),
    r.reason ? el("div", { class: "reason", text: r.reason + (r.fix ? ` — ${r.fix}` : "") }) : null,
    el("div", { class: "counters" },
      counter("received", "received"), counter("succeeded", "succeeded"),
      counter("dead_lettered", "dead-lettered"), counter("in_flight", "in flight"),
      counter("retried", "retried"), counter("rejected", "rejected"),
      counter("duplicates", "duplicates"), counter("breaker_trips", "breaker trips")),
    el("div", { class: "charts" },
      chart("per second", [rates(samples, "received"), rates(samples, "succeeded"), rates(samples, "dead_lettered")],
        ["in", "ok", "dlq"]),
      chart("in flight / lag", [samples.map((s) => s.in_flight), samples.map((s) => s.lag)], ["in flight", "lag"])));
  if (r.lag.length) {
    const rows = r.lag.map((l) => el("tr", {},
      el("td", { text: l.topic }), el("td", { text: l.partition == null ? "-" : String(l.partition) }),
      el("td", { text: String(l.messages) })));
    card.append(el("table", { class: "lag" },
      el("thead", {}, el("tr", {}, el("th", { text: "topic" }), el("th", { text: "partition" }), el("th", { text: "lag" }))),
      el("tbody", {}, ...rows)));
  } else {
    card.append(el("div", { class: "lag muted", text: "lag: not reported by this source" }));
  }
  return card;
}

function drawStatus(s) {
  const now = Date.now();
  const box = $("#routes");
  box.replaceChildren(...s.routes.map((r) => {
    const samples = history.get(r.route) || [];
    samples.push({ t: now, received: r.received, succeeded: r.succeeded, dead_lettered: r.dead_lettered,
      in_flight: r.in_flight, lag: r.lag.reduce((a, l) => a + l.messages, 0) });
    while (samples.length > SAMPLES) samples.shift();
    history.set(r.route, samples);
    return routeCard(r);
  }));
  if (!s.routes.length) box.append(el("p", { class: "muted", text: "No route is running." }));
  const routeSelect = $("#f-route");
  const have = new Set([...routeSelect.options].map((o) => o.value));
  for (const r of s.routes) if (!have.has(r.route)) routeSelect.append(el("option", { text: r.route }));
  const failing = s.routes.filter((r) => r.reason).map((r) =>
    el("li", {}, el("b", { text: `${r.route}: ` }), el("span", { class: "reason", text: r.reason })));
  drawFailures(failing, null);
  $("#reload-counts").textContent = `${s.reloads.applied} applied, ${s.reloads.refused} refused since start`;
  $("#reloads").replaceChildren(...s.reloads.history.map((h) =>
    el("li", {}, el("span", { class: h.applied ? "badge ok" : "badge bad", text: h.applied ? "applied" : "refused" }),
      ` ${when(h.at_ms)} `, el("span", { text: h.applied ? h.changes.join("; ") : h.error || "" }))));
  if (!s.reloads.history.length) $("#reloads").append(el("li", { class: "muted", text: "No reload since start." }));
}

let routeFailures = [];
let letterFailures = [];
function drawFailures(routes, letters) {
  if (routes) routeFailures = routes;
  if (letters) letterFailures = letters;
  const all = [...routeFailures, ...letterFailures];
  $("#failures").replaceChildren(...(all.length ? all : [el("li", { class: "muted", text: "None." })]));
}

// --- dead letters ---------------------------------------------------------------------------

function filterQuery() {
  const q = new URLSearchParams();
  for (const [id, name] of [["#f-route", "route"], ["#f-kind", "error_kind"], ["#f-status", "status"], ["#f-reason", "reason"]]) {
    const v = $(id).value.trim();
    if (v) q.set(name, v);
  }
  q.set("limit", "200");
  return q.toString();
}

function updateReplayButton() {
  $("#replay").disabled = selected.size === 0;
  $("#replay").textContent = selected.size ? `Replay selected (${selected.size})` : "Replay selected";
}

function drawLetters(list) {
  const rows = list.dead_letters.map((d) => {
    const box = el("input", { type: "checkbox", "aria-label": `select ${d.shown}` });
    box.checked = selected.has(d.position);
    box.addEventListener("click", (e) => {
      e.stopPropagation();
      if (box.checked) selected.add(d.position); else selected.delete(d.position);
      updateReplayButton();
    });
    const tr = el("tr", { "data-position": d.position },
      el("td", {}, box), el("td", { text: d.shown }), el("td", { text: d.route }),
      el("td", { text: d.error_kind }), el("td", { text: String(d.attempts) }),
      el("td", { text: when(d.last_failure_ms) }),
      el("td", { class: "status" }, el("span", { class: d.status === "pending" ? "badge warn" : d.status === "handled" || d.status === "skipped" ? "badge ok" : d.status === "failed" ? "badge bad" : "badge", text: d.status })),
      el("td", { class: "why", text: d.reason }));
    if (d.position === openPosition) tr.classList.add("open");
    tr.addEventListener("click", () => openLetter(d.position));
    return tr;
  });
  $("#dead-letters tbody").replaceChildren(...rows);
  const errors = list.errors.length ? ` — cannot read: ${list.errors.join("; ")}` : "";
  $("#dl-summary").textContent = `${list.dead_letters.length} of ${list.total} dead letters shown${errors}`;
}

async function openLetter(position, scroll = true) {
  openPosition = position;
  for (const tr of document.querySelectorAll("#dead-letters tbody tr")) {
    tr.classList.toggle("open", tr.dataset.position === position);
  }
  try {
    const d = await getJson(`/ui/api/dead-letters/${encodeURI(position)}`);
    $("#letter-position").textContent = d.shown;
    const meta = [["dlq", d.dlq], ["status", d.status + (d.result_detail ? ` (${d.result_detail})` : "")],
      ["route", d.route], ["handler", `${d.handler} (module ${d.module_hash.slice(0, 12)})`],
      ["source", d.source], ["message id", d.message_id],
      ["error", `${d.error_kind}: ${d.reason}`], ["gave up", `${d.gave_up} after ${d.attempts} attempt(s)`],
      ["first failure", when(d.first_failure_ms)], ["last failure", when(d.last_failure_ms)]];
    if (d.key != null) meta.push(["key", d.key]);
    if (d.key_base64 != null) meta.push(["key (base64)", d.key_base64]);
    $("#letter-meta").replaceChildren(...meta.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    $("#letter-headers tbody").replaceChildren(...(d.headers.length
      ? d.headers.map(([n, v]) => el("tr", {}, el("td", { text: n }), el("td", { text: v })))
      : [el("tr", {}, el("td", { class: "muted", text: "none" }))]));
    let payload = d.payload != null ? d.payload : `(base64) ${d.payload_base64}`;
    try { if (d.payload != null) payload = JSON.stringify(JSON.parse(d.payload), null, 2); } catch (_) { /* not JSON */ }
    $("#letter-payload").textContent = payload;
    const wasHidden = $("#letter").hidden;
    $("#letter").hidden = false;
    if (scroll && wasHidden) $("#letter").scrollIntoView({ block: "nearest" });
  } catch (e) {
    $("#letter-position").textContent = position;
    $("#letter-meta").replaceChildren(el("dt", { text: "error" }), el("dd", { class: "reason", text: e.message }));
    if (e.message.startsWith("HTTP 401") || e.message.startsWith("HTTP 403")) {
      $("#letter-meta").append(el("dt", { text: "" }), el("dd", { class: "muted", text: "A letter's payload and headers need the admin token: type it above." }));
    }
    $("#letter-headers tbody").replaceChildren();
    $("#letter-payload").textContent = "";
    $("#letter").hidden = false;
  }
}

async function pollLetters() {
  try {
    drawLetters(await getJson(`/ui/api/dead-letters?${filterQuery()}`));
    // The open letter's status changes when it is replayed: show it as it is now.
    if (openPosition) await openLetter(openPosition, false);
    const recent = await getJson("/ui/api/dead-letters?limit=6");
    drawFailures(null, recent.dead_letters.map((d) => el("li", {},
      el("b", { text: `${d.route} ` }), el("span", { class: "muted", text: `${when(d.last_failure_ms)} ${d.error_kind}: ` }),
      el("span", { class: "reason", text: d.reason }))));
  } catch (e) {
    $("#dl-summary").textContent = `Dead letters unavailable: ${e.message}`;
  }
}

async function replay() {
  const result = $("#replay-result");
  result.className = "";
  result.textContent = "Replaying…";
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const r = await fetch("/ui/api/replay", {
      method: "POST", headers, body: JSON.stringify({ positions: [...selected] }),
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      result.className = "bad";
      result.textContent = `Refused (${r.status}): ${body.error || r.statusText}`;
      if (r.status === 401 || r.status === 403) $("#token").focus();
      return;
    }
    result.className = "ok";
    result.textContent = `Replayed ${body.replayed} (${body.already} already replayed, ${body.not_found} not found)`;
    selected.clear();
    updateReplayButton();
    await pollLetters();
  } catch (e) {
    result.className = "bad";
    result.textContent = `Replay failed: ${e.message}`;
  }
}

// --- polling --------------------------------------------------------------------------------

async function pollStatus() {
  try {
    const s = await getJson("/ui/api/status");
    drawStatus(s);
    $("#conn").className = "badge ok";
    $("#conn").textContent = `live ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("#conn").className = "badge bad";
    $("#conn").textContent = `disconnected: ${e.message}`;
  }
}

function every(ms, f) {
  const tick = async () => { await f(); setTimeout(tick, ms); };
  tick();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("#token").value.trim();
    $("#token-state").textContent = token ? "token set" : "read-only";
    if (openPosition) openLetter(openPosition, false);
  });
  $("#dl-filter").addEventListener("submit", (e) => { e.preventDefault(); pollLetters(); });
  $("#replay").addEventListener("click", replay);
  every(STATUS_EVERY, pollStatus);
  every(LETTERS_EVERY, pollLetters);
});
