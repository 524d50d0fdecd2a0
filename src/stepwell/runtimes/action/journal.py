"""Writing the run records and logs of action invocations, off the request path.

An action answers its caller in milliseconds; writing its run record and log
lines synchronously would cost more than the action itself (each store call
is its own transaction). The journal takes those writes on a background
thread instead, and batches them: a run that started and ended within one
batch window is written once, with its final status, and the log lines of
every run in a batch go in with one insert. Records reach the store within
``window`` seconds (the response to the caller already carries the run id);
:meth:`RunJournal.flush` waits for everything queued so far.

If the host dies before a batch is written, those records are lost; the
actions themselves changed nothing in the store (code steps cannot write and
SQL steps only read), so nothing else is affected.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from stepwell.store.base import LogLine, RunRecord, Store

log = logging.getLogger("stepwell.actions")

#: Seconds a batch waits for more writes (a fast run's start and end merge).
DEFAULT_WINDOW = 0.05
#: Queued operations beyond this make writers wait (back-pressure).
MAX_PENDING = 50_000


class RunJournal:
    """Background writer of run records and log lines (one per store)."""

    def __init__(self, store: Store, *, window: float = DEFAULT_WINDOW):
        self.store = store
        self.window = window
        self._cond = threading.Condition()
        self._ops: list[tuple[str, Any]] = []
        self._queued = 0
        self._written = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="stepwell-run-journal",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    # -- producers -----------------------------------------------------------
    def _put(self, kind: str, item: Any) -> None:
        with self._cond:
            while len(self._ops) >= MAX_PENDING and not self._closed:
                self._cond.wait(0.1)
            if self._closed:
                self._write([(kind, item)])  # after close: write in the caller's thread
                return
            self._ops.append((kind, item))
            self._queued += 1
            self._cond.notify_all()

    def started(self, run: RunRecord) -> None:
        """A new run record (status ``running``)."""
        self._put("create", dataclasses.replace(run, info=dict(run.info)))

    def finished(self, run_id: str, **fields: Any) -> None:
        """Final fields of a run (status, ended_at, error, info...)."""
        self._put("update", (run_id, fields))

    def append_logs(self, lines: Sequence[LogLine]) -> None:
        """Log lines (the ``RunLog`` sink interface)."""
        if lines:
            self._put("logs", list(lines))

    # -- the writer ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._closed:
                    self._cond.wait()
                if not self._ops and self._closed:
                    return
            if self.window and not self._closed:
                time.sleep(self.window)  # let a batch gather (and fast runs end)
            with self._cond:
                batch, self._ops = self._ops, []
                self._cond.notify_all()
            self._write(batch)
            with self._cond:
                self._written += len(batch)
                self._cond.notify_all()

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        creates: dict[str, RunRecord] = {}
        updates: list[tuple[str, dict[str, Any]]] = []
        lines: list[LogLine] = []
        for kind, item in batch:
            if kind == "create":
                creates[item.id] = item
            elif kind == "update":
                run_id, fields = item
                if run_id in creates:  # started and ended within the batch: one write
                    creates[run_id] = dataclasses.replace(creates[run_id], **fields)
                else:
                    updates.append((run_id, fields))
            else:
                lines.extend(item)
        if creates:
            self._attempt("record runs", self.store.create_runs, list(creates.values()))
        if lines:
            self._attempt("write log lines", self.store.append_logs, lines)
        for run_id, fields in updates:
            self._attempt("finish run", lambda r=run_id, f=fields: self.store.update_run(r, **f))

    def _attempt(self, what: str, call: Any, *args: Any) -> None:
        for attempt in range(3):
            try:
                call(*args)
                return
            except Exception as exc:  # noqa: BLE001 - never lose the writer thread
                if attempt == 2:
                    log.error("action journal: cannot %s: %s", what, exc)
                else:
                    time.sleep(0.05 * (attempt + 1))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued before this call is in the store."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._queued
            while self._written < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and stop the writer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
