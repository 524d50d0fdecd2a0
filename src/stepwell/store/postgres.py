"""The PostgreSQL store (psycopg 3).

Every transaction, bookkeeping call and scan takes its own connection from a
small pool; data is never written in autocommit mode. Arrow data goes in with
``COPY … FROM STDIN (FORMAT csv)`` fed by Arrow's vectorized CSV writer
(quoted values are never NULL, so empty strings and NULLs stay apart). Scans
run in a ``REPEATABLE READ READ ONLY`` transaction through a server-side
(named) cursor, ``batch_rows`` rows per fetch, converted to Arrow in the
canonical types of :mod:`stepwell.store.schema`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import re
import secrets
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import pq
from psycopg.types.string import TextLoader

from stepwell.store import ids
from stepwell.store import schema as sch
from stepwell.store.base import ID_COLUMN, RUN_LOCK_BUSY, StoreError, Transaction
from stepwell.store.sql import META, Dialect, Session, SQLStore, SQLTransaction, quote

DIALECT = Dialect(
    name="PostgreSQL",
    type_names={
        "int": "BIGINT",
        "float": "DOUBLE PRECISION",
        "decimal": "NUMERIC",
        "str": "TEXT",
        "bool": "BOOLEAN",
        "date": "DATE",
        "datetime": "TIMESTAMP",
        "datetime_tz": "TIMESTAMPTZ",
        "json": "JSONB",
        "binary": "BYTEA",
    },
    columns_query=(
        "SELECT column_name, udt_name, numeric_precision, numeric_scale FROM "
        "information_schema.columns WHERE table_catalog = current_database() AND "
        "table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position"
    ),
    case_insensitive=False,
    max_identifier_length=63,
    text_collation=' COLLATE "C"',
    secondary_indexes=True,
    bootstrap_lock="SELECT pg_advisory_xact_lock(5172935101)",
    shared=True,
    named_lock="SELECT pg_advisory_xact_lock(hashtextextended(?, 0))",
)
#: First key of the advisory locks that tie an id lease to its transaction.
LEASE_LOCK_CLASS = 1398230065
#: A lease (row of ``id_leases``) is alive while its transaction holds this lock.
_LEASE_ALIVE = (
    "EXISTS (SELECT 1 FROM pg_locks k WHERE k.locktype = 'advisory' AND k.granted "
    f"AND k.classid = CAST({LEASE_LOCK_CLASS} AS oid) AND k.objid = CAST(l.key AS oid) "
    "AND k.objsubid = 2)"
)

#: How long a read waits for a table locked by an uncommitted change.
READ_LOCK_TIMEOUT = "10s"
#: Rows per CSV chunk sent to COPY (bounds the memory of the text form).
COPY_CHUNK_ROWS = 65536
_CSV_OPTIONS = pacsv.WriteOptions(include_header=False, quoting_style="all_valid")
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def _refuse_nul(target: str, data: pa.Table) -> None:
    """Raise naming the first text value holding NUL, which PostgreSQL text and JSON
    cannot (in JSON it is the escape ``\\u0000``)."""
    import pyarrow.compute as pc

    table = target.split(".")[-1].strip('"')
    for field in data.schema:
        if not pa.types.is_string(field.type) and not pa.types.is_large_string(field.type):
            continue
        column = data.column(field.name)
        found = pc.match_substring(column, "\x00")
        if sch.is_json_field(field):
            found = pc.or_(found, pc.match_substring(column, "\\u0000"))
        row = pc.index(found, True).as_py()
        if row >= 0:
            raise StoreError(
                f"table {table!r}, column {field.name!r} (row {row} of this write): PostgreSQL "
                "text cannot hold the NUL character (\\x00); remove it "
                "(text.replace('\\x00', '')) or store the value as bytes"
            )


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", url)


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    """Translate ``?`` placeholders to psycopg's ``%s`` (and escape ``%``),
    leaving quoted identifiers and literals alone."""
    out: list[str] = []
    quoted: str | None = None
    for ch in sql:
        if ch == "%":
            out.append("%%")
        elif quoted:
            quoted = None if ch == quoted else quoted
            out.append(ch)
        elif ch in "\"'":
            quoted = ch
            out.append(ch)
        else:
            out.append("%s" if ch == "?" else ch)
    return "".join(out)


def _csv_ready(data: pa.Table) -> pa.Table:
    """Binary columns as PostgreSQL's ``\\x`` hex text; everything else as is."""
    for i, f in enumerate(data.schema):
        if pa.types.is_binary(f.type):
            texts = [None if v is None else "\\x" + v.hex() for v in data.column(i).to_pylist()]
            data = data.set_column(i, pa.field(f.name, pa.string()), pa.array(texts, pa.string()))
    return data


def _infer_numeric(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())


def _result_column(column: psycopg.Column, values: list[Any]) -> tuple[pa.Field, pa.Array]:
    """Arrow field and array for one column of an arbitrary query result."""
    info = psycopg.postgres.types.get(column.type_code)
    if info is None:
        type_name = "unknown"
    elif column.type_code == info.array_oid:
        type_name = f"{info.name}[]"
    else:
        type_name = info.name
    logical = sch.logical_from_sql(type_name, column.precision, column.scale)
    if type_name == "numeric" and column.precision is None:
        array = _infer_numeric(values)
        return pa.field(column.name, array.type), array
    if logical.startswith("sql:"):
        if any(isinstance(v, list | dict) for v in values):  # arrays, composites
            logical = "json"
            values = [None if v is None else sch.json_dumps(v) for v in values]
        else:
            values = [None if v is None else str(v) for v in values]
    f = sch.arrow_field(column.name, logical)
    return f, pa.array(values, f.type)


def _rows_to_batch(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.RecordBatch:
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
    arrays = [pa.array(values, f.type) for values, f in zip(columns, schema, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


@contextlib.contextmanager
def _lock_timeouts() -> Iterator[None]:
    """Say what a read's lock timeout means."""
    try:
        yield
    except psycopg.errors.LockNotAvailable as exc:
        raise StoreError(
            f"a table this reads is being changed by a transaction not yet committed (a "
            f"reset or a new table version, perhaps by the run that reads it), and it waited "
            f"{READ_LOCK_TIMEOUT}: read the table after that run's next commit ({exc})"
        ) from exc


class _Pool:
    """A minimal thread-safe pool of idle connections."""

    def __init__(self, url: str, max_idle: int):
        self.url = url
        self.max_idle = max_idle
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> psycopg.Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and not conn.broken:
                    return conn
        try:
            conn = psycopg.connect(self.url, autocommit=False, connect_timeout=30)
        except psycopg.Error as exc:
            reason = str(exc).strip()
            if "Is the server running" not in reason:  # (psycopg's own hint otherwise)
                reason += " (check the URL's user, password and database)"
            raise StoreError(f"cannot connect to PostgreSQL at {redact(self.url)}: {reason}") from exc
        conn.execute("SET TIME ZONE 'UTC'")
        conn.commit()
        return conn

    def put(self, conn: psycopg.Connection) -> None:
        reusable = (
            not conn.closed
            and not conn.broken
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
        )
        with self._lock:
            if reusable and not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresSession(Session):
    """A transaction on a pooled connection."""

    dialect = DIALECT
    errors = (psycopg.Error,)

    def __init__(self, pool: _Pool, conn: psycopg.Connection, *, read_only: bool, snapshot: bool):
        self._pool = pool
        self._conn: psycopg.Connection | None = conn
        self._names = itertools.count(1)
        if snapshot:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        elif read_only:
            conn.execute("SET TRANSACTION READ ONLY")
        if snapshot or read_only:
            # a reader blocked by a table change not yet committed (a reset or a new
            # version, maybe by the very run that reads) gives up instead of hanging
            conn.execute(f"SET LOCAL lock_timeout = '{READ_LOCK_TIMEOUT}'")

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None:
            raise StoreError("the PostgreSQL session is closed")
        return self._conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.conn.cursor() as cur, _lock_timeouts():
            cur.execute(_pyformat(sql), list(params))
            return cur.rowcount

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur, _lock_timeouts():
            cur.execute(_pyformat(sql), list(params))
            return cur.fetchall()

    def fetch_arrow(self, sql: str) -> pa.Table:
        with self.conn.cursor() as cur:
            for json_type in ("json", "jsonb"):
                cur.adapters.register_loader(json_type, TextLoader)
            cur.execute(sql)
            if cur.description is None:
                return pa.table({})
            rows = cur.fetchall()
            columns = list(zip(*rows, strict=True)) if rows else [()] * len(cur.description)
            fields, arrays = [], []
            for column, values in zip(cur.description, columns, strict=True):
                f, array = _result_column(column, list(values))
                fields.append(f)
                arrays.append(array)
            return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def insert_arrow(self, target: str, data: pa.Table, *, every_column: bool = False) -> int:
        data = _csv_ready(data)
        columns = ", ".join(quote(c) for c in data.column_names)
        try:
            with (
                self.conn.cursor() as cur,
                cur.copy(f"COPY {target} ({columns}) FROM STDIN (FORMAT csv)") as copy,
            ):
                for batch in data.to_batches(max_chunksize=COPY_CHUNK_ROWS):
                    buffer = io.BytesIO()
                    pacsv.write_csv(batch, buffer, _CSV_OPTIONS)
                    copy.write(buffer.getbuffer())
        except (psycopg.errors.CharacterNotInRepertoire, psycopg.errors.UntranslatableCharacter):
            _refuse_nul(target, data)
            raise
        return data.num_rows

    def stage(self, data: pa.Table) -> str:
        # not a valid table name, so it never shadows a user table
        name = quote(f"stepwell-stage-{next(self._names)}")
        defs = ", ".join(
            f"{quote(f.name)} {self.dialect.sql_type(sch.logical_type(f))}" for f in data.schema
        )
        self.execute(f"CREATE TEMPORARY TABLE {name} ({defs}) ON COMMIT DROP")
        self.insert_arrow(name, data)
        self.execute(f"ANALYZE {name}")
        return name

    def unstage(self, relation: str) -> None:
        self.execute(f"DROP TABLE IF EXISTS {relation}")

    def stream(
        self, sql: str, params: Sequence[Any], schema: pa.Schema, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        cur = self.conn.cursor(name=f"stepwell_scan_{next(self._names)}", binary=True)
        try:
            with _lock_timeouts():
                cur.execute(_pyformat(sql), list(params))
            while rows := cur.fetchmany(batch_rows):
                yield _rows_to_batch(rows, schema)
        finally:
            if self._conn is not None and not self._conn.closed and not self._conn.broken:
                cur.close()

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.rollback()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.info.transaction_status != pq.TransactionStatus.IDLE and not conn.broken:
                try:
                    conn.rollback()
                except psycopg.Error:
                    conn.close()
            self._pool.put(conn)


class PostgresTransaction(SQLTransaction):
    """A transaction that, once it hands out ids, holds an id lease until it ends.

    Several hosts may write one PostgreSQL store, each handing out ids from its
    own clock, so a stream on one host must not read past ids another host has
    handed out but not committed, nor may a host hand out ids below rows a stream
    has read already (its clock may be behind). So before its first id a
    transaction (1) takes an advisory lock that lives exactly as long as it does,
    (2) in a transaction of its own, reads ``id_clock`` (an id at least as great
    as every committed one) with a row lock and records a lease with a floor
    above it, and hands out ids only above that floor; at commit it raises
    ``id_clock`` to its ids and drops its lease, atomically with its rows. A
    stream reads only below the smallest floor of a live lease (one whose lock is
    held), evaluated in the same snapshot as the rows it reads."""

    def __init__(self, session: Session, store: PostgresStore):
        super().__init__(session)
        self._store = store
        self._lease: int | None = None

    def lease_ids(self) -> str | None:
        if self._lease is not None:
            return None  # taken already: the ids handed out since lie above its floor
        with self._op("taking an id lease") as s:
            key = _lock_lease_key(s)
        floor = self._store._record_lease(key)
        self._lease = key
        return floor

    def commit(self) -> None:
        if self._lease is not None:
            with self._op("commit") as s:
                s.execute(
                    f"WITH ended AS (DELETE FROM {META}.id_leases WHERE key = ?) "
                    f'UPDATE {META}.id_clock SET value = GREATEST(value COLLATE "C", ?)',
                    [self._lease, ids.high_water()],
                )
        super().commit()


def _lock_lease_key(s: Session) -> int:
    """A random lease key, its advisory lock taken by the transaction of ``s``."""
    for _ in range(16):
        key = secrets.randbelow(2**31 - 1) + 1
        ((got,),) = s.fetchall(
            "SELECT pg_try_advisory_xact_lock(CAST(? AS int4), CAST(? AS int4))",
            [LEASE_LOCK_CLASS, key],
        )
        if got:
            return key
    raise StoreError("no free id lease key after 16 tries")


class PostgresStore(SQLStore):
    """Store in a PostgreSQL database: user tables in the default schema,
    bookkeeping in schema ``stepwell`` (created on open)."""

    dialect = DIALECT

    def __init__(self, url: str, *, max_idle_connections: int = 8):
        self.url = url
        self._pool = _Pool(url, max_idle_connections)
        super().__init__()
        with self._autocommit() as s:
            # No id may go below one a stream has read; in a store made before id
            # leases only the recorded stream positions say how far that is.
            s.execute(
                f'UPDATE {META}.id_clock SET value = GREATEST(value COLLATE "C", ('
                f'SELECT max(GREATEST(last_id COLLATE "C", CASE WHEN order_by = '
                f"'{ID_COLUMN}' THEN value #>> '{{}}' END)) FROM {META}.positions))"
            )

    def _new_session(
        self, *, read_only: bool = False, snapshot: bool = False, single: bool = False
    ) -> Session:
        conn = self._pool.get()
        try:
            return PostgresSession(self._pool, conn, read_only=read_only, snapshot=snapshot)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"PostgreSQL at {redact(self.url)}: {exc}") from exc

    def transaction(self) -> Transaction:
        return PostgresTransaction(self._session(), self)

    def _record_lease(self, key: int) -> str:
        """Record lease ``key`` (its lock held); returns its floor."""
        with self._autocommit() as s:
            # the row lock waits for transactions raising the clock as they commit
            ((floor,),) = s.fetchall(
                f"WITH clock AS (SELECT value FROM {META}.id_clock FOR UPDATE) "
                f"INSERT INTO {META}.id_leases (key, floor, pid, created_at) "
                f'SELECT ?, GREATEST(value COLLATE "C", ?), ?, now() FROM clock RETURNING floor',
                [key, ids.high_water(), os.getpid()],
            )
        return floor

    def _stream_bound(self) -> tuple[str, list[Any]] | None:
        # Leases whose lock is free are over, and go: their transaction rolled back
        # (or its host is gone), or it committed, and then a snapshot taken after
        # this sees its rows (PostgreSQL releases locks once a commit is visible).
        with self._autocommit() as s:
            s.execute(f"DELETE FROM {META}.id_leases l WHERE NOT {_LEASE_ALIVE}")
        return f'SELECT min(floor COLLATE "C") FROM {META}.id_leases', []

    @contextlib.contextmanager
    def run_lock(self, step: str) -> Iterator[None]:
        """A session-level advisory lock keyed by the step's name, on a connection
        kept out of the pool for the run (if the process dies, PostgreSQL drops the
        connection and with it the lock)."""
        conn = self._pool.get()
        key = f"stepwell-run:{step}"
        try:
            try:
                (got,) = conn.execute(
                    "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", [key]
                ).fetchone()
                conn.commit()
            except psycopg.Error as exc:
                conn.close()
                raise StoreError(f"PostgreSQL at {redact(self.url)}: {exc}") from exc
            if not got:
                raise StoreError(
                    f"{RUN_LOCK_BUSY}, so this run did nothing (one run of a step at a time "
                    "keeps its stream positions and state exactly-once): wait for that run to end"
                )
            yield
        finally:
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock_all()")
                    conn.commit()
                self._pool.put(conn)

    def _close_backend(self) -> None:
        self._pool.close()
