// One idea: text, proposer, parents and children, the patch (diff highlighted, pre-flight
// report), and each run with status, metrics, provenance and its log (followed while running).

import { badge, dollars, empty, esc, getJSON, getText, num, numCell, section, short, throttle, when } from "../lib.js";

const LOG_POLL_MS = 1000;

export async function show(state) {
  state.id = state.args[0];
  state.logs = new Map(); // run id -> {text, next, complete, error}
  state.refresh = throttle(() => render(state), 250);
  state.timer = setInterval(() => followLogs(state), LOG_POLL_MS);
  await render(state);
}

export function leave(state) {
  state.alive = false;
  clearInterval(state.timer);
}

export function onLive(state, event) {
  const s = event.summary ?? {};
  if (event.search_id === state.searchId && (s.idea_id === state.id || event.type.startsWith("Generation"))) {
    state.refresh();
  }
}

async function render(state) {
  const idea = await getJSON(`/ideas/${encodeURIComponent(state.id)}`);
  state.searchId = idea.search_id;
  const sid = encodeURIComponent(idea.search_id);
  const [lineage, runs, siblings, patch] = await Promise.all([
    getJSON(`/ideas/${encodeURIComponent(state.id)}/lineage?max_depth=1`),
    getJSON(`/searches/${sid}/runs?idea_id=${encodeURIComponent(state.id)}&limit=1000`),
    getJSON(`/searches/${sid}/ideas?limit=1000`),
    idea.patch_id ? getJSON(`/patches/${encodeURIComponent(idea.patch_id)}`) : Promise.resolve(null),
  ]);
  let diff = patch?.diff ?? null;
  if (patch && diff === null && patch.diff_key) {
    diff = await getText(`/patches/${encodeURIComponent(patch.patch_id)}/diff`).catch((e) => `(${e.message})`);
  }
  if (!state.alive) return;
  state.runs = runs;
  document.title = `${idea.title ?? short(idea.idea_id)} · groundloop`;
  const parents = lineage.nodes.filter((n) => n.depth === 1);
  const children = siblings.filter((i) => (i.parent_ids ?? []).includes(idea.idea_id));
  const keepOpen = new Set([...state.root.querySelectorAll("details[open]")].map((d) => d.id));
  const proposer = [idea.proposer_kind, idea.proposer_model, idea.policy_version !== null ? `policy v${idea.policy_version}` : null].filter(Boolean).join(" · ");

  state.root.innerHTML = `
  <div class="page-head">
    <a class="muted" href="#/search/${sid}">← ${esc(idea.search_id)}</a>
    <h1>${esc(idea.title ?? short(idea.idea_id))}</h1>
    ${badge(idea.status.replace("_", " "), idea.status)} ${badge(idea.mode ?? "–", idea.mode ?? "none")}
    <span class="muted">generation ${idea.generation ?? "–"} · proposed ${when(idea.proposed_at)} by ${esc(proposer)}</span>
  </div>
  <div class="cards">
    <div class="card" data-card="mean_score"><div class="card-label">mean score</div><div class="card-value">${numCell(idea.mean_score)}</div><div class="card-note">${idea.search_runs ?? 0} search-split runs</div></div>
    <div class="card"><div class="card-label">best score</div><div class="card-value">${numCell(idea.best_score)}</div></div>
    <div class="card"><div class="card-label">runs</div><div class="card-value">${idea.runs_succeeded} / ${idea.runs_completed}</div><div class="card-note">succeeded / completed</div></div>
    <div class="card"><div class="card-label">model cost</div><div class="card-value">${dollars(idea.cost_usd + idea.patch_failed_cost_usd + (patch?.cost_usd ?? 0))}</div><div class="card-note">idea ${dollars(idea.cost_usd)} · patch ${dollars((patch?.cost_usd ?? 0) + idea.patch_failed_cost_usd)}</div></div>
  </div>
  <div class="layout">
    <div class="col-main">
      ${section("Idea", `<div class="idea-text" id="idea-text">${esc(idea.text ?? "")}</div>
        ${idea.knobs ? `<p class="muted small">knobs: <code>${esc(JSON.stringify(idea.knobs))}</code></p>` : ""}
        ${idea.prompt_digest ? `<p class="muted small">prompt ${esc(idea.prompt_digest.slice(0, 16))} · ${idea.input_tokens} tokens in, ${idea.output_tokens} out</p>` : ""}`)}
      ${section("Patch", patchView(idea, patch, diff))}
      ${section(`Runs <span class="muted small">${runs.length}</span>`, runs.length ? runs.map((r) => runView(r, state.logs.get(r.run_id))).join("") : empty("No run yet."), 'id="runs"')}
    </div>
    <aside class="col-side">
      ${section("Built on", parents.length ? `<ul class="list">${parents.map((p) => `<li>${p.known ? `<a href="#/idea/${encodeURIComponent(p.idea_id)}">${esc(p.title ?? short(p.idea_id))}</a>` : `<span class="muted">${esc(short(p.idea_id))} (not in the log)</span>`} <span class="muted small">g${p.generation ?? "–"} · ${numCell(p.best_score)}</span></li>`).join("")}</ul>` : empty(idea.mode === "exploit" ? "No parents recorded." : `A ${idea.mode ?? ""} idea: built on no earlier idea.`), 'id="parents"')}
      ${section("Built on this", children.length ? `<ul class="list">${children.map((c) => `<li><a href="#/idea/${encodeURIComponent(c.idea_id)}">${esc(c.title ?? short(c.idea_id))}</a> <span class="muted small">g${c.generation}</span></li>`).join("")}</ul>` : empty("No later idea built on this one."))}
    </aside>
  </div>`;
  for (const d of state.root.querySelectorAll("details")) {
    if (keepOpen.has(d.id)) d.open = true;
    d.addEventListener("toggle", () => d.open && loadLog(state, d.dataset.run));
  }
  // The newest run's log is shown open; a running one is followed.
  const newest = runs[runs.length - 1];
  if (newest && !keepOpen.size) {
    const d = state.root.querySelector(`details[data-run="${CSS.escape(newest.run_id)}"]`);
    if (d) d.open = true;
  }
}

function patchView(idea, patch, diff) {
  if (!patch) {
    if (idea.patch_error) {
      return `<p class="bad">patch failed at ${esc(idea.patch_stage ?? "?")} after ${idea.patch_attempts ?? "?"} attempts</p><pre class="error-tail">${esc(idea.patch_error)}</pre>`;
    }
    return empty("Not implemented yet.");
  }
  const checks = patch.preflight?.checks ?? [];
  return `<p class="muted small">${esc(patch.implementer_kind)}${patch.implementer_model ? `: ${esc(patch.implementer_model)}` : ""} · ${patch.attempts} attempt(s) · files: ${(patch.files_changed ?? []).map((f) => `<code>${esc(f)}</code>`).join(", ")} · ${when(patch.created_at)}</p>
    <h3>Pre-flight ${patch.preflight_passed ? badge("passed", "succeeded") : badge("failed", "failed")}</h3>
    ${checks.length ? `<table class="grid-table compact" id="preflight"><thead><tr><th>check</th><th>result</th><th class="r">seconds</th><th>detail</th></tr></thead><tbody>
      ${checks.map((c) => `<tr><td>${esc(c.name)}</td><td>${c.ok ? badge("ok", "succeeded") : badge("failed", "failed")}</td><td class="r">${num(c.seconds, 3)}</td><td class="small">${esc(c.detail ?? c.message ?? "")}</td></tr>`).join("")}</tbody></table>` : ""}
    <h3>Diff</h3>${diffView(diff ?? "")}`;
}

// Unified diff, coloured by line kind (no highlighting library needed).
export function diffView(diff) {
  if (!diff) return empty("No diff recorded.");
  const lines = diff.split("\n").map((line) => {
    let kind = "ctx";
    if (line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ") || line.startsWith("index ")) kind = "file";
    else if (line.startsWith("@@")) kind = "hunk";
    else if (line.startsWith("+")) kind = "add";
    else if (line.startsWith("-")) kind = "del";
    return `<span class="dl dl-${kind}">${esc(line) || " "}</span>`;
  });
  return `<pre class="diff" id="diff">${lines.join("")}</pre>`;
}

function runView(r, log) {
  const metrics = Object.entries(r.metrics ?? {});
  const prov = r.provenance ?? {};
  const running = ["requested", "running"].includes(r.status);
  return `<div class="run" data-run="${esc(r.run_id)}">
    <div class="run-head">${badge(r.status.replace("_", " "), r.status)} <b>${esc(r.purpose ?? "run")}</b>
      <span class="muted small">${esc(short(r.run_id))} · seed ${r.seed ?? "–"} · attempt ${r.attempt ?? "–"} · ${esc(r.runner_id ?? "")}@${esc(r.host ?? "")} · ${(r.devices ?? []).join(", ")}</span>
      <span class="run-score">${r.score !== null ? `score ${numCell(r.score, 6)} · reward ${num(r.reward, 6)}` : ""}${r.wall_seconds ? ` · ${num(r.wall_seconds, 3)} s` : ""}</span></div>
    ${r.reason ? `<p class="bad small">${esc(r.reason)}</p>` : ""}
    ${r.error_tail ? `<pre class="error-tail">${esc(r.error_tail)}</pre>` : ""}
    ${metrics.length ? `<table class="kv"><tbody>${metrics.map(([k, v]) => `<tr><td>${esc(k)}</td><td class="r">${typeof v === "number" ? numCell(v, 6) : esc(JSON.stringify(v))}</td></tr>`).join("")}</tbody></table>` : ""}
    ${Object.keys(prov).length ? `<details id="prov-${esc(r.run_id)}"><summary>provenance</summary><table class="kv"><tbody>${Object.entries(prov).map(([k, v]) => `<tr><td>${esc(k)}</td><td><code>${esc(typeof v === "object" ? JSON.stringify(v) : v)}</code></td></tr>`).join("")}</tbody></table></details>` : ""}
    <details id="log-${esc(r.run_id)}" data-run="${esc(r.run_id)}"><summary>log${running ? ' <span class="pulse"></span> following' : ""}</summary>
      <pre class="log" data-log="${esc(r.run_id)}">${log ? esc(log.text) : ""}${log?.error ? `<span class="bad">${esc(log.error)}</span>` : ""}</pre></details>
  </div>`;
}

async function loadLog(state, runId) {
  const known = state.logs.get(runId) ?? { text: "", next: 0, complete: false };
  if (known.complete || known.loading) return;
  known.loading = true;
  state.logs.set(runId, known);
  try {
    const part = await getJSON(`/runs/${encodeURIComponent(runId)}/log?from_chunk=${known.next}`);
    known.text += part.text;
    known.next = part.next_chunk;
    known.complete = part.complete;
    if (part.dropped_bytes) known.text += `\n[${part.dropped_bytes} bytes over the log cap were not stored]`;
    known.error = null;
  } catch (error) {
    known.error = error.message;
    known.complete = error.status === 404 && !(state.runs ?? []).some((r) => r.run_id === runId && r.status === "running");
  } finally {
    known.loading = false;
  }
  const pre = state.root.querySelector(`pre[data-log="${CSS.escape(runId)}"]`);
  if (pre) {
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.innerHTML = esc(known.text) + (known.error ? `<span class="bad">${esc(known.error)}</span>` : "");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }
}

// Open logs of runs still going are asked again from where they stopped.
function followLogs(state) {
  for (const d of state.root.querySelectorAll("details[data-run][open]")) {
    const log = state.logs.get(d.dataset.run);
    if (!log || !log.complete) loadLog(state, d.dataset.run);
  }
}
