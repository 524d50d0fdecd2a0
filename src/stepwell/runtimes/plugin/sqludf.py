"""Plugin functions inside ``sql:`` steps.

A SQL step normally runs in the store. When its (already checked) query calls
a function served by an installed plugin, it runs instead in a private
in-memory DuckDB: the tables it reads are loaded from the store's committed
data, every plugin call site becomes a UDF backed by the plugin's process pool
(:mod:`stepwell.runtimes.plugin.functions`), and the result goes back to the
runner as Arrow, to be staged like any SQL step output. This works the same
on DuckDB and PostgreSQL stores (PostgreSQL SQL is translated by sqlglot).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from stepwell.runtimes.plugin.channels import DeadlinePassed

__all__ = ["query_with_plugin_functions"]

def query_with_plugin_functions(
    sql: str, app_root: Path, store: Any, dialect: str, deadline: float | None = None
) -> pa.Table | None:
    """Run ``sql`` with plugin UDFs, or return None when it calls no plugin function.
    By ``deadline`` (``time.monotonic()``) the query is interrupted, and raises
    :class:`~stepwell.runtimes.plugin.channels.DeadlinePassed`."""
    from stepwell.runtimes.plugin.install import list_plugins

    symbols = {fn for plugin in list_plugins(app_root) for fn in plugin.functions}
    if not symbols or not any(symbol in sql.lower() for symbol in symbols):
        return None
    import duckdb
    import sqlglot
    from sqlglot import exp

    from stepwell.runtimes.plugin.functions import UdfSite, context_json, register_udfs
    from stepwell.runtimes.plugin.manager import shared_manager
    from stepwell.runtimes.sqlcheck import sqlglot_dialect, tables_of
    from stepwell.streams.parser import _func_name, rewrite_plugin_calls
    from stepwell.streams.rules import rows_to_arrow

    read = sqlglot_dialect(dialect)
    tree = sqlglot.parse_one(sql, read=read)
    if not any(_func_name(n) in symbols for n in tree.find_all(exp.Func)):
        return None
    manager = shared_manager(app_root)
    sites = rewrite_plugin_calls(
        tree, "", lambda name: name in symbols,
        lambda name: manager.function_pool(name).is_aggregate(),
    )
    for site in sites:
        problem = manager.function_pool(site.symbol).validate(site.arg_nodes)
        if problem is not None:
            raise ValueError(f"function {site.symbol}(): {problem}")
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        for name in sorted(tables_of(tree)):
            batches = list(store.scan(name))
            data = pa.Table.from_batches(batches) if batches else _empty(store, name)
            con.register(name, data)
        register_udfs(
            con,
            [UdfSite(s.udf_name, s.symbol, s.arity, s.aggregate, context_json("sql", "step", s.func_id))
             for s in sites],
            {s.symbol: manager.function_pool(s.symbol) for s in sites},
            deadline=deadline,
        )
        timer = None
        if deadline is not None:
            # a function call ends by the deadline itself (its error names it); the
            # interrupt, a moment later, ends whatever else the query is doing
            timer = threading.Timer(max(0.0, deadline - time.monotonic()) + 0.5, con.interrupt)
            timer.daemon = True
            timer.start()
        try:
            relation = con.sql(tree.sql(dialect="duckdb"))
            names = relation.columns
            fetched = relation.fetchall()
        except Exception as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlinePassed(f"the query was still running: {exc}") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
        rows = [dict(zip(names, row, strict=True)) for row in fetched]
        if not rows:
            return pa.table({name: pa.array([], pa.string()) for name in names})
        return rows_to_arrow(rows)
    finally:
        con.close()


def _empty(store: Any, name: str) -> pa.Table:
    from stepwell.store import schema as sch

    info = store.table_info(name, count_rows=False)
    if info is None:
        raise ValueError(f"table {name!r} does not exist")
    return pa.table({c.name: pa.array([], sch.arrow_field(c.name, c.type).type) for c in info.columns})
