"""Warm workers for action code steps, and the pool that keeps them ready.

Every code step runs in a sandboxed worker process, never in the host. Starting
one costs milliseconds to tens of milliseconds (a fork-server fork plus the
worker's set-up), so a pool keeps a few *warm* workers per app: started ahead
of time (from the fork-server when it is available, else as plain
subprocesses, see :func:`~stepwell.sandbox.launcher.start_worker`), with the
app's environment on their path and the modules its actions import already
imported, each looping over invocations (see ``worker.py``).

A worker serves one invocation at a time. One that times out is killed; one
that crashes, reports a MemoryError, has served ``max_uses`` invocations or is
older than ``max_age`` is retired; the pool starts replacements in the
background so requests rarely wait for a start.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from stepwell.sandbox import linux
from stepwell.sandbox.launcher import WorkerProcess
from stepwell.sandbox.policy import MAX_STOPPED_AT, TIME_LIMIT_GRACE
from stepwell.sandbox.protocol import NOTIFY_OPS, PeerGone, ProtocolError

log = logging.getLogger("stepwell.actions")

#: Worker entry point of action workers.
ENTRY = "stepwell.runtimes.action.worker:serve"
#: Seconds a new worker gets to set itself up (imports included).
STARTUP_TIMEOUT = 60.0
#: Seconds between looks at whether a worker that has not taken its call was stopped.
STOP_CHECK = 0.25


class WorkerFailed(Exception):
    """The worker could not serve the invocation (it died, or broke the protocol)."""


class WorkerGone(WorkerFailed):
    """The worker had ended before the invocation sent anything (a call before
    may have killed it after its result): the job may go to another worker."""


class StepTimedOut(Exception):
    """The invocation did not end before its deadline; its worker was killed.
    ``where``: ``file:line`` where the step's code was stopped, if it said."""

    def __init__(self, where: str | None = None):
        super().__init__(where)
        self.where = where


class WarmWorker:
    """One started worker process waiting for invocations."""

    def __init__(self, process: WorkerProcess, start: dict[str, Any]):
        self.process = process
        self.notes = list(process.notes)
        self.started = time.monotonic()
        self.uses = 0
        self.healthy = True
        #: the invocation under way has sent a frame (so it ran)
        self._heard = False
        self.failed_imports: list[str] = []
        channel = process.channel
        try:
            channel.sock.settimeout(STARTUP_TIMEOUT)
            channel.send(start)
            while True:
                message, _ = channel.recv()
                op = message.get("op")
                if op == "ready":
                    self.failed_imports = list(message.get("failed_imports") or [])
                    break
                if op == "done":  # the worker failed before its loop (sandbox refused...)
                    raise WorkerFailed(str(message.get("error") or "the worker did not start"))
                if op not in NOTIFY_OPS:
                    channel.send({"ok": False, "error": f"unexpected {op!r} while starting"})
        except (OSError, ProtocolError) as exc:
            process.kill()
            reason = process.exit_description() if isinstance(exc, PeerGone) else str(exc)
            process.close()
            raise WorkerFailed(f"an action worker did not start: {reason}") from None
        except WorkerFailed:
            process.kill()
            process.close()
            raise
        finally:
            try:
                channel.sock.settimeout(None)
            except OSError:
                pass

    def invoke(self, job: dict[str, Any], deadline: float | None,
               on_log: Callable[[str, list[str]], None]) -> dict[str, Any]:  # fmt: skip
        """Run ``job``; the worker's ``result`` message. ``on_log(level, lines)``
        receives its output. Raises :class:`StepTimedOut` or :class:`WorkerFailed`
        (the worker is then unusable)."""
        channel = self.process.channel
        self.uses += 1
        self._heard = False
        try:
            channel.sock.settimeout(_remaining(deadline))
            channel.send({"ok": True, "job": job})
            return self._result(deadline, on_log)
        except TimeoutError:
            self.healthy = False
            where = self._stop_at_time_limit(on_log)
            self.process.kill()
            raise StepTimedOut(where) from None
        except (OSError, ProtocolError) as exc:
            self.healthy = False
            if isinstance(exc, (PeerGone, ConnectionError)):
                status, reason = self.process.exit_outcome()
                gone = WorkerFailed if self._heard else WorkerGone
                raise gone(f"the worker running the step ended: {reason}") from None
            self.process.kill()
            raise WorkerFailed(f"the worker broke the wire protocol: {exc}") from None

    def _result(self, deadline: float | None,
                on_log: Callable[[str, list[str]], None]) -> dict[str, Any]:  # fmt: skip
        """The invocation's ``result`` frame (its log lines to ``on_log`` meanwhile)."""
        channel = self.process.channel
        while True:
            if not self._heard:
                self._wait_for_first_frame(deadline)
            if deadline is not None:
                channel.sock.settimeout(_remaining(deadline))
            message, _ = channel.recv()
            self._heard = True
            op = message.get("op")
            if op == "result":
                if message.get("memory_error"):
                    self.healthy = False
                return message
            if op == "log":
                on_log(str(message.get("level") or "info"), list(message.get("lines") or []))
            elif op not in NOTIFY_OPS:
                channel.send({"ok": False, "error": f"{op!r} is not available to action steps"})

    def _wait_for_first_frame(self, deadline: float | None) -> None:
        """Wait for the invocation's first frame (on the socket, not reading it: a
        frame is never cut). A worker an earlier call stopped (SIGSTOP) would never
        send one: it is given up at once rather than waited out (``WorkerGone``)."""
        sock = self.process.channel.sock
        while not select.select([sock], [], [], min(_remaining(deadline) or STOP_CHECK, STOP_CHECK))[0]:
            if _stopped(self.process.pid):
                self.healthy = False
                self.process.kill()
                raise WorkerGone("the worker was stopped (SIGSTOP, by an earlier call) before "
                                 "it took the call")  # fmt: skip

    def _stop_at_time_limit(self, on_log: Callable[[str, list[str]], None]) -> str | None:
        """Past its deadline: ask the step's code to stop where it is and wait
        ``TIME_LIMIT_GRACE`` seconds for it to say where that was (its last log lines
        come too). The step can forge its frames: only text is taken."""
        if not self.process.stop_at_time_limit():
            return None
        try:
            result = self._result(time.monotonic() + TIME_LIMIT_GRACE, on_log)
        except (OSError, ProtocolError):  # (TimeoutError included: it did not say)
            return None
        where = result.get("stopped_at")
        return where[:MAX_STOPPED_AT] if isinstance(where, str) and where else None

    def alive(self) -> bool:
        """Whether an idle worker is still there and able to work: one waiting for
        a job sends nothing, so anything to read on its channel (end-of-file, above
        all) means it died meanwhile (killed, or its fork-server gone); and a call
        may have stopped it (SIGSTOP: its calls run as its user, in its sandbox),
        when the next call, whoever made it, would wait out its whole time limit."""
        poller = select.poll()
        try:
            poller.register(self.process.channel.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        except (OSError, ValueError):  # (a closed socket)
            return False
        return not poller.poll(0) and not _stopped(self.process.pid)

    def stop(self) -> None:
        """Ask the worker to exit, then release the process."""
        if self.healthy:
            try:
                self.process.channel.sock.settimeout(1.0)
                self.process.channel.send({"ok": True, "job": None})
            except OSError:
                pass
        self.process.kill()
        self.process.close()


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (by a signal, or a tracer)."""
    try:
        return linux.proc_stat(pid)[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    return remaining


class WorkerPool:
    """A bounded set of warm workers of one app.

    ``start`` makes one new :class:`WarmWorker`. ``warm`` workers are kept idle
    and ready (started in the background); at most ``max_workers`` exist at once,
    and callers beyond that wait for one to be free."""

    def __init__(self, start: Callable[[], WarmWorker], *, warm: int = 2, max_workers: int = 8,
                 max_uses: int = 1000, max_age: float = 3600.0):  # fmt: skip
        self._start = start
        self.warm = max(0, warm)
        self.max_workers = max(1, max_workers)
        self.max_uses = max_uses
        self.max_age = max_age
        self._cond = threading.Condition()
        self._idle: list[WarmWorker] = []
        self._count = 0  # started or starting, idle or busy
        self._starting = 0
        self._closed = False
        self.started_total = 0
        self.last_error: str | None = None
        self._filler: threading.Thread | None = None
        if self.warm:
            self._filler = threading.Thread(target=self._fill, name="stepwell-action-pool",
                                            daemon=True)  # fmt: skip
            self._filler.start()

    # -- the background filler ----------------------------------------------
    def _fill(self) -> None:
        """Keep ``warm`` idle workers (restarted after failures, with a pause)."""
        pause = 0.0
        while True:
            with self._cond:
                while not self._closed and (
                    len(self._idle) + self._starting >= self.warm or self._count >= self.max_workers
                ):
                    self._cond.wait()
                if self._closed:
                    return
                self._count += 1
                self._starting += 1
            if pause:
                time.sleep(pause)
            worker = self._new_worker()
            with self._cond:
                self._starting -= 1
                if worker is None:
                    self._count -= 1
                    pause = min(max(pause * 2, 0.5), 30.0)
                elif self._closed:
                    self._count -= 1
                else:
                    pause = 0.0
                    self._idle.append(worker)
                self._cond.notify_all()
            if worker is not None and self._closed:
                worker.stop()

    def _new_worker(self) -> WarmWorker | None:
        try:
            worker = self._start()
        except Exception as exc:  # noqa: BLE001 - reported to the next caller
            self.last_error = str(exc)
            log.warning("cannot start an action worker: %s", exc)
            return None
        self.started_total += 1
        return worker

    # -- borrowing --------------------------------------------------------------
    def acquire(self, deadline: float | None = None) -> WarmWorker:
        """An idle worker (or a new one); waits while ``max_workers`` are busy.
        Raises TimeoutError at ``deadline``, WorkerFailed when none can start."""
        with self._cond:
            while True:
                if self._closed:
                    raise WorkerFailed("the action worker pool is closed (the server is stopping)")
                while self._idle:
                    worker = self._idle.pop()
                    if self._fresh(worker) and worker.alive():
                        self._cond.notify_all()  # the filler may start a replacement
                        return worker
                    self._count -= 1  # spent or dead: retired, and the filler may replace it
                    self._cond.notify_all()
                    threading.Thread(target=worker.stop, daemon=True).start()
                if self._count < self.max_workers:
                    self._count += 1
                    break
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise TimeoutError
                self._cond.wait(timeout)
        worker = self._new_worker()
        if worker is None:
            with self._cond:
                self._count -= 1
                self._cond.notify_all()
            raise WorkerFailed(self.last_error or "an action worker did not start")
        return worker

    def _fresh(self, worker: WarmWorker) -> bool:
        return (
            worker.healthy
            and worker.uses < self.max_uses
            and time.monotonic() - worker.started < self.max_age
        )

    def release(self, worker: WarmWorker) -> None:
        """Give a worker back after an invocation (a spent or broken one is retired)."""
        with self._cond:
            if not self._closed and self._fresh(worker):
                self._idle.append(worker)
                self._cond.notify_all()
                return
            self._count -= 1
            self._cond.notify_all()
        worker.stop()

    def close(self) -> None:
        """Stop every idle worker; busy ones are stopped when they come back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for worker in idle:
            worker.stop()
        if self._filler is not None:
            self._filler.join(timeout=10)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"idle": len(self._idle), "workers": self._count,
                    "started": self.started_total, "max_workers": self.max_workers}  # fmt: skip
