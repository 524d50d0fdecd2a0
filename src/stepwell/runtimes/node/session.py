"""Worker-side bookkeeping of one node run: write buffers, stream positions, state.

Everything a node changes is held here (or staged in the host's open
transaction) until a commit point: ``Table.flush()``, ``Stream.checkpoint()``
or the end of the run. ``commit()`` first pushes every buffered write to the
host and then sends positions and state in the same request, so the host
commits them in one transaction.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from stepwell.sandbox.client import HostLink
from stepwell.sandbox.protocol import decode_table

if TYPE_CHECKING:
    import pyarrow as pa

    from stepwell.runtimes.node.api import Stream, Table


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
        #: unique_on keys the app file declares per table (tables or schemas)
        self.table_keys: dict[str, list[str]] = start.get("table_keys") or {}
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
        self.link.notify("write", data, table=table, **options)

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
        if not self._memory_loaded:  # neither read nor changed: nothing to write
            return {"positions": None, "state": None, "state_reset": False}
        return {
            "positions": self.positions(),
            "state": self.state,
            "state_reset": self.state_reset,
        }

    def commit(self) -> None:
        effects = self._effects()
        self.link.call("commit", **effects)
        self._mark_committed(effects)

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
        effects = self._effects()
        self.link.notify("done", status="ok", request_new_run=self.new_run_request, **effects)

    # -- limits ----------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started
