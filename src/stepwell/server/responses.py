"""Ingest-and-respond webhooks: HTTP requests waiting for a step's answer.

A webhook with ``respond: true`` stores its request as a row carrying a fresh
``patterns_request_key`` and keeps the request open. A step that processes
the row answers with ``respond_to_request(key, payload)``; the payload becomes
the HTTP response. The answer goes out when the step calls it (it does not
wait for the run to commit), and only the first answer for a key counts. A run
that fails while the request's row is in hand answers it with the error
(:class:`~stepwell.engine.worker_session.RequestFailed`, 502) instead of a timeout.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any

from stepwell.engine.worker_session import RequestFailed
from stepwell.runtimes.node.api import REQUEST_KEY_COLUMN

__all__ = ["REQUEST_KEY_COLUMN", "PendingResponses", "RequestFailed", "ServerStopping"]


class ServerStopping(RequestFailed):
    """The answer to requests still waiting when the server stops."""


class PendingResponses:
    """Requests waiting for an answer, by request key. ``expect``/``forget`` run
    on the server's event loop; ``deliver`` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        #: request key -> (its table, when its row was committed)
        self._rows: dict[str, tuple[str, dt.datetime]] = {}

    def expect(self, key: str) -> asyncio.Future[Any]:
        """A future that ``deliver(key, ...)`` resolves (call on the event loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._waiting[key] = (loop, future)
        return future

    def forget(self, key: str) -> None:
        """Stop waiting for ``key`` (answered, timed out, or the client left)."""
        with self._lock:
            self._waiting.pop(key, None)
            self._rows.pop(key, None)

    def stored(self, key: str, table: str, posted: dt.datetime) -> None:
        """The row of request ``key``, posted at ``posted``, is committed to ``table``
        (a run starting after ``posted`` may be the one to read it: the run its commit
        triggers can start before the commit call returns)."""
        with self._lock:
            if key in self._waiting:
                self._rows[key] = (table, posted)

    def fail_readers(self, tables: set[str], since: dt.datetime, error: RequestFailed) -> int:
        """Answer with ``error`` the requests whose rows, in ``tables``, were stored
        before ``since``: a run that started then, read those tables and failed
        could not answer them (it stopped on an earlier row, say), and the next one
        would fail the same way. How many were answered."""
        with self._lock:
            keys = [key for key, (table, at) in self._rows.items() if table in tables and at <= since]
        return sum(self.deliver(key, error) for key in keys)

    def deliver(self, key: str, payload: Any) -> bool:
        """Answer request ``key`` (with ``payload``, or with the error when it is a
        ``RequestFailed``); False when no request waits for it (any more)."""
        with self._lock:
            waiting = self._waiting.pop(key, None)
        if waiting is None:
            return False
        loop, future = waiting

        def resolve() -> None:
            if future.done():
                return
            if isinstance(payload, RequestFailed):
                future.set_exception(payload)
            else:
                future.set_result(payload)

        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the loop is closed: the server is stopping
            return False
        return True

    def fail_all(self, error: ServerStopping) -> int:
        """Answer every waiting request with ``error`` (the server is stopping and no
        step will answer them now); how many were waiting."""
        with self._lock:
            keys = list(self._waiting)
        return sum(self.deliver(key, error) for key in keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)
