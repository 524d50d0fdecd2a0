"""The host's side of one worker run: answer the worker's requests until ``done``.

Every data request (scan, write, read_sql, commit, ...) is served here against
the store; writes and positions go through the run's ``StagedRun`` so they
commit together. The session ends with an outcome the runner turns into the
run's final status.
"""

from __future__ import annotations

import datetime as dt
import itertools
import select
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from stepwell.engine.logs import Redactor, RunLog
from stepwell.engine.staging import StagedRun
from stepwell.runtimes.sqlcheck import restrict_select, table_statement, unwritten_tables
from stepwell.sandbox.launcher import WorkerProcess
from stepwell.sandbox.policy import MAX_STOPPED_AT, TIME_LIMIT_GRACE
from stepwell.sandbox.protocol import (
    NOTIFY_OPS,
    PeerGone,
    ProtocolError,
    decode_table,
)
from stepwell.store.base import ID_COLUMN, Store, active_positions
from stepwell.store.sql import quote

#: Seconds after which a run still in progress gets its ``running`` record (a
#: shorter one is recorded once, with its end; see ``StagedRun.unrecorded``).
RECORD_AFTER = 0.2
#: Requests still served after a deferred write error.
_AFTER_WRITE_ERROR_OPS = frozenset({"done", "log", "rollback"})


class RequestFailed(Exception):
    """The answer to a respond webhook's request when the run handling its row failed
    before answering (the message is the run's error, secrets masked)."""


@dataclass
class DeclaredSchema:
    """A Common Model schema from the app file, as column types and keys."""

    types: dict[str, pa.DataType]
    unique_on: list[str] = field(default_factory=list)
    #: the default stream order: its strictly_monotonic_ordering field, else its
    #: created_ordering field (Patterns' field roles), else None
    order_by: str | None = None


@dataclass
class Outcome:
    """How the worker run ended (before the runner maps it to a run status)."""

    status: str  # succeeded | failed | timed_out | killed
    error: str | None = None
    traceback: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: the run-record fields committed with the run's effects, when it succeeded
    fields: dict[str, Any] | None = None


class WorkerSession:
    def __init__(
        self,
        store: Store,
        staged: StagedRun,
        worker: WorkerProcess,
        log: RunLog,
        redact: Redactor,
        *,
        deadline: float | None,
        limit_note: str = "",
        schemas: Mapping[str, DeclaredSchema] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        on_respond: Callable[[str, Any], bool] | None = None,
    ):
        self.store = store
        self.staged = staged
        self.worker = worker
        self.log = log
        self.redact = redact
        self.deadline = deadline
        self.limit_note = limit_note
        self.schemas = dict(schemas or {})
        self.on_progress = on_progress
        self.on_respond = on_respond
        self.rows_in = 0
        self.committed_rows_in = 0
        self._scans: dict[int, _ScanAhead] = {}
        self._scan_ids = itertools.count(1)
        self._done: Outcome | None = None
        self._deferred_error: str | None = None
        #: the state and positions as last committed (first: as sent in ``start``, or
        #: as the worker fetched them with ``step_memory``)
        self._committed_state: Any = None
        self._committed_positions: Any = None
        #: the worker's last frame said the run imported numpy (pandas imports it too)
        self.imported_numpy = False
        #: (table, column) of streams whose null order values the log has been told of
        self._null_orders_said: set[tuple[str, str]] = set()
        #: tables the step read that do not exist, as told in the log
        self._missing_said: set[str] = set()

    # -- the loop --------------------------------------------------------
    def serve(self, start: dict[str, Any]) -> Outcome:
        channel = self.worker.channel
        # runtimes that know their tables up front confine the worker to them
        self._read_tables = start.get("read_tables")
        self._write_tables = start.get("write_tables")
        self._committed_state = start.get("state")
        self._committed_positions = start.get("positions")
        record_at = time.monotonic() + RECORD_AFTER
        try:
            channel.send(start)
            while self._done is None:
                if self.staged.unrecorded is not None:
                    self._record_when_due(record_at)
                if self.deadline is not None:
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    channel.sock.settimeout(remaining)
                message, body = channel.recv()
                op = message.get("op")
                if self._deferred_error is not None and op not in _AFTER_WRITE_ERROR_OPS:
                    # a write already failed: refuse further work until rollback or done
                    if op not in NOTIFY_OPS:
                        channel.send({"ok": False, "error": self._deferred_error})
                    continue
                reply, reply_body = self._dispatch(op, message, body)
                if op not in NOTIFY_OPS:
                    channel.send(reply, reply_body)
                elif not reply.get("ok") and op == "done":  # the final commit failed
                    self.staged.rollback()
                    self._done = Outcome("failed", reply.get("error"))
                elif not reply.get("ok"):
                    # writes are not answered (so host and worker overlap): report the
                    # failure on the worker's next request instead, naming the user's
                    # line the rows came from when the worker said it
                    origin = message.get("origin")
                    error = reply.get("error")
                    self._deferred_error = f"{error} ({origin})" if isinstance(origin, str) else error
        except TimeoutError:
            return self._stop_at_time_limit()
        except (PeerGone, ConnectionError):  # ConnectionError: it died before reading
            self.staged.rollback()
            if self._done is not None:
                return self._done
            exit_outcome = getattr(self.worker, "exit_outcome", None)
            if exit_outcome is not None:  # names the limit that killed it, if any
                status, reason = exit_outcome()
                return Outcome(status, self.redact(self._with_kill_note(reason)))
            return Outcome("killed", self._death_reason())
        except ProtocolError as exc:
            self.worker.kill()
            self.staged.rollback()
            return Outcome("failed", f"the worker broke the wire protocol: {exc}")
        finally:
            self._close_scans()
        return self._done

    def _stop_at_time_limit(self) -> Outcome:
        """The run is past its time limit: nothing of it is kept. Ask the step's code
        to stop where it is (the error then says where that was: file, line, input
        row), give it ``TIME_LIMIT_GRACE`` seconds to say so, then kill the worker."""
        self.staged.rollback()
        stopped: dict[str, Any] = {}
        if self.worker.stop_at_time_limit():
            channel = self.worker.channel
            give_up = time.monotonic() + TIME_LIMIT_GRACE
            try:
                while not stopped and (remaining := give_up - time.monotonic()) > 0:
                    channel.sock.settimeout(remaining)
                    message, body = channel.recv()
                    op = message.get("op")
                    if op == "done":
                        stopped = message
                    elif op in ("log", "respond"):  # its last lines; a waiting request's 502
                        reply, reply_body = self._dispatch(op, message, body)
                        if op not in NOTIFY_OPS:
                            channel.send(reply, reply_body)
                    elif op not in NOTIFY_OPS:  # nothing else is done for it any more
                        channel.send({"ok": False, "error": "the run's time limit has passed"})
            except (TimeoutError, PeerGone, ConnectionError, ProtocolError, OSError):
                pass
        self.worker.kill()
        error = f"the step exceeded its time limit{self.limit_note}"
        where = _text(stopped.get("stopped_at"))  # (the step may forge this frame)
        if where:
            error += f"; it was stopped at {where[:MAX_STOPPED_AT]}"
        traceback = _text(stopped.get("traceback")) if "stopped_at" in stopped else None
        return Outcome("timed_out", self.redact(error), self.redact(traceback))

    def _record_when_due(self, record_at: float) -> None:
        """Wait for the worker's next frame until ``record_at`` at most, then write
        the run's record if it is due (waiting on the socket, not reading from it,
        so a frame is never cut by the timeout)."""
        wait = record_at - time.monotonic()
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
        if wait > 0:
            select.select([self.worker.channel.sock], [], [], wait)
        if time.monotonic() >= record_at:
            self.staged.record()

    def _death_reason(self) -> str:
        return self._with_kill_note(self.worker.exit_description())

    def _with_kill_note(self, description: str) -> str:
        # stepwell's own limits are named where they end a run (the time limit by the
        # host, CPU time and memory by the kernel's signals): not this one
        if "SIGKILL" in description and "limit" not in description:
            description += (", not by a stepwell limit (the system's out-of-memory killer: "
                            "see `dmesg`; another process; or the step itself)")  # fmt: skip
        return description

    def _dispatch(self, op: Any, message: dict, body: bytes) -> tuple[dict, bytes]:
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown request {op!r}"}, b""
        try:
            self._check_tables(op, message)
            result = handler(message, body)
        except Exception as exc:  # errors go back to user code as exceptions
            return {"ok": False, "error": self.redact(str(exc)) or type(exc).__name__}, b""
        if isinstance(result, tuple):
            reply, reply_body = result
        else:
            reply, reply_body = result or {}, b""
        return {"ok": True, **reply}, reply_body

    # -- reads -----------------------------------------------------------
    def op_table_info(self, message: dict, _body: bytes) -> dict:
        info = self.store.table_info(str(message["table"]), count_rows=message.get("count", True))
        if info is None:
            return {"exists": False, "row_count": 0, "version": 0}
        reply = {
            "exists": True,
            "row_count": info.row_count or 0,
            "version": info.version,
            "columns": {c.name: c.type for c in info.columns},
        }
        if ID_COLUMN not in reply["columns"]:  # its streams' default order is elsewhere
            reply["stream_order"] = self.store.stream_order(info.name)
        return reply

    def op_scan_open(self, message: dict, _body: bytes) -> dict | tuple[dict, Any]:
        table = str(message["table"])
        info = self.store.table_info(table, count_rows=False)
        if info is None:
            if table not in self._missing_said:  # a typo in its name, or its writer never ran
                self._missing_said.add(table)
                self.log.add("warn", [
                    f"[stepwell] table {table!r} does not exist (nothing has written it "
                    "yet): the step read no rows from it"
                ])  # fmt: skip
            return {"scan": None, "version": 0}
        order_by = message.get("order_by")
        after = message.get("after")
        if order_by:
            missing = [c for c in order_by if c not in {col.name for col in info.columns}]
            if missing == [ID_COLUMN] and order_by == [ID_COLUMN]:  # the default order
                raise ValueError(
                    f"cannot stream table {table!r} in its default order: it has no "
                    f"{ID_COLUMN} column (written with init(add_monotonic_id=...)); name "
                    f"the order, as_stream(order_by='<column>'), with one of its columns "
                    f"({', '.join(c.name for c in info.columns)}), or give its schema a "
                    "strictly_monotonic_ordering or created_ordering field role"
                )
            if missing:
                raise ValueError(
                    f"cannot stream table {table!r} ordered by {', '.join(missing)}: no such "
                    f"column (columns: {', '.join(c.name for c in info.columns)})"
                )
            if after and after[0] is not None and order_by[0] != ID_COLUMN:
                self._warn_null_order(table, order_by[0])
        # Streams in patterns_id order stop below ids still in flight elsewhere, so a
        # late commit can never land behind this stream's position.
        batches = self.store.scan(
            table,
            order_by=order_by or None,
            after=tuple(after) if after else None,
            batch_rows=int(message.get("batch_rows") or 50_000),
            stream=bool(order_by) and order_by[0] == ID_COLUMN,
        )
        # The reply carries the first batch, and says when it is the last: a small
        # input costs one round trip, not three (open, its batch, the end).
        scan_id = next(self._scan_ids)
        self._scans[scan_id] = _ScanAhead(batches)
        reply, batch = self._next_batch(scan_id)
        return {"scan": None if reply["done"] else scan_id, "version": info.version, **reply}, batch

    def _warn_null_order(self, table: str, column: str) -> None:
        """Say (once per run) that rows with no value in a stream's order column are
        behind its position: null sorts first, so once it has read a value it never
        reads them (a stream meeting one at its start refuses it)."""
        if (table, column) in self._null_orders_said:
            return
        self._null_orders_said.add((table, column))
        count = self.store.query(
            f"SELECT count(*) AS n FROM {quote(table)} WHERE {quote(column)} IS NULL"
        ).column(0)[0].as_py()
        if count:
            self.log.add("warn", [
                f"[stepwell] table {table!r}: {count} row(s) have no {column} (null); a "
                f"stream ordered by {column} has read past them and will not read them: give "
                f"them a {column}, or stream by {ID_COLUMN}"
            ])  # fmt: skip

    def op_scan_next(self, message: dict, _body: bytes) -> tuple[dict, bytes]:
        if message.get("scan") not in self._scans:
            raise ValueError("unknown or closed scan")
        return self._next_batch(message["scan"])

    def _next_batch(self, scan_id: int) -> tuple[dict, Any]:
        batch, more = self._scans[scan_id].take()
        if not more:
            self._scans.pop(scan_id).close()
        if batch is None:
            return {"done": True}, b""
        self.rows_in += batch.num_rows
        self._progress()
        return {"rows": batch.num_rows, "done": not more}, batch

    def op_scan_close(self, message: dict, _body: bytes) -> dict:
        scan = self._scans.pop(message.get("scan"), None)
        if scan is not None:
            scan.close()
        return {}

    def _close_scans(self) -> None:
        for scan in self._scans.values():
            scan.close()
        self._scans.clear()

    def op_read_sql(self, message: dict, _body: bytes) -> tuple[dict, bytes]:
        allowed = {str(k): str(v) for k, v in (message.get("tables") or {}).items()}
        sql = restrict_select(
            str(message["sql"]), allowed, self.store.dialect.name, where=f"read_sql in {self.staged.step}"
        )
        try:
            return {}, self.staged.query(sql)
        except Exception:
            store = self.store
            missing = unwritten_tables(sql, allowed.values(), store.dialect.name,
                                       lambda t: store.table_info(t, count_rows=False) is not None)
            if missing:
                raise ValueError(
                    f"read_sql: table {missing[0]!r} does not exist yet (nothing has written "
                    "it); check Table(...).exists first (read() gives no rows for it)"
                ) from None
            raise

    # -- writes ----------------------------------------------------------
    def op_table_sql(self, message: dict, _body: bytes) -> tuple[dict, Any]:
        """``Table.execute_sql``: check the statement. An UPDATE or DELETE runs here;
        for an INSERT or CREATE TABLE AS the reply carries the rows to add (the
        worker writes them like any other rows, with its table's options)."""
        allowed = {str(k): str(v) for k, v in (message.get("tables") or {}).items()}
        table = str(message["table"])
        plan = table_statement(
            str(message["sql"]), table, allowed, self.store.dialect.name,
            where=f"execute_sql in {self.staged.step}",
        )
        if plan.kind in ("update", "delete"):
            return {"kind": plan.kind, "rows": self.staged.change_rows(table, plan.sql)}, b""
        return {"kind": plan.kind, "columns": plan.columns}, self.staged.query(plan.sql)

    def op_write(self, message: dict, body: bytes) -> dict:
        data = decode_table(body)
        table = str(message["table"])
        schema = message.get("schema")
        declared = self.schemas.get(schema) if isinstance(schema, str) else None
        if isinstance(schema, str) and declared is None:
            raise ValueError(
                f"Table({table!r}, schema={schema!r}): no schema of that name "
                f"is declared in the app file (`schemas:`)"
            )
        types = dict(declared.types) if declared else {}
        if isinstance(schema, dict):  # Table(..., schema={"field": "Type"})
            types.update(_field_types(schema, table, "schema"))
        types.update(_field_types(message.get("schema_hints") or {}, table, "schema_hints"))
        written = self.staged.write(
            table,
            data,
            mode=str(message.get("mode", "append")),
            unique_on=message.get("unique_on") or (declared.unique_on if declared else None),
            id_column=message.get("id_column"),
            add_created=message.get("add_created"),
            ordering=message.get("strictly_monotonic_ordering"),
            schema=types or None,
        )
        self._progress()
        return {"rows": written}

    def op_truncate(self, message: dict, _body: bytes) -> dict:
        self.staged.truncate(str(message["table"]))
        return {}

    def op_reset(self, message: dict, _body: bytes) -> dict:
        return {"version": self.staged.reset(str(message["table"]))}

    def op_activate_version(self, message: dict, _body: bytes) -> dict:
        self.staged.activate_version(str(message["table"]), int(message["version"]))
        return {}

    # -- commit points ---------------------------------------------------
    def op_commit(self, message: dict, _body: bytes) -> dict:
        self._commit(message, counts=True)
        # (rows read ahead and not consumed yet come again after a rollback)
        self.committed_rows_in = self.staged.committed_rows_in = self._consumed(message)
        return {}

    def _consumed(self, message: dict) -> int:
        """Rows the step has consumed: those sent, less what its streams read ahead
        and have not handed to its code yet (the worker says how many)."""
        return self.rows_in - max(int(message.get("unread") or 0), 0)

    def _commit(
        self, message: dict, run_fields: dict[str, Any] | None = None, counts: bool = False
    ) -> None:
        """Commit the staged effects with the worker's positions and state; those
        are written only when they changed (most runs of a step leave them be).
        ``counts``: the run record's row counts so far go in with what they count
        (a run whose host dies later still shows the rows it kept)."""
        positions, state = message.get("positions"), message.get("state")
        new_positions = None if positions == self._committed_positions else positions
        new_state = None if state == self._committed_state else state
        if counts and (self.staged.open or new_positions is not None or new_state is not None):
            run_fields = {"rows_in": self._consumed(message), "rows_out": self.staged.rows_out}
        self.staged.commit(new_positions, new_state, run_fields=run_fields)
        if positions is not None:
            self._committed_positions = positions
        if state is not None:
            self._committed_state = state

    def op_rollback(self, _message: dict, _body: bytes) -> dict:
        self._deferred_error = None
        self.staged.rollback()
        self.rows_in = self.committed_rows_in
        return {}

    def op_done(self, message: dict, _body: bytes) -> dict:
        self.imported_numpy = bool(message.get("imported_numpy"))
        if self._deferred_error is not None and message.get("status") == "ok":
            message = {"status": "error", "error": self._deferred_error}
        if message.get("status") != "ok":
            self.staged.rollback()
            self._done = Outcome(
                "failed",
                self.redact(str(message.get("error") or "the step failed")),
                self.redact(_text(message.get("traceback"))),
                info={"memory_error": True} if message.get("memory_error") else {},
            )
            return {}
        info = {}
        if message.get("request_new_run"):
            info["request_new_run"] = message["request_new_run"]
        rows_in = self._consumed(message)
        status = "succeeded" if rows_in or self.staged.rows_out else "succeeded_no_data"
        if message.get("run_status") in ("succeeded", "succeeded_no_data", "succeeded_with_errors"):
            status = message["run_status"]  # the runtime decides (processor statuses)
            info.update(message.get("run_info") or {})
        fields = {
            "status": status,
            "ended_at": dt.datetime.now(dt.UTC),
            "rows_in": rows_in,
            "rows_out": self.staged.rows_out,
            "info": info,
            # (a host that wrongly took this run for dead may have written one)
            "error": self.redact(str(message["run_error"])) if message.get("run_error") else None,
        }
        self.log.flush()
        self._commit(message, run_fields=fields)
        self._done = Outcome(status, info=info, fields=fields)
        return {}

    def op_respond(self, message: dict, _body: bytes) -> dict:
        """``respond_to_request``: answer the HTTP request waiting for ``key`` (with
        ``failed``: the run is failing with the request's row in hand)."""
        key = str(message.get("key") or "")
        failed = message.get("failed")
        payload = RequestFailed(self.redact(str(failed))) if failed else message.get("payload")
        delivered = bool(key and self.on_respond is not None and self.on_respond(key, payload))
        if not delivered and not failed:
            self.log.add("warn", [
                f"[stepwell] respond_to_request({key!r}): no request is waiting for this key "
                "(it timed out or was answered already, or the app is not running under "
                "`stepwell serve`)"
            ])  # fmt: skip
        return {"delivered": delivered}

    def op_step_memory(self, _message: dict, _body: bytes) -> dict:
        """A node's committed State and stream positions (asked for on first use); the
        stream positions still valid for each table's active version."""
        step = self.staged.step
        state = self.store.get_state(step)
        positions = [
            {"table": p.table, "order_by": list(p.order_by), "table_version": p.table_version,
             "value": p.value, "last_id": p.last_id}
            for p in active_positions(self.store, step)
        ]  # fmt: skip
        self._committed_state, self._committed_positions = state, positions
        return {"state": state, "positions": positions}

    def op_log(self, message: dict, _body: bytes) -> dict:
        self.log.add(str(message.get("level", "info")), message.get("lines") or [])
        return {}

    def _check_tables(self, op: str, message: dict) -> None:
        """Refuse tables outside ``read_tables``/``write_tables`` of the start frame, when given."""
        reads, writes = getattr(self, "_read_tables", None), getattr(self, "_write_tables", None)
        if reads is None or writes is None:
            return
        if op in ("write", "truncate", "reset", "activate_version", "table_sql"):
            tables, allowed, what = [message.get("table")], writes, "write"
        elif op in ("scan_open", "table_info"):
            tables, allowed, what = [message.get("table")], [*reads, *writes], "read"
        elif op == "read_sql":
            tables, allowed, what = list((message.get("tables") or {}).values()), [*reads, *writes], "read"
        else:
            return
        for table in tables:
            if table not in allowed:
                raise PermissionError(f"step {self.staged.step!r} may not {what} table {table!r}")

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(self.rows_in, self.staged.rows_out)


def _text(value: Any) -> str | None:
    """A text field of a worker's frame: the step can forge frames, so anything but
    text (a number where a traceback goes) is dropped, not passed on to fail later."""
    return value if isinstance(value, str) else None


def _field_types(fields: Any, table: str, option: str) -> dict[str, pa.DataType]:
    """Arrow types of ``{field: "Type"}`` (Patterns type names: Integer, Text,
    Decimal(12,2), ...) given as a table's ``schema`` or ``schema_hints``."""
    from stepwell.app.models import logical_type
    from stepwell.store.schema import arrow_type

    if not isinstance(fields, dict):
        raise ValueError(f"table {table!r}: {option} must map field names to types, got {fields!r}")
    types = {}
    for name, type_name in fields.items():
        logical = logical_type(type_name) if isinstance(type_name, str) else None
        if logical is None:
            raise ValueError(
                f"table {table!r}: {option} gives field {name!r} the unknown type {type_name!r} "
                "(use Integer, Text, Float, Boolean, Date, DateTime, Decimal(p,s) or Json)"
            )
        types[str(name)] = arrow_type(logical)
    return types


class _ScanAhead:
    """A store scan read one batch ahead, so the reply with its last batch can say so."""

    def __init__(self, batches: Iterator[pa.RecordBatch]):
        self._batches = batches
        self._next = next(batches, None)

    def take(self) -> tuple[pa.RecordBatch | None, bool]:
        """The next batch (None: none left) and whether another follows it."""
        batch = self._next
        self._next = next(self._batches, None) if batch is not None else None
        return batch, self._next is not None

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
