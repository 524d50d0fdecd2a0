"""SQL steps: one SELECT over app tables, its result replaces the output table's rows.

SQL steps run in the host (there is no user Python to isolate), but the query
is checked first: a single SELECT that reads only the app's tables, never the
``stepwell`` bookkeeping schema, files or system functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from stepwell.runtimes.sqlcheck import restrict_select, template_tables, unwritten_tables
from stepwell.store.base import ID_COLUMN


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
    if staged.store.table_info(output, count_rows=False) is not None:
        staged.truncate(output)
    # Rows get a patterns_id (larger than any earlier run's), so a stream over the
    # output reads each new result once; a result that selects an input's
    # patterns_id keeps those ids instead.
    id_column = None if ID_COLUMN in result.column_names else ID_COLUMN
    return staged.write(output, result, mode="append", id_column=id_column)
