// Searches: one line each (status, environment, strategy, progress, best, cost, started).

import {
  badge, dollars, duration, empty, esc, getJSON, numCell, section, throttle, when,
} from "../lib.js";

export async function show(state) {
  state.refresh = throttle(() => render(state), 300);
  await render(state);
}

export function onLive(state) {
  state.refresh(); // any search's event can change this page
}

async function render(state) {
  const rows = await getJSON("/dashboard/searches");
  if (!state.alive) return;
  const selected = new Set(
    [...state.root.querySelectorAll("input[data-compare]:checked")].map((i) => i.value),
  );
  const running = rows.filter((r) => r.status === "running").length;
  const body = rows.length
    ? `<table class="grid-table" id="searches-table">
      <thead><tr>
        <th></th><th>search</th><th>status</th><th>environment</th><th>strategy</th>
        <th>proposer</th><th class="r">generation</th><th class="r">ideas</th>
        <th class="r">runs ok / failed / open</th><th class="r">best (search split)</th>
        <th class="r">baseline</th><th class="r">final best</th><th class="r">cost</th>
        <th class="r">GPU</th><th>started</th>
      </tr></thead>
      <tbody>${rows.map((r) => row(r, selected.has(r.search_id))).join("")}</tbody>
    </table>
    <div class="actions"><button id="compare-btn">Compare selected</button></div>`
    : empty("No searches yet. Start one with `groundloop search`; it appears here as soon as it starts.");
  state.root.innerHTML = `
    <div class="page-head"><h1>Searches</h1>
      <span class="muted">${rows.length} searches, ${running} running</span></div>
    ${section("All searches", body)}`;
  const button = state.root.querySelector("#compare-btn");
  if (button) {
    button.onclick = () => {
      const ids = [...state.root.querySelectorAll("input[data-compare]:checked")].map((i) => i.value);
      location.hash = `#/compare?ids=${ids.map(encodeURIComponent).join(",")}`;
    };
  }
}

function row(r, checked) {
  const generation = r.generation === null ? "–" : `${r.generation + 1} / ${r.generations ?? "?"}`;
  const proposer = r.proposer_model ? `${r.proposer_kind}: ${r.proposer_model}` : r.proposer_kind;
  const elapsed = r.started_at && r.completed_at
    ? (new Date(r.completed_at) - new Date(r.started_at)) / 1000 : null;
  return `<tr data-search="${esc(r.search_id)}">
    <td><input type="checkbox" data-compare value="${esc(r.search_id)}" ${checked ? "checked" : ""}
      aria-label="select ${esc(r.search_id)} to compare"></td>
    <td><a href="#/search/${encodeURIComponent(r.search_id)}">${esc(r.search_id)}</a></td>
    <td data-field="status" title="${esc(r.completion_reason ?? "")}">${badge(r.status)}</td>
    <td>${esc(r.environment ?? "–")}</td><td>${esc(r.strategy ?? "–")}</td>
    <td>${esc(proposer ?? "–")}</td>
    <td class="r">${generation}</td>
    <td class="r" data-field="ideas">${r.ideas}</td>
    <td class="r" data-field="runs">${r.runs_succeeded} / <span class="${r.runs_failed ? "bad" : ""}">${r.runs_failed}</span> / ${r.runs_open}</td>
    <td class="r" data-field="best_score" title="${esc(r.best_title ?? "")}">${numCell(r.best_score)}</td>
    <td class="r" data-field="baseline_score">${numCell(r.baseline_score)}</td>
    <td class="r" data-field="final_best_score">${numCell(r.final_best_score)}</td>
    <td class="r" data-field="cost_usd">${dollars(r.cost_usd)}</td>
    <td class="r">${r.gpu_seconds ? duration(r.gpu_seconds) : "–"}</td>
    <td>${when(r.started_at)}${elapsed !== null ? ` <span class="muted">(${duration(elapsed)})</span>` : ""}</td>
  </tr>`;
}

export function leave(state) {
  state.alive = false;
}
