// The analyses of `groundloop analyze` (GET /analysis?ids=…, one JSON per search), drawn as
// the same four figures, one line per search so several compare side by side:
// execution rate and failure reasons, hyper-parameter share and score per class, diversity,
// best (solid) and mean (dashed) score per generation with each baseline dotted.

import { empty, esc, getJSON, numCell } from "../lib.js";
import { chart, legend } from "../plot.js";

export const PALETTE = ["#58a6ff", "#3fb950", "#f0883e", "#d2a8ff", "#e3b341", "#ff7b72", "#79c0ff", "#56d364"];
const CLASSES = ["hyperparameter", "algorithmic", "unclassified"];

// The analyses of `ids`, in order; an error (no broker: 503) becomes a message to show.
export async function loadAnalyses(ids) {
  if (!ids.length) return { analyses: [], error: null };
  const query = ids.map(encodeURIComponent).join(",");
  try {
    return { analyses: await getJSON(`/analysis?ids=${query}`), error: null };
  } catch (error) {
    return { analyses: [], error: error.message };
  }
}

const pointsOf = (a, key) => a.generations.filter((g) => g[key] !== null && g[key] !== undefined).map((g) => [g.generation, g[key]]);

function figure(id, title, spec, note = "") {
  return `<div class="figure" id="${id}"><h3 class="small">${esc(title)}</h3>${chart({ height: 260, xLabel: "generation", xInteger: true, ...spec })}${note}</div>`;
}

function lines(analyses, colors, key, extra = {}) {
  return analyses.map((a, i) => ({ points: pointsOf(a, key), color: colors[i], label: a.search_id, ...extra }));
}

function failureTable(analyses) {
  const rows = analyses.flatMap((a) => a.generations.map((g) => {
    const reasons = Object.entries(g.failures).map(([k, n]) => `${esc(k)}: ${n}`).join(", ") || "–";
    return `<tr data-search="${esc(a.search_id)}" data-generation="${g.generation}"><td>${esc(a.search_id)}</td><td class="r">${g.generation}</td><td class="r">${g.ideas}</td><td class="r">${g.valid}</td><td class="r">${g.pending}</td><td class="r">${numCell(g.execution_rate)}</td><td class="small">${reasons}</td></tr>`;
  }));
  return `<table class="grid-table compact" id="analysis-failures"><thead><tr><th>search</th><th class="r">gen</th><th class="r">ideas</th><th class="r">valid</th><th class="r">pending</th><th class="r">execution rate</th><th>why no valid run</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

function classTable(analyses) {
  const rows = analyses.flatMap((a) => CLASSES.filter((c) => a.classes[c]?.ideas).map((c) => {
    const s = a.classes[c];
    return `<tr data-search="${esc(a.search_id)}" data-class="${c}"><td>${esc(a.search_id)}</td><td>${c}</td><td class="r">${s.ideas}</td><td class="r">${s.valid}</td><td class="r">${numCell(s.mean_score)}</td><td class="r">${numCell(s.best_score)}</td></tr>`;
  }));
  return `<table class="grid-table compact" id="analysis-classes"><thead><tr><th>search</th><th>class (by patch)</th><th class="r">ideas</th><th class="r">valid</th><th class="r">mean score</th><th class="r">best score</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

// The four analyses of `analyses` (colours in the same order) as HTML.
export function analysisFigures(analyses, colors = PALETTE) {
  if (!analyses.length) return empty("No analysis yet.");
  const palette = analyses.map((_, i) => colors[i % colors.length]);
  const metrics = [...new Set(analyses.map((a) => (a.metric ? `${a.metric.name} (${a.metric.direction === "minimize" ? "lower" : "higher"} is better)` : "score")))];
  const baselines = analyses.map((a, i) => (a.baseline.mean === null ? null : { y: a.baseline.mean, color: palette[i], dash: "2 4", label: `${a.search_id} baseline` })).filter(Boolean);
  const key = legend([
    ...analyses.map((a, i) => ({ label: a.search_id, color: palette[i], shape: "line" })),
  ]);
  const measures = [...new Set(analyses.map((a) => a.diversity.measure))].join("; ");
  const notes = [...new Set(analyses.map((a) => a.diversity.note).filter(Boolean))];
  return `${key}
    <div class="two">
      ${figure("analysis-execution", "Execution rate: ideas with a valid run ÷ ideas with an outcome", { yDomain: [0, 1.02], yLabel: "execution rate", lines: lines(analyses, palette, "execution_rate") })}
      ${figure("analysis-share", "Hyper-parameter share of classified ideas (by patch)", { yDomain: [0, 1.02], yLabel: "hyper-parameter share", lines: analyses.map((a, i) => ({ points: a.generations.filter((g) => g.classes.hyperparameter_share !== null).map((g) => [g.generation, g.classes.hyperparameter_share]), color: palette[i], label: a.search_id })) })}
      ${figure("analysis-diversity", "Diversity (1 − mean pairwise similarity, solid) and distinct fraction (dashed)", { yDomain: [0, 1.02], yLabel: "diversity", lines: [...lines(analyses, palette, "diversity"), ...lines(analyses, palette, "distinct_fraction", { dash: "5 4" })] }, `<p class="muted small">similarity: ${esc(measures)}${notes.length ? ` — ${esc(notes.join("; "))}` : ""}</p>`)}
      ${figure("analysis-scores", "Best (solid) and mean (dashed) idea score per generation; baselines dotted", { yLabel: metrics.join(" / "), lines: [...lines(analyses, palette, "best_score", { width: 2.5 }), ...lines(analyses, palette, "mean_score", { dash: "5 4" })], rules: baselines })}
    </div>
    ${metrics.length > 1 ? `<p class="bad small">these searches measure different metrics: ${metrics.map(esc).join(", ")}</p>` : ""}
    <details id="analysis-details"><summary>Failure reasons and score per class</summary>${failureTable(analyses)}${classTable(analyses)}
      <p class="muted small">classes read from ${esc([...new Set(analyses.map((a) => a.class_basis))].join("; "))}; the LLM judge: <code>groundloop analyze --judge-model</code></p></details>`;
}
