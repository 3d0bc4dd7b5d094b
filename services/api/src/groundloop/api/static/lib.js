// Small helpers every page uses: fetching the JSON API, escaping, number and time formats.

export async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail ?? detail;
    } catch (_) {
      /* not JSON: keep the status text */
    }
    const error = new Error(`${path}: ${response.status} ${detail}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

export async function getText(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: ${response.status} ${response.statusText}`);
  return response.text();
}

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

// Every string from the API (idea text written by a model, error tails, logs) goes through this.
export function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

export function num(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 1e5 || abs < 1e-3) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}

// A number shown rounded, with the exact value kept for tooltips and tests.
export function numCell(value, digits = 4) {
  const exact = value === null || value === undefined ? "" : String(value);
  return `<span class="num" data-value="${esc(exact)}" title="${esc(exact)}">${num(value, digits)}</span>`;
}

export function dollars(value) {
  if (!value) return "$0";
  return value < 0.01 ? `$${value.toFixed(4)}` : `$${value.toFixed(2)}`;
}

export function tokens(value) {
  if (!value) return "0";
  if (value >= 1e6) return `${(value / 1e6).toFixed(2)} M`;
  if (value >= 1e3) return `${(value / 1e3).toFixed(1)} k`;
  return String(value);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  const h = Math.floor(seconds / 3600);
  return `${h} h ${Math.round((seconds % 3600) / 60)} min`;
}

export function when(iso) {
  if (!iso) return "–";
  const t = new Date(iso);
  const ago = (Date.now() - t.getTime()) / 1000;
  const rel = ago < 90 ? `${Math.max(0, Math.round(ago))} s ago`
    : ago < 5400 ? `${Math.round(ago / 60)} min ago`
    : ago < 129600 ? `${Math.round(ago / 3600)} h ago`
    : `${Math.round(ago / 86400)} d ago`;
  return `<time datetime="${esc(iso)}" title="${esc(t.toLocaleString())}">${rel}</time>`;
}

export function short(id) {
  return id ? String(id).slice(0, 8) : "–";
}

export function badge(text, kind = text) {
  return `<span class="badge badge-${esc(kind)}">${esc(text)}</span>`;
}

export const MODE_COLORS = {
  baseline: "#8b949e",
  fresh: "#58a6ff",
  explore: "#d2a8ff",
  exploit: "#3fb950",
  rl: "#f0883e",
};
export const FAILED_COLOR = "#f85149";

export function modeColor(mode) {
  return MODE_COLORS[mode] ?? "#c9d1d9";
}

// Run `fn` at most once per `ms`, and once more after the last call (nothing is dropped).
export function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  return (...args) => {
    const wait = last + ms - Date.now();
    clearTimeout(timer);
    if (wait <= 0) {
      last = Date.now();
      fn(...args);
    } else {
      timer = setTimeout(() => {
        last = Date.now();
        fn(...args);
      }, wait);
    }
  };
}

export function section(title, body, extra = "") {
  return `<section class="panel" ${extra}><h2>${title}</h2>${body}</section>`;
}

export function empty(text) {
  return `<p class="empty">${esc(text)}</p>`;
}
