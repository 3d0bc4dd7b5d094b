// The search page's figures: best-so-far with every run, final re-evaluation, lineage graph,
// cost per generation, RL curves.

import { chart, forest, legend } from "../plot.js";
import {
  FAILED_COLOR, MODE_COLORS, dollars, empty, esc, modeColor, num, tokens,
} from "../lib.js";

export function curveFigure(curve) {
  const searchRuns = curve.runs.filter((r) => r.purpose !== "reeval");
  if (!searchRuns.length) return empty("No run has completed yet.");
  const metric = curve.metric;
  const better = metric.direction === "minimize" ? "lower is better" : metric.direction === "maximize" ? "higher is better" : "";
  const last = searchRuns[searchRuns.length - 1].position;
  const points = searchRuns.map((r) => {
    const failed = r.status !== "succeeded" || r.score === null;
    return {
      x: r.position,
      y: failed ? null : r.score,
      color: failed ? FAILED_COLOR : modeColor(r.mode),
      shape: failed ? "cross" : "dot",
      r: r.mode === "baseline" ? 5 : 4,
      title: `${r.title ?? r.mode ?? "run"}\n${r.status}${failed ? "" : ` · score ${num(r.score, 6)}`} · gen ${r.generation ?? "–"} · ${r.mode}`,
      href: r.idea_id ? `#/idea/${encodeURIComponent(r.idea_id)}` : null,
    };
  });
  const base = curve.baseline_scores;
  const bands = [];
  const rules = [];
  if (base.length) {
    const mean = base.reduce((a, b) => a + b, 0) / base.length;
    bands.push({ y0: Math.min(...base), y1: Math.max(...base), color: "rgba(139,148,158,0.18)", label: `baseline: ${base.length} runs, ${num(Math.min(...base))} – ${num(Math.max(...base))}` });
    rules.push({ y: mean, color: "#8b949e", label: `baseline ${num(mean)}` });
  }
  const steps = curve.best_so_far;
  const lines = steps.length
    ? [{ points: steps.map((s) => [s.position, s.mean_score]), step: true, color: "#e3b341", width: 2.5, extendTo: last, label: "best so far (mean of the leader's runs)" }]
    : [];
  const svg = chart({
    height: 340,
    xLabel: "runs completed",
    yLabel: `${metric.name ?? "score"} (${metric.split ?? "search"} split${better ? `, ${better}` : ""})`,
    xInteger: true,
    xDomain: [0.5, last + 0.5],
    lines, points, bands, rules,
    failedLane: true,
  });
  const present = new Set(searchRuns.map((r) => r.mode));
  const items = Object.entries(MODE_COLORS).filter(([m]) => present.has(m)).map(([m, c]) => ({ label: m, color: c }));
  items.push({ label: "failed", color: FAILED_COLOR, shape: "cross" });
  items.push({ label: "best so far", color: "#e3b341", shape: "line" });
  if (base.length) items.push({ label: "baseline band", color: "#8b949e", shape: "band" });
  return `<div class="figure" id="curve">${svg}</div>${legend(items)}`;
}

export function finalFigure(curve) {
  const finals = curve.final ?? [];
  if (!finals.length) {
    return empty("The final re-evaluation runs when the search completes: the top ideas on fresh seeds, on the final split.");
  }
  const rows = finals.map((f) => ({
    label: f.title ?? f.idea_id,
    mean: f.mean, low: f.ci95_low ?? f.mean, high: f.ci95_high ?? f.mean,
    color: "#e3b341",
    title: `mean ${num(f.mean, 6)} · 95 % CI [${num(f.ci95_low, 6)}, ${num(f.ci95_high, 6)}] · p ${num(f.p_value_vs_baseline, 3)}`,
  }));
  const split = curve.metric.final_split ?? "final";
  const table = `<table class="grid-table compact" id="final-table"><thead><tr><th>idea</th><th class="r">scores</th><th class="r">mean</th><th class="r">95 % CI</th><th class="r">p vs baseline</th></tr></thead><tbody>
    ${finals.map((f) => `<tr><td><a href="#/idea/${encodeURIComponent(f.idea_id)}">${esc(f.title ?? f.idea_id)}</a></td>
      <td class="r">${(f.scores ?? []).map((s) => num(s)).join(", ")}</td>
      <td class="r" data-field="final_mean" data-value="${f.mean}">${num(f.mean)}</td>
      <td class="r">[${num(f.ci95_low)}, ${num(f.ci95_high)}]</td>
      <td class="r">${num(f.p_value_vs_baseline, 3)}</td></tr>`).join("")}
    </tbody></table>`;
  return forest(rows, curve.final_baseline_score, `baseline on ${split}: ${num(curve.final_baseline_score)}`) + table;
}

// Ideas as nodes in columns by generation; an edge from each parent to the idea built on it.
export function lineageFigure(ideas, leaderId) {
  const shown = ideas.filter((i) => i.mode !== "baseline");
  if (!shown.length) return empty("No ideas yet.");
  const byGen = new Map();
  for (const i of shown) {
    const g = i.generation ?? 0;
    if (!byGen.has(g)) byGen.set(g, []);
    byGen.get(g).push(i);
  }
  const gens = [...byGen.keys()].sort((a, b) => a - b);
  const colW = 250;
  const rowH = 30;
  const maxRows = Math.max(...gens.map((g) => byGen.get(g).length));
  const W = Math.max(600, 80 + gens.length * colW);
  // drawn at its own size (no scaling): the panel scrolls when there are many generations
  const H = 50 + maxRows * rowH;
  const pos = new Map();
  gens.forEach((g, gi) => {
    const column = byGen.get(g).sort((a, b) => (b.mean_reward ?? -Infinity) - (a.mean_reward ?? -Infinity));
    column.forEach((i, k) => pos.set(i.idea_id, [60 + gi * colW, 42 + k * rowH]));
  });
  const out = [`<svg class="chart lineage" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img">`];
  gens.forEach((g, gi) => out.push(`<text class="label" x="${60 + gi * colW}" y="18" text-anchor="middle">generation ${g}</text>`));
  let edges = 0;
  for (const i of shown) {
    const [x2, y2] = pos.get(i.idea_id);
    for (const p of i.parent_ids ?? []) {
      if (!pos.has(p)) continue;
      const [x1, y1] = pos.get(p);
      const mx = (x1 + x2) / 2;
      out.push(`<path class="edge" d="M${x1 + 7},${y1}C${mx},${y1} ${mx},${y2} ${x2 - 7},${y2}"/>`);
      edges += 1;
    }
  }
  for (const i of shown) {
    const [x, y] = pos.get(i.idea_id);
    const failed = ["patch_failed", "run_failed"].includes(i.status);
    const label = (i.title ?? "").length > 30 ? `${i.title.slice(0, 29)}…` : i.title ?? "";
    out.push(`<a href="#/idea/${encodeURIComponent(i.idea_id)}">
      <circle cx="${x}" cy="${y}" r="${i.idea_id === leaderId ? 8 : 6}" fill="${failed ? "none" : modeColor(i.mode)}" stroke="${failed ? FAILED_COLOR : i.idea_id === leaderId ? "#e3b341" : "#0d1117"}" stroke-width="${i.idea_id === leaderId ? 3 : 1.5}"/>
      <text class="node-label" x="${x + 11}" y="${y + 4}">${esc(label)}</text>
      <title>${esc(i.title ?? i.idea_id)}\n${i.mode} · ${i.status} · mean score ${num(i.mean_score, 6)}${(i.parent_ids ?? []).length ? `\nbuilt on ${i.parent_ids.length} idea(s)` : ""}</title></a>`);
  }
  out.push("</svg>");
  const note = edges ? `${edges} parent → child links` : "no idea has parents yet (exploit ideas build on earlier ones)";
  return `<div class="figure scroll" id="lineage">${out.join("")}</div><p class="muted small">${note}; ring: failed; gold: the leader.</p>`;
}

export function costFigure(costs) {
  const rows = costs.generations;
  if (!rows.length) return empty("Nothing spent yet.");
  const body = rows.map((g) => `<tr>
    <td>${g.generation ?? "–"}</td><td class="r">${g.ideas}</td>
    <td class="r">${tokens(g.ideator_input_tokens)} / ${tokens(g.ideator_output_tokens)}</td>
    <td class="r">${dollars(g.ideator_usd)}</td>
    <td class="r">${tokens(g.implementer_input_tokens)} / ${tokens(g.implementer_output_tokens)}</td>
    <td class="r">${dollars(g.implementer_usd)}</td>
    <td class="r">${g.runs}</td><td class="r">${num(g.wall_seconds, 3)} s</td><td class="r">${num(g.gpu_seconds / 3600, 3)} h</td></tr>`).join("");
  return `<table class="grid-table compact" id="cost-table"><thead><tr><th>gen</th><th class="r">ideas</th>
    <th class="r">ideator tokens in / out</th><th class="r">ideator $</th>
    <th class="r">implementer tokens in / out</th><th class="r">implementer $</th>
    <th class="r">runs</th><th class="r">run time</th><th class="r">GPU-hours</th></tr></thead>
    <tbody>${body}</tbody>
    <tfoot><tr><td>total</td><td></td><td class="r" colspan="3">${tokens(costs.input_tokens)} in / ${tokens(costs.output_tokens)} out</td>
    <td class="r" data-field="cost_total" data-value="${costs.cost_usd}">${dollars(costs.cost_usd)}</td><td></td><td></td>
    <td class="r">${num(costs.gpu_seconds / 3600, 3)} h</td></tr></tfoot></table>`;
}

export function rlFigure(policies) {
  if (!policies.length) return "";
  const rewardLines = [
    { points: policies.map((p) => [p.step, p.mean_reward]), color: "#58a6ff", label: "mean reward" },
    { points: policies.map((p) => [p.step, p.max_reward]), color: "#3fb950", label: "max reward" },
  ];
  const diversity = policies.filter((p) => p.diversity !== null && p.diversity !== undefined);
  const rewards = chart({ height: 260, xLabel: "policy step", yLabel: "reward", lines: rewardLines, points: policies.flatMap((p) => [
    { x: p.step, y: p.mean_reward, color: "#58a6ff", r: 3, title: `v${p.policy_version} mean ${num(p.mean_reward, 6)}` },
    { x: p.step, y: p.max_reward, color: "#3fb950", r: 3, title: `v${p.policy_version} max ${num(p.max_reward, 6)}` }]) });
  const div = diversity.length
    ? chart({ height: 260, xLabel: "policy step", yLabel: "idea diversity", lines: [{ points: diversity.map((p) => [p.step, p.diversity]), color: "#d2a8ff" }], points: diversity.map((p) => ({ x: p.step, y: p.diversity, color: "#d2a8ff", r: 3, title: `v${p.policy_version}: ${num(p.diversity, 4)}` })) })
    : empty("no diversity recorded");
  return `<div class="two" id="rl">${`<div>${rewards}${legend([{ label: "mean reward", color: "#58a6ff", shape: "line" }, { label: "max reward", color: "#3fb950", shape: "line" }])}</div>`}<div>${div}</div></div>
    <p class="muted small">${policies.length} policy updates; latest v${policies[policies.length - 1].policy_version} at step ${policies[policies.length - 1].step}.</p>`;
}
