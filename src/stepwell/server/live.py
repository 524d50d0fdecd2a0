"""Live run events for server-sent event streams.

The scheduler's runner calls the hub's listener methods from its run threads;
the hub hands each event to the asyncio queues of the clients following that
run (``loop.call_soon_threadsafe``), so a stream sees log lines as the worker
prints them, before they are flushed to the store.

A run's log reaches the store in batches, so the hub also keeps the lines of
each run in progress (:meth:`LiveHub.recent`): a client that starts following a
run gets them with its subscription, and nothing printed before it subscribed
but not yet stored is missed. When the run ends its log is complete in the
store and the hub forgets it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stepwell.server.models import LogLineModel, RunDetail
from stepwell.server.responses import PendingResponses, RequestFailed
from stepwell.store.base import LogLine, RunRecord

#: Events a slow client has not read yet beyond this many are dropped for it
#: (the stored log stays complete: GET /api/runs/{id}/logs).
MAX_QUEUED_EVENTS = 10_000
#: Lines of a run in progress kept in memory (older ones are in the store by then).
MAX_RECENT_LINES = 10_000
#: At most one progress event per run per this many seconds.
PROGRESS_INTERVAL = 0.25


@dataclass
class RunEvent:
    """One server-sent event: ``kind`` is status, earlier, log, progress, end or closing."""

    kind: str
    data: dict[str, Any]
    seq: int | None = None

    def encode(self) -> bytes:
        import json

        lines = [f"event: {self.kind}"]
        if self.seq is not None:
            lines.append(f"id: {self.seq}")
        lines.append("data: " + json.dumps(self.data, separators=(",", ":")))
        return ("\n".join(lines) + "\n\n").encode()


def run_event(kind: str, run: RunRecord) -> RunEvent:
    return RunEvent(kind, RunDetail.of(run).model_dump(mode="json"))


def log_event(line: LogLine) -> RunEvent:
    return RunEvent("log", LogLineModel.of(line).model_dump(mode="json"), seq=line.seq)


class LiveHub:
    """Fan-out of run events to SSE subscribers (also a ``RunListener``)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, set[asyncio.Queue[RunEvent]]] = {}
        self._lock = threading.Lock()
        self._last_progress: dict[str, float] = {}
        self._recent: dict[str, deque[LogLine]] = {}
        self.closed = False
        #: webhook requests waiting for a step's respond_to_request
        self.responses = PendingResponses()
        #: the tables a step reads (set by the server: failed runs answer the
        #: requests waiting on them)
        self.tables_read_by: Callable[[str], set[str]] = lambda _step: set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self, run_id: str) -> tuple[asyncio.Queue[RunEvent], list[LogLine]]:
        """A queue of the run's events from now on, and its lines so far that
        may not be in the store yet."""
        queue: asyncio.Queue[RunEvent] = asyncio.Queue(MAX_QUEUED_EVENTS)
        with self._lock:
            self._subs.setdefault(run_id, set()).add(queue)
            return queue, list(self._recent.get(run_id, ()))

    def recent(self, run_id: str) -> list[LogLine]:
        """Lines of run ``run_id`` in progress, possibly not stored yet."""
        with self._lock:
            return list(self._recent.get(run_id, ()))

    def unsubscribe(self, run_id: str, queue: asyncio.Queue[RunEvent]) -> None:
        with self._lock:
            queues = self._subs.get(run_id)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._subs[run_id]

    def publish(self, run_id: str, event: RunEvent) -> None:
        with self._lock:
            queues = list(self._subs.get(run_id, ()))
        if queues and self._loop is not None:
            for queue in queues:
                self._loop.call_soon_threadsafe(_offer, queue, event)

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        self.closed = True
        with self._lock:
            run_ids = list(self._subs)
        for run_id in run_ids:
            self.publish(run_id, RunEvent("closing", {"reason": "the server is shutting down"}))

    # -- RunListener --------------------------------------------------------------
    def run_started(self, run: RunRecord) -> None:
        with self._lock:
            self._recent[run.id] = deque(maxlen=MAX_RECENT_LINES)
        self.publish(run.id, run_event("status", run))

    def progress(self, run: RunRecord, rows_in: int, rows_out: int) -> None:
        now = time.monotonic()
        if now - self._last_progress.get(run.id, 0.0) < PROGRESS_INTERVAL:
            return
        self._last_progress[run.id] = now
        self.publish(run.id, RunEvent("progress", {"run_id": run.id, "rows_in": rows_in,
                                                   "rows_out": rows_out}))

    def log_line(self, run: RunRecord, line: LogLine) -> None:
        with self._lock:
            recent = self._recent.get(run.id)
            if recent is not None:
                recent.append(line)
        self.publish(run.id, log_event(line))

    def run_finished(self, run: RunRecord) -> None:
        self._last_progress.pop(run.id, None)
        with self._lock:
            self._recent.pop(run.id, None)
        self.publish(run.id, run_event("end", run))
        if run.status in ("failed", "timed_out", "killed") and run.started_at and len(self.responses):
            tables = self.tables_read_by(run.step)
            if tables:
                self.responses.fail_readers(tables, run.started_at, RequestFailed(
                    f"run {run.id} of step {run.step!r}, which reads the request's row, "
                    f"ended {run.status} without answering it: {run.error}"))

    def tables_committed(self, run: RunRecord, tables: set[str]) -> None:
        pass

    def respond(self, run: RunRecord, request_key: str, payload: Any) -> bool:
        return self.responses.deliver(request_key, payload)


def _offer(queue: asyncio.Queue[RunEvent], event: RunEvent) -> None:
    if queue.full():
        if event.kind not in ("end", "closing"):
            return  # a client that does not keep up misses live lines, never the end
        queue.get_nowait()
    queue.put_nowait(event)
