// The app graph as an SVG picture: a layered left-to-right layout of steps,
// tables and webhooks (GET /api/graph), edges as curves with arrowheads.

import { cls, svg } from "./dom.js";

const NODE_H = 42;
const GAP_X = 64;
const GAP_Y = 20;
const MARGIN = 16;
const CHAR_W = 7.4; // average width of a label character, px
const MIN_W = 96;
const MAX_CHARS = 32; // longer names are cut (the full name is in the tooltip)

/** Each node's layer: the longest path to it from a node with no inputs (cycles cut). */
function layers(nodes) {
  const layer = new Map();
  const visiting = new Set();
  const depth = (node) => {
    if (layer.has(node.id)) return layer.get(node.id);
    if (visiting.has(node.id)) return -1; // an edge that closes a cycle is ignored
    visiting.add(node.id);
    let d = 0;
    for (const pred of node.preds) d = Math.max(d, depth(pred) + 1);
    visiting.delete(node.id);
    layer.set(node.id, d);
    return d;
  };
  for (const node of nodes.values()) depth(node);
  return layer;
}

const label = (name) => (name.length > MAX_CHARS ? `${name.slice(0, MAX_CHARS - 1)}…` : name);

/**
 * Positions of nodes ({x, y, w} per node id) and the picture's size. Within a
 * layer, nodes are ordered by the mean position of their inputs, which keeps
 * most edges from crossing.
 */
export function layout(graph) {
  const nodes = new Map(graph.nodes.map((n) => [n.id, { ...n, preds: [], succs: [] }]));
  for (const edge of graph.edges) {
    const source = nodes.get(edge.source);
    const target = nodes.get(edge.target);
    if (source && target && source !== target) {
      source.succs.push(target);
      target.preds.push(source);
    }
  }
  const layerOf = layers(nodes);
  const byLayer = [];
  for (const node of nodes.values()) {
    const index = layerOf.get(node.id);
    (byLayer[index] ||= []).push(node);
  }
  const columns = byLayer.filter(Boolean);
  const rank = new Map();
  columns.forEach((column, index) => {
    const order = (node) => {
      const placed = node.preds.filter((p) => rank.has(p.id));
      return placed.length ? placed.reduce((sum, p) => sum + rank.get(p.id), 0) / placed.length : Infinity;
    };
    column.sort((a, b) => order(a) - order(b) || a.kind.localeCompare(b.kind) || a.name.localeCompare(b.name));
    column.forEach((node, row) => rank.set(node.id, row));
    columns[index] = column;
  });

  const positions = new Map();
  const tallest = Math.max(0, ...columns.map((c) => c.length));
  const height = tallest * (NODE_H + GAP_Y) - GAP_Y + 2 * MARGIN;
  let x = MARGIN;
  for (const column of columns) {
    const widths = column.map((n) => Math.max(MIN_W, label(n.name).length * CHAR_W + 28));
    const width = Math.max(...widths);
    const top = (height - (column.length * (NODE_H + GAP_Y) - GAP_Y)) / 2;
    column.forEach((node, row) => {
      positions.set(node.id, { x, y: top + row * (NODE_H + GAP_Y), w: width });
    });
    x += width + GAP_X;
  }
  return { positions, width: Math.max(x - GAP_X + MARGIN, 2 * MARGIN), height: Math.max(height, 2 * MARGIN) };
}

function edgePath(from, to) {
  const x1 = from.x + from.w;
  const y1 = from.y + NODE_H / 2;
  const x2 = to.x;
  const y2 = to.y + NODE_H / 2;
  const bend = Math.max(30, Math.abs(x2 - x1) / 2);
  return `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2 - 4} ${y2}`;
}

/** The hash address a node opens (steps and tables), or null. */
function target(node) {
  if (node.kind === "step") return `#/steps/${encodeURIComponent(node.name)}`;
  if (node.kind === "table") return `#/tables/${encodeURIComponent(node.name)}`;
  return null;
}

/**
 * The SVG picture. `kinds` maps a step name to its kind (node, sql, ...),
 * shown under the name. Returns the <svg>; its step nodes are
 * `g.node.node-step[data-name]`, so callers can colour them by status.
 */
export function drawGraph(graph, kinds = new Map()) {
  const { positions, width, height } = layout(graph);
  const picture = svg("svg", {
    class: "graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "The app graph: steps, tables and webhooks",
  });
  picture.append(svg("defs", {}, svg("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 7, markerHeight: 7,
    orient: "auto-start-reverse",
  }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }))));

  for (const edge of graph.edges) {
    const from = positions.get(edge.source);
    const to = positions.get(edge.target);
    if (!from || !to) continue;
    picture.append(svg("path", {
      class: "edge", d: edgePath(from, to), "marker-end": "url(#arrow)",
      "data-source": edge.source, "data-target": edge.target,
    }));
  }

  for (const node of graph.nodes) {
    const at = positions.get(node.id);
    const href = target(node);
    const sub = node.kind === "step" ? (kinds.get(node.name) || "step") : node.kind;
    const group = svg("g", {
      class: `node ${cls("node-", node.kind)}`, "data-id": node.id, "data-name": node.name,
      transform: `translate(${at.x} ${at.y})`,
      tabindex: href ? 0 : null, role: href ? "link" : null,
    },
    svg("title", {}, `${node.kind} ${node.name}`),
    svg("rect", { width: at.w, height: NODE_H, rx: node.kind === "table" ? NODE_H / 2 : 6 }),
    svg("text", { class: "name", x: at.w / 2, y: 18, "text-anchor": "middle" }, label(node.name)),
    svg("text", { class: "kind", x: at.w / 2, y: 33, "text-anchor": "middle" }, sub));
    if (href) {
      group.addEventListener("click", () => { location.hash = href; });
      group.addEventListener("keydown", (event) => {
        if (event.key === "Enter") location.hash = href;
      });
    }
    picture.append(group);
  }
  return picture;
}
