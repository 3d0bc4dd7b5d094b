// Two or more searches on one plot: each one's best-so-far curve and baseline, by runs done,
// and the analyses of `groundloop analyze A B …` side by side (same colours).

import { badge, dollars, empty, esc, getJSON, numCell, section, throttle } from "../lib.js";
import { chart, legend } from "../plot.js";
import { PALETTE, analysisFigures, loadAnalyses } from "./analysis.js";

export async function show(state) {
  const params = new URLSearchParams(state.args[0] ?? "");
  state.ids = (params.get("ids") ?? "").split(",").filter(Boolean);
  state.refresh = throttle(() => render(state), 400);
  await render(state);
}

export function onLive(state, event) {
  if (state.ids.includes(event.search_id)) state.refresh();
}

export function leave(state) {
  state.alive = false;
}

async function render(state) {
  const all = await getJSON("/dashboard/searches");
  const [curves, analysis] = await Promise.all([
    Promise.all(state.ids.map((id) => getJSON(`/searches/${encodeURIComponent(id)}/curve`).catch(() => null))),
    loadAnalyses(state.ids),
  ]);
  if (!state.alive) return;
  const picker = `<div class="picker">${all.map((s) => `<label><input type="checkbox" value="${esc(s.search_id)}" ${state.ids.includes(s.search_id) ? "checked" : ""}> ${esc(s.search_id)} <span class="muted small">${esc(s.environment ?? "")} · ${esc(s.strategy ?? "")}</span></label>`).join("")}</div>`;
  let figure = empty("Pick two or more searches above.");
  const shown = curves.map((c, i) => ({ c, id: state.ids[i], color: PALETTE[i % PALETTE.length] })).filter((x) => x.c);
  if (shown.length) {
    const lines = [];
    const rules = [];
    for (const { c, id, color } of shown) {
      const runs = c.runs.filter((r) => r.purpose !== "reeval");
      const last = runs.length ? runs[runs.length - 1].position : 0;
      if (c.best_so_far.length) lines.push({ points: c.best_so_far.map((s) => [s.position, s.mean_score]), step: true, color, width: 2.5, extendTo: last, label: id });
      if (c.baseline_scores.length) rules.push({ y: c.baseline_scores.reduce((a, b) => a + b, 0) / c.baseline_scores.length, color, dash: "3 5" });
    }
    const metrics = new Set(shown.map(({ c }) => `${c.metric.name ?? "score"} (${c.metric.direction ?? "?"})`));
    const warn = metrics.size > 1 ? `<p class="bad small">these searches measure different metrics: ${[...metrics].map(esc).join(", ")}</p>` : "";
    figure = `${warn}<div class="figure" id="compare-plot">${chart({ width: 1100, height: 380, xDomain: [0.5, Math.max(1, ...shown.flatMap(({ c }) => c.runs.filter((r) => r.purpose !== "reeval").map((r) => r.position))) + 0.5], xLabel: "runs completed", yLabel: [...metrics][0], xInteger: true, lines, rules })}</div>
      ${legend(shown.map(({ id, color }) => ({ label: id, color, shape: "line" })))}<p class="muted small">dashed: each search's baseline mean, same colour</p>`;
  }
  const byId = new Map(all.map((s) => [s.search_id, s]));
  const table = shown.length ? `<table class="grid-table" id="compare-table"><thead><tr><th>search</th><th>status</th><th>environment</th><th>strategy</th><th class="r">ideas</th><th class="r">runs</th><th class="r">best</th><th class="r">baseline</th><th class="r">final best</th><th class="r">cost</th></tr></thead><tbody>
    ${shown.map(({ id, color }) => { const s = byId.get(id) ?? {}; return `<tr><td><i class="swatch line" style="--c:${color}"></i> <a href="#/search/${encodeURIComponent(id)}">${esc(id)}</a></td><td>${badge(s.status ?? "?")}</td><td>${esc(s.environment ?? "")}</td><td>${esc(s.strategy ?? "")}</td><td class="r">${s.ideas ?? "–"}</td><td class="r">${(s.runs_succeeded ?? 0) + (s.runs_failed ?? 0)}</td><td class="r">${numCell(s.best_score)}</td><td class="r">${numCell(s.baseline_score)}</td><td class="r">${numCell(s.final_best_score)}</td><td class="r">${dollars(s.cost_usd)}</td></tr>`; }).join("")}
  </tbody></table>` : "";
  state.root.innerHTML = `<div class="page-head"><h1>Compare searches</h1><span class="muted">${shown.length} shown</span></div>
    ${section("Searches", picker)}${section("Best so far, search split", figure + table)}
    ${state.ids.length ? section(`Analysis <span class="muted small">what <code>groundloop analyze ${state.ids.map(esc).join(" ")}</code> writes</span>`, analysis.error ? `<p class="muted">${esc(analysis.error)}</p>` : analysisFigures(analysis.analyses, state.ids.map((_, i) => PALETTE[i % PALETTE.length])), 'id="analysis"') : ""}`;
  for (const box of state.root.querySelectorAll(".picker input")) {
    box.onchange = () => {
      const ids = [...state.root.querySelectorAll(".picker input:checked")].map((b) => b.value);
      location.hash = `#/compare?ids=${ids.map(encodeURIComponent).join(",")}`;
    };
  }
}
