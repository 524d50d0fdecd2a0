// #/actions: each action with a form (params as JSON) that runs it and shows
// the JSON result, or its error.

import { api, seg } from "../api.js";
import { dataTable, fill, h, jsonBlock, runLink, statusBadge } from "../dom.js";

/** The params typed into the form, or an Error saying what is wrong with them. */
function parseParams(text) {
  let params;
  try {
    params = JSON.parse(text.trim() || "{}");
  } catch (error) {
    throw Object.assign(new Error(`params are not valid JSON: ${error.message}`), { code: "invalid_params" });
  }
  if (params === null || typeof params !== "object" || Array.isArray(params)) {
    throw Object.assign(new Error("params must be a JSON object, e.g. {\"user_id\": 1}"),
      { code: "invalid_params" });
  }
  return params;
}

function result(answer) {
  return [
    h("p", { class: "result-head" }, statusBadge(answer.status), " run ", runLink(answer.run_id),
      ` in ${Math.round(answer.duration_ms)} ms`),
    answer.error !== null && answer.error !== undefined
      ? [h("h4", {}, "Error"), jsonBlock(answer.error, { class: "json result-error" })]
      : null,
    h("h4", {}, "Result"), jsonBlock(answer.data, { class: "json result-data" }),
    h("details", {}, h("summary", {}, "Steps"), dataTable([
      ["Step", (s) => s.name],
      ["Kind", (s) => s.kind],
      ["Took", (s) => `${Math.round(s.duration_ms)} ms`],
      ["Error", (s) => (s.error === null ? "" : JSON.stringify(s.error))],
    ], answer.steps)),
  ];
}

function actionCard(page, action) {
  const params = h("textarea", { name: "params", rows: 4, spellcheck: "false", "aria-label": "params (JSON)" },
    "{}");
  const output = h("div", { class: "result" });
  const button = h("button", { type: "submit" }, "Run");
  const form = h("form", { class: "action-form" },
    h("label", {}, "Params (JSON object)", params), h("p", {}, button));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    page.guard(async () => {
      fill(output);
      const body = parseParams(params.value);
      button.disabled = true;
      try {
        const answer = await api(`/api/actions/${seg(action.name)}/run`, {
          method: "POST", body, headers: { "X-Stepwell-Trigger": "ui" } });
        fill(output, result(answer));
      } finally {
        button.disabled = false;
      }
    });
  });
  return h("section", { class: "card action", "data-action": action.name },
    h("h2", {}, action.name),
    action.description ? h("p", {}, action.description) : null,
    h("p", { class: "hint" }, action.params.length
      ? `Params with defaults: ${action.params.join(", ")}.` : "No params with defaults.",
    " Steps: ", action.steps.map((s) => `${s.name} (${s.kind})`).join(" → ")),
    form, output);
}

export async function actionsView(page) {
  const { actions } = await api("/api/actions", { signal: page.signal });
  page.root.append(h("h1", {}, "Actions"));
  if (!actions.length) page.root.append(h("p", { class: "empty" }, "This app declares no actions."));
  for (const action of actions) page.root.append(actionCard(page, action));
}
