"""The store boundary.

The host process is the only owner of the store: user code never holds a
connection. Everything above this module (runner, CLI, server) talks to a
``Store`` in plain types: Arrow tables/batches for data, dataclasses for
bookkeeping records. Two implementations pass one conformance suite:
``DuckDBStore`` (embedded, default) and ``PostgresStore`` (psycopg 3).

Reads through ``Store`` see committed data only. Every change a run makes goes
through one ``Transaction`` that the runner commits at a commit point, so data,
stream positions, state and the run record become visible together or not at
all::

    with store.transaction() as tx:
        tx.append("orders", arrow_table)
        tx.set_position(StreamPosition("enrich", "orders", ("patterns_id",), 1, None, "01h..."))
        tx.set_state("enrich", {"count": 3})
        tx.commit()

User tables live in the default schema under their own names (so SQL steps can
name them directly); bookkeeping lives in the ``stepwell`` schema.
"""

from __future__ import annotations

import abc
import contextlib
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

#: Column holding the monotonic ULID every node/webhook/connector row gets.
ID_COLUMN = "patterns_id"


class StoreError(Exception):
    """A store operation failed; the message says what and what to do."""


#: How a run that found its step's run lock taken by another process begins its
#: error (the run did nothing; see ``Store.run_lock``).
RUN_LOCK_BUSY = "it is already running in another process on this store"


class InvalidName(StoreError):
    """A table or column name the store cannot take (the message says why)."""


class ConcurrentChange(StoreError):
    """Another transaction changed the same table at the same moment and committed
    first; nothing of this one was written, and the same work may simply run again."""


class SchemaConflict(StoreError):
    """Incoming data cannot be stored in a table's existing column without loss."""

    def __init__(self, table: str, column: str, existing: str, incoming: str):
        self.table, self.column, self.existing, self.incoming = table, column, existing, incoming
        super().__init__(
            f"table {table!r}, column {column!r}: existing type {existing} cannot hold "
            f"incoming {incoming} values; write {existing} values, rename the field, "
            f"or reset the table"
        )


@dataclass
class ColumnInfo:
    name: str
    #: logical type: int, float, decimal(p,s), str, bool, date, datetime,
    #: datetime_tz, json, binary
    type: str


@dataclass
class TableInfo:
    name: str
    columns: list[ColumnInfo]
    #: None when not asked for (``table_info(..., count_rows=False)``)
    row_count: int | None
    version: int
    unique_on: list[str] | None = None


def missing_table_message(name: str, known: Sequence[str], listed: int = 20) -> str:
    """``table 'name' does not exist`` with the closest names and (some of) the rest."""
    if not known:
        return f"table {name!r} does not exist (there are no tables yet)"
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    more = f", ... ({len(names)} in all)" if len(names) > listed else ""
    return f"table {name!r} does not exist ({hint}tables: {', '.join(names[:listed])}{more})"


@dataclass
class TableVersion:
    table: str
    version: int
    physical_name: str
    created_at: datetime
    active: bool
    row_count: int


@dataclass
class RunRecord:
    id: str
    step: str
    status: str
    trigger: str = "manual"
    started_at: datetime | None = None
    ended_at: datetime | None = None
    rows_in: int = 0
    rows_out: int = 0
    error: str | None = None
    traceback: str | None = None
    host_pid: int | None = None
    #: free-form JSON details (request_new_run, environment, partitions, ...)
    info: dict[str, Any] = field(default_factory=dict)


#: Every status a run record can have (DESIGN.md, section 1).
RUN_STATUSES = ("queued", "running", "succeeded", "succeeded_no_data", "succeeded_with_errors",
                "failed", "timed_out", "cancelled", "killed")  # fmt: skip


@dataclass
class LogLine:
    run_id: str
    seq: int
    ts: datetime
    level: str
    message: str


@dataclass
class StreamPosition:
    """How far ``step`` has consumed ``table`` in ``order_by`` order.

    ``value`` is the last consumed row's first order_by value (JSON-able or a
    datetime/date) and ``last_id`` its ``patterns_id`` (tie breaker), or None
    when the table has no ``patterns_id``. A position recorded for another
    ``table_version`` than the active one is ignored (the table was reset).
    """

    step: str
    table: str
    order_by: tuple[str, ...]
    table_version: int
    value: Any
    last_id: str | None


#: ``PartitionRecord.status`` of a prefix's record.
PREFIX_STATUS = "prefix"


@dataclass
class PartitionRecord:
    """Bookkeeping of one connector partition (a leaf yielded by ``list_objects``),
    or of a prefix (``status`` ``prefix``).

    ``fingerprint`` and ``code_hash`` are those of the rows currently stored for
    the partition (None when it never committed any); ``status`` is how its
    last read ended (``succeeded`` or ``failed``, with ``error``). ``parent`` is
    the prefix it was listed under (None: the root). A prefix record holds the
    fingerprint its whole subtree was last read at, so an unchanged prefix need
    not be listed again.
    """

    step: str
    name: str
    fingerprint: str | None
    code_hash: str | None
    rows: int = 0
    duration_seconds: float | None = None
    status: str = "succeeded"
    error: str | None = None
    run_id: str | None = None
    updated_at: datetime | None = None
    parent: str | None = None


class Transaction(abc.ABC):
    """One atomic unit of change. Nothing is visible to others before ``commit``."""

    @abc.abstractmethod
    def append(self, table: str, data: pa.Table, unique_on: Sequence[str] | None = None) -> int:
        """Append rows, creating the table (schema from ``data``) or widening it.

        Returns the number of rows written. Raises ``SchemaConflict`` when a
        column cannot be widened safely.
        """

    @abc.abstractmethod
    def upsert(self, table: str, data: pa.Table, unique_on: Sequence[str]) -> int:
        """Insert rows, replacing existing rows with equal ``unique_on`` values
        (last row wins within ``data``)."""

    @abc.abstractmethod
    def truncate(self, table: str) -> None:
        """Delete all rows, keep the table, its schema and version."""

    @abc.abstractmethod
    def reset(self, table: str) -> int:
        """Point ``table`` at a new empty version; the old version's rows are kept
        under a versioned name. Returns the new version number."""

    @abc.abstractmethod
    def activate_version(self, table: str, version: int) -> None:
        """Make an earlier (or later) version of ``table`` the active one again; the
        version that was active is kept under its versioned name."""

    @abc.abstractmethod
    def delete_where(self, table: str, column: str, values: Sequence[Any]) -> int:
        """Delete rows whose ``column`` is one of ``values``; returns rows deleted."""

    @abc.abstractmethod
    def query(self, sql: str) -> pa.Table:
        """Run SQL inside this transaction (sees its own uncommitted writes)."""

    @abc.abstractmethod
    def lock(self, name: str) -> None:
        """Wait for, then hold until this transaction ends, the lock called ``name``
        that every process writing this store shares (nothing to do on a store only
        one process opens: its threads use their own locks)."""

    @abc.abstractmethod
    def get_state(self, step: str) -> dict[str, Any]:
        """``step``'s state as this transaction sees it ({} when it has none)."""

    @abc.abstractmethod
    def set_state(self, step: str, state: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def set_position(self, position: StreamPosition) -> None:
        """Record one stream position, replacing the step's one for that table and order."""

    @abc.abstractmethod
    def set_stream_order(self, table: str, column: str) -> None:
        """Record ``column`` as the default stream order of ``table`` (a table
        written without ``patterns_id``, whose rows got a monotonic id or a
        created-at column under another name instead)."""

    @abc.abstractmethod
    def replace_positions(self, step: str, positions: Sequence[StreamPosition]) -> None:
        """Make ``positions`` the step's only stream positions (none: forget them all)."""

    @abc.abstractmethod
    def change_rows(self, table: str, statement: str) -> int:
        """Run ``statement``, an UPDATE or DELETE of ``table`` already checked to
        change only that table (``sqlcheck.table_statement``); the rows changed."""

    @abc.abstractmethod
    def create_run(self, run: RunRecord) -> None:
        """Insert a run record as part of this transaction."""

    @abc.abstractmethod
    def update_run(self, run_id: str, **fields: Any) -> None:
        """Update fields of a run record as part of this transaction."""

    @abc.abstractmethod
    def set_partition(self, record: PartitionRecord) -> None:
        """Insert or replace the record of partition ``(record.step, record.name)``
        (``updated_at`` None: now)."""

    @abc.abstractmethod
    def delete_partition(self, step: str, name: str) -> None:
        """Forget partition ``name`` of ``step`` (no error when it is unknown)."""

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def rollback(self) -> None: ...

    def lease_ids(self) -> str | None:
        """Called before the transaction hands out ``patterns_id``s. On a store
        several hosts write at once, the first call registers, for every host's
        streams to see until this transaction ends, that ids are in flight here,
        and returns the floor they will lie above (every id ever committed to the
        store is at most that: another host's clock may be ahead of ours); later
        calls return None. None on a store one process owns."""
        return None

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving the block without commit() discards everything.
        self.rollback()


class Store(abc.ABC):
    """Tables plus engine bookkeeping, behind one interface."""

    url: str

    # -- user tables (committed data only) -------------------------------
    @abc.abstractmethod
    def list_tables(self) -> list[TableInfo]: ...

    @abc.abstractmethod
    def table_info(self, name: str, *, count_rows: bool = True) -> TableInfo | None:
        """The table's columns, active version and keys, None if it does not exist.
        ``count_rows=False`` skips counting its rows (a full scan on PostgreSQL) for
        callers that only need its columns or version."""

    @abc.abstractmethod
    def stream_order(self, name: str) -> str | None:
        """The column ``Transaction.set_stream_order`` recorded for ``name``, if any."""

    @abc.abstractmethod
    def scan(
        self,
        table: str,
        *,
        order_by: Sequence[str] | None = None,
        after: tuple[Any, str | None] | None = None,
        columns: Sequence[str] | None = None,
        batch_rows: int = 65536,
        stream: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Stream a consistent snapshot of ``table`` in batches.

        With ``order_by`` (a column name list; the engine passes
        ``[col, "patterns_id"]`` or ``["patterns_id"]``) rows come sorted
        ascending, NULLs first. ``after=(value, last_id)`` keeps only rows
        strictly after that position in that order (``last_id`` None: compare on
        the first column only). ``stream``: a stream's read in ``patterns_id``
        order, which must never pass an id that may still be committed, so only
        rows below every id still in flight (``store.visibility``; on a store
        several hosts write, theirs too). Memory stays bounded by ``batch_rows``.
        """

    @abc.abstractmethod
    def query(self, sql: str) -> pa.Table:
        """Run a read-only SQL query over committed data."""

    @abc.abstractmethod
    def table_versions(self, name: str) -> list[TableVersion]: ...

    @abc.abstractmethod
    def transaction(self) -> Transaction: ...

    # -- bookkeeping (each call commits on its own) -----------------------
    @abc.abstractmethod
    def create_run(self, run: RunRecord) -> None: ...

    def create_runs(self, runs: Sequence[RunRecord]) -> None:
        """Insert several run records (in one transaction where the backend can)."""
        for run in runs:
            self.create_run(run)

    def create_run_later(self, run: RunRecord) -> None:
        """Insert the record of a run that ended having changed nothing else (no
        rows, state or positions to commit with it). A store may hold it briefly to
        write it with others (every other call of the store writes it first); this
        one writes it now."""
        self.create_run(run)

    @abc.abstractmethod
    def update_run(self, run_id: str, **fields: Any) -> None: ...

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRecord | None: ...

    @abc.abstractmethod
    def list_runs(
        self, step: str | None = None, limit: int | None = 100, *,
        statuses: Sequence[str] | None = None, trigger: str | None = None,
        before: str | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first (at most ``limit``; None: all), of ``step``, with one of
        ``statuses``, started by ``trigger``, created before run ``before`` (paging)."""

    def latest_runs(self, steps: Sequence[str]) -> dict[str, RunRecord]:
        """The newest run of each of ``steps`` that has one, by step name."""
        latest = {}
        for step in steps:
            if runs := self.list_runs(step=step, limit=1):
                latest[step] = runs[0]
        return latest

    @abc.abstractmethod
    def append_logs(self, lines: Sequence[LogLine]) -> None: ...

    @abc.abstractmethod
    def get_logs(self, run_id: str, after_seq: int = -1) -> list[LogLine]:
        """The log lines of run ``run_id`` (those after line ``after_seq``), in order."""

    @abc.abstractmethod
    def get_state(self, step: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    def get_positions(self, step: str) -> list[StreamPosition]: ...

    @abc.abstractmethod
    def get_partitions(self, step: str, *, prefixes: bool = False) -> list[PartitionRecord]:
        """The committed partition records of connector step ``step``, by name
        (``prefixes``: the prefix records too)."""

    @contextlib.contextmanager
    def run_lock(self, step: str) -> Iterator[None]:
        """Hold ``step``'s run lock across processes for the block; ``StoreError`` if
        another process holds it. One run of a step at a time is what keeps its
        stream positions and state exactly-once. A store only one process can
        open (DuckDB) needs nothing more than the host's own bookkeeping."""
        yield

    @abc.abstractmethod
    def close(self) -> None: ...


def active_positions(store: Store, step: str) -> list[StreamPosition]:
    """``step``'s stream positions that still apply: those recorded for the active
    version of their table (a reset table is read again from its start)."""
    versions: dict[str, int] = {}
    result = []
    for position in store.get_positions(step):
        if position.table not in versions:
            info = store.table_info(position.table, count_rows=False)
            versions[position.table] = info.version if info else -1
        if versions[position.table] == position.table_version:
            result.append(position)
    return result
