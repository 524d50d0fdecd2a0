"""A run's staged effects: the one place they become a store transaction.

Writes go into an open store transaction as they arrive (so a long run's
output never has to fit in memory), and nothing is visible to anyone else
until ``commit`` adds the stream positions, state and run-record fields and
commits all of it at once. ``rollback`` (or the host dying) discards it all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from stepwell.store import ids, visibility
from stepwell.store.base import ID_COLUMN, RunRecord, Store, StreamPosition, Transaction
from stepwell.store.schema import normalize_column


class StagedRun:
    def __init__(
        self,
        store: Store,
        run_id: str,
        step: str,
        *,
        unique_on: Mapping[str, Sequence[str]] | None = None,
        column_types: Mapping[str, Mapping[str, pa.DataType]] | None = None,
        on_commit: Callable[[set[str]], None] | None = None,
        unrecorded: RunRecord | None = None,
    ):
        self.store = store
        self.run_id = run_id
        self.step = step
        self.rows_out = 0  # rows written, including staged ones
        self.committed_rows_out = 0
        #: rows read as of the last commit point (kept by the run's worker session)
        self.committed_rows_in = 0
        self._unique_on = dict(unique_on or {})
        self._column_types = dict(column_types or {})
        self._tx: Transaction | None = None
        #: tables whose stream order the open transaction has recorded
        self._orders_recorded: set[str] = set()
        #: called after each commit with the tables that got new rows in it
        self.on_commit = on_commit
        self._tables_with_rows: set[str] = set()
        #: the run's record while it is not in the store yet: the run's first commit
        #: (or ``record``) writes it, so a short run costs one statement, not two
        self.unrecorded = unrecorded

    def record(self) -> None:
        """Write the run's record now, if it is not in the store yet."""
        if self.unrecorded is not None:
            self.store.create_run(self.unrecorded)
            self.unrecorded = None

    def close_record(self, run_fields: Mapping[str, Any]) -> None:
        """Write the run record's final ``run_fields`` on their own (nothing staged:
        a record not written yet may be written with others, ``create_run_later``)."""
        if self.unrecorded is not None:
            self.store.create_run_later(dataclasses.replace(self.unrecorded, **run_fields))
            self.unrecorded = None
        else:
            self.store.update_run(self.run_id, **run_fields)

    def tx(self) -> Transaction:
        """The run's open transaction (opened by its first write). The run's record
        is written before it opens: a record written while it is open would be
        invisible to it (snapshot isolation), so the commit could not update it."""
        if self._tx is None:
            self.record()
            self._tx = self.store.transaction()
        return self._tx

    def _new_ids(self, n: int) -> pa.Array:
        """Ids for ``n`` new rows. The transaction's first ones wait for its id
        lease (on a store several hosts share): every id after it is greater."""
        if n and (floor := self.tx().lease_ids()) is not None:
            ids.advance_past(floor)
        return visibility.new_ids_in_flight(self, n)

    @property
    def open(self) -> bool:
        return self._tx is not None

    # -- writes ----------------------------------------------------------
    def prepare(
        self,
        data: pa.Table,
        *,
        id_column: str | None = "patterns_id",
        add_created: str | None = None,
        schema: Mapping[str, pa.DataType] | None = None,
    ) -> pa.Table:
        """Cast to declared column types and add the id / created-at columns."""
        for name, type_ in (schema or {}).items():
            if name in data.column_names and data.schema.field(name).type != type_:
                index = data.column_names.index(name)
                try:
                    # from its stored form (a UUID as its text, not its 16 bytes)
                    _, column = normalize_column(data.schema.field(name), data.column(name))
                    column = column.cast(type_)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ValueError(f"field {name!r} does not fit its declared type {type_}: {exc}") from None
                data = data.set_column(index, pa.field(name, type_), column)
        if add_created:
            now = pa.array([dt.datetime.now(dt.UTC)] * data.num_rows, pa.timestamp("us", "UTC"))
            data = _put_column(data, add_created, now)
        if id_column:
            data = _put_column(data, id_column, self._new_ids(data.num_rows))
        return data

    def write(
        self,
        table: str,
        data: pa.Table,
        *,
        mode: str = "append",
        unique_on: Sequence[str] | None = None,
        id_column: str | None = "patterns_id",
        add_created: str | None = None,
        ordering: str | None = None,
        schema: Mapping[str, pa.DataType] | None = None,
    ) -> int:
        """Stage rows of ``table``; ``ordering`` names the column the writer says
        strictly increases (``init(strictly_monotonic_ordering=...)``)."""
        unique_on = list(unique_on or self._unique_on.get(table) or []) or None
        declared = dict(self._column_types.get(table, {}))
        declared.update(schema or {})
        data = self.prepare(data, id_column=id_column, add_created=add_created, schema=declared)
        if ordering and data.num_rows and ordering not in data.column_names:
            raise ValueError(
                f"table {table!r}: init(strictly_monotonic_ordering={ordering!r}) names no "
                f"column of the rows written (columns: {', '.join(data.column_names)})"
            )
        if mode == "upsert":
            if not unique_on:
                raise ValueError(
                    f"upsert into {table!r} needs unique_on columns: declare them for the "
                    "table or its schema in the app file, or pass them to init(unique_on=[...])"
                )
            written = self.tx().upsert(table, data, unique_on)
        elif mode == "append":
            written = self.tx().append(table, data, unique_on)
        else:
            raise ValueError(f"unknown write mode {mode!r}")
        self.rows_out += written
        if written:
            self._tables_with_rows.add(table)
        # Patterns: the ordering the writer names, else a monotonic id under another
        # name (else a created-at column, when there is no id) fills the schema's
        # ordering role, so streams of a table without patterns_id go by it when they
        # name no order; it outlives this run, so the store keeps it
        order = ordering or id_column or add_created
        if written and order and order != ID_COLUMN and table not in self._orders_recorded:
            self.tx().set_stream_order(table, order)
            self._orders_recorded.add(table)
        return written

    def truncate(self, table: str) -> None:
        self.tx().truncate(table)

    def reset(self, table: str) -> int:
        return self.tx().reset(table)

    def change_rows(self, table: str, statement: str) -> int:
        """An UPDATE or DELETE of ``table`` (checked beforehand); the rows changed."""
        changed = self.tx().change_rows(table, statement)
        if changed:
            self._tables_with_rows.add(table)  # its readers hear of the change at commit
        return changed

    def activate_version(self, table: str, version: int) -> None:
        self.tx().activate_version(table, version)

    def query(self, sql: str) -> pa.Table:
        return self._tx.query(sql) if self._tx is not None else self.store.query(sql)

    # -- commit points ---------------------------------------------------
    def commit(
        self,
        positions: Sequence[Mapping[str, Any]] | None,
        state: Mapping[str, Any] | None,
        run_fields: Mapping[str, Any] | None = None,
    ) -> None:
        if self._tx is None and positions is None and state is None:
            # nothing was staged: the run record's fields are one statement
            if run_fields:
                self.close_record(run_fields)
            return
        if self._tx is None:  # state or positions only: the record goes in with them
            self._tx = self.store.transaction()
        tx = self._tx
        if positions is not None:
            tx.replace_positions(self.step, [
                StreamPosition(
                    self.step, p["table"], tuple(p["order_by"]), int(p["table_version"]),
                    p["value"], p["last_id"],
                )
                for p in positions
            ])  # fmt: skip
        if state is not None:
            tx.set_state(self.step, dict(state))
        if self.unrecorded is not None:
            tx.create_run(dataclasses.replace(self.unrecorded, **(run_fields or {})))
        elif run_fields:
            tx.update_run(self.run_id, **run_fields)
        try:
            tx.commit()
            self.unrecorded = None
        finally:
            self._tx = None
            self._orders_recorded.clear()
            visibility.in_flight_done(self)
        self.committed_rows_out = self.rows_out
        tables, self._tables_with_rows = self._tables_with_rows, set()
        if tables and self.on_commit is not None:
            self.on_commit(tables)

    def rollback(self) -> None:
        self._orders_recorded.clear()
        if self._tx is not None:
            tx, self._tx = self._tx, None
            try:
                tx.rollback()
            finally:
                visibility.in_flight_done(self)
        self.rows_out = self.committed_rows_out
        self._tables_with_rows.clear()


def _put_column(data: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Set ``name`` to ``values``, replacing a column of that name if present."""
    if name in data.column_names:
        index = data.column_names.index(name)
        return data.set_column(index, pa.field(name, values.type), values)
    return data.append_column(pa.field(name, values.type), values)
