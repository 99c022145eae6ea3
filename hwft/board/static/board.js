// hwft board's page: the recipe builder, data preview, runs, comparison, chat and the machine.
// Everything it shows comes from the board's JSON routes (hwft/board/app.py); text is always set
// as text, never as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v != null) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
};

let inFlight = 0; // requests under way: <body data-busy> while any is (tests wait for it to clear)
async function api(path, body, method) {
  inFlight++;
  document.body.dataset.busy = "1";
  try { return await request(path, body, method); }
  finally { if (--inFlight === 0) document.body.dataset.busy = ""; }
}

async function request(path, body, method) {
  const init = { method: method || (body === undefined ? "GET" : "POST"), headers: { "X-Hwft-Board": "1" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

const state = { fields: [], raw: {}, yaml: "", refusals: {}, selectedRun: null, compare: new Set(), runs: [],
                chat: [], error: null };

// -- tabs ---------------------------------------------------------------------------------------
for (const button of document.querySelectorAll("#tabs button")) {
  button.addEventListener("click", () => showTab(button.dataset.tab));
}
function showTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== `tab-${name}`;
  if (name === "runs" || name === "compare" || name === "use") refreshRuns();
  if (name === "compare") refreshBench();
  if (name === "machine") refreshMachine();
}

// -- the recipe builder ------------------------------------------------------------------------
function valueAt(raw, key) {
  let node = raw;
  const parts = key.split(".");
  for (let i = 0; i < parts.length; i++) {
    if (node == null) return undefined;
    if (typeof node === "string" && i === 1 && (parts[0] === "model" || parts[0] === "output")) {
      return parts[1] === (parts[0] === "model" ? "name" : "dir") ? node : undefined;
    }
    if (typeof node !== "object") return undefined;
    node = node[parts[i]];
  }
  return node;
}

const shown = (v) => v === null ? "null" : typeof v === "object" ? JSON.stringify(v) : String(v);

function say(text, isError) {
  const out = $("#recipe-said");
  out.textContent = text || "";
  out.classList.toggle("error", !!isError);
}

function setRecipe(data) {
  state.raw = data.raw; state.yaml = data.yaml; state.refusals = data.refusals || {}; state.error = data.error;
  $("#recipe-yaml").value = data.yaml;
  $("#recipe-note").textContent = data.note || "";
  say(data.error || "the recipe is valid: hwft train accepts it (Check reads its data too)", !!data.error);
  $("#start").disabled = !!data.error;
  renderForm();
}

async function edit(key, change) {
  try {
    setRecipe(await api("/api/recipe", { yaml: $("#recipe-yaml").value, path: $("#recipe-path").value,
                                         set: [{ key, ...change }] }));
  } catch (err) { say(err.message, true); }
}

function fieldInput(f) {
  const current = valueAt(state.raw, f.key);
  const refused = state.refusals[f.key] || {};
  const why = [];
  let input;
  if (f.kind === "choice" || f.kind === "bool") {
    input = el("select", { name: f.key, onchange: (e) => edit(f.key, { value: JSON.parse(e.target.value) }) });
    const options = f.choices.slice();
    if (current !== undefined && !options.some((o) => JSON.stringify(o) === JSON.stringify(current))) options.push(current);
    const selected = current === undefined ? f.default : current;
    if (current === undefined) input.append(el("option", { value: JSON.stringify(f.default), text: `${shown(f.default)} (default)` }));
    for (const option of options) {
      const value = JSON.stringify(option);
      if (current === undefined && value === JSON.stringify(f.default)) continue;
      const no = refused[value];
      input.append(el("option", { value, disabled: !!no && value !== JSON.stringify(selected),
                                  selected: value === JSON.stringify(selected), title: no || false,
                                  text: shown(option) + (no ? " (refused)" : "") }));
      if (no) why.push(el("span", { class: "refused", "data-option": shown(option), text: `${shown(option)}: ${no}` }));
    }
  } else if (f.kind === "yaml") {
    input = el("textarea", { name: f.key, rows: 2, onchange: (e) => edit(f.key, { text: e.target.value }) });
    input.value = current === undefined ? "" : JSON.stringify(current);
  } else {
    input = el("input", { name: f.key, type: "text", placeholder: shown(f.default),
                          onchange: (e) => edit(f.key, { text: e.target.value }) });
    input.value = current === undefined || current === null ? "" : String(current);
  }
  return [input, why];
}

function renderForm() {
  const formEl = $("#recipe-form");
  const open = new Set([...formEl.querySelectorAll("fieldset:not(.closed)")].map((f) => f.dataset.section));
  const first = formEl.children.length === 0;
  formEl.replaceChildren();
  const objective = valueAt(state.raw, "method.objective") || "sft";
  const sections = new Map();
  for (const f of state.fields) {
    const methodSection = f.section.startsWith("method.") && f.section !== "method.lora" &&
      f.section !== "method.qlora" && f.section !== "method.freeze";
    if (methodSection && f.section !== `method.${objective}`) continue; // only the chosen method's own section
    if (!sections.has(f.section)) sections.set(f.section, []);
    sections.get(f.section).push(f);
  }
  const errorText = state.error || "";
  // the keys the error names, as hwft's messages name them (hwft.board.form.names)
  // (backend 'x' cannot run this recipe: ... names what it cannot do, not the backend)
  const named = (key) => key === "backend" ? /backend '[^']*' is not available/.test(errorText)
    : [`${key} '`, `${key} (`, `${key}: `, `'${key}'`].some((f) => errorText.includes(f));
  for (const [section, fields] of sections) {
    // a section opens where it was open, and wherever the recipe's error names one of its keys
    const isOpen = (first ? ["recipe", "model", "data", "method", "train"].includes(section) : open.has(section)) ||
      fields.some((f) => named(f.key));
    const set = el("fieldset", { "data-section": section, class: isOpen ? "" : "closed" });
    const legend = el("legend", { text: section, onclick: () => set.classList.toggle("closed") });
    set.append(legend);
    for (const f of fields) {
      const [input, why] = fieldInput(f);
      const wrong = named(f.key);
      const help = el("small", { text: `${f.help} (default: ${shown(f.default)})` });
      for (const w of why) help.append(w);
      set.append(el("div", { class: "field" + (wrong ? " error" : ""), "data-key": f.key },
                    el("label", { text: f.key }), input, help));
    }
    formEl.append(set);
  }
}

async function loadSources() {
  const data = await api("/api/form");
  state.fields = data.fields;
  $("#workspace").textContent = `workspace ${data.workspace} · runs in ${data.runs_dir}`;
  const select = $("#recipe-source");
  select.replaceChildren(...data.recipes.map((r) => el("option", { value: r, text: r })));
  if (data.start) select.value = data.start;
}

$("#load").addEventListener("click", async () => {
  const path = $("#recipe-source").value;
  try {
    const data = await api(`/api/recipe/load?path=${encodeURIComponent(path)}`);
    $("#recipe-path").value = path.replace(/\.ya?ml$/, "") + "-board.yaml";
    setRecipe(data);
  } catch (err) { say(err.message, true); }
});
$("#apply-yaml").addEventListener("click", async () => {
  try { setRecipe(await api("/api/recipe", { yaml: $("#recipe-yaml").value, path: $("#recipe-path").value })); }
  catch (err) { say(err.message, true); }
});
$("#save").addEventListener("click", async () => {
  try { say(`saved ${(await api("/api/recipe/save", { yaml: $("#recipe-yaml").value, path: $("#recipe-path").value })).saved}`); }
  catch (err) { say(err.message, true); }
});
$("#check").addEventListener("click", async () => {
  say("checking: reading the data, finding the model, choosing the backend ...");
  try { say((await api("/api/check", { yaml: $("#recipe-yaml").value, path: $("#recipe-path").value })).ok); }
  catch (err) { say(err.message, true); }
});
$("#start").addEventListener("click", async () => {
  try {
    const started = await api("/api/runs/start", { yaml: $("#recipe-yaml").value, path: $("#recipe-path").value });
    say(`started ${started.name} (pid ${started.pid})`);
    state.selectedRun = started.name;
    showTab("runs");
  } catch (err) { say(err.message, true); }
});
$("#upload").addEventListener("click", async () => {
  const file = $("#upload-file").files[0];
  if (!file) return;
  const path = `${$("#upload-dir").value.replace(/\/$/, "")}/${file.name}`;
  const response = await fetch(`/api/upload?path=${encodeURIComponent(path)}`,
                               { method: "PUT", headers: { "X-Hwft-Board": "1" }, body: file });
  const data = await response.json();
  $("#upload-said").textContent = response.ok ? `saved ${data.saved} (${data.bytes} bytes)` : data.error;
});

// -- data preview ------------------------------------------------------------------------------
function marked(text) {
  // hwft data inspect marks trained tokens with [[ ]]: shown as <mark>, as text
  const out = document.createDocumentFragment();
  const parts = text.split(/(\[\[[\s\S]*?\]\])/);
  for (const p of parts) {
    if (p.startsWith("[[") && p.endsWith("]]")) out.append(el("mark", { text: p.slice(2, -2) }));
    else out.append(document.createTextNode(p));
  }
  return out;
}

$("#preview").addEventListener("click", async () => {
  const said = $("#data-said");
  said.classList.remove("error");
  said.textContent = "reading the data ...";
  try {
    const data = await api("/api/data", { yaml: $("#recipe-yaml").value, path: $("#recipe-path").value,
                                          rows: Number($("#preview-rows").value) });
    const lines = data.text.split("\n");
    said.textContent = lines.filter((l) => !l.startsWith("  ") && !l.startsWith("---") && !l.includes("[[")).slice(0, 4).join("\n");
    const r = data.report;
    const figures = $("#data-figures");
    figures.replaceChildren();
    if (r.tokens !== undefined) {
      figures.append(el("p", { id: "packing", text: `${r.examples} examples, ${r.tokens} tokens (${r.trained_tokens} trained); ` +
        `packing: ${r.packed_rows} rows, ${(100 * r.packed_fill).toFixed(1)}% full; real tokens per computed token ` +
        `${(100 * r.efficiency_packed).toFixed(1)}% packed, ${(100 * r.efficiency_unpacked).toFixed(1)}% unpacked` }));
    }
    const hist = $("#data-histogram");
    hist.replaceChildren();
    for (const line of lines.filter((l) => /^\s+\d+-\d+\s/.test(l))) {
      const m = line.trim().match(/^(\d+-\d+)\s+#*\s*(\d+)$/);
      if (!m) continue;
      const top = Math.max(...lines.filter((l) => /^\s+\d+-\d+\s/.test(l)).map((l) => Number(l.trim().split(/\s+/).pop())));
      hist.append(el("span", { text: `${m[1]} tokens: ${m[2]}` }),
                  el("div", { class: "bar-fill", style: `width: ${(100 * Number(m[2]) / top).toFixed(1)}%` }));
    }
    const rows = $("#data-rows");
    rows.replaceChildren();
    for (const row of r.rows) {
      rows.append(el("h4", { text: `${row.source}${row.part ? " " + row.part : ""}: ${row.tokens} tokens, ${row.trained} trained` }));
      if (row.thumbnails && row.thumbnails.length) {  // the row's images and videos (a video's first frame)
        rows.append(el("div", { class: "thumbs" }, ...row.thumbnails.map((t) =>
          el("img", { class: "thumb", src: t.src, alt: t.kind, title: t.kind }))));
      }
      rows.append(el("div", { class: "row" }, marked(row.marked_short || row.marked)));
    }
  } catch (err) { said.textContent = err.message; said.classList.add("error"); }
});

// -- runs --------------------------------------------------------------------------------------
const fmt = (v, digits = 4) => v == null ? "" : typeof v === "number" ? (Math.abs(v) < 1e-2 && v !== 0 ? v.toExponential(2) : Number(v.toFixed(digits)).toString()) : String(v);
const secs = (v) => v == null ? "" : `${Math.round(v)}s`;

async function svgInto(target, url) {
  const response = await fetch(url, { cache: "no-store" });
  if (response.ok) target.innerHTML = await response.text(); // our own matplotlib SVG
}

async function refreshRuns() {
  let data;
  try { data = await api("/api/runs"); } catch (err) { return; }
  state.runs = data.runs;
  const body = $("#runs-table tbody");
  body.replaceChildren();
  for (const r of data.runs) {
    const actions = el("td");
    if (r.state === "running") actions.append(el("button", { "data-action": "stop", "data-run": r.name, text: "Stop", onclick: () => runAction("stop", r.name) }));
    if (r.resumable) actions.append(el("button", { "data-action": "resume", "data-run": r.name, text: "Resume", onclick: () => runAction("resume", r.name) }));
    const tick = el("input", { type: "checkbox", checked: state.compare.has(r.name), onchange: (e) => {
      if (e.target.checked) state.compare.add(r.name); else state.compare.delete(r.name);
      refreshCompare();
    } });
    const row = el("tr", { "data-run": r.name, "data-state": r.state, class: r.name === state.selectedRun ? "selected" : "" },
      el("td", {}, tick), el("td", {}, el("a", { href: "#", text: r.name, onclick: (e) => { e.preventDefault(); state.selectedRun = r.name; refreshRuns(); } })),
      el("td", { class: "state", text: r.state + (r.code != null && r.state !== "running" ? ` (exit ${r.code})` : "") }),
      el("td", { class: "step", text: r.step == null ? "" : `${r.step}/${r.total_steps ?? "?"}` }),
      el("td", { text: fmt(r.loss) }), el("td", { text: fmt(r.lr) }), el("td", { text: fmt(r.tokens_per_second, 0) }),
      el("td", { text: secs(r.elapsed) }), el("td", { text: secs(r.eta) }), el("td", { text: fmt(r.eval_loss) }), actions);
    body.append(row);
  }
  const chosen = data.runs.find((r) => r.name === state.selectedRun);
  $("#run-detail").hidden = !chosen;
  if (chosen) {
    $("#run-title").textContent = `${chosen.name}: ${chosen.state}`;
    await svgInto($("#run-chart"), `/api/chart.svg?run=${encodeURIComponent(chosen.name)}&metric=${$("#run-metric").value}`);
    const log = await api(`/api/runs/log?name=${encodeURIComponent(chosen.name)}`);
    const pre = $("#run-log");
    // follow the end, unless the reader scrolled up to read
    const atEnd = pre.dataset.run !== chosen.name || pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = log.log;
    pre.dataset.run = chosen.name;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
  const finished = data.runs.filter((r) => r.result);
  const use = $("#use-run");
  const keep = use.value;
  use.replaceChildren(...finished.map((r) => el("option", { value: r.name, text: `${r.name} (${r.result})` })));
  if (finished.some((r) => r.name === keep)) use.value = keep;
  refreshCompare();
}

async function runAction(action, name) {
  try { await api(`/api/runs/${action}`, { name }); state.selectedRun = name; } catch (err) { alert(err.message); }
  refreshRuns();
}
$("#run-metric").addEventListener("change", refreshRuns);

// -- compare -----------------------------------------------------------------------------------
function refreshCompare() {
  const box = $("#compare-runs");
  box.replaceChildren(...state.runs.map((r) => el("label", {}, el("input", { type: "checkbox", value: r.name,
    checked: state.compare.has(r.name), onchange: (e) => { if (e.target.checked) state.compare.add(r.name);
      else state.compare.delete(r.name); refreshCompare(); } }), ` ${r.name}`)));
  if (!$("#tab-compare").hidden && state.compare.size) {
    const query = [...state.compare].map((n) => `run=${encodeURIComponent(n)}`).join("&");
    svgInto($("#compare-chart"), `/api/chart.svg?${query}`);
  }
}

async function refreshBench() {
  const data = await api("/api/bench");
  const body = $("#bench-table tbody");
  body.replaceChildren(...data.results.map((r) => el("tr", {}, el("td", { text: r.label }), el("td", { text: r.workload }),
    el("td", { text: fmt(r.tokens_per_second, 1) }), el("td", { text: fmt(r.step_time_median_s, 3) }),
    el("td", { text: `${fmt(r.peak_memory_gib, 2)} ${r.memory_kind === "process-rss" ? "RSS" : "device"}` }),
    el("td", { text: r.mfu == null ? "" : `${(100 * r.mfu).toFixed(1)}%` }), el("td", { text: fmt(r.eval_loss) }),
    el("td", { text: r.file }))));
  if (data.results.length) svgInto($("#bench-chart"), "/api/bench/chart.svg");
}

// -- use: chat, eval, export -------------------------------------------------------------------
function renderChat() {
  const log = $("#chat-log");
  log.replaceChildren(...state.chat.map((m) => el("div", { class: m.role, text: (m.role === "user" ? "> " : "") + m.content })));
}
$("#chat-reset").addEventListener("click", () => { state.chat = []; renderChat(); });
async function send() {
  const text = $("#chat-input").value.trim();
  const run = $("#use-run").value;
  if (!text || !run) return;
  $("#chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  const messages = state.chat.slice();
  const reply = { role: "assistant", content: "" };
  state.chat.push(reply);
  renderChat();
  $("#chat-send").disabled = true;
  try {
    const response = await fetch("/api/chat", { method: "POST", headers: { "X-Hwft-Board": "1", "Content-Type": "application/json" },
      body: JSON.stringify({ run, messages, max_new_tokens: Number($("#chat-max").value), temperature: Number($("#chat-temperature").value) }) });
    if (!response.ok) { reply.content = (await response.json()).error; renderChat(); return; }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      reply.content += decoder.decode(value, { stream: true });
      $("#chat-log").lastChild.textContent = reply.content;
    }
    reply.content = reply.content.trim();
    $("#chat-log").lastChild.dataset.done = "1";
  } finally { $("#chat-send").disabled = false; }
}
$("#chat-send").addEventListener("click", send);
$("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter") send(); });

async function followTask(run, kind) {
  const pre = $("#task-log");
  for (;;) {
    const log = await api(`/api/runs/log?name=${encodeURIComponent(run)}&kind=${encodeURIComponent(kind)}`);
    pre.textContent = log.log;
    pre.dataset.code = log.code == null ? "" : String(log.code);
    if (!log.running) return;
    await new Promise((r) => setTimeout(r, 1000));
  }
}
$("#eval").addEventListener("click", async () => {
  const run = $("#use-run").value;
  try { await api("/api/eval", { run }); followTask(run, "eval"); } catch (err) { $("#task-log").textContent = err.message; }
});

// -- machine -----------------------------------------------------------------------------------
async function refreshMachine() {
  const env = await api("/api/env");
  const box = $("#machine");
  box.replaceChildren(el("p", { text: `hwft ${env.hwft_version} (plugin API ${env.plugin_api}); backend: auto -> ${env.auto}; ranking: ${env.ranking.join(", ")}` }));
  for (const b of env.backends) {
    const cap = b.capability;
    const rows = [
      ["state", b.available ? "available" : `unavailable: ${b.reason}`], ["engine", b.engine], ["plugin", b.plugin],
      ["devices", b.devices.map((d) => Object.entries(d).map(([k, v]) => `${k}=${v}`).join(", ")).join("; ") || "-"],
      ["methods", Object.entries(cap.methods).map(([o, t]) => `${o}: ${t.join(", ")}`).join("; ")],
      ["dtypes", cap.dtypes.join(", ")], ["quantization", cap.quantization.join(", ") || "-"],
      ["attention", cap.attention.join(", ")], ["fused kernels", b.kernels.join(", ") || "-"], ["optimizers", cap.optimizers.join(", ")],
      ["compile", cap.compile ? "yes" : "no"], ["parallel", cap.parallel.join(", ")], ["packing", cap.packing ? "yes" : "no"],
      ...Object.entries(cap.notes).map(([k, v]) => [`no ${k}`, v]), ...Object.entries(b.details).map(([k, v]) => [k, shown(v)]),
    ];
    box.append(el("h3", { text: `${b.name}: ${b.description}` }),
               el("table", { "data-backend": b.name }, ...rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v })))));
  }
  const buttons = $("#export-buttons");
  buttons.replaceChildren(...env.export_formats.map((f) => el("button", { "data-export": f, text: `Export ${f}`, onclick: async () => {
    const run = $("#use-run").value;
    try { await api("/api/export", { run, to: f }); followTask(run, `export-${f}`); } catch (err) { $("#task-log").textContent = err.message; }
  } })));
}

// -- start -------------------------------------------------------------------------------------
(async () => {
  await loadSources();
  refreshMachine();
  const first = $("#recipe-source").value;
  if (first) $("#load").click();
  setInterval(() => {
    const watching = !$("#tab-runs").hidden || !$("#tab-compare").hidden;
    if (watching || state.runs.some((r) => r.state === "running" || r.state === "stopping")) refreshRuns();
  }, 1500);
})();
