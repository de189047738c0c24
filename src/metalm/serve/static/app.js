// The page of `metalm serve`: create a task from labeled examples, classify texts with
// it, score it on a labeled file (with a confusion-matrix picture), list and delete
// tasks. Plain JavaScript over the service's own JSON API; no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
let selected = null; // the task id chosen in the table

function status(message, kind) {
  const line = $("status");
  line.textContent = message;
  line.className = kind || "";
}

async function api(method, path, body) {
  const headers = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.authorization = "Bearer " + key;
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    let detail = data.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return data;
}

// -- files -----------------------------------------------------------------------------
function splitCsvLine(line) {
  const cells = []; let cell = ""; let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quoted) {
      if (c === '"' && line[i + 1] === '"') { cell += '"'; i++; }
      else if (c === '"') quoted = false;
      else cell += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { cells.push(cell); cell = ""; }
    else cell += c;
  }
  cells.push(cell);
  return cells;
}

// Labeled examples from CSV (header with `text` and `label`) or JSON lines.
function parseExamples(raw) {
  const lines = raw.split(/\r?\n/).filter((l) => l.trim());
  if (!lines.length) throw new Error("no examples: paste some or choose a file");
  if (lines[0].trim().startsWith("{")) {
    return lines.map((line, i) => {
      let row;
      try { row = JSON.parse(line); } catch (err) { throw new Error(`line ${i + 1}: not JSON`); }
      if (!("text" in row) || !("label" in row)) {
        throw new Error(`line ${i + 1}: needs "text" and "label"`);
      }
      return { text: String(row.text), label: row.label };
    });
  }
  const header = splitCsvLine(lines[0]).map((h) => h.trim());
  const t = header.indexOf("text"); const y = header.indexOf("label");
  if (t < 0 || y < 0) throw new Error('the CSV header needs the columns "text" and "label"');
  return lines.slice(1).map((line, i) => {
    const cells = splitCsvLine(line);
    if (cells.length <= Math.max(t, y)) throw new Error(`row ${i + 2}: too few columns`);
    return { text: cells[t], label: cells[y] };
  });
}

function readFile(input) {
  const file = input.files[0];
  return file ? file.text() : Promise.resolve(null);
}

// -- tasks -----------------------------------------------------------------------------
async function refresh() {
  const list = await api("GET", "/tasks");
  const body = $("tasks").querySelector("tbody");
  body.replaceChildren();
  if (!list.tasks.some((t) => t.task_id === selected)) selected = null;
  for (const task of list.tasks) {
    if (selected === null) selected = task.task_id;
    const row = body.insertRow();
    const pick = document.createElement("input");
    pick.type = "radio"; pick.name = "task"; pick.checked = task.task_id === selected;
    pick.addEventListener("change", () => { selected = task.task_id; });
    row.insertCell().append(pick);
    row.insertCell().textContent = task.task_id.slice(0, 8);
    row.insertCell().textContent = task.classes.join(", ");
    row.insertCell().textContent = task.n_examples;
    const remove = document.createElement("button");
    remove.className = "delete"; remove.textContent = "Delete";
    remove.addEventListener("click", () => run(async () => {
      await api("DELETE", `/tasks/${task.task_id}`);
      await refresh();
      status("task deleted", "ok");
    }));
    row.insertCell().append(remove);
  }
}

async function create() {
  const raw = (await readFile($("examples-file"))) ?? $("examples").value;
  const task = await api("POST", "/tasks", { examples: parseExamples(raw) });
  selected = task.task_id;
  await refresh();
  status(`task ${task.task_id.slice(0, 8)} created: ${task.classes.length} classes, ` +
    `${task.n_examples} examples`, "ok");
}

function needTask() {
  if (!selected) throw new Error("create or choose a task first");
  return selected;
}

// -- classify --------------------------------------------------------------------------
async function classify() {
  const task = needTask();
  const file = await readFile($("texts-file"));
  const raw = file ?? $("texts").value;
  const texts = raw.split(/\r?\n/).map((l) => l.trim()).filter(Boolean);
  if (!texts.length) throw new Error("no texts: type some, one per line");
  const answer = await api("POST", `/tasks/${task}/classify`, { texts });
  const body = $("predictions").querySelector("tbody");
  body.replaceChildren();
  answer.predictions.forEach((p, i) => {
    const top = p.probabilities.map((q, j) => [q, answer.classes[j]])
      .sort((a, b) => b[0] - a[0]).slice(0, 3)
      .map(([q, c]) => `${c} ${(100 * q).toFixed(1)}%`).join(", ");
    const row = body.insertRow();
    row.className = "prediction";
    row.insertCell().textContent = texts[i];
    row.insertCell().textContent = p.label;
    row.insertCell().textContent = (100 * p.probability).toFixed(1) + "%";
    row.insertCell().textContent = top;
  });
  status(`${texts.length} texts classified`, "ok");
}

// -- score -----------------------------------------------------------------------------
function confusionPicture(classes, matrix) {
  const ns = "http://www.w3.org/2000/svg";
  const cell = Math.max(8, Math.min(28, Math.floor(560 / classes.length)));
  const margin = 120; const size = margin + cell * classes.length;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", size); svg.setAttribute("height", size);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "confusion matrix: rows true class, columns predicted");
  const rowSums = matrix.map((r) => r.reduce((a, b) => a + b, 0) || 1);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
    return el;
  };
  matrix.forEach((row, i) => row.forEach((count, j) => {
    const share = count / rowSums[i];
    const rect = add("rect", {
      x: margin + j * cell, y: margin + i * cell, width: cell - 1, height: cell - 1,
      fill: `rgba(47, 111, 214, ${0.08 + 0.92 * share})`, class: "confusion-cell",
    });
    rect.append(Object.assign(document.createElementNS(ns, "title"),
      { textContent: `${classes[i]} → ${classes[j]}: ${count}` }));
  }));
  if (cell >= 14) {
    classes.forEach((c, i) => {
      add("text", { x: margin - 4, y: margin + i * cell + cell * 0.7, "text-anchor": "end" }, c);
      add("text", {
        x: margin + i * cell + cell * 0.7, y: margin - 4,
        transform: `rotate(-60 ${margin + i * cell + cell * 0.7} ${margin - 4})`,
      }, c);
    });
  }
  return svg;
}

async function score() {
  const task = needTask();
  const raw = await readFile($("score-file"));
  if (raw === null) throw new Error("choose a labeled file to score");
  const result = await api("POST", `/tasks/${task}/score`, { examples: parseExamples(raw) });
  $("score-summary").textContent =
    `accuracy ${(100 * result.accuracy).toFixed(2)}% ± ${(100 * result.accuracy_ci95).toFixed(2)}` +
    `, macro-F1 ${(100 * result.macro_f1).toFixed(2)}% over ${result.n_texts} texts`;
  $("confusion").replaceChildren(confusionPicture(result.classes, result.confusion));
  status("scored", "ok");
}

// -- wiring ----------------------------------------------------------------------------
async function run(action) {
  try {
    status("working…");
    await action();
  } catch (err) {
    status(err.message, "error");
  }
}

$("api-key").value = sessionStorage.getItem("metalm-api-key") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("metalm-api-key", $("api-key").value.trim());
  run(refresh);
});
$("create").addEventListener("click", () => run(create));
$("refresh").addEventListener("click", () => run(refresh));
$("classify").addEventListener("click", () => run(classify));
$("score").addEventListener("click", () => run(score));
fetch("/health").then((r) => r.json()).then((h) => {
  $("model").textContent = `${h.learner} model ${h.model}: ${h.tasks} of ${h.max_tasks} tasks`;
}).catch(() => {});
run(refresh).then(() => { if ($("status").className !== "error") status(""); });
