// #/graph: the app graph as a picture, and its steps with a Run button each.
// Step nodes are coloured by what the step is doing (polled every 2 s).

import { api } from "../api.js";
import { cls, fill, h } from "../dom.js";
import { drawGraph } from "../graph.js";
import { latestRuns, stepsTable } from "./steps.js";

function colour(picture, steps, latest) {
  for (const step of steps) {
    const node = [...picture.querySelectorAll("g.node-step")].find((g) => g.dataset.name === step.name);
    if (!node) continue;
    const status = step.running_run ? "running" : step.queued_run ? "queued"
      : latest.get(step.name)?.status;
    for (const name of [...node.classList]) if (name.startsWith("st-")) node.classList.remove(name);
    node.classList.add(cls("st-", status));
  }
}

export async function graphView(page) {
  const [graph, { steps }] = await Promise.all([
    api("/api/graph", { signal: page.signal }), api("/api/steps", { signal: page.signal })]);
  const picture = drawGraph(graph, new Map(steps.map((s) => [s.name, s.kind])));
  const list = h("div");
  page.root.append(
    h("h1", {}, "Graph"),
    graph.nodes.length
      ? h("div", { class: "graph-frame" }, picture)
      : h("p", { class: "empty" }, "This app has no steps or tables yet."),
    h("p", { class: "hint" }, "Click a step or a table to open it."),
    h("h2", {}, "Steps"),
    list,
  );
  await page.every(2000, async () => {
    const current = await api("/api/steps", { signal: page.signal });
    const latest = latestRuns(current.steps);
    colour(picture, current.steps, latest);
    fill(list, stepsTable(page, current.steps, latest));
  });
}
