// Runs: the list (polled every 2 s) and one run's page, whose log follows the
// run live through its event stream (GET /api/runs/{id}/events).

import { api, followEvents, seg, withQuery } from "../api.js";
import {
  FINISHED, dataTable, facts, fill, fmtTime, h, jsonBlock, runDuration, runLink, stepLink,
  statusBadge,
} from "../dom.js";

const PAGE = 100;
/** Log lines added to the page per animation frame (the rest in the next ones). */
const LINES_PER_FRAME = 2000;
/** A run page shows the last this many stored log lines (and every live one). */
const LOG_TAIL = 5000;

/** #/runs: newest first, filtered by status, a page of 100 at a time. */
export async function runsView(page) {
  const holder = h("div");
  const status = h("select", { id: "runs-status" }, h("option", { value: "" }, "any status"),
    ...[...["queued", "running"], ...FINISHED].map((s) => h("option", { value: s }, s)));
  const newer = h("button", { type: "button", id: "runs-newest", hidden: true }, "Newest runs");
  const older = h("button", { type: "button", id: "runs-older" }, "Older runs");
  let before = null; // the page shown: runs older than this run id (null: the newest)
  let shown = [];
  const refresh = async () => {
    const query = { limit: PAGE, status: status.value || null, before };
    ({ runs: shown } = await api(withQuery("/api/runs", query), { signal: page.signal }));
    fill(holder, runsTable(shown));
    older.disabled = shown.length < PAGE;
    newer.hidden = before === null;
  };
  const show = (from) => {
    before = from;
    page.guard(refresh);
  };
  status.addEventListener("change", () => show(null));
  newer.addEventListener("click", () => show(null));
  older.addEventListener("click", () => shown.length && show(shown[shown.length - 1].id));
  page.root.append(h("h1", {}, "Runs"),
    h("p", { class: "hint" }, "Newest first; refreshed every 2 s."),
    h("p", { class: "pager" }, h("label", {}, "Status ", status), newer, older),
    holder);
  await page.every(2000, refresh);
}

/** A table of runs; ``withStep: false`` leaves out the step (runs of one step). */
export function runsTable(runs, { withStep = true } = {}) {
  return dataTable([
    ["Run", (r) => runLink(r.id)],
    ...(withStep ? [["Step", (r) => stepLink(r.step)]] : []),
    ["Status", (r) => statusBadge(r.status)],
    ["Trigger", (r) => r.trigger || ""],
    ["Started", (r) => fmtTime(r.started_at)],
    ["Duration", (r) => runDuration(r)],
    ["Rows in", (r) => r.rows_in],
    ["Rows out", (r) => r.rows_out],
    ["Error", (r) => (r.error ? h("span", { class: "error-text", title: r.error }, r.error) : "")],
  ], runs, { empty: "No runs yet.", attrs: { class: "data runs" },
    rowAttrs: (r) => ({ "data-run": r.id, "data-step": r.step, "data-status": r.status }) });
}

// -- one run ---------------------------------------------------------------------

function summary(run) {
  return facts([
    ["Step", stepLink(run.step)],
    ["Status", statusBadge(run.status)],
    ["Trigger", run.trigger],
    ["Started", fmtTime(run.started_at)],
    ["Ended", fmtTime(run.ended_at)],
    ["Duration", runDuration(run)],
    ["Rows in", String(run.rows_in)],
    ["Rows out", String(run.rows_out)],
    ["Error", run.error ? h("span", { class: "error-text" }, run.error) : null],
  ]);
}

function logLine(line) {
  return h("li", { class: `log-line level-${line.level.toLowerCase().replace(/[^a-z]/g, "")}`,
    "data-seq": line.seq },
  h("time", {}, new Date(line.ts).toLocaleTimeString()), " ",
  h("span", { class: "level" }, line.level), " ",
  h("span", { class: "message" }, line.message));
}

/** #/runs/<id> */
export async function runView(page, runId) {
  const path = `/api/runs/${seg(runId)}`;
  const about = h("div");
  const details = h("div");
  const log = h("ol", { class: "log", id: "log" });
  const earlier = h("p", { class: "hint", id: "log-earlier", hidden: true });
  const live = h("span", { class: "live", hidden: true }, "following live…");
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-run", hidden: true },
    "Cancel");
  page.root.append(
    h("div", { class: "title-row" }, h("h1", {}, "Run ", h("span", { class: "mono" }, runId)), cancel),
    about, details,
    h("section", { class: "card" }, h("h2", {}, "Log ", live), earlier, log),
  );

  let run = null;
  const seen = new Set();
  const show = (record) => {
    run = record;
    fill(about, summary(record));
    cancel.hidden = FINISHED.has(record.status);
    const extra = [];
    if (record.traceback) extra.push(h("h3", {}, "Traceback"), h("pre", { class: "traceback" }, record.traceback));
    if (record.info && Object.keys(record.info).length) {
      extra.push(h("details", {}, h("summary", {}, "Run info"), jsonBlock(record.info)));
    }
    fill(details, extra);
  };
  // Lines are added once per animation frame, up to LINES_PER_FRAME at a time:
  // measuring the scroll position per line forced a layout per line (a 20,000-line
  // log took minutes), and adding a 100,000-line log in one frame froze the page
  // for seconds before its first line showed.
  let pending = [];
  const addLines = () => {
    const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    const batch = document.createDocumentFragment();
    for (const line of pending.splice(0, LINES_PER_FRAME)) batch.append(logLine(line));
    log.append(batch);
    if (pending.length) requestAnimationFrame(addLines);
    if (follow) log.scrollTop = log.scrollHeight;
  };
  const addLine = (line) => {
    if (seen.has(line.seq)) return;
    seen.add(line.seq);
    if (!pending.length) requestAnimationFrame(addLines);
    pending.push(line);
  };

  // A long log shows its last LOG_TAIL lines first; the rest on request.
  const showEarlier = (count) => {
    const all = h("button", { type: "button", id: "log-show-all" }, "Show all lines");
    all.addEventListener("click", () => page.guard(async () => {
      all.disabled = true;
      const { lines } = await api(`${path}/logs`, { signal: page.signal });
      earlier.hidden = true;
      pending = [];
      seen.clear();
      log.replaceChildren();
      lines.forEach(addLine);
    }));
    fill(earlier, `${count.toLocaleString()} earlier lines are not shown. `, all);
    earlier.hidden = false;
  };

  cancel.addEventListener("click", () => page.guard(async () => {
    const answer = await api(`${path}/cancel`, { method: "POST" });
    cancel.hidden = true;
    if (answer.status === "cancelled") show(await api(path));
  }));

  show(await api(path, { signal: page.signal }));
  // keep the duration of a run in progress ticking
  page.every(1000, () => {
    if (!FINISHED.has(run.status)) fill(about, summary(run));
  });
  // The stream sends the run, its stored lines, then live lines until `end`.
  live.hidden = FINISHED.has(run.status);
  let ended = false;
  try {
    await followEvents(`${path}/events?tail=${LOG_TAIL}`, ({ event, data }) => {
      if (event === "log") addLine(data);
      else if (event === "earlier") showEarlier(data.lines);
      else if (event === "status") show(data);
      else if (event === "progress") show({ ...run, rows_in: data.rows_in, rows_out: data.rows_out });
      else if (event === "end") {
        ended = true;
        show(data);
      } else if (event === "closing") {
        page.report(new Error(`the live log stopped: ${data.reason}`));
      }
    }, page.signal);
  } catch (error) {
    page.report(error);
  } finally {
    live.hidden = true;
  }
  if (!ended && page.active) {
    // the stream broke off (server stopping, network): show the run as stored now
    await page.guard(async () => {
      show(await api(path, { signal: page.signal }));
      const { lines } = await api(`${path}/logs?tail=${LOG_TAIL}`, { signal: page.signal });
      lines.forEach(addLine);
    });
  }
}
