"""Rows arriving over HTTP (webhooks, loads): one writer thread per table, group commits.

Each table gets one writer thread. Requests queue their rows and wait; the
writer takes everything queued (up to ``max_batch_rows``), writes it in one
transaction and commits, then answers every request of the batch with the
``patterns_id`` of its rows. So a burst of webhook posts costs one commit per
batch, not one per post, and every response is sent after its rows committed.

One writer per table also keeps ``patterns_id`` order equal to commit order
for rows that arrive over HTTP, so a stream reading the table in that order
never passes a row that commits later.

If a batch fails (a post whose values do not fit the table's columns, say),
its requests are retried one by one so only the bad ones fail. A batch that
lost a race with another change of the table (a reset, say) is written again
a few times before its requests are told to retry later (503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from stepwell.engine.staging import StagedRun
from stepwell.runtimes.node.records import records_to_arrow
from stepwell.server.errors import ApiError
from stepwell.store.base import ID_COLUMN, ConcurrentChange, Store

log = logging.getLogger("stepwell.server")

#: Rows written per transaction at most (a single larger request is one transaction).
MAX_BATCH_ROWS = 20_000
#: Attempts at a batch that keeps losing to concurrent changes of its table.
CONFLICT_ATTEMPTS = 4


@dataclass
class _Item:
    rows: list[dict[str, Any]] | pa.Table
    future: asyncio.Future[list[str]]
    loop: asyncio.AbstractEventLoop

    @property
    def count(self) -> int:
        return self.rows.num_rows if isinstance(self.rows, pa.Table) else len(self.rows)


class IngestError(ValueError):
    """The rows could not be stored; the message says why. ``retry_later``: nothing
    was written and the same request may simply be sent again (503, not 422)."""

    def __init__(self, message: str, *, retry_later: bool = False):
        super().__init__(message)
        self.retry_later = retry_later

    def api_error(self, prefix: str = "") -> ApiError:
        if self.retry_later:
            return ApiError(503, prefix + str(self), headers={"Retry-After": "1"})
        return ApiError(422, prefix + str(self))


class Ingest:
    """Group-committing writers, one per table."""

    def __init__(
        self,
        store: Store,
        *,
        unique_on: Mapping[str, Sequence[str]] | None = None,
        on_commit: Callable[[str], None] | None = None,
        max_batch_rows: int = MAX_BATCH_ROWS,
    ):
        self.store = store
        self.unique_on = dict(unique_on or {})
        self.on_commit = on_commit
        self.max_batch_rows = max_batch_rows
        self._queues: dict[str, queue.Queue[_Item | None]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        # pyarrow imports pandas on its first from_pylist (~0.5 s): not on the first post
        threading.Thread(target=records_to_arrow, args=([{"warm_up": 1}], "warm_up"),
                         name="stepwell-ingest-warm-up", daemon=True).start()

    async def add(self, table: str, rows: list[dict[str, Any]] | pa.Table) -> list[str]:
        """Commit ``rows`` to ``table``; returns their ``patterns_id`` values.

        Raises :class:`IngestError` when the rows cannot be stored."""
        loop = asyncio.get_running_loop()
        item = _Item(rows, loop.create_future(), loop)
        if item.count == 0:
            return []
        self._queue(table).put(item)
        return await item.future

    def close(self) -> None:
        """Finish what is queued, then stop the writers."""
        with self._lock:
            self._closed = True
            queues = list(self._queues.values())
        for q in queues:
            q.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def _queue(self, table: str) -> queue.Queue[_Item | None]:
        with self._lock:
            if self._closed:
                raise IngestError("the server is shutting down", retry_later=True)
            q = self._queues.get(table)
            if q is None:
                q = self._queues[table] = queue.Queue()
                thread = threading.Thread(
                    target=self._writer, args=(table, q), name=f"stepwell-ingest-{table}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            return q

    # -- the writer thread -------------------------------------------------------------
    def _writer(self, table: str, q: queue.Queue[_Item | None]) -> None:
        stop = False
        while not stop:
            first = q.get()
            if first is None:
                return
            batch, rows = [first], first.count
            while rows < self.max_batch_rows:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                rows += item.count
            self._write_batch(table, batch)

    def _write_batch(self, table: str, batch: list[_Item]) -> None:
        try:
            ids = self._commit_retrying(table, batch)
        except Exception as exc:
            if len(batch) == 1:
                busy = isinstance(exc, ConcurrentChange)
                _settle(batch[0], error=IngestError(_describe(exc), retry_later=busy))
                return
            for item in batch:  # find the request(s) at fault
                self._write_batch(table, [item])
            return
        offset = 0
        for item in batch:
            _settle(item, ids[offset : offset + item.count])
            offset += item.count
        if self.on_commit is not None:
            try:
                self.on_commit(table)
            except Exception:
                log.exception("dispatch after a commit to %r failed", table)

    def _commit_retrying(self, table: str, batch: list[_Item]) -> list[str]:
        attempt = 1
        while True:
            try:
                return self._commit(table, batch)
            except ConcurrentChange:
                if attempt >= CONFLICT_ATTEMPTS:
                    raise
                time.sleep(min(0.02 * attempt, 0.1))  # let the change that won finish
                attempt += 1

    def _commit(self, table: str, batch: list[_Item]) -> list[str]:
        parts: list[pa.Table] = []
        records: list[dict[str, Any]] = []
        for item in batch:
            if isinstance(item.rows, pa.Table):
                if records:
                    parts.append(records_to_arrow(records, table))
                    records = []
                parts.append(item.rows)
            else:
                records.extend(item.rows)
        if records:
            parts.append(records_to_arrow(records, table))
        data = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
        staged = StagedRun(self.store, run_id="", step="", unique_on=self.unique_on)
        try:
            data = staged.prepare(data)
            staged.write(table, data, id_column=None)
            staged.commit(positions=None, state=None)
        except BaseException:
            staged.rollback()
            raise
        return data.column(ID_COLUMN).to_pylist()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _settle(item: _Item, ids: list[str] | None = None, *, error: IngestError | None = None) -> None:
    def apply() -> None:
        if item.future.done():
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(ids or [])

    try:
        item.loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the event loop is gone (the server stopped): nobody waits
        pass
