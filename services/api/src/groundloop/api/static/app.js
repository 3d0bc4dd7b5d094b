// The dashboard: a hash router over four pages, and one live feed (GET /live, server-sent
// events off the log) that tells the open page when something it shows has changed.

import { esc } from "./lib.js";
import * as searches from "./pages/searches.js";
import * as search from "./pages/search.js";
import * as idea from "./pages/idea.js";
import * as compare from "./pages/compare.js";

const ROUTES = [
  [/^#?\/?$/, searches, "searches"],
  [/^#\/search\/([^/?]+)$/, search, "searches"],
  [/^#\/idea\/([^/?]+)$/, idea, "searches"],
  [/^#\/compare(?:\?(.*))?$/, compare, "compare"],
];

const main = document.getElementById("main");
let current = null; // {page, args, state}

async function route() {
  const hash = location.hash || "#/";
  const found = ROUTES.find(([re]) => re.test(hash));
  if (current?.page.leave) current.page.leave(current.state);
  if (!found) {
    main.innerHTML = `<p class="empty">no page at ${esc(hash)}</p>`;
    current = null;
    return;
  }
  const [re, page, nav] = found;
  const args = hash.match(re).slice(1).map((a) => (a === undefined ? a : decodeURIComponent(a)));
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === nav);
  }
  const state = { args, root: main, alive: true };
  current = { page, args, state };
  main.dataset.page = nav;
  try {
    await page.show(state);
  } catch (error) {
    main.innerHTML = `<p class="error">${esc(error.message)}</p>`;
  }
}

// ---------------------------------------------------------------- live feed

const liveBox = document.getElementById("live");
const liveState = document.getElementById("live-state");
const liveLast = document.getElementById("live-last");
window.groundloopLive = { received: 0, last: null }; // read by the browser test

function connectLive() {
  const source = new EventSource("/live");
  source.onopen = () => {
    liveBox.dataset.state = "open";
    liveState.textContent = "live";
  };
  source.onerror = () => {
    // EventSource reconnects by itself, sending Last-Event-ID: nothing is missed.
    liveBox.dataset.state = "retrying";
    liveState.textContent = "reconnecting…";
  };
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    window.groundloopLive.received += 1;
    window.groundloopLive.last = event;
    const time = new Date().toLocaleTimeString();
    liveLast.textContent = `${event.type} · ${event.search_id ?? ""} · ${time}`;
    if (current?.page.onLive) current.page.onLive(current.state, event);
  };
}

window.addEventListener("hashchange", route);
route();
connectLive();
