// SVG charts drawn here (no plotting library): lines, step curves, points, bands, rules.
// Every chart returns an SVG string sized by its viewBox, so it scales with its panel.

import { esc, num } from "./lib.js";

const PAD = { left: 64, right: 18, top: 14, bottom: 42 };

function niceStep(span, count) {
  const raw = span / Math.max(count, 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  return (norm >= 5 ? 10 : norm >= 2 ? 5 : norm >= 1 ? 2 : 1) * mag;
}

export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const step = niceStep(hi - lo, count);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    out.push(Number(v.toPrecision(12)));
  }
  return out;
}

function extent(values, pad = 0.06) {
  const finite = values.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  if (!finite.length) return [0, 1];
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (lo === hi) {
    const d = Math.abs(lo) * 0.05 || 1;
    return [lo - d, hi + d];
  }
  const d = (hi - lo) * pad;
  return [lo - d, hi + d];
}

// spec: {width, height, xLabel, yLabel, xInteger, lines: [{points: [[x, y]], color, step,
//   dash, width, label}], points: [{x, y, color, shape: "dot" | "cross" | "ring", r, title,
//   href}], bands: [{y0, y1, color, label}], rules: [{y, color, dash, label}],
//   failedLane: bool (points with y === null are drawn on a lane at the bottom)}
export function chart(spec) {
  const W = spec.width ?? 900;
  const H = spec.height ?? 320;
  const lines = spec.lines ?? [];
  const pts = spec.points ?? [];
  const bands = spec.bands ?? [];
  const rules = spec.rules ?? [];
  const xs = [
    ...lines.flatMap((l) => [...l.points.map((p) => p[0]), ...(l.extendTo === undefined ? [] : [l.extendTo])]),
    ...pts.map((p) => p.x),
  ];
  const ys = [
    ...lines.flatMap((l) => l.points.map((p) => p[1])),
    ...pts.map((p) => p.y),
    ...bands.flatMap((b) => [b.y0, b.y1]),
    ...rules.map((r) => r.y),
  ];
  const [x0, x1] = spec.xDomain ?? extent(xs, 0.03);
  const [y0, y1] = spec.yDomain ?? extent(ys);
  const lane = spec.failedLane && pts.some((p) => p.y === null) ? 22 : 0;
  const left = PAD.left;
  const right = W - PAD.right;
  const top = PAD.top;
  const bottom = H - PAD.bottom - lane;
  const sx = (x) => left + ((x - x0) / (x1 - x0 || 1)) * (right - left);
  const sy = (y) => bottom - ((y - y0) / (y1 - y0 || 1)) * (bottom - top);
  const out = [];
  out.push(`<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" preserveAspectRatio="xMidYMid meet">`);
  out.push(`<rect class="plot-bg" x="${left}" y="${top}" width="${right - left}" height="${bottom - top}"/>`);
  for (const t of ticks(y0, y1, 5)) {
    const y = sy(t);
    out.push(`<line class="grid" x1="${left}" x2="${right}" y1="${y}" y2="${y}"/>`);
    out.push(`<text class="tick" x="${left - 8}" y="${y + 4}" text-anchor="end">${num(t, 4)}</text>`);
  }
  const xt = spec.xInteger ? ticks(x0, x1, 8).filter((t) => Number.isInteger(t)) : ticks(x0, x1, 8);
  for (const t of xt) {
    const x = sx(t);
    out.push(`<line class="grid" x1="${x}" x2="${x}" y1="${top}" y2="${bottom}"/>`);
    out.push(`<text class="tick" x="${x}" y="${H - PAD.bottom + 16}" text-anchor="middle">${num(t, 4)}</text>`);
  }
  for (const b of bands) {
    const ya = sy(Math.max(b.y0, b.y1));
    const yb = sy(Math.min(b.y0, b.y1));
    out.push(`<rect class="band" x="${left}" y="${ya}" width="${right - left}" height="${Math.max(yb - ya, 2)}" fill="${b.color}"><title>${esc(b.label ?? "")}</title></rect>`);
  }
  for (const r of rules) {
    const y = sy(r.y);
    out.push(`<line x1="${left}" x2="${right}" y1="${y}" y2="${y}" stroke="${r.color}" stroke-width="1.5" stroke-dasharray="${r.dash ?? "6 4"}"><title>${esc(r.label ?? "")}</title></line>`);
    if (r.label) {
      out.push(`<text class="rule-label" x="${right - 6}" y="${y - 5}" text-anchor="end" fill="${r.color}">${esc(r.label)}</text>`);
    }
  }
  for (const l of lines) {
    if (!l.points.length) continue;
    let d = "";
    l.points.forEach(([x, y], i) => {
      if (i === 0) d += `M${sx(x)},${sy(y)}`;
      else if (l.step) d += `H${sx(x)}V${sy(y)}`;
      else d += `L${sx(x)},${sy(y)}`;
    });
    if (l.extendTo !== undefined) d += `H${sx(l.extendTo)}`;
    out.push(`<path d="${d}" fill="none" stroke="${l.color}" stroke-width="${l.width ?? 2}" ${l.dash ? `stroke-dasharray="${l.dash}"` : ""}><title>${esc(l.label ?? "")}</title></path>`);
  }
  if (lane) {
    out.push(`<text class="tick lane" x="${left - 8}" y="${bottom + lane - 6}" text-anchor="end">failed</text>`);
  }
  for (const p of pts) {
    const x = sx(p.x);
    const y = p.y === null ? bottom + lane - 10 : sy(p.y);
    const r = p.r ?? 4;
    let mark;
    if (p.shape === "cross") {
      mark = `<path class="mark" d="M${x - r},${y - r}L${x + r},${y + r}M${x - r},${y + r}L${x + r},${y - r}" stroke="${p.color}" stroke-width="2"/>`;
    } else if (p.shape === "ring") {
      mark = `<circle class="mark" cx="${x}" cy="${y}" r="${r}" fill="none" stroke="${p.color}" stroke-width="2"/>`;
    } else {
      mark = `<circle class="mark" cx="${x}" cy="${y}" r="${r}" fill="${p.color}" fill-opacity="0.85" stroke="#0d1117" stroke-width="1"/>`;
    }
    const title = p.title ? `<title>${esc(p.title)}</title>` : "";
    out.push(p.href ? `<a href="${esc(p.href)}">${mark}${title}</a>` : `<g>${mark}${title}</g>`);
  }
  out.push(`<line class="axis" x1="${left}" x2="${right}" y1="${bottom + lane}" y2="${bottom + lane}"/>`);
  out.push(`<line class="axis" x1="${left}" x2="${left}" y1="${top}" y2="${bottom + lane}"/>`);
  if (spec.xLabel) out.push(`<text class="label" x="${(left + right) / 2}" y="${H - 6}" text-anchor="middle">${esc(spec.xLabel)}</text>`);
  if (spec.yLabel) out.push(`<text class="label" transform="translate(14 ${(top + bottom) / 2}) rotate(-90)" text-anchor="middle">${esc(spec.yLabel)}</text>`);
  out.push("</svg>");
  return out.join("");
}

// items: [{label, color, shape}] -> an HTML legend line
export function legend(items) {
  return `<div class="legend">${items
    .map((i) => `<span><i class="swatch ${i.shape ?? "dot"}" style="--c:${i.color}"></i>${esc(i.label)}</span>`)
    .join("")}</div>`;
}

// Mean with a 95 % CI per row, against a reference value (the baseline on the same split).
export function forest(rows, reference, referenceLabel, width = 900) {
  const rowH = 34;
  const H = 40 + rows.length * rowH;
  const labelW = 320;
  const values = rows.flatMap((r) => [r.low, r.high, r.mean]).concat(reference ?? []);
  const [x0, x1] = extent(values, 0.1);
  const sx = (x) => labelW + ((x - x0) / (x1 - x0 || 1)) * (width - labelW - 24);
  const out = [`<svg class="chart" viewBox="0 0 ${width} ${H}" role="img">`];
  for (const t of ticks(x0, x1, 6)) {
    out.push(`<line class="grid" x1="${sx(t)}" x2="${sx(t)}" y1="8" y2="${H - 24}"/>`);
    out.push(`<text class="tick" x="${sx(t)}" y="${H - 8}" text-anchor="middle">${num(t, 4)}</text>`);
  }
  if (reference !== null && reference !== undefined) {
    out.push(`<line x1="${sx(reference)}" x2="${sx(reference)}" y1="4" y2="${H - 24}" stroke="#8b949e" stroke-dasharray="5 4" stroke-width="1.5"><title>${esc(referenceLabel)}</title></line>`);
    out.push(`<text class="rule-label" x="${sx(reference) + 4}" y="14" fill="#8b949e">${esc(referenceLabel)}</text>`);
  }
  rows.forEach((r, i) => {
    const y = 28 + i * rowH;
    out.push(`<text class="row-label" x="8" y="${y + 4}">${esc(r.label.length > 44 ? r.label.slice(0, 43) + "…" : r.label)}<title>${esc(r.label)}</title></text>`);
    out.push(`<line x1="${sx(r.low)}" x2="${sx(r.high)}" y1="${y}" y2="${y}" stroke="${r.color}" stroke-width="2.5"/>`);
    for (const end of [r.low, r.high]) out.push(`<line x1="${sx(end)}" x2="${sx(end)}" y1="${y - 6}" y2="${y + 6}" stroke="${r.color}" stroke-width="2"/>`);
    out.push(`<circle cx="${sx(r.mean)}" cy="${y}" r="5" fill="${r.color}"><title>${esc(r.title ?? "")}</title></circle>`);
  });
  out.push("</svg>");
  return out.join("");
}
