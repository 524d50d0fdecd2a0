"""SQL steps: one SELECT over app tables, its result replaces the output table's rows.

SQL steps run in the host (there is no user Python to isolate), but the query
is checked first: a single SELECT that reads only the app's tables, never the
``stepwell`` bookkeeping schema, files or system functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from stepwell.runtimes.sqlcheck import restrict_select, template_tables, unwritten_tables
from stepwell.store.base import ID_COLUMN, ColumnInfo
from stepwell.store.schema import NULL, base_type, logical_type, widen


def run_sql_step(step, app_root: Path, staged, dialect: str, tables: Iterable[str],
                 deadline: float | None = None) -> int:  # fmt: skip
    """Run the step's query and stage its result as the new content of its output.
    Returns the number of rows written (the caller commits). A query calling plugin
    functions ends by ``deadline`` (``time.monotonic()``) or raises ``DeadlinePassed``."""
    path = app_root / step.file
    sql = path.read_text()
    allowed = {name: name for name in tables}
    allowed.update({name: name for name in template_tables(sql)})
    allowed.update(dict(step.inputs or {}))
    checked = restrict_select(sql, allowed, dialect, where=str(step.file))
    from stepwell.runtimes.plugin.sqludf import query_with_plugin_functions

    try:
        result = query_with_plugin_functions(checked, app_root, staged.store, dialect, deadline)
        if result is None:
            result = staged.query(checked)
    except Exception:
        # as read_sql does: a table nothing wrote yet, not the database's own words
        # ('Catalog Error: ... Did you mean "pg_sequences"?')
        store = staged.store
        missing = unwritten_tables(checked, allowed.values(), dialect,
                                   lambda t: store.table_info(t, count_rows=False) is not None)
        if missing:
            raise ValueError(
                f"{step.file}: table {missing[0]!r} does not exist yet (nothing has written "
                "it): run the step that writes it first, or load rows into it with "
                "`stepwell load`"
            ) from None
        raise
    output = step.sql_output()
    # Rows get a patterns_id (larger than any earlier run's), so a stream over the
    # output reads each new result once; a result that selects an input's
    # patterns_id keeps those ids instead.
    id_column = None if ID_COLUMN in result.column_names else ID_COLUMN
    info = staged.store.table_info(output, count_rows=False)
    if info is not None:
        if _same_shape(info.columns, result.schema, id_column):
            staged.truncate(output)
        else:
            # The result replaces the rows, so it sets the columns too (as Table.replace
            # does): a new version, whose first rows give its shape. A stream over the
            # output reads the new version from its start, so still each result once,
            # and its position in the old version, whose values may be of the old
            # column types, is not compared with the new ones.
            staged.reset(output)
    return staged.write(output, result, mode="append", id_column=id_column)


def _same_shape(columns: Iterable[ColumnInfo], result: pa.Schema, id_column: str | None) -> bool:
    """Whether the output's ``columns`` are the result's (plus the id column the
    write adds), each of the same kind: an all-null result column fits any type,
    and a decimal column takes a result's other precision or scale by widening
    (PostgreSQL types an unconstrained ``numeric`` by its values, so a sum's
    precision grows with it: a new version for that would come with every digit)."""
    incoming = {f.name: logical_type(f) for f in result}
    if id_column:
        incoming[id_column] = "str"
    existing = {c.name: c.type for c in columns}
    return existing.keys() == incoming.keys() and all(
        incoming[name] == NULL
        or (base_type(incoming[name]) == base_type(existing[name])
            and widen(existing[name], incoming[name]) is not None)
        for name in existing
    )  # fmt: skip
