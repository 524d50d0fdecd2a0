// Tables: the list with row counts and schemas, and one table's page:
// columns and types, a page of rows, its versions, and Reset.

import { api, seg, withQuery } from "../api.js";
import { dataTable, facts, fill, fmtTime, h, link, section, valueNode } from "../dom.js";

const PAGE_ROWS = 50;

function schema(columns) {
  return h("span", { class: "schema" }, Object.entries(columns).map(([name, type]) =>
    h("span", { class: "column" }, name, " ", h("span", { class: "type" }, type))));
}

/** #/tables */
export async function tablesView(page) {
  const { tables } = await api("/api/tables", { signal: page.signal });
  page.root.append(h("h1", {}, "Tables"), dataTable([
    ["Table", (t) => link(t.name, "tables", t.name)],
    ["Rows", (t) => t.rows],
    ["Version", (t) => t.version],
    ["Unique on", (t) => (t.unique_on || []).join(", ")],
    ["Columns", (t) => schema(t.columns)],
  ], tables, { empty: "No tables yet: they appear when a step first writes them.",
    attrs: { class: "data tables" }, rowAttrs: (t) => ({ "data-table": t.name }) }));
}

function rowsTable(info, rows) {
  const names = Object.keys(info.columns);
  for (const row of rows) for (const key of Object.keys(row)) if (!names.includes(key)) names.push(key);
  return dataTable(names.map((name) => [name, (row) => valueNode(row[name])]), rows,
    { empty: "The table is empty.", attrs: { class: "data rows", id: "rows" } });
}

/** #/tables/<name> */
export async function tableView(page, name) {
  const path = `/api/tables/${seg(name)}`;
  const about = h("div", { class: "stack" });
  const rows = h("div");
  const versions = h("div");
  const pager = h("p", { class: "pager" });
  const reset = h("button", { type: "button", class: "danger", id: "reset-table" }, "Reset table");
  page.root.append(h("div", { class: "title-row" }, h("h1", {}, name), reset), about,
    section("Rows", pager, rows), section("Versions", versions));

  let offset = 0;
  let info = null;
  const load = async () => {
    let table;
    try {
      table = await api(path, { signal: page.signal });
    } catch (error) {
      if (error.status !== 404) throw error;
      // a table the app declares but nothing has written yet, or no table at all:
      // the answer says which; there is nothing to page through or reset
      reset.hidden = true;
      fill(about, h("p", { class: "empty", id: "no-table" }, error.message));
      fill(pager);
      fill(rows);
      fill(versions);
      return;
    }
    const [chunk, list] = await Promise.all([
      api(withQuery(`${path}/rows`, { limit: PAGE_ROWS, offset }), { signal: page.signal }),
      api(`${path}/versions`, { signal: page.signal }),
    ]);
    info = table;
    fill(about, facts([
      ["Rows", String(table.rows)],
      ["Version", String(table.version)],
      ["Unique on", (table.unique_on || []).join(", ")],
    ]), section("Columns", dataTable([
      ["Column", ([column]) => h("code", {}, column)],
      ["Type", ([, type]) => type],
    ], Object.entries(table.columns), { empty: "No columns.", attrs: { class: "data columns" } })));
    fill(rows, rowsTable(info, chunk.rows));
    const last = Math.min(chunk.total, offset + chunk.rows.length);
    const go = (to) => () => { offset = to; page.guard(load); };
    const lastPage = Math.max(0, Math.floor((chunk.total - 1) / PAGE_ROWS) * PAGE_ROWS);
    fill(pager,
      h("button", { type: "button", disabled: offset === 0, onclick: go(0) }, "« First"),
      h("button", { type: "button", disabled: offset === 0,
        onclick: go(Math.max(0, offset - PAGE_ROWS)) }, "‹ Previous"),
      ` rows ${chunk.total ? offset + 1 : 0}–${last} of ${chunk.total} `,
      h("button", { type: "button", disabled: last >= chunk.total,
        onclick: go(offset + PAGE_ROWS) }, "Next ›"),
      h("button", { type: "button", disabled: last >= chunk.total, onclick: go(lastPage) },
        "Last »"));
    fill(versions, dataTable([
      ["Version", (v) => v.version],
      ["Rows", (v) => v.row_count],
      ["Created", (v) => fmtTime(v.created_at)],
      ["Active", (v) => (v.active ? "yes" : "")],
      ["Stored as", (v) => h("code", {}, v.physical_name)],
    ], list.versions, { empty: "No versions.", attrs: { class: "data versions" } }));
  };

  reset.addEventListener("click", () => page.guard(async () => {
    if (!confirm(`Reset table ${name}? It starts a new, empty version; the old rows are kept `
      + "as an older version.")) return;
    await api(`${path}/reset`, { method: "POST" });
    offset = 0;
    await load();
  }));
  await load();
}
