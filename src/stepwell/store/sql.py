"""Everything the SQL backends share: one implementation of ``Store`` and
``Transaction`` on top of a small :class:`Session` primitive.

A backend (``duckdb.py``, ``postgres.py``) supplies a :class:`Dialect` (type
names and the few spelling differences, as data) and a :class:`Session`: one
database transaction that can run statements with ``?`` placeholders, return
rows or Arrow, bulk-insert an Arrow table, stage an Arrow table as a
temporary relation, and stream a query's result in Arrow batches. All SQL
text, the widening rule, upsert/reset logic and the bookkeeping in the
``stepwell`` schema live here, once.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa

from stepwell.store import ids, visibility
from stepwell.store import schema as sch
from stepwell.store.base import (
    ID_COLUMN,
    PREFIX_STATUS,
    ColumnInfo,
    ConcurrentChange,
    InvalidName,
    LogLine,
    PartitionRecord,
    RunRecord,
    Store,
    StoreError,
    StreamPosition,
    TableInfo,
    TableVersion,
    Transaction,
)
from stepwell.store.catalog import MISSING, CatalogCache, CatalogView
from stepwell.store.late_runs import LateRuns

#: Schema holding the engine's bookkeeping tables.
META = "stepwell"
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: A table's earlier versions are kept as ``<name>__v<version>`` (``versioned_name``).
_VERSION_SUFFIX = re.compile(r"__v[0-9]+\Z")
_RUN_FIELDS = tuple(f.name for f in fields(RunRecord))
_RUN_TIME_FIELDS = frozenset({"started_at", "ended_at"})
_LOG_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("seq", pa.int64()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("level", pa.string()),
        ("message", pa.string()),
    ]
)


# -- dialect and identifiers ------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """What differs between the SQL engines, as data."""

    name: str
    #: logical base type -> SQL type name (``decimal`` gets ``(p,s)`` appended)
    type_names: Mapping[str, str]
    #: a table's columns in order, as (name, type, numeric precision, numeric scale);
    #: one ``?``: the table's name (in the current schema)
    columns_query: str
    #: whether quoted identifiers differing only in case name the same column
    case_insensitive: bool
    #: longest identifier the engine keeps intact (None: no limit)
    max_identifier_length: int | None
    #: appended to text expressions in ORDER BY and comparisons, for byte order
    text_collation: str
    #: whether to create secondary indexes on bookkeeping tables
    secondary_indexes: bool
    #: statement serializing concurrent bootstrap, if needed
    bootstrap_lock: str | None
    #: whether several hosts may write the store at once (see ``Transaction.lease_ids``)
    shared: bool = False
    #: statement taking a transaction-long lock on a name (parameter: the name)
    #: that every host writing the store shares (``Transaction.lock``): writers
    #: racing to create or widen one table wait for each other instead of failing
    #: (None: one process opens the store)
    named_lock: str | None = None
    #: text of the error a transaction gets when another one changed the same table
    #: first and it cannot wait for it (None: writers wait, see ``named_lock``)
    concurrent_change_error: str | None = None
    #: (text of an error, what to add to its message): advice the backend's own
    #: message does not give, or gives wrongly for stepwell's users
    error_hints: tuple[tuple[str, str], ...] = ()

    def sql_type(self, logical: str) -> str:
        dec = sch.parse_decimal(logical)
        if dec:
            return f"{self.type_names['decimal']}({dec[0]},{dec[1]})"
        try:
            return self.type_names[logical]
        except KeyError:
            raise StoreError(f"no {self.name} column type for logical type {logical!r}") from None


def quote(identifier: str) -> str:
    """A quoted SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def check_table_name(name: str, dialect: Dialect) -> str:
    """``name`` if it is a valid table name, else ``InvalidName`` naming it."""
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise InvalidName(
            f"invalid table name {name!r}: use letters, digits and underscores, "
            "starting with a letter or underscore"
        )
    if _VERSION_SUFFIX.search(name):
        raise InvalidName(
            f"invalid table name {name!r}: names ending in __v<number> are kept for a "
            "table's earlier versions (see its versions); rename the table"
        )
    limit = dialect.max_identifier_length
    if limit is not None and len(name) > limit - 8:  # room for a __vNNNNN suffix
        raise InvalidName(f"table name {name!r} is too long: use at most {limit - 8} characters")
    return name


def check_column_name(table: str, name: str, dialect: Dialect) -> None:
    if not name or "\x00" in name:
        raise InvalidName(f"table {table!r}: invalid column name {name!r}: a column's name "
                          "cannot be empty or hold NUL; rename the field")
    limit = dialect.max_identifier_length
    if limit is not None and len(name.encode()) > limit:
        raise InvalidName(
            f"table {table!r}: column name {name!r} is longer than {limit} bytes; rename it"
        )


def versioned_name(name: str, version: int) -> str:
    """Physical name of an inactive table version."""
    return f"{name}__v{version}"


# -- tagged JSON (bookkeeping values that must round-trip dates) ----------------------


def _tag(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot store a {type(value).__name__} value as JSON: {value!r}")


_UNTAG: dict[str, Callable[[str], Any]] = {
    "$datetime": datetime.fromisoformat,
    "$date": date.fromisoformat,
    "$decimal": Decimal,
    "$bytes": base64.b64decode,
}


def _untag(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((key, text),) = obj.items()
        if key in _UNTAG and isinstance(text, str):
            return _UNTAG[key](text)
    return obj


def dumps_tagged(value: Any) -> str:
    """JSON text in which datetimes, dates, decimals and bytes keep their type."""
    try:
        return json.dumps(value, ensure_ascii=False, default=_tag, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(str(exc)) from exc


def loads_tagged(text: str | None) -> Any:
    return None if text is None else json.loads(text, object_hook=_untag)


def _utc(value: datetime | None) -> datetime | None:
    """A timezone-aware UTC datetime (naive values are taken to be UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


# -- the backend primitive -------------------------------------------------------------


class Session(abc.ABC):
    """One open database transaction of a backend.

    SQL passed to ``execute``/``fetchall``/``stream`` uses ``?`` placeholders
    and identifiers quoted with :func:`quote`; ``fetch_arrow`` runs user SQL
    verbatim.
    """

    dialect: Dialect
    #: exception types of the driver, translated into ``StoreError``
    errors: tuple[type[BaseException], ...]
    #: the store's catalog cache as this session may use it (None: not kept)
    catalog: CatalogView | None = None

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; returns the rows it changed (-1 when not applicable)."""

    @abc.abstractmethod
    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    @abc.abstractmethod
    def fetch_arrow(self, sql: str) -> pa.Table:
        """Run user SQL and return its full result (empty table if it has none)."""

    @abc.abstractmethod
    def insert_arrow(self, target: str, data: pa.Table, *, every_column: bool = False) -> int:
        """Insert ``data`` (canonical types, columns named as in the table) into
        the quoted relation ``target``; returns rows inserted. ``every_column``:
        ``data`` has exactly the target's columns, in its order (so a backend may
        insert by position)."""

    @abc.abstractmethod
    def stage(self, data: pa.Table) -> str:
        """Make ``data`` queryable as a temporary relation; returns its quoted name."""

    @abc.abstractmethod
    def unstage(self, relation: str) -> None: ...

    @abc.abstractmethod
    def stream(
        self, sql: str, params: Sequence[Any], schema: pa.Schema, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        """Stream a query's rows as batches of at most ``batch_rows`` rows, with
        ``schema`` (the result columns in canonical types)."""

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def rollback(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Release the session's resources (an open transaction is discarded)."""


# -- SQL shared by transactions and the store --------------------------------------------


def bootstrap_statements(d: Dialect) -> list[str]:
    """Idempotent DDL creating the bookkeeping schema."""
    text, big, ts, js, boolean = (
        d.type_names["str"],
        d.type_names["int"],
        d.type_names["datetime_tz"],
        d.type_names["json"],
        d.type_names["bool"],
    )
    statements = [
        f"CREATE SCHEMA IF NOT EXISTS {META}",
        f"""CREATE TABLE IF NOT EXISTS {META}.runs (
            id {text} PRIMARY KEY, step {text} NOT NULL, status {text} NOT NULL,
            "trigger" {text}, started_at {ts}, ended_at {ts}, rows_in {big}, rows_out {big},
            error {text}, traceback {text}, host_pid {big}, info {js})""",
        f"""CREATE TABLE IF NOT EXISTS {META}.logs (
            run_id {text} NOT NULL, seq {big} NOT NULL, ts {ts}, level {text}, message {text},
            PRIMARY KEY (run_id, seq))""",
        f"""CREATE TABLE IF NOT EXISTS {META}.state (step {text} PRIMARY KEY, value {js})""",
        f"""CREATE TABLE IF NOT EXISTS {META}.positions (
            step {text} NOT NULL, "table" {text} NOT NULL, order_by {text} NOT NULL,
            table_version {big}, value {js}, last_id {text},
            PRIMARY KEY (step, "table", order_by))""",
        f"""CREATE TABLE IF NOT EXISTS {META}.tables (
            name {text} PRIMARY KEY, version {big} NOT NULL, unique_on {js})""",
        f"""CREATE TABLE IF NOT EXISTS {META}.table_versions (
            name {text} NOT NULL, version {big} NOT NULL, physical_name {text} NOT NULL,
            created_at {ts}, active {boolean} NOT NULL, PRIMARY KEY (name, version))""",
        f"""CREATE TABLE IF NOT EXISTS {META}.partitions (
            step {text} NOT NULL, name {text} NOT NULL, fingerprint {text}, code_hash {text},
            "rows" {big}, duration_seconds {d.type_names["float"]}, status {text} NOT NULL,
            error {text}, run_id {text}, updated_at {ts}, parent {text},
            PRIMARY KEY (step, name))""",
        # stores made before prefixes were recorded
        f"ALTER TABLE {META}.partitions ADD COLUMN IF NOT EXISTS parent {text}",
        f"""CREATE TABLE IF NOT EXISTS {META}.stream_orders (
            name {text} PRIMARY KEY, column_name {text} NOT NULL)""",
    ]
    if d.secondary_indexes:
        statements.append(
            f"CREATE INDEX IF NOT EXISTS runs_step_started ON {META}.runs (step, started_at)"
        )
    if d.shared:  # ids in flight on every host, and an id greater than all committed
        statements += [
            f"""CREATE TABLE IF NOT EXISTS {META}.id_leases (
                key {big} PRIMARY KEY, floor {text} NOT NULL, pid {big}, created_at {ts})""",
            f"CREATE TABLE IF NOT EXISTS {META}.id_clock (value {text} NOT NULL)",
            f"INSERT INTO {META}.id_clock (value) SELECT '{'0' * ids.ULID_LENGTH}' "
            f"WHERE NOT EXISTS (SELECT 1 FROM {META}.id_clock)",
        ]
    return statements


def bootstrap(session: Session) -> None:
    """Create the bookkeeping schema if missing (in ``session``, not committed)."""
    if session.dialect.bootstrap_lock:
        session.execute(session.dialect.bootstrap_lock)
    for statement in bootstrap_statements(session.dialect):
        session.execute(statement)


def table_columns(session: Session, name: str) -> dict[str, str] | None:
    """``{column: logical type}`` of a user table, None if it does not exist."""
    if session.catalog and (known := session.catalog.get(("columns", name))) is not MISSING:
        return known
    rows = session.fetchall(session.dialect.columns_query, [name])
    columns = (
        {col: sch.logical_from_sql(typ, prec, scale) for col, typ, prec, scale in rows}
        if rows
        else None
    )
    if session.catalog:
        session.catalog.put(("columns", name), columns)
    return columns


def _row_count(session: Session, physical: str) -> int:
    return int(session.fetchall(f"SELECT count(*) FROM {quote(physical)}")[0][0])


def _registration(session: Session, name: str) -> tuple[int, list[str] | None] | None:
    """A user table's active version and ``unique_on`` columns (None: not registered)."""
    if session.catalog and (known := session.catalog.get(("registration", name))) is not MISSING:
        return known
    rows = session.fetchall(
        f"SELECT version, CAST(unique_on AS TEXT) FROM {META}.tables WHERE name = ?", [name]
    )
    found = None
    if rows:
        version, unique_on = rows[0]
        found = int(version), (json.loads(unique_on) if unique_on else None)
    if session.catalog:
        session.catalog.put(("registration", name), found)
    return found


def _table_info(
    name: str,
    columns: Mapping[str, str],
    registration: tuple[int, list[str] | None] | None,
    row_count: int | None,
) -> TableInfo:
    version, unique_on = registration or (1, None)
    return TableInfo(
        name=name,
        columns=[ColumnInfo(c, t) for c, t in columns.items()],
        row_count=row_count,
        version=version,
        unique_on=unique_on,
    )


def _json_param(session: Session) -> str:
    return f"CAST(? AS {session.dialect.type_names['json']})"


def _run_from_row(row: Sequence[Any]) -> RunRecord:
    values = dict(zip(_RUN_FIELDS, row, strict=True))
    for key in _RUN_TIME_FIELDS:
        values[key] = _utc(values[key])
    values["info"] = loads_tagged(values["info"]) or {}
    return RunRecord(**values)


def _run_params(key: str, value: Any) -> Any:
    if key in _RUN_TIME_FIELDS:
        return _utc(value)
    if key == "info":
        return dumps_tagged(value or {})
    return _shown_nul(value)


def _shown_nul(value: Any) -> Any:
    """Text a run record or log line holds (what user code printed or raised) with
    NUL shown as ``\\x00``: PostgreSQL's text cannot hold the character itself, and
    refusing it would lose the run's record and fail the command that ran it."""
    return value.replace("\x00", "\\x00") if isinstance(value, str) and "\x00" in value else value


def hinted_error(d: Dialect, message: str, exc: BaseException) -> StoreError:
    """``message`` as a StoreError, with what to do when the dialect knows (its
    ``error_hints``; the hint then replaces the database's lines of detail)."""
    hints = list(dict.fromkeys(hint for text, hint in d.error_hints if text in str(exc)))
    return StoreError(" ".join([message.splitlines()[0] if hints else message, *hints]))


def _select_runs(
    session: Session, where: str, params: Sequence[Any], limit: int | None
) -> list[RunRecord]:
    columns = ", ".join("CAST(info AS TEXT)" if f == "info" else quote(f) for f in _RUN_FIELDS)
    collate = session.dialect.text_collation
    sql = (
        f"SELECT {columns} FROM {META}.runs {where} "
        f"ORDER BY id{collate} DESC"  # ULIDs: newest created first (queued runs too)
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [_run_from_row(row) for row in session.fetchall(sql, params)]


def _read_state(session: Session, step: str) -> dict[str, Any]:
    rows = session.fetchall(f"SELECT CAST(value AS TEXT) FROM {META}.state WHERE step = ?", [step])
    return (loads_tagged(rows[0][0]) or {}) if rows else {}


def insert_runs(session: Session, runs: Sequence[RunRecord]) -> None:
    """Insert run records (one statement per 100)."""
    row = "(" + ", ".join(_json_param(session) if f == "info" else "?" for f in _RUN_FIELDS) + ")"
    for start in range(0, len(runs), 100):
        chunk = runs[start : start + 100]
        session.execute(
            f"INSERT INTO {META}.runs ({', '.join(quote(f) for f in _RUN_FIELDS)}) "
            f"VALUES {', '.join([row] * len(chunk))}",
            [_run_params(f, getattr(run, f)) for run in chunk for f in _RUN_FIELDS],
        )


def update_run(session: Session, run_id: str, changes: Mapping[str, Any]) -> None:
    """Set fields of a run record; unknown fields and unknown runs are errors."""
    unknown = sorted(set(changes) - set(_RUN_FIELDS[1:]))
    if unknown:
        raise StoreError(
            f"update_run: unknown run fields {unknown}; known: {list(_RUN_FIELDS[1:])}"
        )
    if not changes:
        return
    sets = ", ".join(
        f"{quote(k)} = {_json_param(session) if k == 'info' else '?'}" for k in changes
    )
    params = [_run_params(k, v) for k, v in changes.items()]
    changed = session.execute(f"UPDATE {META}.runs SET {sets} WHERE id = ?", [*params, run_id])
    if changed == 0:
        raise StoreError(f"update_run: no run with id {run_id!r}")


_PARTITION_FIELDS = tuple(f.name for f in fields(PartitionRecord))
_PARTITION_COLUMNS = ", ".join(quote(f) for f in _PARTITION_FIELDS)


def _insert_position(session: Session) -> str:
    return (
        f'INSERT INTO {META}.positions (step, "table", order_by, table_version, value, last_id) '
        f"VALUES (?, ?, ?, ?, {_json_param(session)}, ?) "
    )


def _position_params(position: StreamPosition) -> list[Any]:
    return [
        position.step,
        position.table,
        ",".join(position.order_by),
        position.table_version,
        dumps_tagged(position.value),
        position.last_id,
    ]


def _partition_from_row(row: Sequence[Any]) -> PartitionRecord:
    record = PartitionRecord(*row)
    record.rows = int(record.rows or 0)
    record.duration_seconds = (
        None if record.duration_seconds is None else float(record.duration_seconds)
    )
    record.updated_at = _utc(record.updated_at)
    return record


#: Greater than every id (ids are lowercase base32, a tilde sorts after them).
_ABOVE_ALL_IDS = "~"


def scan_query(
    dialect: Dialect,
    name: str,
    types: Mapping[str, str],
    order_by: Sequence[str] | None,
    after: tuple[Any, str | None] | None,
    columns: Sequence[str] | None,
    below_id: str | None = None,
    below_sql: tuple[str, list[Any]] | None = None,
) -> tuple[str, list[Any], pa.Schema]:
    """SQL, parameters and result schema of a scan (see ``Store.scan``): only rows
    whose patterns_id is below ``below_id`` and below the value of the query
    ``below_sql`` (when it has one), if given."""
    wanted = list(columns) if columns is not None else list(types)
    if not wanted:
        raise StoreError(f"scan of {name!r}: 'columns' names no columns")
    order = list(order_by or [])
    for column in [*wanted, *order]:
        if column not in types:
            raise StoreError(f"table {name!r} has no column {column!r}; columns: {list(types)}")

    def select(column: str) -> str:
        logical = types[column]
        if logical == "json" or logical.startswith("sql:"):
            return f"CAST({quote(column)} AS TEXT) AS {quote(column)}"
        return quote(column)

    def ordered(column: str) -> str:
        return quote(column) + (dialect.text_collation if types[column] == "str" else "")

    sql = f"SELECT {', '.join(select(c) for c in wanted)} FROM {quote(name)}"
    where: list[str] = []
    params: list[Any] = []
    if after is not None:
        if not order:
            raise StoreError(f"scan of {name!r}: 'after' needs 'order_by'")
        value, last_id = after
        first = ordered(order[0])
        if last_id is not None and len(order) > 1:
            tie = ordered(order[1])
            if value is None:
                where.append(f"(({first} IS NULL AND {tie} > ?) OR {first} IS NOT NULL)")
                params = [last_id]
            else:
                where.append(f"({first} > ? OR ({first} = ? AND {tie} > ?))")
                params = [value, value, last_id]
        elif value is None:
            where.append(f"{first} IS NOT NULL")
        else:
            where.append(f"{first} > ?")
            params = [value]
    if below_id is not None and ID_COLUMN in types:
        where.append(f"{ordered(ID_COLUMN)} < ?")
        params.append(below_id)
    if below_sql is not None and ID_COLUMN in types:
        where.append(f"{ordered(ID_COLUMN)} < COALESCE(({below_sql[0]}), ?)")
        params += [*below_sql[1], _ABOVE_ALL_IDS]
    if where:
        sql += " WHERE " + " AND ".join(where)
    if order:
        sql += " ORDER BY " + ", ".join(f"{ordered(c)} ASC NULLS FIRST" for c in order)
    return sql, params, sch.arrow_schema({c: types[c] for c in wanted})


def _dedupe_last(data: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Keep the last row of each ``keys`` value; rows with a NULL key all stay
    (NULL matches nothing, as in SQL)."""
    n = data.num_rows
    if n < 2:
        return data
    import pyarrow.compute as pc  # (here: importing it costs every host 40 ms at start)

    rows = pa.array(np.arange(n, dtype=np.int64))
    has_key = pc.is_valid(data[keys[0]]).combine_chunks()
    for key in keys[1:]:
        has_key = pc.and_(has_key, pc.is_valid(data[key]).combine_chunks())
    row = "stepwell row"  # not a name user data can collide with after select()
    keyed = data.select(list(keys)).append_column(row, rows).filter(has_key)
    last = keyed.group_by(list(keys), use_threads=False).aggregate([(row, "max")])
    if last.num_rows == keyed.num_rows == n:
        return data  # keys already unique
    keep = pa.concat_arrays([last[f"{row}_max"].combine_chunks(), rows.filter(pc.invert(has_key))])
    return data.take(pc.take(keep, pc.sort_indices(keep)))


# -- the transaction ----------------------------------------------------------------------


#: Said with a ``Dialect.concurrent_change_error`` (DuckDB gives each transaction a
#: snapshot from its start: of two runs that create or change one table at the same
#: moment, the later cannot see the other's change).
_CONCURRENT_CHANGE_HINT = (
    " (another run created or changed this table at the same moment and committed "
    "first; nothing of this run's transaction was written: run it again)"
)


class SQLTransaction(Transaction):
    """``Transaction`` over one backend :class:`Session`."""

    def __init__(self, session: Session):
        self._s = session
        self._d = session.dialect
        self._done = False
        self._lock = threading.RLock()
        # Known within this transaction (it is the only one changing these tables'
        # shape while it is open), so repeated writes skip the catalog queries.
        self._columns: dict[str, dict[str, str]] = {}
        self._registered: set[str] = set()
        self._changed_shapes = False
        #: tables this transaction reset and has not written to since: their new,
        #: empty version takes the shape of the first rows written (a new version
        #: has no schema yet, as in Patterns: ``replace`` may change column types)
        self._fresh: set[str] = set()

    def _change_shapes(self) -> None:
        """Called before this transaction changes a table's shape or registration:
        the store's catalog cache stands aside until it ends."""
        if not self._changed_shapes and self._s.catalog:
            self._s.catalog.begin_change()
        self._changed_shapes = True

    def _end(self) -> None:
        try:
            self._s.close()
        finally:
            if self._changed_shapes and self._s.catalog:
                self._s.catalog.end_change()

    # -- plumbing
    @contextlib.contextmanager
    def _op(self, what: str) -> Iterator[Session]:
        with self._lock:
            if self._done:
                raise StoreError(f"{what}: the transaction is already committed or rolled back")
            try:
                yield self._s
            except StoreError:
                raise
            except self._s.errors as exc:
                raise self._error(f"{what}: {exc}", exc) from exc

    def _error(self, message: str, exc: BaseException) -> StoreError:
        marker = self._d.concurrent_change_error
        if marker and marker in str(exc):
            return ConcurrentChange(message + _CONCURRENT_CHANGE_HINT)
        return hinted_error(self._d, message, exc)

    def _create_table(self, s: Session, physical: str, columns: Mapping[str, str]) -> None:
        self._change_shapes()
        defs = ", ".join(f"{quote(c)} {self._d.sql_type(t)}" for c, t in columns.items())
        s.execute(f"CREATE TABLE {quote(physical)} ({defs})")

    def _ensure_registered(self, s: Session, name: str) -> None:
        if name not in self._registered:
            self._registered_version(s, name)
            self._registered.add(name)

    def _registered_version(self, s: Session, name: str) -> int:
        """The table's active version, registering it (version 1) if new."""
        found = _registration(s, name)
        if found:
            return found[0]
        self._change_shapes()
        s.execute(
            f"INSERT INTO {META}.tables (name, version, unique_on) VALUES (?, 1, NULL)", [name]
        )
        s.execute(
            f"INSERT INTO {META}.table_versions (name, version, physical_name, created_at, active) "
            "VALUES (?, 1, ?, ?, TRUE)",
            [name, name, _now()],
        )
        return 1

    def _record_unique_on(self, s: Session, name: str, unique_on: Sequence[str]) -> None:
        found = _registration(s, name)
        if found and found[1] != list(unique_on):
            self._change_shapes()
            s.execute(
                f"UPDATE {META}.tables SET unique_on = {_json_param(s)} WHERE name = ?",
                [json.dumps(list(unique_on)), name],
            )

    def _prepare(self, s: Session, name: str, data: pa.Table) -> pa.Table:
        """Create or widen table ``name`` for ``data``; returns ``data`` cast to it."""
        if not isinstance(data, pa.Table):
            raise StoreError(f"table {name!r}: expected a pyarrow.Table, got {type(data).__name__}")
        data = sch.normalize(data, name=name)
        if data.num_columns == 0:
            if data.num_rows:
                raise StoreError(f"table {name!r}: {data.num_rows} rows without any columns")
            return data
        for column in data.column_names:
            check_column_name(name, column, self._d)
        if name in self._fresh:
            self._fresh.discard(name)
            self._change_shapes()
            s.execute(f"DROP TABLE {quote(name)}")  # empty, made by this transaction
            self._columns.pop(name, None)
        existing = self._columns.get(name) or table_columns(s, name)
        plan = sch.plan_columns(
            name, existing, data.schema, case_insensitive=self._d.case_insensitive
        )
        if (plan.create or plan.add or plan.alter) and self._d.named_lock:
            # another host may be changing it too: wait for it, then look again
            s.execute(self._d.named_lock, [f"stepwell-table:{name}"])
            plan = sch.plan_columns(
                name, table_columns(s, name), data.schema,
                case_insensitive=self._d.case_insensitive,
            )  # fmt: skip
        if plan.create:
            self._create_table(s, name, plan.columns)
        elif plan.add or plan.alter:
            self._change_shapes()
        for column, logical in plan.add if not plan.create else ():
            s.execute(
                f"ALTER TABLE {quote(name)} ADD COLUMN {quote(column)} {self._d.sql_type(logical)}"
            )
        for column, logical in plan.alter:
            sql_type = self._d.sql_type(logical)
            s.execute(
                f"ALTER TABLE {quote(name)} ALTER COLUMN {quote(column)} TYPE {sql_type} "
                f"USING CAST({quote(column)} AS {sql_type})"
            )
        self._ensure_registered(s, name)
        self._columns[name] = dict(plan.columns)
        return sch.conform(name, data, plan.columns, plan.rename)

    def _delete_matching(self, s: Session, name: str, keys: pa.Table) -> int:
        """Delete rows of ``name`` whose key columns equal a row of ``keys``."""
        relation = s.stage(keys)
        try:
            match = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in keys.column_names)
            return s.execute(f"DELETE FROM {quote(name)} AS t USING {relation} AS s WHERE {match}")
        finally:
            s.unstage(relation)

    def _insert(self, s: Session, name: str, data: pa.Table) -> int:
        """Insert rows ``_prepare`` made ready for table ``name``."""
        if not data.num_rows:
            return 0
        every_column = data.column_names == list(self._columns[name])
        return s.insert_arrow(quote(name), data, every_column=every_column)

    # -- Transaction
    def append(self, table: str, data: pa.Table, unique_on: Sequence[str] | None = None) -> int:
        with self._op(f"append to table {table!r}") as s:
            name = check_table_name(table, self._d)
            data = self._prepare(s, name, data)
            written = self._insert(s, name, data)
            if unique_on:
                self._record_unique_on(s, name, unique_on)
            return written

    def upsert(self, table: str, data: pa.Table, unique_on: Sequence[str]) -> int:
        with self._op(f"upsert into table {table!r}") as s:
            name = check_table_name(table, self._d)
            keys = [unique_on] if isinstance(unique_on, str) else list(unique_on or [])
            if not keys:
                raise StoreError(f"upsert into table {name!r}: unique_on names no columns")
            missing = [k for k in keys if k not in getattr(data, "column_names", ())]
            if missing:
                raise StoreError(
                    f"upsert into table {name!r}: unique_on columns {missing} are missing "
                    f"from the data (columns: {getattr(data, 'column_names', None)})"
                )
            data = self._prepare(s, name, data)
            data = _dedupe_last(data, keys)
            if data.num_rows:
                self._delete_matching(s, name, data.select(keys))
            written = self._insert(s, name, data)
            self._record_unique_on(s, name, keys)
            return written

    def change_rows(self, table: str, statement: str) -> int:
        with self._op(f"change rows of table {table!r}") as s:
            name = check_table_name(table, self._d)
            if table_columns(s, name) is None:
                raise StoreError(f"table {table!r} does not exist yet: write rows to it first")
            return max(s.execute(statement), 0)

    def truncate(self, table: str) -> None:
        with self._op(f"truncate table {table!r}") as s:
            name = check_table_name(table, self._d)
            if table_columns(s, name) is not None:
                s.execute(f"DELETE FROM {quote(name)}")

    def reset(self, table: str) -> int:
        with self._op(f"reset table {table!r}") as s:
            name = check_table_name(table, self._d)
            columns = table_columns(s, name)
            if columns is None:
                found = _registration(s, name)
                return found[0] if found else 1
            old = self._registered_version(s, name)
            # after activate_version the active one need not be the newest
            ((newest,),) = s.fetchall(
                f"SELECT max(version) FROM {META}.table_versions WHERE name = ?", [name]
            )
            new = max(int(newest or old), old) + 1
            archived = versioned_name(name, old)
            self._change_shapes()
            s.execute(f"ALTER TABLE {quote(name)} RENAME TO {quote(archived)}")
            self._create_table(s, name, columns)
            self._fresh.add(name)
            s.execute(
                f"UPDATE {META}.table_versions SET physical_name = ?, active = FALSE "
                "WHERE name = ? AND version = ?",
                [archived, name, old],
            )
            s.execute(
                f"INSERT INTO {META}.table_versions (name, version, physical_name, created_at, active) "
                "VALUES (?, ?, ?, ?, TRUE)",
                [name, new, name, _now()],
            )
            s.execute(f"UPDATE {META}.tables SET version = ? WHERE name = ?", [new, name])
            return new

    def activate_version(self, table: str, version: int) -> None:
        with self._op(f"activate version {version} of table {table!r}") as s:
            name = check_table_name(table, self._d)
            current = self._registered_version(s, name)
            if version == current:
                return
            rows = s.fetchall(
                f"SELECT physical_name FROM {META}.table_versions WHERE name = ? AND version = ?",
                [name, version],
            )
            if not rows:
                known = [v for (v,) in s.fetchall(
                    f"SELECT version FROM {META}.table_versions WHERE name = ? ORDER BY version",
                    [name],
                )]  # fmt: skip
                raise StoreError(f"table {name!r} has no version {version} (versions: {known})")
            (physical,) = rows[0]
            self._change_shapes()
            if table_columns(s, name) is not None:
                archived = versioned_name(name, current)
                s.execute(f"ALTER TABLE {quote(name)} RENAME TO {quote(archived)}")
            else:
                archived = None
            if physical != name and table_columns(s, physical) is not None:
                s.execute(f"ALTER TABLE {quote(physical)} RENAME TO {quote(name)}")
            s.execute(
                f"UPDATE {META}.table_versions SET physical_name = ?, active = FALSE "
                "WHERE name = ? AND version = ?",
                [archived or versioned_name(name, current), name, current],
            )
            s.execute(
                f"UPDATE {META}.table_versions SET physical_name = ?, active = TRUE "
                "WHERE name = ? AND version = ?",
                [name, name, version],
            )
            s.execute(f"UPDATE {META}.tables SET version = ? WHERE name = ?", [version, name])

    def delete_where(self, table: str, column: str, values: Sequence[Any]) -> int:
        with self._op(f"delete from table {table!r}") as s:
            name = check_table_name(table, self._d)
            columns = table_columns(s, name)
            if columns is None:
                return 0
            if column not in columns:
                raise StoreError(
                    f"table {name!r} has no column {column!r}; columns: {list(columns)}"
                )
            values = list(values)
            if not values:
                return 0
            keys = sch.column_values(name, column, columns[column], values)
            return self._delete_matching(s, name, keys)

    def query(self, sql: str) -> pa.Table:
        with self._op("query") as s:
            return sch.clean_result(s.fetch_arrow(sql))

    def lock(self, name: str) -> None:
        if self._d.named_lock:
            with self._op(f"lock {name!r}") as s:
                s.execute(self._d.named_lock, [name])

    def get_state(self, step: str) -> dict[str, Any]:
        with self._op(f"read state of step {step!r}") as s:
            return _read_state(s, step)

    def set_state(self, step: str, state: dict[str, Any]) -> None:
        with self._op(f"set state of step {step!r}") as s:
            s.execute(
                f"INSERT INTO {META}.state (step, value) VALUES (?, {_json_param(s)}) "
                "ON CONFLICT (step) DO UPDATE SET value = excluded.value",
                [step, dumps_tagged(state)],
            )

    def set_stream_order(self, table: str, column: str) -> None:
        with self._op(f"record the stream order of table {table!r}") as s:
            s.execute(
                f"INSERT INTO {META}.stream_orders (name, column_name) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET column_name = excluded.column_name",
                [check_table_name(table, self._d), column],
            )

    def set_position(self, position: StreamPosition) -> None:
        with self._op(f"set stream position of step {position.step!r}") as s:
            s.execute(
                _insert_position(s) + 'ON CONFLICT (step, "table", order_by) DO UPDATE SET '
                "table_version = excluded.table_version, value = excluded.value, "
                "last_id = excluded.last_id",
                _position_params(position),
            )

    def replace_positions(self, step: str, positions: Sequence[StreamPosition]) -> None:
        with self._op(f"set stream positions of step {step!r}") as s:
            s.execute(f"DELETE FROM {META}.positions WHERE step = ?", [step])
            # none is left to conflict with: a plain INSERT (an upsert costs DuckDB ~3x)
            for position in positions:
                s.execute(_insert_position(s), _position_params(position))

    def create_run(self, run: RunRecord) -> None:
        with self._op(f"create run {run.id!r}") as s:
            insert_runs(s, [run])

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self._op(f"update run {run_id!r}") as s:
            update_run(s, run_id, fields)

    def set_partition(self, record: PartitionRecord) -> None:
        with self._op(f"set partition {record.name!r} of step {record.step!r}") as s:
            values = [
                (_utc(record.updated_at) or _now()) if f == "updated_at" else getattr(record, f)
                for f in _PARTITION_FIELDS
            ]
            updates = ", ".join(f"{quote(f)} = excluded.{quote(f)}" for f in _PARTITION_FIELDS[2:])
            s.execute(
                f"INSERT INTO {META}.partitions ({_PARTITION_COLUMNS}) VALUES "
                f"({', '.join('?' for _ in _PARTITION_FIELDS)}) "
                f"ON CONFLICT (step, name) DO UPDATE SET {updates}",
                values,
            )

    def delete_partition(self, step: str, name: str) -> None:
        with self._op(f"delete partition {name!r} of step {step!r}") as s:
            s.execute(f"DELETE FROM {META}.partitions WHERE step = ? AND name = ?", [step, name])

    def commit(self) -> None:
        with self._lock:
            if self._done:
                raise StoreError("commit: the transaction is already committed or rolled back")
            self._done = True
            try:
                self._s.commit()
            except self._s.errors as exc:
                with contextlib.suppress(*self._s.errors):
                    self._s.rollback()
                raise self._error(f"commit failed, nothing was written: {exc}", exc) from exc
            finally:
                self._end()

    def rollback(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            try:
                self._s.rollback()
            finally:
                self._end()


# -- the store -------------------------------------------------------------------------------


class SQLStore(Store):
    """``Store`` over a backend's :meth:`_session` factory."""

    dialect: Dialect

    def __init__(self) -> None:
        self._open: weakref.WeakSet[Session] = weakref.WeakSet()
        self._open_lock = threading.Lock()
        self._closed = False
        # only this process changes the tables of a store no other host writes
        self._catalog = None if self.dialect.shared else CatalogCache()
        self._late_runs = LateRuns(self.create_runs)
        with self._autocommit() as s:
            bootstrap(s)

    @abc.abstractmethod
    def _new_session(
        self, *, read_only: bool = False, snapshot: bool = False, single: bool = False
    ) -> Session:
        """A new session with its transaction begun (``snapshot``: a consistent
        read-only view for a long scan). ``single``: the session runs one statement
        only, so a backend may let that statement be its own transaction."""

    @abc.abstractmethod
    def _close_backend(self) -> None: ...

    def _session(
        self, *, read_only: bool = False, snapshot: bool = False, single: bool = False
    ) -> Session:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        self._late_runs.flush()  # whatever this session does may need them
        view = self._catalog.view() if self._catalog else None  # before the snapshot
        session = self._new_session(read_only=read_only, snapshot=snapshot, single=single)
        session.catalog = view
        with self._open_lock:
            self._open.add(session)
        return session

    @contextlib.contextmanager
    def _autocommit(self, *, read_only: bool = False, single: bool = False) -> Iterator[Session]:
        """A session committed when the block succeeds, rolled back otherwise
        (``single``: the block runs one statement; see ``_new_session``)."""
        s = self._session(read_only=read_only, single=single)
        try:
            try:
                yield s
                s.commit()
            except BaseException:
                with contextlib.suppress(*s.errors):
                    s.rollback()
                raise
        except StoreError:
            raise
        except s.errors as exc:
            raise hinted_error(self.dialect, str(exc), exc) from exc
        finally:
            s.close()

    # -- user tables
    def list_tables(self) -> list[TableInfo]:
        with self._autocommit(read_only=True) as s:
            rows = s.fetchall(f"SELECT name, version, CAST(unique_on AS TEXT) FROM {META}.tables")
            infos = []
            for name, version, u in sorted(rows):
                columns = table_columns(s, name)
                if columns is not None:
                    registration = (int(version), json.loads(u) if u else None)
                    infos.append(_table_info(name, columns, registration, _row_count(s, name)))
        return infos

    def table_info(self, name: str, *, count_rows: bool = True) -> TableInfo | None:
        check_table_name(name, self.dialect)
        if not count_rows and self._catalog:  # what the cache knows needs no session
            view = self._catalog.view()
            columns, found = view.get(("columns", name)), view.get(("registration", name))
            if columns is not MISSING and found is not MISSING:
                return _table_info(name, columns, found, None) if columns is not None else None
        with self._autocommit(read_only=True) as s:
            found = _registration(s, name)
            columns = table_columns(s, name)
            if columns is None:
                return None
            return _table_info(name, columns, found, _row_count(s, name) if count_rows else None)

    def stream_order(self, name: str) -> str | None:
        check_table_name(name, self.dialect)
        with self._autocommit(read_only=True, single=True) as s:
            rows = s.fetchall(f"SELECT column_name FROM {META}.stream_orders WHERE name = ?", [name])
        return rows[0][0] if rows else None

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
        name = check_table_name(table, self.dialect)
        if batch_rows < 1:
            raise StoreError(f"scan of {name!r}: batch_rows must be positive, got {batch_rows}")
        below_id = visibility.watermark() if stream else None
        # (before the scan's snapshot: see ``_stream_bound``)
        below_sql = self._stream_bound() if stream else None
        s = self._session(read_only=True, snapshot=True)
        try:
            try:
                types = table_columns(s, name)
                if types is None:
                    raise StoreError(f"table {name!r} does not exist")
                sql, params, result_schema = scan_query(
                    self.dialect, name, types, order_by, after, columns, below_id, below_sql
                )
                yield from s.stream(sql, params, result_schema, batch_rows)
            except s.errors as exc:
                raise hinted_error(self.dialect, f"scan of table {name!r}: {exc}", exc) from exc
            finally:
                with contextlib.suppress(*s.errors):
                    s.rollback()
        finally:
            s.close()

    def _stream_bound(self) -> tuple[str, list[Any]] | None:
        """A query for the smallest id rows may still be committed at by other
        hosts, run inside a stream's scan so that it sees the same snapshot (None:
        one process owns the store, and ``visibility`` knows all its writers)."""
        return None

    def query(self, sql: str) -> pa.Table:
        with self._autocommit(read_only=True) as s:
            return sch.clean_result(s.fetch_arrow(sql))

    def table_versions(self, name: str) -> list[TableVersion]:
        check_table_name(name, self.dialect)
        with self._autocommit(read_only=True) as s:
            rows = s.fetchall(
                f"SELECT version, physical_name, created_at, active FROM {META}.table_versions "
                "WHERE name = ? ORDER BY version",
                [name],
            )
            return [
                TableVersion(
                    table=name,
                    version=int(version),
                    physical_name=physical,
                    created_at=_utc(created),
                    active=bool(active),
                    row_count=_row_count(s, physical)
                    if table_columns(s, physical) is not None
                    else 0,
                )
                for version, physical, created, active in rows
            ]

    def transaction(self) -> Transaction:
        return SQLTransaction(self._session())

    # -- bookkeeping
    def create_run(self, run: RunRecord) -> None:
        self.create_runs([run])

    def create_runs(self, runs: Sequence[RunRecord]) -> None:
        if not runs:
            return
        with self._autocommit(single=len(runs) <= 100) as s:
            insert_runs(s, runs)

    def create_run_later(self, run: RunRecord) -> None:
        self._late_runs.add(run)  # see store.late_runs

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self._autocommit(single=True) as s:
            update_run(s, run_id, fields)

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._autocommit(read_only=True, single=True) as s:
            runs = _select_runs(s, "WHERE id = ?", [run_id], None)
        return runs[0] if runs else None

    def list_runs(
        self, step: str | None = None, limit: int | None = 100, *,
        statuses: Sequence[str] | None = None, trigger: str | None = None,
        before: str | None = None,
    ) -> list[RunRecord]:
        conditions, params = [], []
        if step is not None:
            conditions.append("step = ?")
            params.append(step)
        if statuses is not None:
            conditions.append(f"status IN ({', '.join('?' * len(statuses))})" if statuses else "FALSE")
            params.extend(statuses)
        if trigger is not None:
            conditions.append('"trigger" = ?')
            params.append(trigger)
        with self._autocommit(read_only=True, single=True) as s:
            if before is not None:
                conditions.append(f"id{s.dialect.text_collation} < ?")
                params.append(before)
            where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
            return _select_runs(s, where, params, limit)

    def latest_runs(self, steps: Sequence[str]) -> dict[str, RunRecord]:
        if not steps:
            return {}
        with self._autocommit(read_only=True, single=True) as s:
            collate = s.dialect.text_collation
            where = (
                f"WHERE (step, id) IN (SELECT step, max(id{collate}) FROM {META}.runs "
                f"WHERE step IN ({', '.join('?' * len(steps))}) GROUP BY step)"
            )
            return {run.step: run for run in _select_runs(s, where, list(steps), None)}

    def append_logs(self, lines: Sequence[LogLine]) -> None:
        if not lines:
            return
        data = pa.table(
            {
                "run_id": [line.run_id for line in lines],
                "seq": [line.seq for line in lines],
                "ts": [_utc(line.ts) for line in lines],
                "level": [line.level for line in lines],
                "message": [_shown_nul(line.message) for line in lines],
            },
            schema=_LOG_SCHEMA,
        )
        with self._autocommit(single=True) as s:  # (_LOG_SCHEMA is the table's columns)
            s.insert_arrow(f"{META}.logs", data, every_column=True)

    def get_logs(self, run_id: str, after_seq: int = -1) -> list[LogLine]:
        with self._autocommit(read_only=True, single=True) as s:
            rows = s.fetchall(
                f"SELECT run_id, seq, ts, level, message FROM {META}.logs "
                f"WHERE run_id = ? AND seq > ? ORDER BY seq",
                [run_id, after_seq],
            )
        return [LogLine(r, int(seq), _utc(ts), level, msg) for r, seq, ts, level, msg in rows]

    def get_state(self, step: str) -> dict[str, Any]:
        with self._autocommit(read_only=True, single=True) as s:
            return _read_state(s, step)

    def get_positions(self, step: str) -> list[StreamPosition]:
        with self._autocommit(read_only=True, single=True) as s:
            rows = s.fetchall(
                f'SELECT step, "table", order_by, table_version, CAST(value AS TEXT), last_id '
                f"FROM {META}.positions WHERE step = ? "
                f'ORDER BY "table"{s.dialect.text_collation}, order_by{s.dialect.text_collation}',
                [step],
            )
        return [
            StreamPosition(
                step=st,
                table=tb,
                order_by=tuple(ob.split(",")) if ob else (),
                table_version=int(ver),
                value=loads_tagged(value),
                last_id=last_id,
            )
            for st, tb, ob, ver, value, last_id in rows
        ]

    def get_partitions(self, step: str, *, prefixes: bool = False) -> list[PartitionRecord]:
        only_leaves = "" if prefixes else f" AND status <> '{PREFIX_STATUS}'"
        with self._autocommit(read_only=True, single=True) as s:
            rows = s.fetchall(
                f"SELECT {_PARTITION_COLUMNS} FROM {META}.partitions WHERE step = ?{only_leaves} "
                f"ORDER BY name{s.dialect.text_collation}",
                [step],
            )
        return [_partition_from_row(row) for row in rows]

    def close(self) -> None:
        if self._closed:
            return
        self._late_runs.flush_or_log()
        self._closed = True
        with self._open_lock:
            sessions = list(self._open)
        for session in sessions:
            with contextlib.suppress(Exception):
                session.close()
        self._close_backend()
