// The UI's entry point: hash routing, the token prompt, and the page lifecycle.
//
// Each view is `async (page, ...params)`: it fills `page.root` and may start
// polls or streams tied to `page`, which stop when the user goes elsewhere.

import { api, clearToken, getToken, onUnauthorized, setToken, takeTokenFromFragment } from "./api.js";
import { clearErrors, h, showError } from "./dom.js";
import { actionsView } from "./views/actions.js";
import { graphView } from "./views/graph.js";
import { pluginsView } from "./views/plugins.js";
import { runsView, runView } from "./views/runs.js";
import { stepsView, stepView } from "./views/steps.js";
import { tablesView, tableView } from "./views/tables.js";

/** [pattern over the part after "#", view, nav section] */
const ROUTES = [
  [/^\/graph$/, graphView, "graph"],
  [/^\/runs$/, runsView, "runs"],
  [/^\/runs\/([^/]+)$/, runView, "runs"],
  [/^\/tables$/, tablesView, "tables"],
  [/^\/tables\/([^/]+)$/, tableView, "tables"],
  [/^\/steps$/, stepsView, "steps"],
  [/^\/steps\/([^/]+)$/, stepView, "steps"],
  [/^\/actions$/, actionsView, "actions"],
  [/^\/plugins$/, pluginsView, "plugins"],
];

/** One visit of a view: its container, and what to stop when it is left. */
export class Page {
  constructor(root) {
    this.root = root;
    this.controller = new AbortController();
    this.timers = new Set();
  }

  get signal() {
    return this.controller.signal;
  }

  get active() {
    return !this.signal.aborted;
  }

  /** Report a failure in the banner, unless it only says the page was left. */
  report(error) {
    if (!this.active || error.name === "AbortError") return;
    if (error.status === 401) return; // the token prompt shows it
    showError(error);
  }

  /** Run `fn` now and then every `ms` until the page is left. */
  async every(ms, fn) {
    if (!this.active) return;
    try {
      await fn();
    } catch (error) {
      this.report(error);
    }
    if (this.active) {
      const timer = setTimeout(() => {
        this.timers.delete(timer);
        this.every(ms, fn);
      }, ms);
      this.timers.add(timer);
    }
  }

  /** Run `fn` (e.g. a button's work), reporting its failure. */
  async guard(fn) {
    try {
      return await fn();
    } catch (error) {
      this.report(error);
      return undefined;
    }
  }

  leave() {
    this.controller.abort();
    for (const timer of this.timers) clearTimeout(timer);
    this.root.remove();
  }
}

let current = null;

/** The address' path segments decoded, or null when one is malformed (`%E0`). */
function decodeAll(parts) {
  try {
    return parts.map(decodeURIComponent);
  } catch {
    return null;
  }
}

/** Show the view the address' fragment names (the graph by default). */
async function route() {
  if (takeTokenFromFragment()) {
    hideTokenPrompt();
    showTokenControls();
    loadTitle();
  }
  const path = location.hash.replace(/^#/, "") || "/graph";
  if (current) current.leave();
  clearErrors();
  const root = h("div", { class: "page" });
  document.getElementById("view").replaceChildren(root);
  const page = current = new Page(root);

  const match = ROUTES.map(([pattern, view, nav]) => [path.match(pattern), view, nav])
    .find(([found]) => found);
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", Boolean(match) && a.dataset.section === match[2]);
  }
  const params = match && decodeAll(match[0].slice(1));
  if (!params) {
    root.append(h("h1", {}, "Not found"), h("p", {}, "No such page: ", h("code", {}, path)));
    return;
  }
  const view = match[1];
  try {
    await view(page, ...params);
  } catch (error) {
    page.report(error);
  }
}

// -- the token ---------------------------------------------------------------

function showTokenPrompt(error) {
  const reason = getToken()
    ? `The server refused the token this tab has: ${error.message}`
    : error.message;
  document.getElementById("token-reason").textContent = reason;
  document.getElementById("token-prompt").hidden = false;
  document.getElementById("view").hidden = true;
  document.getElementById("token-input").focus();
}

function hideTokenPrompt() {
  document.getElementById("token-prompt").hidden = true;
  document.getElementById("view").hidden = false;
}

function showTokenControls() {
  document.getElementById("forget-token").hidden = !getToken();
}

/** The app's title in the header. */
async function loadTitle() {
  try {
    const app = await api("/api/app");
    const title = app.title || app.root.split("/").pop();
    document.getElementById("app-title").textContent = title;
    document.title = `${title} · stepwell`;
  } catch (error) {
    if (error.status !== 401) showError(error);
  }
}

function start() {
  onUnauthorized(showTokenPrompt);
  takeTokenFromFragment();
  showTokenControls();

  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    if (!input.value.trim()) return;
    setToken(input.value);
    input.value = "";
    hideTokenPrompt();
    showTokenControls();
    loadTitle();
    route();
  });
  document.getElementById("forget-token").addEventListener("click", () => {
    clearToken();
    showTokenControls();
    route();
  });
  document.getElementById("banner-close").addEventListener("click", clearErrors);

  window.addEventListener("hashchange", () => {
    showTokenControls();
    route();
  });
  loadTitle();
  route();
}

start();
