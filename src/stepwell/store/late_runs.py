"""Run records written a moment late, several in one statement.

A run that ends having changed nothing (no rows, state or stream positions)
commits only its record, and a single-row INSERT is dear: in DuckDB ~1 ms of
CPU, and 1.4 ms of the ~5.5 ms from one trivial sandboxed step to the next
(``benchmarks/step_overhead.py``). Such records wait here at most ``DELAY``
seconds and are written together: before the store's next use of any kind (so
whoever asks this store sees them), when the delay is over, when the store
closes, or when the process exits. What a crash inside that window can lose is
the record of a run that changed nothing; a run's effects are never held here,
and always commit with its record. (Actions have a journal of their own,
``runtimes/action/journal.py``, which also merges a call's start and end and
batches log lines, answering the caller before any of it is written.)
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence

from stepwell.store.base import RunRecord

#: seconds a record may wait for others
DELAY = 0.1

log = logging.getLogger("stepwell.store")


class LateRuns:
    """Records waiting to be written by ``write`` (which inserts several at once)."""

    def __init__(self, write: Callable[[Sequence[RunRecord]], None]) -> None:
        self._write = write
        self._runs: list[RunRecord] = []
        self._lock = threading.Lock()
        #: held while records are written: a use of the store waits for them
        self._writing = threading.RLock()
        self._timer: threading.Timer | None = None

    def __bool__(self) -> bool:
        return bool(self._runs)

    def add(self, run: RunRecord) -> None:
        with self._lock:
            self._runs.append(run)
            if self._timer is None:
                self._timer = threading.Timer(DELAY, self.flush_or_log)
                self._timer.daemon = True
                self._timer.start()
        _waiting.add(self)

    def flush(self) -> None:
        """Write the waiting records now, or wait for another thread writing them;
        if that fails they wait on (and it raises)."""
        with self._writing:  # (re-entered by ``write``'s own use of the store)
            with self._lock:
                runs, self._runs = self._runs, []
                timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()
            if not runs:
                return
            try:
                self._write(runs)
            except BaseException:
                with self._lock:
                    self._runs[:0] = runs
                raise

    def flush_or_log(self) -> None:
        """``flush``, for the timer and the store's close: a failure is logged."""
        try:
            self.flush()
        except Exception as exc:
            log.error("could not write the records of %d ended runs (%s): %s",
                      len(self._runs), ", ".join(r.id for r in self._runs[:5]), exc)  # fmt: skip


#: buffers that may hold records, written when the process exits
_waiting: weakref.WeakSet[LateRuns] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for late in list(_waiting):
        if late:
            late.flush_or_log()


def _forget_in_child() -> None:
    """A forked child's copies of waiting records are its parent's to write."""
    for late in list(_waiting):
        late._runs, late._timer = [], None
        late._lock, late._writing = threading.Lock(), threading.RLock()


os.register_at_fork(after_in_child=_forget_in_child)
