// Steps: the list (with a Run button each) and one step's page: what it is,
// its runs, its state, stream positions and checkpoint (with Reset), and a
// connector's partitions.

import { api, seg, withQuery } from "../api.js";
import {
  dataTable, facts, fill, fmtSeconds, fmtTime, h, jsonBlock, link, runLink, section,
  statusBadge, valueNode,
} from "../dom.js";
import { runsTable } from "./runs.js";

/** The newest run of each step (`last_run` of GET /api/steps): Map(step name -> run). */
export function latestRuns(steps) {
  return new Map(steps.filter((s) => s.last_run).map((s) => [s.name, s.last_run]));
}

/** Trigger a run of `step` (POST /api/runs) and open the run's page. */
export async function runStep(page, step) {
  await page.guard(async () => {
    const ticket = await api("/api/runs", { method: "POST", body: { step } });
    location.hash = `#/runs/${seg(ticket.run_id)}`;
  });
}

function runButton(page, step) {
  return h("button", { type: "button", class: "run", "data-step": step,
    onclick: () => runStep(page, step) }, "Run");
}

/** What a step is doing: running / queued (links to those runs), else its last status. */
function activity(step, latest) {
  if (step.running_run) return [statusBadge("running"), " ", runLink(step.running_run)];
  if (step.queued_run) return [statusBadge("queued"), " ", runLink(step.queued_run)];
  const last = latest.get(step.name);
  return last ? [statusBadge(last.status), " ", runLink(last.id)] : statusBadge(null);
}

/** The steps as a table with a Run button each. */
export function stepsTable(page, steps, latest) {
  return dataTable([
    ["Step", (s) => link(s.name, "steps", s.name)],
    ["Kind", (s) => s.kind],
    ["Trigger", (s) => s.trigger],
    ["Next tick", (s) => fmtTime(s.next_tick)],
    ["Status", (s) => activity(s, latest)],
    ["", (s) => runButton(page, s.name)],
  ], steps, { empty: "This app has no steps.", rowAttrs: (s) => ({ "data-step": s.name }),
    attrs: { class: "data steps" } });
}

/** #/steps */
export async function stepsView(page) {
  page.root.append(h("h1", {}, "Steps"));
  const holder = h("div");
  page.root.append(holder);
  await page.every(2000, async () => {
    const { steps } = await api("/api/steps", { signal: page.signal });
    fill(holder, stepsTable(page, steps, latestRuns(steps)));
  });
}

// -- one step ------------------------------------------------------------------

const tableLinks = (names) => (names.length
  ? names.flatMap((name, i) => [i ? ", " : "", link(name, "tables", name)]) : "none");

function describe(step) {
  return facts([
    ["Kind", step.kind],
    ["File", h("code", {}, step.file)],
    ["Description", step.description],
    ["Trigger", step.trigger],
    ["Next tick", fmtTime(step.next_tick)],
    ["After", step.after ? link(step.after, "steps", step.after) : null],
    ["Reads", tableLinks(step.inputs)],
    ["Writes", tableLinks(step.outputs)],
    ["Parameters", Object.keys(step.parameters).length ? jsonBlock(step.parameters) : null],
    ["Secrets", step.secrets.length ? step.secrets.join(", ") : null],
    ["Running", step.running_run ? runLink(step.running_run) : null],
    ["Queued", step.queued_run ? runLink(step.queued_run) : null],
  ]);
}

/** State values, the checkpoint and stream positions of GET /api/steps/{name}/state. */
function stateParts(state) {
  const entries = Object.entries(state.state).map(([key, value]) => ({ key, value }));
  const checkpoint = state.state.DATA_CHECKPOINT;
  return [
    checkpoint !== undefined ? facts([["Checkpoint", valueNode(checkpoint)]]) : null,
    h("h3", {}, "Values"),
    dataTable([
      ["Key", (e) => h("code", {}, e.key)],
      ["Value", (e) => valueNode(e.value)],
    ], entries, { empty: "No state.", attrs: { class: "data state" },
      rowAttrs: (e) => ({ "data-key": e.key }) }),
    h("h3", {}, "Stream positions"),
    dataTable([
      ["Table", (p) => link(p.table, "tables", p.table)],
      ["Order by", (p) => p.order_by.join(", ")],
      ["Table version", (p) => p.table_version],
      ["Position", (p) => valueNode(p.value)],
      ["Last id", (p) => valueNode(p.last_id)],
    ], state.stream_positions, { empty: "No stream positions.", attrs: { class: "data positions" } }),
  ];
}

function partitionsTable(partitions) {
  return dataTable([
    ["Partition", (p) => p.name],
    ["Status", (p) => statusBadge(p.status)],
    ["Rows", (p) => p.rows],
    ["Fingerprint", (p) => valueNode(p.fingerprint)],
    ["Read in", (p) => fmtSeconds(p.duration_seconds)],
    ["Updated", (p) => fmtTime(p.updated_at)],
    ["Run", (p) => runLink(p.run_id)],
    ["Error", (p) => (p.error ? h("span", { class: "error-text" }, p.error) : "")],
  ], partitions, { empty: "No partitions read yet.", attrs: { class: "data partitions" } });
}

/** #/steps/<name> */
export async function stepView(page, name) {
  const path = `/api/steps/${seg(name)}`;
  const about = h("div");
  const runs = h("div");
  const state = h("div", { id: "step-state" });
  const partitions = h("div");
  const resetButton = h("button", { type: "button", class: "danger", id: "reset-state" }, "Reset state");
  page.root.append(
    h("div", { class: "title-row" }, h("h1", {}, name), runButton(page, name)),
    about,
    section("Recent runs", runs),
    section("State, checkpoint and stream positions", h("p", { class: "actions" }, resetButton), state),
  );

  const showState = (value) => fill(state, stateParts(value));
  const loadState = async () => showState(await api(`${path}/state`, { signal: page.signal }));
  const step = await api(path, { signal: page.signal });
  if (step.kind === "connector") page.root.append(section("Partitions", partitions));
  const loadPartitions = async () => {
    if (step.kind !== "connector") return;
    const { partitions: list } = await api(`${path}/partitions`, { signal: page.signal });
    fill(partitions, partitionsTable(list));
  };

  resetButton.addEventListener("click", () => page.guard(async () => {
    if (!confirm(`Reset step ${name}? Its state and stream positions are cleared; `
      + "its next run starts from the beginning.")) return;
    showState(await api(`${path}/state`, { method: "DELETE" }));
  }));

  await Promise.all([loadState(), loadPartitions()]);
  // Poll the step and its runs; reload state and partitions when a run ends.
  let lastEnded = null;
  await page.every(2000, async () => {
    const [current, list] = await Promise.all([
      api(path, { signal: page.signal }),
      api(withQuery("/api/runs", { step: name, limit: 10 }), { signal: page.signal }),
    ]);
    fill(about, describe(current));
    fill(runs, runsTable(list.runs, { withStep: false }));
    const ended = list.runs.find((r) => r.ended_at);
    const key = ended ? `${ended.id}:${ended.status}` : null;
    if (lastEnded !== null && key !== lastEnded) await Promise.all([loadState(), loadPartitions()]);
    lastEnded = key ?? "";
  });
}
