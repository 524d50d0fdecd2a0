"""The node API user code sees: ``Table``, ``Stream``, ``State``, ``Parameter``.

Inside a worker this module is also importable as ``patterns``, so nodes
written for Patterns run unchanged; ``from stepwell import Table`` works too.
Every call is served by the host over the wire protocol; nothing here touches
the store directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from collections.abc import Iterator
from typing import Any

from stepwell.runtimes.node.records import RecordError, records_to_arrow, to_records
from stepwell.runtimes.node.session import NodeSession, SavePoint
from stepwell.store.schema import is_json_field, to_pylist

__all__ = [
    "Connection", "Parameter", "State", "Stream", "Table", "TableVersion", "RecordError",
    "respond_to_request",
]  # fmt: skip

ID_COLUMN = "patterns_id"
#: Rows buffered per table before they are shipped to the host as one Arrow batch.
FLUSH_ROWS = 20_000
#: consume_with_rollback() commits at most this often (records / seconds).
GROUP_COMMIT_ROWS, GROUP_COMMIT_SECONDS = 10_000, 1.0

_session: NodeSession | None = None


def _current() -> NodeSession:
    if _session is None:
        raise RuntimeError(
            "the stepwell node API only works inside a run: use `stepwell run APP STEP`"
        )
    return _session


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Table:
    """A table the node reads (``mode="r"``, the default) or writes (``mode="w"``)."""

    def __init__(
        self,
        name: str,
        mode: str = "r",
        description: str | None = None,
        schema: str | dict | None = None,
        required: bool = True,
    ):
        if mode not in ("r", "w"):
            raise ValueError(f"Table({name!r}): mode must be 'r' or 'w', not {mode!r}")
        session = _current()
        self.port = name
        self.table_name = session.resolve_table(name)
        self.mode = mode
        self.description = description
        self.required = required
        # An optional port the app file leaves unconnected (the step declares its
        # ports, not this one): as in Patterns, reads see nothing, writes go nowhere.
        declared = {**session.inputs, **session.outputs}
        self._connected = required or not declared or name in declared
        self._session = session
        self._buffer: list[dict[str, Any]] = []
        #: (file, line) of the code that wrote the buffer's first row
        self._buffer_from: tuple[str, int] | None = None
        self._buffer_mode = "append"
        self._rows_written = 0
        self._options: dict[str, Any] = {
            "id_column": ID_COLUMN,
            "unique_on": session.table_keys.get(self.table_name),
            "add_created": None,
            "strictly_monotonic_ordering": None,
            "schema": schema,
        }
        previous = session.tables.get(name)
        if previous is not None and previous is not self:
            previous._send_buffer()  # a second Table() of one name must not drop rows
        session.tables[name] = self

    # -- identity --------------------------------------------------------
    @property
    def sql_name(self) -> str:
        return f'"{self.table_name}"'

    def __str__(self) -> str:
        return self.sql_name

    def __repr__(self) -> str:
        return f"Table({self.port!r}, mode={self.mode!r})"

    @property
    def is_connected(self) -> bool:
        return self._connected

    def _info(self) -> dict[str, Any]:
        if not self._connected:
            return {"exists": False, "row_count": 0}
        return self._session.table_info(self.table_name)

    @property
    def exists(self) -> bool:
        return bool(self._info().get("exists"))

    @property
    def record_count(self) -> int:
        return int(self._info().get("row_count", 0))

    @property
    def schema(self) -> dict[str, str] | None:
        info = self._info()
        return info.get("columns") if info.get("exists") else None

    # -- reading ---------------------------------------------------------
    def _batches(self, batch_rows: int):
        if not self._connected:
            return
        for _, batch in self._session.scan(self.table_name, None, None, batch_rows):
            yield batch

    def read(self, as_format: str = "records", chunksize: int | None = None) -> Any:
        """All committed rows as records (list of dicts) or a DataFrame
        (``as_format="dataframe"``); with ``chunksize``, an iterator of chunks."""
        # Whole-table reads come in large batches (fewer round trips); chunked
        # reads in batches near the chunk size, so memory follows the chunk.
        batch_rows = max(chunksize, 10_000) if chunksize else 1_000_000
        return _shape(self._batches(batch_rows), as_format, chunksize)

    def read_dataframe(self, chunksize: int | None = None) -> Any:
        return self.read("dataframe", chunksize)

    def read_sql(self, sql: str, as_format: str = "records", chunksize: int | None = None) -> Any:
        """Run a SELECT over this node's own tables (by port name or ``str(table)``)."""
        return _shape(iter(self._session.read_sql(sql).to_batches()), as_format, chunksize)

    def as_stream(self, order_by: str | None = None, starting_value: Any = None) -> Stream:
        """The table's stream in ``order_by`` order. A run has one stream per table
        and order (as in Patterns): asking again returns it, where it is now, so no
        second stream can commit an older position over the first one's progress."""
        if not order_by:
            order_by = self._default_order()
        for stream in self._session.streams:
            if stream.table.table_name == self.table_name and stream.order_by_field == (
                order_by or ID_COLUMN
            ):
                return stream
        return Stream(self, order_by, starting_value)

    def _default_order(self) -> str | None:
        """The order of a table without ``patterns_id`` (None: go by patterns_id): its
        schema's field roles, else the column ``init(add_monotonic_id=...)`` (or
        ``add_created=...``) filled when it was written, as in Patterns."""
        if not self._connected:
            return None
        info = self._session.table_info(self.table_name, count=False)
        if not info.get("exists") or ID_COLUMN in (info.get("columns") or {}):
            return None
        return self._session.table_orders.get(self.table_name) or info.get("stream_order")

    def _has_ids(self) -> bool:
        """Whether the table has its ``patterns_id`` column (or does not exist yet)."""
        if not self._connected:
            return True
        info = self._session.table_info(self.table_name, count=False)
        return not info.get("exists") or ID_COLUMN in (info.get("columns") or {})

    # -- writing ---------------------------------------------------------
    def _check_writable(self, what: str) -> None:
        if self.mode != "w":
            raise PermissionError(
                f"Table({self.port!r}) is read-only; open it with Table({self.port!r}, 'w') "
                f"to {what}"
            )

    def init(
        self,
        schema: str | dict | None = None,
        schema_hints: dict | None = None,
        unique_on: str | list[str] | None = None,
        add_created: str | None = None,
        add_monotonic_id: str | None = ID_COLUMN,
        auto_indexes: bool = True,
        strictly_monotonic_ordering: str | None = None,
    ) -> None:
        """Set how rows are written: ``unique_on`` (needed by ``upsert``), the
        monotonic id column (None disables ``patterns_id``), a created-at column,
        and the column whose values strictly increase row by row
        (``strictly_monotonic_ordering``, Patterns' field role of that name).

        That column is the table's default stream order only when the table has
        no ``patterns_id``: the id is given at write and a stream never reads past
        an id still in flight, so it increases in the order rows become visible,
        which a column of the rows' own values cannot promise (a run committing
        later with a smaller value would land behind a stream's position and never
        be read). With ``patterns_id`` the named column is recorded, not used."""
        if isinstance(unique_on, str):
            unique_on = [unique_on]
        if strictly_monotonic_ordering is not None and not isinstance(strictly_monotonic_ordering, str):
            raise TypeError(
                f"Table({self.port!r}).init(strictly_monotonic_ordering=...) takes one column "
                f"name, not {type(strictly_monotonic_ordering).__name__}"
            )
        self._options.update(
            unique_on=unique_on,
            add_created=add_created,
            strictly_monotonic_ordering=strictly_monotonic_ordering,
            id_column=add_monotonic_id,
            schema=schema if schema is not None else self._options["schema"],
            schema_hints=schema_hints,
        )

    def _add(self, records: Any, mode: str) -> None:
        data = to_records(records)
        if mode != self._buffer_mode:
            self._send_buffer()
            self._buffer_mode = mode
        if isinstance(data, list):
            if not self._buffer:
                self._buffer_from = _user_line()
            self._buffer.extend(data)
            if len(self._buffer) >= FLUSH_ROWS:
                self._send_buffer()
        else:  # an Arrow table (from a DataFrame): keep order, ship as is
            self._send_buffer()
            self._ship(data, mode, _user_line())

    def append(self, records: Any) -> None:
        """Append a dict, a list of dicts or a DataFrame."""
        if type(records) is dict and self.mode == "w" and self._buffer_mode == "append":
            # the per-row hot path of stream loops
            buffer = self._buffer
            if not buffer:
                self._buffer_from = _user_line()
            buffer.append(records.copy())
            if len(buffer) >= FLUSH_ROWS:
                self._send_buffer()
            return
        self._check_writable("append rows")
        self._add(records, "append")

    def upsert(self, records: Any) -> None:
        """Insert or replace rows by the ``unique_on`` columns given to ``init``."""
        self._check_writable("upsert rows")
        # a schema named in code (Table(..., schema="Order")) may declare them: the
        # host knows the app's schemas and says so if it does not
        if not self._options["unique_on"] and not isinstance(self._options["schema"], str):
            raise ValueError(
                f"Table({self.port!r}).upsert needs unique_on: call "
                f"Table({self.port!r}, 'w').init(unique_on=[...]) first"
            )
        self._add(records, "upsert")

    def replace(self, records: Any) -> None:
        """Point the table at a new version holding exactly ``records``."""
        self.reset()
        self.append(records)

    def truncate(self) -> None:
        """Delete all rows (keeps the table and its schema)."""
        self._check_writable("truncate it")
        self._buffer.clear()
        if self._connected:
            self._session.change("truncate", table=self.table_name)

    def reset(self) -> None:
        """Start a new empty version; earlier versions are kept."""
        self.create_new_version()

    # -- versions (Patterns' table-version API) ----------------------------
    def get_active_version(self) -> TableVersion | None:
        """The version reads see now (committed), None if the table does not exist."""
        info = self._info()
        if not info.get("exists"):
            return None
        return TableVersion(self.table_name, int(info["version"]), info.get("columns"),
                            int(info.get("row_count") or 0))  # fmt: skip

    def has_active_version(self) -> bool:
        return self.get_active_version() is not None

    def create_new_version(self) -> TableVersion:
        """Point the table at a new empty version (at this run's next commit);
        earlier versions are kept."""
        self._check_writable("start a new version of it")
        self._buffer.clear()
        version = 1
        if self._connected:
            reply, _ = self._session.change("reset", table=self.table_name)
            version = int(reply.get("version") or 1)
        return TableVersion(self.table_name, version, None, 0)

    def set_active_version(self, version: TableVersion | int) -> None:
        """Make an earlier (or later) version the active one again (at the next commit)."""
        self._check_writable("change its active version")
        number = version.version if isinstance(version, TableVersion) else int(version)
        self._send_buffer()
        if self._connected:
            self._session.change("activate_version", table=self.table_name, version=number)

    def signal_create(self) -> None:
        """Kept for Patterns code: downstream steps hear of every commit anyway."""

    def signal_update(self) -> None:
        """Kept for Patterns code: downstream steps hear of every commit anyway."""

    def signal_reset(self) -> None:
        """Kept for Patterns code: downstream steps hear of every commit anyway."""

    def execute_sql(self, sql: str) -> int:
        """Change this table with one SQL statement over the step's tables (named by
        port, ``str(table)`` or ``{{ Table("x") }}``): ``INSERT INTO <this table>
        [(columns)] SELECT ... | VALUES ...`` appends rows, ``CREATE [OR REPLACE]
        TABLE <this table> AS SELECT ...`` replaces its contents (a new version),
        ``UPDATE <this table> SET ...`` and ``DELETE FROM <this table>`` change
        rows in place. New rows are written like ``append``'s (``patterns_id``,
        ``init`` options); everything commits with the run. Returns the number of
        rows written, updated or deleted."""
        self._check_writable("change it with SQL")
        if not self._connected:
            return 0
        self._send_buffer()  # rows appended before come first, and the query sees them
        reply, data = self._session.table_sql(sql, self.table_name)
        kind, columns = reply["kind"], reply.get("columns") or []
        if data is None:  # UPDATE / DELETE: done by the host in the run's transaction
            return int(reply.get("rows") or 0)
        if columns:
            if len(columns) != data.num_columns:
                raise ValueError(
                    f"execute_sql on {self.table_name!r}: {len(columns)} column names for "
                    f"{data.num_columns} values per row"
                )
            data = data.rename_columns(columns)
        if kind == "replace":
            self.reset()
        if data.num_rows:
            self._ship(data, "append", _user_line())
        return data.num_rows

    def flush(self) -> None:
        """A commit point: everything written and consumed so far becomes durable."""
        self._session.commit()

    def _send_buffer(self) -> None:
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        try:
            data = records_to_arrow(rows, self.table_name, self._rows_written)
        except RecordError as exc:  # (rows are checked when sent, in batches)
            if self._buffer_from is None:
                raise
            raise RecordError(f"{exc} ({self._origin(self._buffer_from)})") from None
        self._ship(data, self._buffer_mode, self._buffer_from)

    def _origin(self, where: tuple[str, int]) -> str:
        """Where rows came from, as errors about them say it."""
        root = str(self._session.start.get("app_root") or "").rstrip("/") + "/"
        file = where[0][len(root):] if where[0].startswith(root) else where[0]
        return f"in the rows written from {file}:{where[1]} on"

    def _ship(self, data: Any, mode: str, where: tuple[str, int] | None) -> None:
        if not self._connected:
            return
        # the host's own checks of these rows (schema, types) then name that line too
        origin = self._origin(where) if where is not None else None
        self._session.write(self.table_name, data, mode=mode, origin=origin, **self._options)
        self._rows_written += data.num_rows


def _user_line() -> tuple[str, int] | None:
    """(file, line) of the nearest caller outside this module."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else None


def _shape(batches: Iterator, as_format: str, chunksize: int | None) -> Any:
    import pyarrow as pa

    if as_format not in ("records", "dataframe"):
        raise ValueError(f"as_format must be 'records' or 'dataframe', not {as_format!r}")

    def convert(table: pa.Table) -> Any:
        if as_format != "dataframe":
            return to_pylist(table)
        frame = table.to_pandas()
        for f in table.schema:  # JSON columns hold Python values, as in records
            if is_json_field(f):
                values = table.column(f.name).to_pylist()
                frame[f.name] = [None if v is None else json.loads(v) for v in values]
        return frame

    if chunksize:

        def chunks() -> Iterator[Any]:
            pending: list = []
            count = 0
            for batch in batches:
                pending.append(batch)
                count += batch.num_rows
                while count >= chunksize:
                    table = pa.Table.from_batches(pending)
                    yield convert(table.slice(0, chunksize))
                    rest = table.slice(chunksize)
                    pending, count = rest.to_batches(), rest.num_rows
            if count:
                yield convert(pa.Table.from_batches(pending))

        return chunks()
    collected = list(batches)
    if not collected:
        return convert(pa.table({})) if as_format == "dataframe" else []
    return convert(pa.Table.from_batches(collected))


class TableVersion:
    """One version of a table: ``version`` counts up with each new version."""

    def __init__(self, table: str, version: int, schema: dict[str, str] | None, record_count: int):
        self.name = table
        self.version = version
        self.storage = "stepwell"
        self.schema = schema
        self.record_count = record_count

    @property
    def exists(self) -> bool:
        return self.schema is not None

    def __repr__(self) -> str:
        return f"TableVersion({self.name!r}, version={self.version})"


class Stream:
    """Reads a table's rows exactly once across runs, in ``order_by`` order.

    A row counts as consumed when it is yielded; progress becomes durable at
    the next commit point. Ties in ``order_by`` are broken by ``patterns_id``.
    """

    def __init__(self, table: Table, order_by: str | None = None, starting_value: Any = None):
        self.table = table
        session = table._session
        self._session = session
        self.order_by_field = order_by or ID_COLUMN
        if self.order_by_field == ID_COLUMN:
            self.order_columns: tuple[str, ...] = (ID_COLUMN,)
        elif table._has_ids():
            self.order_columns = (self.order_by_field, ID_COLUMN)  # ties broken by id
        else:  # written with add_monotonic_id=None: the order column alone, strictly after
            self.order_columns = (self.order_by_field,)
        committed = session.committed_positions.get((table.table_name, self.order_columns))
        self._committed_position = committed
        if committed is None and starting_value is not None:
            committed = (None, starting_value, None)
        self._base = committed  # where this run's reading starts: (version, value, last_id)
        # The last yielded row is (batch, index): the position is only built when
        # asked for, so the per-row cost of the stream loop stays one store.
        self._batch: tuple[int, list, list | None] | None = None
        self._rows: list[dict[str, Any]] = []
        self._index = -1
        self._generation = 0
        session.streams.append(self)

    # positions -----------------------------------------------------------
    @property
    def _current(self) -> tuple[int, Any, Any] | None:
        if self._batch is None or self._index < 0:
            return None
        version, values, ids = self._batch
        return (version, values[self._index], ids[self._index] if ids else None)

    def current_record(self) -> dict[str, Any] | None:
        """The row last yielded (None before the first and after a rollback)."""
        if self._batch is None or self._index < 0:
            return None
        return self._rows[self._index]

    @property
    def unread(self) -> int:
        """Rows of the batch in hand not yielded yet."""
        return len(self._rows) - self._index - 1 if self._batch is not None else 0

    def _forget_current(self) -> None:
        self._batch = None
        self._index = -1

    def position_for_commit(self) -> tuple[int, Any, Any] | None:
        current = self._current or self._base
        if current is None or current[0] is None:
            return None
        return current

    def _committed(self) -> None:
        self._committed_position = self.position_for_commit()

    def _rolled_back(self) -> None:
        self._base = self._committed_position
        self._forget_current()
        self._generation += 1

    # consuming ---------------------------------------------------------
    def _after(self) -> Any:
        position = self._current or self._base
        if position is None:
            return None
        return [position[1], position[2]]

    def consume_records(self, with_metadata: bool = False) -> Iterator[dict[str, Any]]:
        """Yield each row not consumed before, oldest first."""
        if not self.table.is_connected:
            return
        generation = self._generation
        columns = list(self.order_columns)
        first = columns[0]
        has_tie = len(columns) > 1
        for version, batch in self._session.scan(self.table.table_name, columns, self._after()):
            if has_tie and ID_COLUMN not in batch.schema.names:
                raise ValueError(
                    f"table {self.table.table_name!r} has no {ID_COLUMN} column to break "
                    f"ties in order_by={first!r}; order by a unique column instead"
                )
            if first not in batch.schema.names:
                raise ValueError(
                    f"cannot stream table {self.table.table_name!r} by {first!r}: no such "
                    f"column (columns: {', '.join(batch.schema.names)})"
                )
            if first != ID_COLUMN and batch.column(first).null_count:
                raise ValueError(self._null_order_message(batch, first))
            rows = to_pylist(batch)
            if generation != self._generation:
                return  # rolled back: stop delivering from a stale position
            self._batch = (
                version,
                batch.column(first).to_pylist(),
                batch.column(ID_COLUMN).to_pylist() if has_tie else None,
            )
            self._rows = rows
            for index, row in enumerate(rows):
                if generation != self._generation:
                    return
                self._index = index
                if with_metadata:
                    yield {"record": row, "metadata": {"table": self.table.port,
                                                       "order_by": self.order_by_field}}
                else:
                    yield row

    __iter__ = consume_records

    def _null_order_message(self, batch: Any, column: str) -> str:
        index = batch.column(column).is_null().index(True).as_py()
        which = (f"the row with {ID_COLUMN} {batch.column(ID_COLUMN)[index].as_py()!r}"
                 if ID_COLUMN in batch.schema.names else "a row")  # fmt: skip
        return (
            f"cannot stream table {self.table.table_name!r} by {column!r}: {which} has no "
            f"value (null) in it, and a stream orders by that value to know which rows "
            f"it has read (a null row would be skipped once later rows are read); give "
            f"every row a {column}, or stream by {ID_COLUMN} (as_stream() with no order_by)"
        )

    def checkpoint(self) -> None:
        """A commit point: consumed rows and all writes so far become durable."""
        self._session.commit()

    def rollback(self) -> None:
        """Forget everything since the last commit point (rows are consumed again,
        writes since then are dropped)."""
        self._session.rollback()

    def rewind(self) -> None:
        """Consume the table again from its first row."""
        self._base = None
        self._forget_current()
        self._session.committed_positions.pop((self.table.table_name, self.order_columns), None)
        self._generation += 1

    def seek(self, value: Any) -> None:
        """Continue with rows whose order_by value is strictly greater than ``value``."""
        self._base = (self._version_hint(), value, None)
        self._forget_current()
        self._generation += 1

    def seek_position(self, position: tuple[int, Any, Any] | None) -> None:
        """Continue right after ``position`` (as ``_current`` gave it)."""
        self._base = position
        self._forget_current()
        self._generation += 1

    def _version_hint(self) -> int:
        info = self._session.table_info(self.table.table_name)
        return int(info.get("version", 1))

    @contextlib.contextmanager
    def consume_with_rollback(self) -> Iterator[Iterator[dict[str, Any]]]:
        """Consume rows; a row is done once the block asks for the next one. If the
        block raises, what the rows before the failing one did is committed, the
        failing row's own writes are dropped and it comes again next run (as if
        each row were a commit point); then the error goes on.

        Rows are committed in groups, not one by one: a failing row's writes are
        dropped from the worker's buffers (a save point after each row). Where that
        cannot be done (the row's writes already reached the host, or it used a
        second stream), the block rolls back to the last commit point instead."""
        session = self._session
        saved: SavePoint | None = None

        def records() -> Iterator[dict[str, Any]]:
            nonlocal saved
            since, last = 0, _now()
            for record in self.consume_records():
                yield record
                since += 1
                if since >= GROUP_COMMIT_ROWS or _now() - last > GROUP_COMMIT_SECONDS:
                    self.checkpoint()
                    since, last = 0, _now()
                saved = session.save_point(self, saved)

        try:
            yield records()
        except BaseException:
            if saved is None or not session.commit_to(saved):
                self.rollback()
            raise


def _now() -> float:
    import time

    return time.monotonic()


class State:
    """Small JSON-able values kept per step across runs, committed with its data."""

    def __init__(self) -> None:
        self._session = _current()

    def get(self) -> dict[str, Any]:
        return dict(self._session.state)

    def set(self, state: dict[str, Any]) -> None:
        self._session.state = dict(_jsonable(state))

    def get_value(self, key: str, default: Any = None) -> Any:
        return self._session.state.get(key, default)

    def set_value(self, key: str, value: Any) -> None:
        self._session.state[key] = _jsonable(value)
        self._session.state_changes += 1

    def get_datetime(self, key: str, default: Any = None) -> dt.datetime | None:
        value = self._session.state.get(key, default)
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value)
        return value

    def reset(self) -> None:
        """Clear all values and stream positions of this step (at the next commit);
        streams already made start again from the first row."""
        self._session.state = {}
        self._session.state_reset = True
        self._session.committed_positions.clear()
        for stream in self._session.streams:
            stream.rewind()

    def should_continue(
        self, pct_of_limit: float | None = None, seconds_till_limit: float | None = None
    ) -> bool:
        """False once the run nears its time limit: by default at 80 % of it or
        120 s before it, whichever is later (as in Patterns: a 60 s limit stops at
        48 s, a 1 h limit 120 s before its end)."""
        limit = self._session.time_limit
        if not limit:
            return True
        elapsed = self._session.elapsed()
        pct = 0.8 if pct_of_limit is None else pct_of_limit
        seconds = 120.0 if seconds_till_limit is None else seconds_till_limit
        if pct_of_limit is not None and seconds_till_limit is None:
            return elapsed < limit * pct
        if seconds_till_limit is not None and pct_of_limit is None:
            return elapsed < limit - seconds
        return elapsed < max(limit * pct, limit - seconds)

    def request_new_run(
        self, trigger_downstream: bool = True, wait_atleast_seconds: float | None = None
    ) -> None:
        """Ask for another run of this step after this one ends."""
        self._session.new_run_request = {
            "trigger_downstream": trigger_downstream,
            "wait_atleast_seconds": wait_atleast_seconds,
        }


#: Column of a respond webhook's rows that names the request to answer.
REQUEST_KEY_COLUMN = "patterns_request_key"


def respond_to_request(request_key: str, payload: Any) -> bool:
    """Answer the HTTP request of an ingest-and-respond webhook (``respond: true``):
    ``request_key`` is the ``patterns_request_key`` of the request's row and
    ``payload`` (JSON-serialisable) becomes the response body. Returns False when
    no request waits for that key (timed out, answered already, or the app is not
    running under ``stepwell serve``); the run log says so too."""
    if not isinstance(request_key, str) or not request_key:
        raise TypeError(f"respond_to_request: request_key must be the row's "
                        f"patterns_request_key (a string), got {request_key!r}")  # fmt: skip
    body = _jsonable(payload, "respond_to_request's payload")
    reply, _ = _current().link.call("respond", key=request_key, payload=body)
    return bool(reply.get("delivered"))


def _jsonable(value: Any, what: str = "State values") -> Any:
    """``value`` after a JSON round trip; rejects what would not survive one, early."""
    try:
        text = json.dumps(value, default=_state_default, allow_nan=False)
    except ValueError as exc:  # NaN and infinities: JSON has no such numbers
        raise TypeError(f"{what} must be JSON-serialisable: {exc} (NaN or infinity; use None "
                        "or a string instead)") from None  # fmt: skip
    except TypeError as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None
    return json.loads(text)


def _state_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class Connection(dict):
    """A parameter type for connection credentials: ``Parameter("db", type=Connection("postgres"))``
    returns a dict-like Connection of that kind."""

    def __init__(self, connection_type: str | None = None, values: dict | None = None):
        super().__init__(values or {})
        self.connection_type = connection_type


_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def _coerce(name: str, value: Any, type_: Any) -> Any:
    if value is None:
        return None
    try:
        if isinstance(type_, Connection):
            if isinstance(value, str):
                value = json.loads(value)
            return Connection(type_.connection_type, dict(value))
        if type_ is bool:
            if isinstance(value, str):
                if value.strip().lower() in _TRUE | _FALSE:
                    return value.strip().lower() in _TRUE
                raise ValueError(f"{value!r} is not true/false")
            return bool(value)
        if type_ is dt.datetime:
            if isinstance(value, dt.datetime):
                return value
            if isinstance(value, dt.date):
                return dt.datetime(value.year, value.month, value.day)
            return dt.datetime.fromisoformat(str(value))
        if type_ is dt.date:
            if isinstance(value, dt.datetime):
                return value.date()
            if isinstance(value, dt.date):
                return value
            return dt.date.fromisoformat(str(value))
        if type_ is list:
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("["):
                    return list(json.loads(text))
                return [part.strip() for part in text.split(",") if part.strip()]
            return list(value)
        if type_ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")  # int() would drop the fraction
        return type_(value)
    except (TypeError, ValueError) as exc:
        type_name = getattr(type_, "__name__", type(type_).__name__)
        raise ValueError(
            f"parameter {name!r}: cannot use {value!r} as {type_name} ({exc}); fix its value "
            f"under the step's parameters in the app file"
        ) from None


def Parameter(  # noqa: N802 - the Patterns API spells it as a class
    name: str,
    description: str | None = None,
    type: Any = str,  # noqa: A002 - Patterns' keyword
    default: Any = MISSING,
) -> Any:
    """The value of a step parameter, converted to ``type``."""
    session = _current()
    session.parameters_read.add(name)
    parameters = session.parameters
    if name in parameters:
        return _coerce(name, parameters[name], type)
    if default is MISSING:
        raise ValueError(
            f"parameter {name!r} has no value: set it under the step's `parameters:` in the "
            f"app file (or `parameter_values:` in graph.yml), or give it a default"
        )
    return _coerce(name, default, type)
