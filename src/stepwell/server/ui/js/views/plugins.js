// #/plugins: installed eKuiper plugins, and rules with their status, metrics
// and Start / Stop / Delete buttons (rules refreshed every 2 s).

import { api, seg } from "../api.js";
import { dataTable, fill, fmtTime, h, section, statusBadge } from "../dom.js";

const list = (names) => (names && names.length ? names.join(", ") : "");

function pluginsTable(plugins) {
  return dataTable([
    ["Plugin", (p) => p.name],
    ["Version", (p) => p.version],
    ["Language", (p) => p.language],
    ["Sources", (p) => list(p.sources)],
    ["Sinks", (p) => list(p.sinks)],
    ["Functions", (p) => list(p.functions)],
    ["Installed", (p) => fmtTime(p.installed_at)],
    ["Warnings", (p) => list(p.warnings)],
  ], plugins, { empty: "No plugins installed (stepwell plugin install APP PATH).",
    attrs: { class: "data plugins" } });
}

/** A rule's metrics from GET /api/rules/{id}/status, as short text. */
function metrics(status) {
  if (!status) return "";
  const parts = [];
  const add = (label, value) => {
    if (value !== null && value !== undefined) parts.push(`${label} ${value}`);
  };
  add("in", status.records_in);
  add("out", status.records_out);
  add("errors", status.errors);
  add("batches", status.batches);
  if (status.latency_ms_avg !== null && status.latency_ms_avg !== undefined) {
    parts.push(`latency avg ${status.latency_ms_avg.toFixed(1)} ms`);
  }
  return parts.join(" · ");
}

export async function pluginsView(page) {
  const plugins = h("div");
  const rules = h("div");
  page.root.append(h("h1", {}, "Plugins and rules"), section("Plugins", plugins), section("Rules", rules));

  const change = (id, verb) => page.guard(async () => {
    if (verb === "delete") {
      if (!confirm(`Delete rule ${id}?`)) return;
      await api(`/api/rules/${seg(id)}`, { method: "DELETE" });
    } else {
      await api(`/api/rules/${seg(id)}/${verb}`, { method: "POST" });
    }
    await loadRules();
  });

  const loadRules = async () => {
    const answer = await api("/api/rules", { signal: page.signal });
    const statuses = new Map(await Promise.all(answer.rules.map(async (rule) =>
      [rule.id, await api(`/api/rules/${seg(rule.id)}/status`, { signal: page.signal })])));
    fill(rules, dataTable([
      ["Rule", (r) => r.id],
      ["Status", (r) => statusBadge(r.status)],
      ["SQL", (r) => h("code", {}, r.sql)],
      ["Metrics", (r) => metrics(statuses.get(r.id))],
      ["Last error", (r) => {
        const error = statuses.get(r.id)?.last_error;
        return error ? h("span", { class: "error-text" }, error) : "";
      }],
      ["", (r) => [
        h("button", { type: "button", class: "start", disabled: r.status === "running",
          onclick: () => change(r.id, "start") }, "Start"), " ",
        h("button", { type: "button", class: "stop", disabled: r.status !== "running",
          onclick: () => change(r.id, "stop") }, "Stop"), " ",
        h("button", { type: "button", class: "danger", onclick: () => change(r.id, "delete") }, "Delete"),
      ]],
    ], answer.rules, { empty: "No rules (stepwell rule create APP FILE.json).",
      attrs: { class: "data rules" }, rowAttrs: (r) => ({ "data-rule": r.id }) }));
  };

  const answer = await api("/api/plugins", { signal: page.signal });
  fill(plugins, pluginsTable(answer.plugins));
  await page.every(2000, loadRules);
}
