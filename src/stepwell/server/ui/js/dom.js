// Building the page safely, and the small formatting helpers every view shares.
//
// Step names, log lines and table values are written by users' code, so they
// only ever reach the page as text nodes or attribute values (createElement,
// append, setAttribute); nothing is parsed as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) {
      if (typeof value !== "function") throw new Error(`${key} must be a function`);
      el.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child)); // strings become text
  }
  return el;
}

/** An HTML element: h("a", {href: "#/runs", class: "x"}, "text", childNode). */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, same calling convention as h(). */
export function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace everything inside `el` with `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  return build(el, {}, children);
}

// -- values --------------------------------------------------------------------

/** A table cell or state value as text: JSON for objects, "null" for null. */
export function valueText(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** Characters of a value shown before it is folded (the rest opens on a click). */
const SHOWN_CHARS = 200;

/** A value as a cell's content (null dimmed, long text folded). */
export function valueNode(value) {
  if (value === null || value === undefined) return h("span", { class: "null" }, "null");
  const text = valueText(value);
  if (text.length <= SHOWN_CHARS * 1.5) return text;
  return h("details", { class: "long" },
    h("summary", {}, `${text.slice(0, SHOWN_CHARS)}… (${text.length.toLocaleString()} characters)`),
    h("div", { class: "full" }, text));
}

/** A JSON value, pretty-printed in a <pre>. */
export function jsonBlock(value, attrs = {}) {
  return h("pre", { class: "json", ...attrs }, JSON.stringify(value, null, 2));
}

/** A timestamp in the browser's locale ("" for none). */
export function fmtTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

/** Seconds as "850 ms", "4.2 s", "3 min 5 s". */
export function fmtSeconds(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
}

/** How long a run took (or has taken so far). */
export function runDuration(run) {
  if (!run.started_at) return "";
  const end = run.ended_at ? new Date(run.ended_at) : new Date();
  return fmtSeconds((end - new Date(run.started_at)) / 1000);
}

/** Statuses of runs that have ended (the others are queued or running). */
export const FINISHED = new Set(["succeeded", "succeeded_no_data", "succeeded_with_errors",
  "failed", "timed_out", "cancelled", "killed"]);

/** A CSS class name made of `prefix` and an API word (anything else dropped). */
export function cls(prefix, word) {
  return `${prefix}${String(word || "none").toLowerCase().replace(/[^a-z0-9_-]/g, "")}`;
}

/** A coloured status label. */
export function statusBadge(status) {
  return h("span", { class: `status ${cls("status-", status)}` }, status || "never run");
}

/** A link to another view of the UI (`parts` are path segments, encoded). */
export function link(text, ...parts) {
  return h("a", { href: `#/${parts.map(encodeURIComponent).join("/")}` }, text);
}

/** A run's link: its id, shortened. */
export function runLink(runId) {
  return runId ? h("a", { href: `#/runs/${encodeURIComponent(runId)}`, class: "mono", title: runId },
    runId.slice(-8)) : "";
}

/** A step's link (action runs, "action:<name>", have no step page). */
export function stepLink(step) {
  return step.startsWith("action:") ? h("span", {}, step) : link(step, "steps", step);
}

// -- layout pieces ---------------------------------------------------------------

/**
 * A table: `columns` is a list of [title, row => cell content]; `empty` is
 * shown when there are no rows. `rowAttrs(row)` adds attributes to each <tr>.
 */
export function dataTable(columns, rows, { empty = "Nothing yet.", rowAttrs, attrs = {} } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("table", { class: "data", ...attrs },
    h("thead", {}, h("tr", {}, columns.map(([title]) => h("th", {}, title)))),
    h("tbody", {}, rows.map((row) => h("tr", rowAttrs ? rowAttrs(row) : {},
      columns.map(([title, cell]) => h("td", { "data-col": title }, cell(row)))))));
}

/** A definition list from [label, content] pairs (pairs with empty content skipped). */
export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs
    .filter(([, value]) => value !== null && value !== undefined && value !== "")
    .map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)]));
}

/** A titled section. */
export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

// -- the error banner -------------------------------------------------------------

const shown = new Set();

/** Show an error (an ApiError or any Error) in the banner at the top. */
export function showError(error) {
  const banner = document.getElementById("banner");
  const list = document.getElementById("banner-list");
  const code = error.code || error.name || "error";
  const message = error.message || String(error);
  const key = `${code}: ${message}`;
  if (shown.has(key)) return; // the same failure of a poll is listed once
  shown.add(key);
  const item = h("li", { class: "error" },
    h("strong", { class: "code" }, code), " ", h("span", { class: "message" }, message));
  if (error.details !== null && error.details !== undefined) {
    item.append(h("details", {}, h("summary", {}, "details"), jsonBlock(error.details)));
  }
  list.append(item);
  banner.hidden = false;
}

/** Empty the banner. */
export function clearErrors() {
  shown.clear();
  document.getElementById("banner-list").replaceChildren();
  document.getElementById("banner").hidden = true;
}
