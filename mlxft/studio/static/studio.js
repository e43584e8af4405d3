// mlxft studio: live updates (server-sent events), forms and buttons. Our own code, no libraries.
"use strict";

const TOKEN = document.querySelector('meta[name="mlxft-token"]').content;

async function post(path, body) {
  // Every state-changing request carries this launch's token; the server refuses it otherwise.
  const response = await fetch(path, {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-Mlxft-Token": TOKEN},
    body: JSON.stringify(body || {}),
  });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function show(el, text) { if (el) { el.textContent = text; el.hidden = !text; } }

// Live regions: the server sends {html} (or {log}) whenever the files behind them change.
function live(el, url, onData) {
  const source = new EventSource(url);
  source.onmessage = (event) => onData(JSON.parse(event.data));
  return source;
}

document.querySelectorAll("[data-live]").forEach((el) => {
  live(el, el.dataset.live, (data) => {
    if (data.html !== undefined) {
      const openLog = el.querySelector("details.log");
      const wasOpen = openLog ? openLog.open : null;
      el.innerHTML = data.html;
      const log = el.querySelector("details.log");
      if (log && wasOpen !== null) log.open = wasOpen;
      const pre = el.querySelector("pre.log-tail");
      if (pre) pre.scrollTop = pre.scrollHeight;
    }
  });
});

document.querySelectorAll("[data-live-launch]").forEach((pre) => {
  const runLine = document.getElementById("launch-run");
  const state = document.getElementById("launch-state");
  live(pre, pre.dataset.liveLaunch, (data) => {
    if (data.log !== undefined) { pre.textContent = data.log; pre.scrollTop = pre.scrollHeight; }
    if (state) state.textContent = (data.alive ? "running" : "ended") +
      (data.returncode !== null && data.returncode !== undefined ? " (exit code " + data.returncode + ")" : "") +
      ". Closing this page does not stop it.";
    if (data.run_url && runLine) {
      runLine.innerHTML = "";
      const a = document.createElement("a");
      a.href = data.run_url; a.id = "run-link"; a.textContent = data.run_url.split("/").pop();
      runLine.append("run: ", a);
      if (runLine.dataset.follow === "1") window.location.assign(data.run_url);
    }
  });
});

// Buttons on a run page: stop (SIGINT, like Ctrl-C), resume, fuse.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button || !button.dataset.run) return;
  const message = document.getElementById("action-message");
  button.disabled = true;
  try {
    const response = await post(`/api/runs/${encodeURIComponent(button.dataset.run)}/${button.dataset.action}`);
    const data = await response.json();
    if (button.dataset.action === "stop") show(message, `stop sent to pid ${data.stopped}: it checkpoints at the end of this step`);
    else show(message, `${button.dataset.action} started (pid ${data.pid})`);
    if (data.url && button.dataset.action === "fuse") window.location.assign(data.url);
  } catch (e) {
    show(message, e.message);
    button.disabled = false;
  }
});

// New run: check the recipe and show its memory plan before anything starts.
const newRun = document.getElementById("new-run");
if (newRun) {
  const errors = document.getElementById("recipe-errors");
  const planBox = document.getElementById("plan");
  const start = document.getElementById("start-button");
  const form = () => ({
    recipe: newRun.recipe_path.value.trim() || newRun.recipe_name.value,
    tier: newRun.tier.value,
    overrides: newRun.overrides.value,
    auto_fit: newRun.auto_fit.checked,
  });
  let planned = null;
  let timer = null;
  async function check() {
    const asked = JSON.stringify(form());
    start.disabled = true;
    planBox.innerHTML = '<p class="muted">checking the recipe and planning memory…</p>';
    try {
      const data = await (await post("/api/plan", form())).json();
      if (asked !== JSON.stringify(form())) return;  // the form changed meanwhile; a newer check follows
      show(errors, "");
      planBox.innerHTML = data.html;
      planned = asked;
      start.disabled = false;
    } catch (e) {
      show(errors, e.message);
      planBox.innerHTML = "";
    }
  }
  newRun.addEventListener("input", () => { start.disabled = true; clearTimeout(timer); timer = setTimeout(check, 500); });
  document.getElementById("plan-button").addEventListener("click", check);
  newRun.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (planned !== JSON.stringify(form())) return check();
    start.disabled = true;
    try {
      const data = await (await post("/api/launch", form())).json();
      window.location.assign(data.url);
    } catch (e) {
      show(errors, e.message);
      start.disabled = false;
    }
  });
}

// Data: `mlxft data check` on a bundled dataset or a file/folder.
const dataForm = document.getElementById("data-check");
if (dataForm) {
  dataForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const errors = document.getElementById("data-errors");
    const result = document.getElementById("data-result");
    result.innerHTML = '<p class="muted">checking…</p>';
    try {
      const data = await (await post("/api/data/check", {
        dataset: document.getElementById("dataset").value,
        path: document.getElementById("data-path").value,
        recipe: document.getElementById("data-recipe-path").value.trim() || document.getElementById("data-recipe").value,
      })).json();
      show(errors, "");
      result.innerHTML = data.html;
    } catch (e) {
      show(errors, e.message);
      result.innerHTML = "";
    }
  });
}

// Playground: the same prompt to the base and each adapter, side by side, streamed.
const playground = document.getElementById("playground");
if (playground) {
  const runs = JSON.parse(playground.dataset.runs);
  const number = (name, parse) => { const v = playground[name].value; return v === "" ? null : parse(v); };
  const body = (model) => ({
    runs, model,
    messages: [{role: "user", content: playground.prompt.value}],
    temperature: number("temperature", parseFloat), top_p: number("top_p", parseFloat),
    top_k: number("top_k", (v) => parseInt(v, 10)), min_p: number("min_p", parseFloat),
    max_tokens: number("max_tokens", (v) => parseInt(v, 10)), seed: number("seed", (v) => parseInt(v, 10)),
  });
  async function ask(model, box) {
    box.textContent = "";
    box.dataset.state = "waiting";
    try {
      const response = await post("/api/playground/generate", body(model));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        box.textContent += decoder.decode(value, {stream: true});
      }
      if (box.textContent && !box.textContent.trim()) {
        box.textContent = JSON.stringify(box.textContent) + "  (whitespace only)";  // visible, as the report shows it
      } else if (!box.textContent) {
        box.textContent = "(empty reply: the model ended its turn at once)";
      }
      box.dataset.state = "done";
    } catch (e) {
      box.textContent = "error: " + e.message;
      box.dataset.state = "error";
    }
  }
  playground.addEventListener("submit", async (event) => {
    event.preventDefault();
    // One at a time: the server has one generation thread, and this keeps the columns in order.
    for (const box of document.querySelectorAll("pre[data-reply]")) await ask(box.dataset.reply, box);
  });
  document.querySelectorAll("button[data-action=probs]").forEach((button) => {
    button.addEventListener("click", async () => {
      const out = document.getElementById("probs");
      out.innerHTML = '<p class="muted">generating…</p>';
      try {
        const data = await (await post("/api/playground/probs", {...body(button.dataset.model), k: 5})).json();
        out.innerHTML = data.html;
      } catch (e) {
        out.textContent = "error: " + e.message;
      }
    });
  });
}
