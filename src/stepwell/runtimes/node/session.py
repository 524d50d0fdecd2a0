"""Worker-side bookkeeping of one node run: write buffers, stream positions, state.

Everything a node changes is held here (or staged in the host's open
transaction) until a commit point: ``Table.flush()``, ``Stream.checkpoint()``
or the end of the run. ``commit()`` first pushes every buffered write to the
host and then sends positions and state in the same request, so the host
commits them in one transaction.
"""

from __future__ import annotations

import copy
import difflib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stepwell.sandbox.client import HostLink
from stepwell.sandbox.protocol import decode_table

if TYPE_CHECKING:
    import pyarrow as pa

    from stepwell.runtimes.node.api import Stream, Table


@dataclass
class SavePoint:
    """Where a run was after a stream's row was done (``Stream.consume_with_rollback``)."""

    stream: Stream
    position: tuple[int, Any, Any] | None
    #: ``NodeSession.changes_sent`` then: the save point holds while it is unchanged
    changes_sent: int
    #: rows in each table's write buffer then
    buffered: dict[int, int]
    #: ``NodeSession.state_changes`` when ``state`` was copied, and the copy
    state_changes: int
    state: dict[str, Any]


class NodeSession:
    def __init__(self, link: HostLink, start: dict[str, Any]):
        self.link = link
        self.start = start
        self.run_id: str = start["run_id"]
        self.step: str = start["step"]
        ports = start.get("ports", {})
        self.inputs: dict[str, str] = ports.get("inputs", {})
        self.outputs: dict[str, str] = ports.get("outputs", {})
        self.parameters: dict[str, Any] = start.get("parameters", {})
        #: names the code asked for with ``Parameter(...)``
        self.parameters_read: set[str] = set()
        #: unique_on keys the app file declares per table (tables or schemas)
        self.table_keys: dict[str, list[str]] = start.get("table_keys") or {}
        #: the default stream order of tables whose schema gives one (field roles)
        self.table_orders: dict[str, str] = start.get("table_orders") or {}
        self.time_limit: float | None = start.get("time_limit")
        self.started = time.monotonic() - float(start.get("elapsed", 0.0))
        self.tables: dict[str, Table] = {}
        self.streams: list[Stream] = []
        # The step's committed State and stream positions come from the host on first
        # use (most runs of a simple node need neither: one store read less per run).
        self._memory_loaded = False
        self._committed_state: dict[str, Any] = {}
        self._state: dict[str, Any] = {}
        self._committed_positions: dict[tuple[str, tuple[str, ...]], tuple[int, Any, Any]] = {}
        self.state_reset = False
        self.new_run_request: dict[str, Any] | None = None
        #: changes sent to the host (writes shipped, truncates, commits, ...): a
        #: save point taken before the last one cannot be gone back to in the worker
        self.changes_sent = 0
        #: calls that may have changed ``state`` (``State.set``/``set_value``/...)
        self.state_changes = 0

    # -- the step's memory: State and stream positions ----------------------
    def _load_memory(self) -> None:
        if self._memory_loaded:
            return
        reply, _ = self.link.call("step_memory")
        self._committed_state = dict(reply.get("state") or {})
        self._state = copy.deepcopy(self._committed_state)
        self._committed_positions = {
            (p["table"], tuple(p["order_by"])): (p["table_version"], p["value"], p["last_id"])
            for p in reply.get("positions") or []
        }
        self._memory_loaded = True

    @property
    def state(self) -> dict[str, Any]:
        self._load_memory()
        return self._state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._load_memory()
        self.state_changes += 1
        self._state = value

    @property
    def committed_positions(self) -> dict[tuple[str, tuple[str, ...]], tuple[int, Any, Any]]:
        """(table, order_by tuple) -> (version, value, last_id) as of the last commit."""
        self._load_memory()
        return self._committed_positions

    # -- tables ----------------------------------------------------------
    def resolve_table(self, port: str) -> str:
        """Map a port name used in code to the app's table name."""
        return self.inputs.get(port) or self.outputs.get(port) or port

    def write(self, table: str, data: pa.Table, **options: Any) -> None:
        self.changes_sent += 1
        self.link.notify("write", data, table=table, **options)

    def change(self, op: str, **fields: Any) -> tuple[dict[str, Any], bytes]:
        """Ask the host to change a table (``truncate``, ``reset``, ...)."""
        self.changes_sent += 1
        return self.link.call(op, **fields)

    def scan(self, table: str, order_by: list[str] | None, after: Any, batch_rows: int = 50_000):
        """Yield (version, Arrow batch) pairs of a consistent snapshot of ``table``."""
        return self.link.scan(table, order_by, after, batch_rows)

    def table_info(self, table: str, count: bool = True) -> dict[str, Any]:
        reply, _ = self.link.call("table_info", table=table, count=count)
        return reply

    def read_sql(self, sql: str) -> pa.Table:
        allowed = {name: t.table_name for name, t in self.tables.items()}
        _, body = self.link.call("read_sql", sql=sql, tables=allowed)
        return decode_table(body)

    def table_sql(self, sql: str, table: str) -> tuple[dict[str, Any], pa.Table | None]:
        """Have the host check (and, for UPDATE/DELETE, run) ``Table.execute_sql``'s
        statement: its reply (kind, columns, rows changed) and the rows to write."""
        allowed = {name: t.table_name for name, t in self.tables.items()}
        self.changes_sent += 1
        reply, body = self.link.call("table_sql", sql=sql, table=table, tables=allowed)
        return reply, decode_table(body) if body else None

    # -- commit points ---------------------------------------------------
    def positions(self) -> list[dict[str, Any]]:
        merged = dict(self.committed_positions)
        for stream in self.streams:
            current = stream.position_for_commit()
            if current is not None:
                merged[(stream.table.table_name, stream.order_columns)] = current
        return [
            {
                "table": table,
                "order_by": list(order_by),
                "table_version": version,
                "value": value,
                "last_id": last_id,
            }
            for (table, order_by), (version, value, last_id) in merged.items()
        ]

    def _effects(self) -> dict[str, Any]:
        for table in self.tables.values():
            table._send_buffer()
        # rows the host sent that no stream has yielded yet (read ahead in batches):
        # the run's rows_in counts what the step consumed
        unread = sum(stream.unread for stream in self.streams)
        if not self._memory_loaded:  # neither read nor changed: nothing to write
            return {"positions": None, "state": None, "state_reset": False, "unread": unread}
        return {
            "positions": self.positions(),
            "state": self.state,
            "state_reset": self.state_reset,
            "unread": unread,
        }

    def commit(self) -> None:
        effects = self._effects()
        self.changes_sent += 1
        self.link.call("commit", **effects)
        self._mark_committed(effects)

    # -- save points (Stream.consume_with_rollback) ------------------------
    def save_point(self, stream: Stream, last: SavePoint | None) -> SavePoint | None:
        """Where the run is now that ``stream``'s current row is done; None when
        going back to it could not be done here (another stream is in use)."""
        if len(self.streams) > 1:
            return None
        state_changes, state = (last.state_changes, last.state) if last else (-1, {})
        if state_changes != self.state_changes:  # copied only when it may have changed
            state_changes, state = self.state_changes, copy.deepcopy(self.state)
        return SavePoint(
            stream, stream._current, self.changes_sent,
            {id(t): len(t._buffer) for t in self.tables.values()}, state_changes, state,
        )  # fmt: skip

    def commit_to(self, point: SavePoint) -> bool:
        """Drop what the run did after ``point`` and commit the rest; False (nothing
        done) when part of it already reached the host."""
        if point.changes_sent != self.changes_sent or len(self.streams) > 1:
            return False
        for table in self.tables.values():
            del table._buffer[point.buffered.get(id(table), 0) :]
        self._state = copy.deepcopy(point.state)
        point.stream.seek_position(point.position)
        self.commit()
        return True

    def _mark_committed(self, effects: dict[str, Any]) -> None:
        if effects["positions"] is None:
            return
        self._committed_positions = {
            (p["table"], tuple(p["order_by"])): (p["table_version"], p["value"], p["last_id"])
            for p in effects["positions"]
        }
        self._committed_state = copy.deepcopy(self.state)
        self.state_reset = False
        for stream in self.streams:
            stream._committed()

    def rollback(self) -> None:
        """Discard everything since the last commit point, here and in the host."""
        for table in self.tables.values():
            table._buffer.clear()
        self.link.call("rollback")
        if self._memory_loaded:
            self._state = copy.deepcopy(self._committed_state)
        self.state_reset = False
        for stream in self.streams:
            stream._rolled_back()

    def finish(self) -> None:
        """The final commit point: the host commits and closes the run."""
        self._warn_unread_parameters()
        effects = self._effects()
        self.link.notify("done", status="ok", request_new_run=self.new_run_request, **effects)

    def _warn_unread_parameters(self) -> None:
        """A parameter set in the app file that the code never asked for is most
        likely misspelt on one side (the code then got its default)."""
        unread = sorted(set(self.parameters) - self.parameters_read)
        if not unread:
            return
        lines = []
        for name in unread:
            line = (f"[stepwell] parameter {name!r} is set for step {self.step!r} in the app "
                    f"file, but this run never read it with Parameter({name!r})")  # fmt: skip
            close = difflib.get_close_matches(name, self.parameters_read, n=1)
            if close:
                line += f"; the code read {close[0]!r}: is one of the two names misspelt?"
            lines.append(line)
        self.link.notify("log", level="warn", lines=lines)

    # -- limits ----------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started
