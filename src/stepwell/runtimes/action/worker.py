"""Worker side of action code steps: a warm parent that forks one process per invocation.

The host starts the worker with a ``start`` frame naming :func:`serve`; the
worker sets the app up once (its environment on ``sys.path``, the app folder
importable, the modules the app's action code imports already imported) and
then asks for work. Frames, all from the worker (requests wait for a reply)::

    {"op": "ready"}                       -> {"ok": true, "job": {...} | null}
    {"op": "log", "level", "lines"}       (notification, no reply)
    {"op": "result", "status": "ok", "data": ...}
    {"op": "result", "status": "error", "error", "traceback"}
                                          -> {"ok": true, "job": {...} | null}

A job is ``{"source", "filename", "where", "package", "data", "error",
"params", "user", "variables"}``; a ``null`` job ends the worker.

The warm process never runs user code itself: each invocation is a fresh fork
of it, which reads its job, answers and exits. So nothing an invocation does
(module globals it changes, threads it leaves running, modules it imports) is
seen by the next one, whoever calls it; the fork is made while the host is
between invocations. ``print()`` output is sent to the host before the result.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import gc
import importlib
import inspect
import os
import select
import signal
import stat
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwell.runtimes.action.code import (
    FUNCTION_NAME,
    NotPassable,
    compile_step,
    syntax_message,
    to_wire,
)
from stepwell.sandbox import isolate, linux
from stepwell.sandbox.client import HostLink, LogStream
from stepwell.sandbox.policy import SANDBOX_TMP, TIME_LIMIT_SIGNAL, signal_name
from stepwell.sandbox.worker import TimeLimitReached, exception_text, time_limit_reached

#: Synthetic package the app folder is importable as (shared with node steps).
APP_PACKAGE = "stepwell_app"
def _mount_app(app_root: Path) -> None:
    """Make the app folder importable: plain imports and the ``stepwell_app`` package."""
    if APP_PACKAGE not in sys.modules:
        package = types.ModuleType(APP_PACKAGE)
        package.__path__ = [str(app_root)]
        package.__package__ = APP_PACKAGE
        sys.modules[APP_PACKAGE] = package
    if str(app_root) not in sys.path:
        sys.path.append(str(app_root))  # last: an app file must not shadow the stdlib


def _warm_up(modules: list[str]) -> list[str]:
    """Import what the app's action code imports; returns those that failed."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - a warm-up import must never end the worker
            failed.append(name)
    return failed


def _streams() -> list[LogStream]:
    return [s for s in (sys.stdout, sys.stderr) if isinstance(s, LogStream)]


def _end_output() -> None:
    """Send what was printed so far."""
    for stream in _streams():
        stream.close_out()


def _fresh_log_budget() -> None:
    """What the warm-up printed does not count against the invocations' log limit
    (each is a fork of this process, with this budget)."""
    streams = _streams()
    if streams:
        from stepwell.sandbox.client import MAX_LOG_CHARS, MAX_LOG_LINES

        streams[0].budget.update(lines=MAX_LOG_LINES - 1, chars=MAX_LOG_CHARS - 1000, dropped=0)


def _frame(exc: BaseException, filename: str, where: str, app_root: str) -> str | None:
    """``file:line`` of the innermost frame in the step's code or the app's files (or
    where its asyncio tasks waited, for the time limit's stop)."""
    frames = [(f.filename, f.lineno) for f in reversed(traceback.extract_tb(exc.__traceback__))]
    for name, line in frames + getattr(exc, "awaiting", []):
        if name == filename:
            return f"{where}:{line}"
        if app_root and name.startswith(app_root.rstrip("/") + "/"):
            return f"{name[len(app_root.rstrip('/')) + 1:]}:{line}"
    return None


def _user_traceback(exc: BaseException, filename: str, where: str, app_root: str) -> str:
    own = str(Path(__file__).resolve().parents[2])
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(own) or frame.filename.startswith("<frozen"):
            continue
        name = where if frame.filename == filename else frame.filename
        if app_root and name.startswith(app_root.rstrip("/") + "/"):
            name = name[len(app_root.rstrip("/")) + 1 :]
        shown = "<action step>" if frame.name == FUNCTION_NAME else frame.name
        lines.append(f'  File "{name}", line {frame.lineno}, in {shown}\n')
        if frame.line:
            lines.append(f"    {frame.line}\n")
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def run_job(job: dict[str, Any], app_root: str) -> dict[str, Any]:
    """Run one invocation; the ``result`` frame's fields."""
    filename = str(job["filename"])
    where = str(job.get("where") or filename)
    variables = dict(job.get("variables") or {})
    try:
        code, is_async = compile_step(str(job["source"]), filename, tuple(variables),
                                      int(job.get("first_line") or 1))
    except SyntaxError as exc:
        return {"status": "error", "error": syntax_message(exc, where), "traceback": None}
    namespace: dict[str, Any] = {
        "__name__": "__stepwell_action__",
        "__builtins__": builtins,
        "__package__": job.get("package") or APP_PACKAGE,
    }
    if job.get("file"):
        namespace["__file__"] = job["file"]
    try:
        exec(code, namespace)
        function = namespace[FUNCTION_NAME]
        value = function(job.get("data"), job.get("error"), job.get("params"), job.get("user"),
                         **variables)  # fmt: skip
        if is_async:
            value = asyncio.run(value)
        if inspect.isgenerator(value):
            value = list(value)
    except SystemExit as exc:
        return {"status": "error", "traceback": None,
                "error": f"the step called exit({exc.code if exc.code is not None else ''}); "
                         f"return a value or raise an exception instead"}  # fmt: skip
    except BaseException as exc:  # noqa: BLE001 - every failure goes back as the step's error
        frame = _frame(exc, filename, where, app_root)
        result = {
            "status": "error",
            "error": exception_text(exc) + (f" (at {frame})" if frame else ""),
            "traceback": _user_traceback(exc, filename, where, app_root),
            "memory_error": isinstance(exc, MemoryError),
        }
        if isinstance(exc, TimeLimitReached):
            result["stopped_at"] = frame or ""
        return result
    try:
        return {"status": "ok", "data": to_wire(value)}
    except NotPassable as exc:
        return {"status": "error", "traceback": None,
                "error": f"the step's result cannot be passed on: {exc}"}  # fmt: skip


def serve(link: HostLink, start: dict[str, Any]) -> None:
    """The worker's loop (runtime entry named in the ``start`` frame)."""
    app_root = str(start.get("app_root") or "")
    if app_root:
        _mount_app(Path(app_root))
    failed = _warm_up(list(start.get("warm_imports") or []))
    _end_output()
    _fresh_log_budget()
    gc.collect()
    gc.freeze()  # invocations then copy fewer of this process's pages
    invocations = _Invocations(link, app_root)
    # the host's time-limit signal comes to this process: the invocation's code is
    # what must stop (and say where it was)
    signal.signal(TIME_LIMIT_SIGNAL, invocations.pass_time_limit_on)
    invocations.serve(ready={"pid": os.getpid(), "failed_imports": failed})


#: What an invocation's process tells the warm worker, on a pipe of its own.
_TOOK, _ANSWERING, _STOP = b"T", b"A", b"S"
#: prctl(2): orphans of our children become ours (we reap them)
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class _Spare:
    """A fork of the warm worker waiting for its turn (one byte on ``go``)."""

    pid: int
    go: int  # write end: its turn
    said: int  # read end: what it tells us
    heard: bytes = b""


class _Invocations:
    """Forks of the warm worker, each serving one job.

    Spares are forked ahead, each waiting on a pipe of its own; the warm worker
    gives the next one its turn only once the one before has exited and its
    process group (whatever it started) is killed. So one invocation at a time
    talks to the host, nothing a call left running outlives it, and the warm
    process itself never runs user code. An invocation says ``A`` just before
    sending its result: one that ended without saying it sent none, and the warm
    worker answers for it (an error naming how it ended)."""

    SPARES = 2

    def __init__(self, link: HostLink, app_root: str):
        self.link = link
        self.app_root = app_root
        self.spares: collections.deque[_Spare] = collections.deque()
        #: pid of the invocation whose turn it is
        self.current: int | None = None
        #: the calls' temp dir (TMPDIR, also HOME; the sandbox's /tmp), its mode and
        #: what it held before any call (the way to an app under /tmp, the stderr
        #: file of a worker without sandbox): see _empty_tmp
        self.tmp = os.environ.get("TMPDIR") or None
        try:
            self.tmp_mode = stat.S_IMODE(os.lstat(self.tmp).st_mode) if self.tmp else 0o700
            self.tmp_kept = frozenset(os.listdir(self.tmp) if self.tmp else ())
        except OSError:
            self.tmp = None
        #: /dev/shm is the sandbox's own too where /tmp is (a mount namespace of its
        #: own), else the host's: then what is in it is not the calls' alone
        self.shm = "/dev/shm" if self.tmp == SANDBOX_TMP and os.path.isdir("/dev/shm") else None
        self.shm_kept = frozenset(os.listdir(self.shm) if self.shm else ())
        #: System V IPC objects and POSIX message queues (where an ``mqueue`` mount
        #: lists them) are the calls' alone where the worker has an IPC namespace of
        #: its own, and what was there before any call: see _clear_ipc
        self.ipc = isolate.own_ipc_namespace
        self.mqueue: str | None = None
        try:
            self.ipc_kept = linux.sysv_ipc_objects() if self.ipc else set()
            if self.ipc:
                self.mqueue = next((path for path, kind in linux.mounts() if kind == "mqueue"), None)
            self.mqueue_kept = frozenset(os.listdir(self.mqueue) if self.mqueue else ())
        except OSError:  # (a kernel without System V IPC)
            self.ipc = False
        with contextlib.suppress(OSError):  # (then orphans go to the namespace's init)
            linux.prctl(_PR_SET_CHILD_SUBREAPER, 1)

    def serve(self, ready: dict[str, Any]) -> None:
        for _ in range(self.SPARES):
            self.spares.append(self._fork())
        self.link.notify("ready", **ready)  # its reply, the first job, is the first turn's
        while True:
            current = self.spares.popleft() if self.spares else self._fork()
            try:
                os.write(current.go, b"g")
            except BrokenPipeError:  # a spare that died waiting
                self._discard(current)
                continue
            os.close(current.go)
            self.current = current.pid
            try:
                if not self._follow(current):
                    return
            finally:
                self.current = None

    def pass_time_limit_on(self, _signum: int, _frame: Any) -> None:
        """Signal handler: the current invocation's time is up."""
        if self.current is not None:
            with contextlib.suppress(OSError):
                os.kill(self.current, TIME_LIMIT_SIGNAL)

    def _discard(self, spare: _Spare) -> None:
        for fd in (spare.go, spare.said):
            os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spare.pid, 0)

    def _follow(self, current: _Spare) -> bool:
        """Wait for ``current`` to end; False when the host said to stop. Its end is
        its exit, not the end of its pipe: a process the step forked may hold that."""
        try:
            pidfd: int | None = os.pidfd_open(current.pid)
        except OSError:  # (no pidfds: look every 10 ms)
            pidfd = None
        said_open = True
        while True:
            watch = [fd for fd in (current.said if said_open else None, pidfd) if fd is not None]
            ready = select.select(watch, [], [], None if pidfd is not None else 0.01)[0]
            if current.said in ready:
                data = os.read(current.said, 16)
                if _TOOK in data and _TOOK not in current.heard:  # forked while it works
                    with contextlib.suppress(OSError):  # (none now: made when needed)
                        self.spares.append(self._fork())
                current.heard += data
                said_open = bool(data)
                continue
            pid, status = os.waitpid(current.pid, os.WNOHANG)
            if pid:
                break
        with contextlib.suppress(OSError):
            os.killpg(current.pid, signal.SIGKILL)  # what it started ends with it
        if said_open:  # (what it said as it exited)
            os.set_blocking(current.said, False)
            with contextlib.suppress(OSError):
                current.heard += os.read(current.said, 16)
        os.close(current.said)
        if pidfd is not None:
            os.close(pidfd)
        ending = _ending(status)
        _reap_orphans()
        ended = self._end_strays() and self._empty_tmp() and self._clear_ipc()
        if _STOP in current.heard:
            self._stop()
            return False
        if _TOOK in current.heard and _ANSWERING not in current.heard:
            self.link.notify("result", status="error", traceback=None, memory_error=False,
                             error=f"the step's process ended before it returned: {ending}")  # fmt: skip
        if not ended:  # this worker ends too: the host replaces it
            self._stop()
            return False
        return True

    def _empty_tmp(self) -> bool:
        """Remove what the call left in the temp dir (and /dev/shm) and undo a change
        to the temp dir's mode: the calls of a warm worker share its sandbox, and the
        next may be another user's (and what each left would count against the app's
        `tmp` limit for all). False when some of it stays."""
        if self.tmp is None:
            return True
        try:
            if stat.S_IMODE(os.lstat(self.tmp).st_mode) != self.tmp_mode:
                os.chmod(self.tmp, self.tmp_mode)
            for name in os.listxattr(self.tmp, follow_symlinks=False):  # (a note left there)
                os.removexattr(self.tmp, name, follow_symlinks=False)
            clean = _empty_folder(self.tmp, self.tmp_kept)
            return (_empty_folder(self.shm, self.shm_kept) if self.shm else True) and clean
        except OSError:
            return False

    def _clear_ipc(self) -> bool:
        """Remove the System V IPC objects and POSIX message queues the call left:
        the next call, maybe another user's, would find what is in them. False when
        some of it stays."""
        if not self.ipc:
            return True
        try:
            for kind, ident in linux.sysv_ipc_objects() - self.ipc_kept:
                linux.remove_sysv_ipc(kind, ident)
            if self.mqueue:
                for name in set(os.listdir(self.mqueue)) - self.mqueue_kept:
                    linux.mq_unlink(name)
        except OSError:
            return False
        return True

    def _end_strays(self) -> bool:
        """Kill what the call left running outside its process group (a process in
        a session of its own, or a group of its own, comes to this one, the
        subreaper, once its parent has ended); False when some would not end."""
        for _ in range(_STRAY_ROUNDS):  # (their children come to us as they die)
            spares = {spare.pid for spare in self.spares}
            strays = [pid for pid in _children() if pid not in spares]
            if not strays:
                return True
            for pid in strays:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            for pid in strays:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        return False

    def _fork(self) -> _Spare:
        go_read, go_write = os.pipe()
        said_read, said_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                signal.signal(TIME_LIMIT_SIGNAL, time_limit_reached)
                os.setpgid(0, 0)
                for spare in self.spares:  # the others' pipes are none of its business
                    os.close(spare.go)
                    os.close(spare.said)
                os.close(go_write)
                os.close(said_read)
                code = self._invocation(go_read, said_write)
            finally:
                os._exit(code)
        os.close(go_read)
        os.close(said_write)
        return _Spare(pid, go_write, said_read)

    def _invocation(self, go: int, said: int) -> int:
        """In an invocation's process: wait for the turn, serve one job."""
        if not os.read(go, 1):  # the warm worker is gone
            return 0
        os.write(said, _TOOK)
        self.link.adopt()
        if not _serve_one(self.link, self.app_root, lambda: os.write(said, _ANSWERING)):
            os.write(said, _STOP)
        return 0

    def _stop(self) -> None:
        for spare in self.spares:  # (each reads end-of-file and exits)
            self._discard(spare)
        self.spares.clear()


#: Entries a call left in /tmp that a warm worker removes at most; it ends instead
#: (a new worker, with a new /tmp, is quicker for the next call).
_CLEAN_BUDGET = 5000
#: Times ``_end_strays`` kills what is left before it gives up on the worker.
_STRAY_ROUNDS = 50


def _children() -> list[int]:
    """This process's children: from ``/proc/self/task/*/children`` where the
    kernel has it, else from every process's ``stat`` (few, in a PID namespace);
    none known when ``/proc`` is not of this process's PID namespace."""
    me, pids = os.getpid(), []
    try:
        if os.readlink("/proc/self") != str(me):  # another PID namespace's /proc
            return []
        for task in os.listdir("/proc/self/task"):  # (os.open: a call waits for this)
            fd = os.open(f"/proc/self/task/{task}/children", os.O_RDONLY | os.O_CLOEXEC)
            try:
                pids += [int(pid) for pid in os.read(fd, 1 << 16).split()]
            finally:
                os.close(fd)
        return pids
    except FileNotFoundError:
        pass
    except OSError:
        return []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = linux.proc_stat(name)
            except OSError:  # (ended meanwhile)
                continue
            if int(fields[1]) == me:
                pids.append(int(name))
    return pids


def _empty_folder(path: str, keep: frozenset[str]) -> bool:
    """Remove what folder ``path`` holds but the entries named ``keep``; whether
    nothing else is left. Gives up after ``_CLEAN_BUDGET`` entries: the next call
    waits for this, and a worker ending (its /tmp with it) costs it less."""
    names = [name for name in os.listdir(path) if name not in keep]
    if not names:  # (the usual case: nothing more to do)
        return True
    if len(names) > _CLEAN_BUDGET:
        return False
    from stepwell.sandbox.forkserver import remove_tree

    share = max(2, _CLEAN_BUDGET // len(names))  # (of the budget, for each entry)
    for name in names:
        inner = os.path.join(path, name)
        if stat.S_ISDIR(os.lstat(inner).st_mode):
            with contextlib.suppress(OSError):  # (one the call made unreadable)
                os.chmod(inner, 0o700)
        if not remove_tree(inner, budget=share):
            return False
    return not any(os.path.lexists(os.path.join(path, name)) for name in names)


def _reap_orphans() -> None:
    """Collect processes that ended (orphans of invocations come to us)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _serve_one(link: HostLink, app_root: str, answering: Callable[[], Any]) -> bool:
    """Read the job, run it, send its result (``answering()`` first); False when
    the host said to stop. Nothing this process sends after the result is sent:
    a thread the step left running must not write on the channel."""
    message, _ = link.channel.recv()
    job = message.get("job")
    if not job:
        return False
    result = run_job(job, app_root)
    _end_output()
    answering()
    try:
        link.notify("result", last=True, **result)
    except (TypeError, ValueError, OverflowError) as exc:  # the protocol cannot carry it
        link.notify("result", last=True, status="error", traceback=None,
                    error=f"the step's result cannot be passed on: {exc}")  # fmt: skip
    return True


def _ending(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal_name(os.WTERMSIG(status))}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
