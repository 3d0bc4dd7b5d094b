// One search: its numbers, generation progress, the best-so-far curve with every run, the
// final re-evaluation, leaderboard, lineage, cost, RL curves, the analyses of
// `groundloop analyze`, ideas and live activity.

import {
  badge, dollars, duration, empty, esc, getJSON, num, numCell, section, short, throttle, tokens, when,
} from "../lib.js";
import { costFigure, curveFigure, finalFigure, lineageFigure, rlFigure } from "./search_charts.js";
import { analysisFigures, loadAnalyses } from "./analysis.js";

const IDEA_STATES = ["proposed", "patched", "running", "ran", "run_failed", "patch_failed"];

export async function show(state) {
  state.id = state.args[0];
  state.activity = [];
  state.refresh = throttle(() => render(state), 250);
  // The analysis reads the whole log: at most every 3 s, never holding up the page.
  state.refreshAnalysis = throttle(() => fillAnalysis(state), 3000);
  await render(state);
}

async function fillAnalysis(state) {
  const { analyses, error } = await loadAnalyses([state.id]);
  if (!state.alive) return;
  state.analysisHtml = error ? `<p class="muted">${esc(error)}</p>` : analysisFigures(analyses);
  const box = state.root.querySelector("#analysis-body");
  if (!box) return;
  const open = box.querySelector("details[open]") !== null;
  box.innerHTML = state.analysisHtml;
  if (open) box.querySelector("details").open = true;
}

export function onLive(state, event) {
  if (event.search_id !== state.id) return;
  state.activity.unshift(event);
  state.activity.length = Math.min(state.activity.length, 14);
  state.refresh();
}

export function leave(state) {
  state.alive = false;
}

async function render(state) {
  const id = encodeURIComponent(state.id);
  const [detail, curve, board, ideas, costs, policies, open] = await Promise.all([
    getJSON(`/searches/${id}`),
    getJSON(`/searches/${id}/curve`),
    getJSON(`/searches/${id}/leaderboard?limit=25&include_baseline=true`),
    getJSON(`/searches/${id}/ideas?limit=1000`),
    getJSON(`/searches/${id}/costs`),
    getJSON(`/searches/${id}/policies`),
    getJSON(`/searches/${id}/runs?status=running&limit=100`),
  ]);
  if (!state.alive) return;
  const s = detail.search;
  document.title = `${s.search_id} · groundloop`;
  const leader = board.find((e) => e.mode !== "baseline");
  const baselines = curve.baseline_scores;
  const baseMean = baselines.length ? baselines.reduce((a, b) => a + b, 0) / baselines.length : null;
  const runsDone = Object.entries(detail.runs_by_status).filter(([k]) => !["requested", "running"].includes(k)).reduce((a, [, n]) => a + n, 0);
  const failed = Object.entries(detail.runs_by_status).filter(([k]) => !["requested", "running", "succeeded"].includes(k)).reduce((a, [, n]) => a + n, 0);
  const ideaCount = ideas.filter((i) => i.mode !== "baseline").length;
  const proposer = s.proposer?.model ? `${s.proposer.kind}: ${s.proposer.model}` : s.proposer?.kind;
  const finalBest = (s.final ?? []).find((f) => f.idea_id === s.best_idea_id) ?? (s.final ?? [])[0];
  const keepOpen = new Set([...state.root.querySelectorAll("details[open]")].map((d) => d.id));

  state.root.innerHTML = `
  <div class="page-head">
    <h1>${esc(s.search_id)}</h1> ${badge(s.status)}
    <span class="muted">${esc(s.environment ?? "")} · ${esc(s.strategy ?? "")} · ${esc(proposer ?? "")} · seed ${s.seed ?? "–"} · started ${when(s.started_at)}${s.completed_at ? ` · took ${duration((new Date(s.completed_at) - new Date(s.started_at)) / 1000)}` : ""}</span>
    ${s.forked_from ? `<span class="muted">forked from <a href="#/search/${encodeURIComponent(s.forked_from)}">${esc(s.forked_from)}</a> at generation ${s.forked_generation}</span>` : ""}
  </div>
  ${s.completion_reason ? `<p class="reason ${s.status === "stopped" ? "bad" : ""}">${esc(s.completion_reason)}</p>` : ""}
  <div class="cards">
    ${card("generation", s.current_generation === null ? "–" : `${s.current_generation + 1} / ${s.config?.generations ?? "?"}`, "generation")}
    ${card("ideas", ideaCount, "ideas")}
    ${card("runs done", `${runsDone}${failed ? ` <small class="bad">${failed} failed</small>` : ""}`, "runs_done", `${open.length} running now`)}
    ${card("best so far", numCell(leader?.mean_score ?? null), "best_score", leader ? esc(leader.title ?? "") : "search split, mean of runs")}
    ${card("baseline", numCell(baseMean), "baseline_score", `${baselines.length} runs, search split`)}
    ${card("final best", finalBest ? `${numCell(finalBest.mean)}` : "–", "final_best", finalBest ? `95 % CI [${num(finalBest.ci95_low)}, ${num(finalBest.ci95_high)}]` : "after the final re-evaluation")}
    ${card("model cost", dollars(detail.cost_usd), "cost_usd", `${tokens(detail.input_tokens)} in · ${tokens(detail.output_tokens)} out`)}
    ${card("GPU time", detail.gpu_seconds ? duration(detail.gpu_seconds) : "–", "gpu_seconds")}
  </div>
  <div class="layout">
    <div class="col-main">
      ${section(`Best so far <span class="muted small">every run a point, by completion</span>`, curveFigure(curve))}
      ${section("Generations", progress(detail.generations, ideas, s.status === "running"))}
      ${section(`Leaderboard <span class="muted small">mean over succeeded search-split runs</span>`, leaderboard(board))}
      ${section(`Final re-evaluation <span class="muted small">${esc(curve.metric.final_split ?? "final")} split, mean and 95 % CI</span>`, finalFigure(curve))}
      ${section(`Lineage <span class="muted small">which ideas each exploit idea built on</span>`, lineageFigure(ideas, leader?.idea_id))}
      ${policies.length ? section("RL policy", rlFigure(policies)) : ""}
      ${section("Cost and tokens", costFigure(costs))}
      ${section(`Analysis <span class="muted small">what <code>groundloop analyze</code> writes, per generation</span>`, `<div id="analysis-body">${state.analysisHtml ?? empty("Reading the log…")}</div>`, 'id="analysis"')}
    </div>
    <aside class="col-side">
      ${section("Running now", running(open, ideas))}
      ${section("Live activity", activity(state.activity), 'id="activity"')}
      ${section(`Ideas <span class="muted small">newest first</span>`, ideaList(ideas), 'id="ideas"')}
    </aside>
  </div>`;
  for (const d of state.root.querySelectorAll("details")) if (keepOpen.has(d.id)) d.open = true;
  state.refreshAnalysis();
}

function card(label, value, field, note = "") {
  return `<div class="card" data-card="${field}"><div class="card-label">${label}</div>
    <div class="card-value">${value}</div>${note ? `<div class="card-note">${note}</div>` : ""}</div>`;
}

function progress(generations, ideas, open) {
  if (!generations.length) return empty("The evolver opens generation 0 once the baseline is measured.");
  const counts = new Map();
  for (const i of ideas) {
    if (i.mode === "baseline") continue;
    const c = counts.get(i.generation) ?? {};
    c[i.status] = (c[i.status] ?? 0) + 1;
    counts.set(i.generation, c);
  }
  const rows = generations.map((g) => {
    const c = counts.get(g.generation) ?? {};
    const total = IDEA_STATES.reduce((a, k) => a + (c[k] ?? 0), 0);
    const planned = (g.fresh ?? 0) + (g.explore ?? 0) + (g.exploit ?? 0) + (g.plan?.rl ?? 0);
    const width = Math.max(total, planned, 1);
    const bar = IDEA_STATES.map((k) => (c[k] ? `<span class="seg seg-${k}" style="width:${(100 * c[k]) / width}%" title="${k}: ${c[k]}"></span>` : "")).join("");
    const plan = [["fresh", g.fresh], ["explore", g.explore], ["exploit", g.exploit], ["rl", g.plan?.rl]].filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(" · ");
    return `<tr data-generation="${g.generation}"><td>${g.generation}</td><td class="muted">${plan}</td>
      <td class="barcell"><div class="bar">${bar}</div></td><td class="r">${total} / ${planned || "?"}</td>
      <td class="r">${numCell(g.best_score)}</td><td class="r">${numCell(g.mean_score)}</td><td>${g.closed_at ? "closed" : open ? badge("open", "running") : "ended"}</td></tr>`;
  }).join("");
  const keys = IDEA_STATES.map((k) => `<span><i class="swatch seg-${k}"></i>${k.replace("_", " ")}</span>`).join("");
  return `<table class="grid-table compact" id="generations"><thead><tr><th>gen</th><th>plan</th><th>ideas by status</th><th class="r">ideas</th><th class="r">best</th><th class="r">mean</th><th></th></tr></thead><tbody>${rows}</tbody></table><div class="legend">${keys}</div>`;
}

function leaderboard(board) {
  if (!board.length) return empty("No idea has a succeeded run yet.");
  return `<table class="grid-table" id="leaderboard"><thead><tr><th class="r">#</th><th>idea</th><th>mode</th><th class="r">gen</th>
    <th class="r">runs</th><th class="r">mean score</th><th class="r">best score</th><th class="r">final mean</th></tr></thead><tbody>
    ${board.map((e) => `<tr data-idea="${esc(e.idea_id)}"><td class="r">${e.rank}</td>
      <td><a href="#/idea/${encodeURIComponent(e.idea_id)}">${esc(e.title ?? short(e.idea_id))}</a></td>
      <td>${badge(e.mode ?? "–", e.mode ?? "none")}</td><td class="r">${e.generation ?? "–"}</td><td class="r">${e.runs}</td>
      <td class="r" data-field="mean_score">${numCell(e.mean_score)}</td><td class="r">${numCell(e.best_score)}</td>
      <td class="r">${e.final_runs ? `${numCell(e.final_mean_score)} <span class="muted small">(${e.final_runs})</span>` : "–"}</td></tr>`).join("")}
  </tbody></table>`;
}

function running(open, ideas) {
  if (!open.length) return empty("No run in flight.");
  const titles = new Map(ideas.map((i) => [i.idea_id, i.title]));
  return `<ul class="list">${open.map((r) => `<li><span class="pulse"></span>
    <a href="#/idea/${encodeURIComponent(r.idea_id ?? "")}">${esc(titles.get(r.idea_id) ?? r.purpose ?? "run")}</a>
    <span class="muted small">${esc(r.purpose ?? "")} · seed ${r.seed ?? "–"} · ${esc(r.runner_id ?? "")} · ${when(r.started_at)}</span></li>`).join("")}</ul>`;
}

function activity(events) {
  if (!events.length) return empty("Events of this search appear here as they happen.");
  return `<ul class="list feed">${events.map((e) => {
    const s = e.summary ?? {};
    const what = s.title ?? (s.status ? `${s.status}${s.score !== undefined ? ` · ${num(s.score)}` : ""}` : s.generation !== undefined ? `generation ${s.generation}` : "");
    return `<li><span class="etype">${esc(e.type)}</span> <span class="small">${esc(what)}</span>
      <span class="muted small">${new Date(e.occurred_at ?? Date.now()).toLocaleTimeString()}</span></li>`;
  }).join("")}</ul>`;
}

function ideaList(ideas) {
  const list = ideas.filter((i) => i.mode !== "baseline").slice().reverse();
  if (!list.length) return empty("No ideas yet.");
  return `<ul class="list ideas">${list.slice(0, 200).map((i) => `<li data-idea="${esc(i.idea_id)}">
    ${badge(i.status.replace("_", " "), i.status)} <a href="#/idea/${encodeURIComponent(i.idea_id)}">${esc(i.title ?? short(i.idea_id))}</a>
    <span class="muted small">g${i.generation ?? "–"} · ${esc(i.mode ?? "")}${i.mean_score !== null && i.mean_score !== undefined ? ` · ${num(i.mean_score)}` : ""}</span></li>`).join("")}</ul>`;
}
