"""The embedded store: one DuckDB file per app.

One ``duckdb.connect(path)`` per store; every transaction, bookkeeping call and
scan gets its own cursor (a DuckDB connection sharing the database), so a long
scan on one thread and a write transaction on another coexist under DuckDB's
snapshot isolation. Arrow data goes in through ``cursor.register`` +
``INSERT … SELECT`` and comes out through streaming record batch readers.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from stepwell.store import schema as sch
from stepwell.store.base import StoreError
from stepwell.store.sql import Dialect, Session, SQLStore, quote

DIALECT = Dialect(
    name="DuckDB",
    type_names={
        "int": "BIGINT",
        "float": "DOUBLE",
        "decimal": "DECIMAL",
        "str": "VARCHAR",
        "bool": "BOOLEAN",
        "date": "DATE",
        "datetime": "TIMESTAMP",
        "datetime_tz": "TIMESTAMPTZ",
        "json": "JSON",
        "binary": "BLOB",
    },
    # (the catalog function under information_schema.columns: the same rows at half
    # the cost, which a run pays several times)
    columns_query=(
        "SELECT column_name, data_type, numeric_precision, numeric_scale FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = current_schema() "
        "AND table_name = ? ORDER BY column_index"
    ),
    case_insensitive=True,
    max_identifier_length=None,
    text_collation="",
    secondary_indexes=False,
    bootstrap_lock=None,
    concurrent_change_error="write-write conflict",
    error_hints=tuple(
        (text, "(the embedded DuckDB store works within a memory budget, "
         "STEPWELL_DUCKDB_MEMORY, default 512MB: raise it for the host process, e.g. "
         "STEPWELL_DUCKDB_MEMORY=4GB, or write the data in smaller parts)")
        for text in ("Out of Memory Error", "failed to pin block", "could not allocate block")
    ),
)


def _arrow_table(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    # DuckDB 2 renamed fetch_arrow_table() to to_arrow_table()
    method = getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table
    return method()


def _arrow_reader(relation: duckdb.DuckDBPyRelation, batch_rows: int) -> pa.RecordBatchReader:
    # DuckDB 2 renamed fetch_record_batch()/fetch_arrow_reader() to to_arrow_reader()
    method = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
    return method(batch_rows)


class DuckDBSession(Session):
    """A transaction on its own cursor."""

    dialect = DIALECT
    errors = (duckdb.Error,)

    def __init__(
        self,
        cursor: duckdb.DuckDBPyConnection,
        *,
        read_only: bool,
        fresh: bool = True,
        release: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
        begin: bool = True,
    ):
        self._cur = cursor
        self._release = release
        self._names = itertools.count(1)
        self._staged: dict[str, str] = {}
        if fresh:  # a reused cursor keeps its settings
            cursor.execute("SET TimeZone = 'UTC'")
        # without ``begin`` each statement commits on its own (one-statement sessions:
        # BEGIN and COMMIT would cost as much as the statement itself)
        if begin:
            cursor.execute("BEGIN TRANSACTION READ ONLY" if read_only else "BEGIN TRANSACTION")
        self._explicit = self._active = begin

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(sql, list(params) if params else None)
        return self._cur.rowcount

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._cur.execute(sql, list(params) if params else None).fetchall()

    def fetch_arrow(self, sql: str) -> pa.Table:
        relation = self._cur.sql(sql)
        if relation is None:
            return pa.table({})
        table = _arrow_table(relation)
        # DuckDB hands JSON out as plain text: mark those columns as JSON
        for i, duck_type in enumerate(relation.types):
            if str(duck_type) == "JSON":
                table = table.set_column(
                    i, sch.arrow_field(table.field(i).name, "json"), table.column(i)
                )
        return table

    def _register(self, data: pa.Table) -> str:
        # not a valid table name, so it never shadows a user table
        name = f"stepwell-arrow-{next(self._names)}"
        self._cur.register(name, data)
        return name

    def insert_arrow(self, target: str, data: pa.Table, *, every_column: bool = False) -> int:
        # A relation, not register(): DuckDB keeps registered objects (and so their
        # Arrow buffers) alive until the transaction ends, which made a long run's
        # host memory grow with every batch it wrote.
        relation = self._cur.from_arrow(data)
        if every_column:  # by position: half the cost of the INSERT ... SELECT below
            relation.insert_into(target)
            return data.num_rows
        columns = ", ".join(quote(c) for c in data.column_names)
        # the alias is not a valid table name, so it never shadows a user table
        relation.query(
            "stepwell-incoming",
            f'INSERT INTO {target} ({columns}) SELECT {columns} FROM "stepwell-incoming"',
        )
        return data.num_rows

    def stage(self, data: pa.Table) -> str:
        name = self._register(data)
        self._staged[quote(name)] = name
        return quote(name)

    def unstage(self, relation: str) -> None:
        name = self._staged.pop(relation, None)
        if name is not None:
            self._cur.unregister(name)

    def stream(
        self, sql: str, params: Sequence[Any], schema: pa.Schema, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        relation = self._cur.sql(sql, params=list(params) if params else None)
        reader = _arrow_reader(relation, batch_rows)
        try:
            for batch in reader:
                yield sch.conform_batch(batch, schema)
        finally:
            reader.close()

    def commit(self) -> None:
        if self._explicit:  # else the statement committed itself
            self._active = False
            self._cur.execute("COMMIT")

    def rollback(self) -> None:
        if self._active:
            self._active = False
            self._cur.execute("ROLLBACK")

    def close(self) -> None:
        reusable = self._release is not None
        try:
            if self._active:
                self._active = False
                self._cur.execute("ROLLBACK")
            for name in self._staged.values():
                self._cur.unregister(name)
            self._staged.clear()
        except duckdb.Error:
            reusable = False
        if reusable:
            self._release(self._cur)
        else:
            self._cur.close()


#: Idle cursors kept for reuse.
_MAX_IDLE_CURSORS = 8

#: Default bound on DuckDB's buffer memory (``STEPWELL_DUCKDB_MEMORY`` overrides).
DEFAULT_MEMORY_LIMIT = "512MB"


class DuckDBStore(SQLStore):
    """Store in a DuckDB database file (``":memory:"`` for a private in-memory one)."""

    dialect = DIALECT

    def __init__(self, path: str | Path, memory_limit: str | None = None):
        self.path = str(path)
        self.url = f"duckdb://{self.path}"
        # DuckDB would take most of the machine's memory for its buffers; a bound
        # makes large transactions spill to disk instead, so the host stays small.
        limit = memory_limit or os.environ.get("STEPWELL_DUCKDB_MEMORY", DEFAULT_MEMORY_LIMIT)
        try:
            self._con = duckdb.connect(self.path, config={"memory_limit": limit})
        except duckdb.Error as exc:
            text = str(exc).lower()
            if "lock" in text:
                advice = (
                    "A DuckDB file is open in one process at a time, and another one has it "
                    "(a `stepwell run` still running, say): wait for it to end. Commands reach "
                    "a running `stepwell serve` through its API by themselves; for several "
                    "processes at once, use a PostgreSQL store (--store postgresql://...)"
                )
            elif "not a valid" in text or "corrupt" in text:
                advice = (
                    "If the file is damaged, move it away to start a new store (it holds the "
                    "app's tables, runs and state)"
                )
            else:
                advice = ""
            raise StoreError(f"cannot open the DuckDB store {self.path}: {exc}. {advice}".rstrip()) from exc
        self._cursor_lock = threading.Lock()
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._closing = False
        super().__init__()

    def _new_session(
        self, *, read_only: bool = False, snapshot: bool = False, single: bool = False
    ) -> Session:
        # Cursors are reused: a new one costs a connection setup per bookkeeping
        # call, which is a noticeable share of a short run.
        with self._cursor_lock:
            cursor = self._idle.pop() if self._idle else None
            fresh = cursor is None
            if fresh:
                cursor = self._con.cursor()
        try:
            return DuckDBSession(
                cursor, read_only=read_only or snapshot, fresh=fresh, release=self._release,
                begin=not single,
            )
        except BaseException:
            cursor.close()
            raise

    def _release(self, cursor: duckdb.DuckDBPyConnection) -> None:
        with self._cursor_lock:
            if len(self._idle) < _MAX_IDLE_CURSORS and not self._closing:
                self._idle.append(cursor)
                return
        cursor.close()

    def _close_backend(self) -> None:
        with self._cursor_lock:
            self._closing = True
            idle, self._idle = self._idle, []
        for cursor in idle:
            cursor.close()
        self._con.close()
