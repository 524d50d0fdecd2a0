"""Worker process entry point: one run of user code, then exit.

The host hands the worker one end of a socketpair (its file descriptor number
is the only argument), then sends a ``start`` frame naming the runtime entry
point (``module:function``) and the run's context; a ``prepare`` frame with
part of it may come first, while the run is not ready to start yet. The worker routes
stdout/stderr into the run log, calls the entry point and makes sure the host
always hears a final ``done``, whatever user code did.
"""

from __future__ import annotations

import gc
import importlib
import mmap
import os
import signal
import site
import socket
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from stepwell.sandbox.client import HostLink, capture_output
from stepwell.sandbox.policy import (
    MEMORY_EXIT_CODE,
    SANDBOX_TMP,
    TIME_LIMIT_SIGNAL,
    shm_full_note,
)
from stepwell.sandbox.protocol import Channel, PeerGone

#: Source folders of stepwell itself: frames from here are not the user's.
_OWN_ROOT = str(Path(__file__).resolve().parents[1])


def user_traceback(exc: BaseException, app_root: str | None = None) -> str:
    """Format ``exc`` keeping only frames of user code (not stepwell, not the stdlib
    plumbing that ran it), so the error points at the user's file and line. Its
    causes (``raise ... from``) and the exceptions it was raised while handling come
    first, as Python prints them."""
    chain: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    link: tuple[BaseException, str | None] | None = (exc, None)
    while link is not None and id(link[0]) not in seen and len(chain) < 20:
        current, joint = link
        seen.add(id(current))
        chain.append((current, joint))
        if current.__cause__ is not None:
            link = (current.__cause__, "The above exception was the direct cause of the "
                                       "following exception:")  # fmt: skip
        elif current.__context__ is not None and not current.__suppress_context__:
            link = (current.__context__, "During handling of the above exception, another "
                                         "exception occurred:")  # fmt: skip
        else:
            link = None
    lines: list[str] = []
    for current, joint in reversed(chain):
        lines.append("Traceback (most recent call last):\n")
        for frame in traceback.extract_tb(current.__traceback__):
            if frame.filename.startswith((_OWN_ROOT, "<frozen", "<stepwell")):
                continue  # (stepwell's own code, also the code it generates)
            name = _app_relative(frame.filename, app_root)
            lines.append(f'  File "{name}", line {frame.lineno}, in {frame.name}\n')
            if frame.line:
                lines.append(f"    {frame.line}\n")
        lines.extend(traceback.format_exception_only(type(current), current))
        if joint is not None:
            lines.append(f"\n{joint}\n\n")
    return "".join(lines)


class TimeLimitReached(BaseException):
    """Raised in the step's code when the host says the run's time limit has passed
    (a BaseException, so that ``except Exception`` in user code does not hold it)."""


def time_limit_reached(_signum: int, _frame: Any) -> None:
    """Handler of ``TIME_LIMIT_SIGNAL``: stop the step's code where it is."""
    signal.signal(TIME_LIMIT_SIGNAL, signal.SIG_IGN)  # once is enough
    stop = TimeLimitReached("the run's time limit has passed")
    stop.awaiting = _awaiting()  # type: ignore[attr-defined]
    raise stop


def _awaiting() -> list[tuple[str, int]]:
    """(file, line) of the frames where this thread's asyncio tasks wait, innermost
    first: when the code is stopped while its event loop waits, the traceback shows
    only the loop."""
    asyncio = sys.modules.get("asyncio")
    try:
        tasks = asyncio.all_tasks() if asyncio is not None else ()
    except RuntimeError:  # no event loop running
        return []
    frames = []
    for task in tasks:
        chain, coro = [], task.get_coro()
        while coro is not None and len(chain) < 100:  # down the chain of awaits
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append((frame.f_code.co_filename, frame.f_lineno))
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        frames += reversed(chain)
    return frames


def user_frame(exc: BaseException, app_root: str | None = None) -> str | None:
    """``file:line`` of the user's code ``exc`` came from: the innermost frame it
    passed through in the app's folder (else outside stepwell), or where the step's
    asyncio tasks were waiting when it was raised."""
    frames = [(f.filename, f.lineno) for f in reversed(traceback.extract_tb(exc.__traceback__))]
    frames += getattr(exc, "awaiting", [])
    inside = (app_root or "").rstrip("/") + "/"
    in_app = [f for f in frames if app_root and f[0].startswith(inside)]
    for filename, lineno in in_app or [f for f in frames if not f[0].startswith((_OWN_ROOT, "<"))]:
        return f"{_app_relative(filename, app_root)}:{lineno}"
    return None


def error_summary(exc: BaseException, app_root: str | None = None) -> str:
    """One line: the exception and the innermost user frame that raised it."""
    frame = user_frame(exc, app_root)
    where = f" (at {frame})" if frame else ""
    if isinstance(exc, SyntaxError) and exc.lineno:
        message = exc.msg  # where: the file and line of the code that does not parse
        if exc.filename and not exc.filename.startswith("<"):
            where = f" (at {_app_relative(exc.filename, app_root)}:{exc.lineno})"
        else:
            message += f" (line {exc.lineno})"
        return f"{type(exc).__name__}: {message}{where}"
    return exception_text(exc) + where


def exception_text(exc: BaseException) -> str:
    """``Type: message`` of a user exception (whatever its ``__str__`` does), with
    what to do when that is clear (a module that is not installed)."""
    try:
        message = str(exc).strip()
    except Exception as broken:  # noqa: BLE001 - the user's own __str__ failed
        message = f"(its message could not be made: {type(broken).__name__} in its __str__)"
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list) and notes:  # (what stepwell or the user added: the row...)
        message += "".join(f" [{note}]" for note in notes if isinstance(note, str))
    if "[Errno 28]" in message and _shm_is_full(exc):  # else the host names the `tmp` limit
        message += shm_full_note()
    if type(exc) is NameError and exc.name in _TYPING_NAMES:  # code copied with its hints
        message += f" (add `from typing import {exc.name}` at the top of the file)"
    if isinstance(exc, ModuleNotFoundError) and exc.name in sys.stdlib_module_names:
        message += _stdlib_module_missing()
    elif isinstance(exc, ModuleNotFoundError) and exc.name and "." not in exc.name:
        package = _PIP_NAMES.get(exc.name, exc.name)
        message += (f" (not installed: add {package} to a requirements file named by the "
                    f"app's requirements_file:, which stepwell installs once and reuses)")  # fmt: skip
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _stdlib_module_missing() -> str:
    """Why a module of Python's standard library cannot be imported."""
    library = os.path.dirname(os.__file__)
    if os.access(library, os.R_OK | os.X_OK):
        return " (part of Python's standard library, but left out of this Python's build)"
    return (f" (part of Python's standard library, which the sandbox's user may not read: "
            f"{library} is closed to it, and without a mount namespace it cannot be shown "
            f"to it; use a Python installed where every user may read it)")


def _shm_is_full(exc: BaseException) -> bool:
    """Whether "no space left" ``exc`` is /dev/shm's (of a size of its own), not
    /tmp's: the file it names is in /dev/shm or, when it names none, /dev/shm is
    full and /tmp is not."""
    name = getattr(exc, "filename", None)
    if isinstance(name, str) and name:
        return os.path.realpath(name).startswith("/dev/shm/")
    try:
        shm, tmp = os.statvfs("/dev/shm"), os.statvfs(SANDBOX_TMP)
    except OSError:
        return False

    def full(fs: os.statvfs_result) -> bool:
        return fs.f_bavail * fs.f_frsize < 1024**2 or (fs.f_files > 0 and fs.f_favail == 0)

    return full(shm) and not full(tmp)


#: Names of ``typing`` that code written against another product's docs uses unimported.
_TYPING_NAMES = frozenset({
    "Any", "Dict", "List", "Optional", "Union", "Tuple", "Set", "Iterator", "Iterable",
    "Generator", "Callable", "Mapping", "Sequence",
})  # fmt: skip

#: Import names whose package on PyPI is called otherwise.
_PIP_NAMES = {
    "bs4": "beautifulsoup4", "jwt": "PyJWT", "sklearn": "scikit-learn", "yaml": "PyYAML",
    "PIL": "Pillow", "cv2": "opencv-python", "dateutil": "python-dateutil", "bson": "pymongo",
    "jose": "python-jose", "dotenv": "python-dotenv", "llama_index": "llama-index",
    "google": "protobuf", "azure": "azure-cosmos",
}  # fmt: skip


def _app_relative(filename: str, app_root: str | None) -> str:
    """``filename`` relative to the app folder when it is inside it."""
    prefix = (app_root or "").rstrip("/") + "/"
    return filename[len(prefix):] if app_root and filename.startswith(prefix) else filename


def _add_site_dirs(paths: list[str]) -> None:
    """Put the app environment's site-packages (with its .pth files) first on sys.path."""
    before = list(sys.path)
    for path in paths:
        site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


def ping(link: HostLink, start: dict[str, Any]) -> None:
    """A runtime entry that does nothing: measures the cost of a worker itself."""
    link.notify("done", status="ok")


def load_entry(spec: str) -> Any:
    module_name, _, func = spec.partition(":")
    return getattr(importlib.import_module(module_name), func)


def _prepare(message: dict[str, Any]) -> None:
    """Let the runtime get ready for its run (``prepare(message)``, if it has one)
    before the start frame comes. Runs none of the step's code; whatever fails is
    done again, and reported, when the run starts."""
    try:
        load_entry(message["entry"].partition(":")[0] + ":prepare")(message)
    except Exception:  # (also: a runtime without ``prepare``)
        pass


def _report_failure(link: HostLink, exc: BaseException, app_root: str | None) -> None:
    error = error_summary(exc, app_root)
    trace = user_traceback(exc, app_root)
    details: dict[str, Any] = {}
    if isinstance(exc, TimeLimitReached):  # where the step's code was stopped
        notes = getattr(exc, "__notes__", None) or []
        details["stopped_at"] = ", ".join([*filter(None, [user_frame(exc, app_root)]), *notes])
    link.notify("done", status="error", error=error, traceback=trace,
                memory_error=isinstance(exc, MemoryError), **details)  # fmt: skip


def serve(channel: Channel, notes: list[str] | None = None, refuse: str | None = None) -> int:
    """Run the one job the host sends on ``channel``. Returns the exit code.

    ``notes`` go to the run log first (isolation that was not available);
    ``refuse`` makes the run fail with that message without running user code."""
    link = HostLink(channel)
    owner = os.getpid()
    # address space set aside (the memory limit is on it), so a MemoryError can still
    # be reported; mapped but never touched, it costs the run no page faults
    reserve: mmap.mmap | None = mmap.mmap(-1, 256 * 1024)
    if notes:
        try:
            link.notify("log", level="warn", lines=list(notes))
        except OSError:
            return 3
    # from here on, what this process prints goes to the run log (a .pth file's
    # complaint included); set up before the start frame, while the host is busy
    out, err = capture_output(link)
    try:
        start, _ = channel.recv()
        if start.get("op") == "prepare":
            if refuse is None:
                _prepare(start)
            start, _ = channel.recv()
    except PeerGone:
        return 3
    if refuse:
        try:
            link.notify("done", status="error", error=refuse)
        except Exception:
            pass
        return 1
    _add_site_dirs(start.get("sys_path", []))
    signal.signal(TIME_LIMIT_SIGNAL, time_limit_reached)
    try:
        load_entry(start["entry"])(link, start)
        return 0
    except PeerGone:
        return 3
    except BaseException as exc:  # noqa: BLE001 - the host must hear about anything
        if os.getpid() != owner:  # a process the step forked: it has no run to report
            return 1
        if isinstance(exc, MemoryError):
            reserve.close()
            reserve = None
            exc.__traceback__ = _without_locals(exc.__traceback__)
            for name in [m for m in sys.modules if m.startswith("stepwell_app")]:
                del sys.modules[name]  # the step's module globals may hold the memory
            gc.collect()
        try:
            out.close_out()
            err.close_out()
            _report_failure(link, exc, start.get("app_root"))
        except MemoryError:
            return MEMORY_EXIT_CODE
        except Exception:
            pass
        return MEMORY_EXIT_CODE if isinstance(exc, MemoryError) else 1
    finally:
        del reserve
        if os.getpid() == owner:
            for stream in (out, err):
                try:
                    stream.close_out()
                except Exception:
                    pass


def _without_locals(tb: TracebackType | None) -> TracebackType | None:
    """Free what the failing frames hold (their locals may be the memory hog)."""
    walk = tb
    while walk is not None:
        try:
            walk.tb_frame.clear()
        except RuntimeError:  # a frame still executing (ours)
            pass
        walk = walk.tb_next
    return tb


def serve_forked(notes: list[str], strict: bool = False, refuse: str | None = None) -> int:
    """Entry of a worker forked by the fork-server (channel on ``CHANNEL_FD``)."""
    from stepwell.sandbox.isolate import CHANNEL_FD

    if refuse is None and strict and notes:
        refuse = ("sandbox mode `strict` refuses to run this step without full isolation: "
                  + "; ".join(n.removeprefix("[stepwell] sandbox: ") for n in notes))  # fmt: skip
    sock = socket.socket(fileno=CHANNEL_FD)
    code = serve(Channel(sock), notes, refuse)
    sys.stdout.flush = lambda: None  # the channel may be gone; skip interpreter flushes
    return code


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[0]))
    code = serve(Channel(sock))
    sys.stdout.flush = lambda: None  # the channel may be gone; skip interpreter flushes
    os._exit(code)


if __name__ == "__main__":
    main()
