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
import contextlib
import gc
import importlib
import inspect
import os
import select
import signal
import sys
import traceback
import types
from pathlib import Path
from typing import Any

from stepwell.runtimes.action.code import (
    FUNCTION_NAME,
    NotPassable,
    compile_step,
    syntax_message,
    to_wire,
)
from stepwell.sandbox.client import HostLink, LogStream
from stepwell.sandbox.policy import signal_name

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
    """Send what the invocation printed, and give the next one a fresh log budget."""
    streams = _streams()
    for stream in streams:
        stream.close_out()
    if streams:
        budget = streams[0].budget
        from stepwell.sandbox.client import MAX_LOG_CHARS, MAX_LOG_LINES

        budget.update(lines=MAX_LOG_LINES - 1, chars=MAX_LOG_CHARS - 1000, dropped=0)


def _location(exc: BaseException, filename: str, where: str, app_root: str) -> str:
    """`` (at file:line)`` of the innermost frame in the step's code or the app's files."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == filename:
            return f" (at {where}:{frame.lineno})"
        if app_root and frame.filename.startswith(app_root.rstrip("/") + "/"):
            return f" (at {frame.filename[len(app_root.rstrip('/')) + 1:]}:{frame.lineno})"
    return ""


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
        message = str(exc).strip()
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return {
            "status": "error",
            "error": text + _location(exc, filename, where, app_root),
            "traceback": _user_traceback(exc, filename, where, app_root),
            "memory_error": isinstance(exc, MemoryError),
        }
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
    gc.collect()
    gc.freeze()  # invocations then copy fewer of this process's pages
    _Invocations(link, app_root).serve(ready={"pid": os.getpid(), "failed_imports": failed})


#: What an invocation's process tells the warm worker, on a pipe of its own.
_TOOK, _ANSWERED, _STOP = b"T", b"A", b"S"


class _Invocations:
    """Forks of the warm worker, each serving one job.

    A few are forked ahead and wait for the *turn*: one byte on a pipe they all
    read, so exactly one takes it. That one reads its job from the channel,
    answers, passes the turn on and exits; the warm worker forks a replacement
    meanwhile. So a job never waits for a fork, and the warm process itself
    never runs user code. When an invocation ends without answering, the warm
    worker answers for it (an error naming how it ended) and passes the turn on."""

    SPARES = 2

    def __init__(self, link: HostLink, app_root: str):
        self.link = link
        self.app_root = app_root
        self.turn_read, self.turn_write = os.pipe()
        #: each invocation's pipe -> (its pid, what it said so far)
        self.said: dict[int, tuple[int, bytes]] = {}

    def serve(self, ready: dict[str, Any]) -> None:
        for _ in range(self.SPARES):
            self._fork()
        self.link.notify("ready", **ready)  # its reply, the first job, is the first turn's
        os.write(self.turn_write, b"t")
        while True:
            for fd in select.select(list(self.said), [], [])[0]:
                if not self._heard(fd):
                    return

    def _heard(self, fd: int) -> bool:
        """Take in what one invocation said; False when the host said to stop."""
        pid, said = self.said[fd]
        data = os.read(fd, 16)
        if data:
            self.said[fd] = (pid, said + data)
            if _STOP in data:
                self._stop()
                return False
            if _TOOK in data:  # one spare fewer: fork the next while this one works
                self._fork()
            return True
        os.close(fd)
        del self.said[fd]
        try:
            _, status = os.waitpid(pid, 0)
            ending = _ending(status)
        except ChildProcessError:
            ending = "it ended"
        if _TOOK in said and _ANSWERED not in said:
            self.link.notify("result", status="error", traceback=None, memory_error=False,
                             error=f"the step's process ended before it returned: {ending}")  # fmt: skip
            os.write(self.turn_write, b"t")
        elif _TOOK not in said:  # a spare that died waiting
            self._fork()
        return True

    def _fork(self) -> None:
        said_read, said_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.close(said_read)
                code = self._invocation(said_write)
            finally:
                os._exit(code)
        os.close(said_write)
        self.said[said_read] = (pid, b"")

    def _invocation(self, said: int) -> int:
        """In an invocation's process: wait for the turn, serve one job, pass the turn."""
        if not os.read(self.turn_read, 1):
            return 0
        os.write(said, _TOOK)
        self.link.adopt()
        if not _serve_one(self.link, self.app_root):
            os.write(said, _STOP)
            return 0
        os.write(said, _ANSWERED)
        os.write(self.turn_write, b"t")
        return 0

    def _stop(self) -> None:
        for fd, (pid, said) in self.said.items():
            if _STOP not in said:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.close(fd)
        for pid, _ in self.said.values():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.said.clear()


def _serve_one(link: HostLink, app_root: str) -> bool:
    """Read the job, run it, send its result; False when the host said to stop."""
    message, _ = link.channel.recv()
    job = message.get("job")
    if not job:
        return False
    result = run_job(job, app_root)
    _end_output()
    try:
        link.notify("result", **result)
    except (TypeError, ValueError, OverflowError) as exc:  # the protocol cannot carry it
        link.notify("result", status="error", traceback=None,
                    error=f"the step's result cannot be passed on: {exc}")  # fmt: skip
    return True


def _ending(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal_name(os.WTERMSIG(status))}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
