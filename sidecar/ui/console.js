// The admin console: plain JavaScript over the admin API (/admin/keys,
// /admin/usage, /admin/audit_logs). The admin token lives in this tab's
// sessionStorage only. Every value from the API is shown with textContent,
// never as HTML.
"use strict";

const TOKEN = "openclaw_admin_token";
const COLORS = ["#3b6fd4", "#d4703b", "#3ba55c", "#b84dbf", "#c9a227", "#2aa7b8", "#d44a6b", "#6b7a8f"];

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function notice(message, kind = "info") {
  const n = $("#notice");
  n.textContent = message;
  n.className = kind;
  n.hidden = !message;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error;
    super(e && e.message ? e.message : `HTTP ${status}`);
    this.status = status;
    this.code = e && e.code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN) || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch (_) {
    json = null;
  }
  if (resp.status === 401 && path.startsWith("/admin/")) {
    signOut("The admin token was refused; sign in again.");
  }
  if (!resp.ok) throw new ApiError(resp.status, json);
  return { json, text, headers: resp.headers };
}

// ---- sign-in -------------------------------------------------------------

function signedIn() {
  return Boolean(sessionStorage.getItem(TOKEN));
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN);
  show();
  if (message) notice(message, "error");
}

async function signIn(event) {
  event.preventDefault();
  const token = $("#token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN, token);
  try {
    await api("GET", "/admin/keys?limit=1");
  } catch (e) {
    sessionStorage.removeItem(TOKEN);
    show();
    notice(e.status === 401 ? "That admin token is not accepted." : `Cannot reach the admin API: ${e.message}`, "error");
    return;
  }
  $("#token").value = "";
  notice("");
  show("keys");
}

function show(view) {
  const inside = signedIn();
  $("#signin-view").hidden = inside;
  $("#nav").hidden = !inside;
  for (const v of document.querySelectorAll(".view")) v.hidden = !inside || v.id !== `${view}-view`;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === view);
  if (!inside) return;
  notice("");
  if (view === "keys") loadKeys(true);
  if (view === "usage") loadUsage();
  if (view === "audit") loadAudit(true);
}

// ---- keys ----------------------------------------------------------------

const PAGE = 100;
let keysOffset = 0;

function fmtNum(n) {
  return n === null || n === undefined ? "" : Number(n).toLocaleString("en-US");
}

function optional(form, name, kind) {
  const raw = form.elements[name].value.trim();
  if (!raw) return null;
  if (kind === "list") return raw.split(",").map((s) => s.trim()).filter(Boolean);
  if (kind === "int") return Number.parseInt(raw, 10);
  return raw;
}

function controlsOf(form) {
  return {
    allowed_models: optional(form, "allowed_models", "list"),
    expires_at: optional(form, "expires_at", "text"),
    rpm_limit: optional(form, "rpm_limit", "int"),
    tpm_limit: optional(form, "tpm_limit", "int"),
  };
}

async function loadKeys(fresh) {
  if (fresh) {
    keysOffset = 0;
    $("#keys tbody").replaceChildren();
  }
  try {
    const { json } = await api("GET", `/admin/keys?limit=${PAGE}&offset=${keysOffset}`);
    for (const k of json.data) $("#keys tbody").append(keyRow(k));
    keysOffset += json.data.length;
    $("#keys-more").hidden = !json.has_more;
  } catch (e) {
    notice(`Keys: ${e.message}`, "error");
  }
}

function keyRow(k) {
  const amount = el("input", { type: "number", step: "1", placeholder: "tokens", class: "topup-amount", "aria-label": "tokens to add" });
  const topUp = el("button", { type: "button", class: "topup", text: "Top up" });
  topUp.addEventListener("click", () => patchKey(k, { balance_tokens: Number.parseInt(amount.value, 10) }, "Topped up"));
  const frozen = k.status === "frozen";
  const toggle = el("button", { type: "button", class: "freeze", text: frozen ? "Activate" : "Freeze" });
  toggle.addEventListener("click", () => patchKey(k, { status: frozen ? "active" : "frozen" }, frozen ? "Activated" : "Frozen"));
  const edit = el("button", { type: "button", class: "edit", text: "Controls" });
  edit.addEventListener("click", () => openEdit(k));
  const row = el(
    "tr",
    { "data-key-id": k.key_id },
    el("td", { class: "mono", text: k.key_id }),
    el("td", { class: "mono", text: k.api_key }),
    el("td", { text: k.user_name }),
    el("td", { class: "num balance", text: fmtNum(k.balance_tokens) }),
    el("td", { class: "num", text: fmtNum(k.held_tokens) }),
    el("td", { class: `status ${k.status}`, text: k.status }),
    el("td", { text: k.allowed_models ? k.allowed_models.join(", ") : "any" }),
    el("td", { text: k.expires_at || "never" }),
    el("td", { class: "num", text: fmtNum(k.rpm_limit) }),
    el("td", { class: "num", text: fmtNum(k.tpm_limit) }),
    el("td", { class: "actions" }, amount, topUp, toggle, edit),
  );
  return row;
}

async function patchKey(k, body, done) {
  if ("balance_tokens" in body && !Number.isInteger(body.balance_tokens)) {
    notice("Give a whole number of tokens to add (negative deducts).", "error");
    return;
  }
  try {
    const { json } = await api("PATCH", `/admin/keys/${encodeURIComponent(k.key_id)}`, body);
    const old = document.querySelector(`#keys tr[data-key-id="${CSS.escape(k.key_id)}"]`);
    if (old) old.replaceWith(keyRow(json));
    notice(`${done}: ${json.key_id} (${json.user_name}), balance ${fmtNum(json.balance_tokens)} tokens.`);
  } catch (e) {
    notice(`${k.key_id}: ${e.message}`, "error");
  }
}

async function createKey(event) {
  event.preventDefault();
  const form = event.target;
  const body = {
    user_name: form.elements.user_name.value.trim(),
    balance_tokens: Number.parseInt(form.elements.balance_tokens.value, 10),
    ...controlsOf(form),
  };
  const apiKey = form.elements.api_key.value.trim();
  if (apiKey) body.api_key = apiKey;
  for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
  try {
    const { json } = await api("POST", "/admin/keys", body);
    form.reset();
    const shown = $("#new-key");
    if (!apiKey) {
      shown.textContent = `New key for ${json.user_name}, shown this once: ${json.api_key}`;
      shown.hidden = false;
    } else {
      shown.hidden = true;
    }
    notice(`Created ${json.key_id} for ${json.user_name} with ${fmtNum(json.balance_tokens)} tokens.`);
    loadKeys(true);
  } catch (e) {
    notice(`Create: ${e.message}`, "error");
  }
}

let editing = null;

function openEdit(k) {
  editing = k;
  const form = $("#edit-form");
  $("#edit-key").textContent = `${k.key_id} (${k.user_name})`;
  form.elements.allowed_models.value = k.allowed_models ? k.allowed_models.join(", ") : "";
  form.elements.expires_at.value = k.expires_at || "";
  form.elements.rpm_limit.value = k.rpm_limit ?? "";
  form.elements.tpm_limit.value = k.tpm_limit ?? "";
  $("#edit-dialog").showModal();
}

async function saveEdit(event) {
  event.preventDefault();
  const k = editing;
  $("#edit-dialog").close();
  if (k) await patchKey(k, controlsOf($("#edit-form")), "Controls saved");
}

// ---- usage ---------------------------------------------------------------

function buckets(range) {
  const now = new Date();
  const out = [];
  if (range === "day") {
    const start = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate(), now.getUTCHours() - 23));
    for (let i = 0; i < 24; i++) out.push(new Date(start.getTime() + i * 3600e3).toISOString().slice(0, 13) + ":00:00Z");
    return { from: out[0], field: "hour", labels: out, short: (b) => b.slice(11, 16) };
  }
  const start = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - 29));
  for (let i = 0; i < 30; i++) out.push(new Date(start.getTime() + i * 86400e3).toISOString().slice(0, 10));
  return { from: `${out[0]}T00:00:00Z`, field: "day", labels: out, short: (b) => b.slice(5) };
}

async function loadUsage(event) {
  if (event) event.preventDefault();
  const by = $("#usage-by").value;
  const range = buckets($("#usage-range").value);
  const group = by === "key" ? "key,user" : "model";
  try {
    const { json } = await api(
      "GET",
      `/admin/usage?from=${encodeURIComponent(range.from)}&group_by=${group},${range.field}`,
    );
    drawUsage(json.data, by, range);
  } catch (e) {
    notice(`Usage: ${e.message}`, "error");
  }
}

function drawUsage(rows, by, range) {
  const series = new Map();
  for (const r of rows) {
    const id = by === "key" ? r.key_id || "(none)" : r.model || "(none)";
    const label = by === "key" ? `${id} · ${r.user_name || ""}` : id;
    let s = series.get(id);
    if (!s) {
      s = { id, label, color: COLORS[series.size % COLORS.length], per: new Map(), totals: [0, 0, 0, 0, 0, 0] };
      series.set(id, s);
    }
    const bucket = r[range.field];
    // What left the balance (the tokens at their model's prices).
    const charged = r.charged_tokens ?? r.total_tokens;
    s.per.set(bucket, (s.per.get(bucket) || 0) + charged);
    const t = [r.requests, r.input_tokens, r.cached_tokens, r.output_tokens, r.total_tokens, charged];
    t.forEach((v, i) => (s.totals[i] += v || 0));
  }
  const chart = $("#chart");
  chart.replaceChildren();
  const W = 900, H = 300, left = 60, bottom = 24, top = 10;
  const n = range.labels.length;
  const slot = (W - left) / n;
  const stacks = range.labels.map((b) => [...series.values()].reduce((sum, s) => sum + (s.per.get(b) || 0), 0));
  const max = Math.max(1, ...stacks);
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  chart.append(svg("line", { x1: left, y1: y(0), x2: W, y2: y(0), class: "axis" }));
  for (const frac of [0.5, 1]) {
    const v = Math.round(max * frac);
    chart.append(svg("line", { x1: left, y1: y(v), x2: W, y2: y(v), class: "grid" }));
    const t = svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" });
    t.textContent = fmtNum(v);
    chart.append(t);
  }
  range.labels.forEach((b, i) => {
    let base = 0;
    for (const s of series.values()) {
      const v = s.per.get(b) || 0;
      if (!v) continue;
      const rect = svg("rect", {
        x: left + i * slot + 2,
        width: Math.max(1, slot - 4),
        y: y(base + v),
        height: y(base) - y(base + v),
        fill: s.color,
        class: "bar",
        "data-series": s.id,
        "data-bucket": b,
        "data-tokens": v,
      });
      const tip = svg("title");
      tip.textContent = `${s.label} · ${b}: ${fmtNum(v)} tokens`;
      rect.append(tip);
      chart.append(rect);
      base += v;
    }
    if (i % Math.ceil(n / 12) === 0) {
      const t = svg("text", { x: left + i * slot + slot / 2, y: H - 6, "text-anchor": "middle", class: "tick" });
      t.textContent = range.short(b);
      chart.append(t);
    }
  });
  const legend = $("#legend");
  legend.replaceChildren();
  const body = $("#usage-totals tbody");
  body.replaceChildren();
  if (!series.size) legend.textContent = "No usage in this period.";
  for (const s of series.values()) {
    const swatch = el("span", { class: "swatch" });
    swatch.style.backgroundColor = s.color; // CSSOM: the CSP allows no inline style attribute
    legend.append(swatch, el("span", { text: s.label }));
    body.append(
      el(
        "tr",
        { "data-series": s.id },
        el("td", { text: s.label }),
        ...s.totals.map((v) => el("td", { class: "num", text: fmtNum(v) })),
      ),
    );
  }
}

// ---- audit log -----------------------------------------------------------

let auditCursor = null;

function auditQuery(extra) {
  const form = $("#audit-form");
  const q = new URLSearchParams();
  for (const name of ["key_id", "user_name", "model", "status_code", "from", "to"]) {
    const v = form.elements[name].value.trim();
    if (v) q.set(name, v);
  }
  for (const [k, v] of Object.entries(extra)) q.set(k, v);
  return q;
}

async function loadAudit(fresh) {
  if (fresh) {
    auditCursor = null;
    $("#audit tbody").replaceChildren();
  }
  const q = auditQuery({ limit: "50" });
  if (auditCursor) q.set("cursor", auditCursor);
  try {
    const { json } = await api("GET", `/admin/audit_logs?${q}`);
    for (const r of json.data) {
      $("#audit tbody").append(
        el(
          "tr",
          { "data-request-id": r.request_id },
          el("td", { text: r.timestamp }),
          el("td", { class: "mono", text: r.request_id }),
          el("td", { class: "mono", text: r.key_id || "" }),
          el("td", { text: r.user_id || "" }),
          el("td", { text: r.model || "" }),
          el("td", { class: "num", text: fmtNum(r.input_tokens) }),
          el("td", { class: "num", text: fmtNum(r.output_tokens) }),
          el("td", { class: "num total", text: fmtNum(r.total_tokens) }),
          el("td", { class: "num charged", text: fmtNum(r.charged_tokens ?? r.total_tokens) }),
          el("td", { class: "num", text: String(r.status_code ?? "") }),
          el("td", { text: r.stream ? "yes" : "no" }),
          el("td", { text: r.usage_source || "" }),
        ),
      );
    }
    auditCursor = json.next_cursor;
    $("#audit-more").hidden = !json.has_more;
  } catch (e) {
    notice(`Audit log: ${e.message}`, "error");
  }
}

async function exportCsv() {
  try {
    const { text } = await api("GET", `/admin/audit_logs?${auditQuery({ format: "csv", limit: "10000" })}`);
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const a = el("a", { href: url, download: "audit_logs.csv" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    notice(`Export: ${e.message}`, "error");
  }
}

// ---- wiring --------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", () => signOut(""));
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => show(t.dataset.view));
  $("#create-form").addEventListener("submit", createKey);
  $("#keys-more").addEventListener("click", () => loadKeys(false));
  $("#edit-form").addEventListener("submit", saveEdit);
  $("#edit-cancel").addEventListener("click", () => $("#edit-dialog").close());
  $("#usage-form").addEventListener("submit", loadUsage);
  $("#usage-by").addEventListener("change", () => loadUsage());
  $("#usage-range").addEventListener("change", () => loadUsage());
  $("#audit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    loadAudit(true);
  });
  $("#audit-more").addEventListener("click", () => loadAudit(false));
  $("#audit-csv").addEventListener("click", exportCsv);
  show(signedIn() ? "keys" : null);
});
