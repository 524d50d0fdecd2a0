"""Worker process entry point: one run of user code, then exit.

The host hands the worker one end of a socketpair (its file descriptor number
is the only argument), then sends a ``start`` frame naming the runtime entry
point (``module:function``) and the run's context. The worker routes
stdout/stderr into the run log, calls the entry point and makes sure the host
always hears a final ``done``, whatever user code did.
"""

from __future__ import annotations

import importlib
import os
import site
import socket
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from stepwell.sandbox.client import HostLink, capture_output
from stepwell.sandbox.protocol import Channel, PeerGone

#: Source folders of stepwell itself: frames from here are not the user's.
_OWN_ROOT = str(Path(__file__).resolve().parents[1])


def user_traceback(exc: BaseException, app_root: str | None = None) -> str:
    """Format ``exc`` keeping only frames of user code (not stepwell, not the stdlib
    plumbing that ran it), so the error points at the user's file and line."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(_OWN_ROOT) and not frame.filename.startswith("<frozen")
    ]
    lines = ["Traceback (most recent call last):\n"]
    for frame in frames:
        name = frame.filename
        if app_root and name.startswith(app_root.rstrip("/") + "/"):
            name = name[len(app_root.rstrip("/")) + 1 :]
        lines.append(f'  File "{name}", line {frame.lineno}, in {frame.name}\n')
        if frame.line:
            lines.append(f"    {frame.line}\n")
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def error_summary(exc: BaseException, app_root: str | None = None) -> str:
    """One line: the exception and the innermost user frame that raised it."""
    where = ""
    tb: TracebackType | None = exc.__traceback__
    for frame in reversed(traceback.extract_tb(tb)):
        if not frame.filename.startswith(_OWN_ROOT) and not frame.filename.startswith("<"):
            name = frame.filename
            if app_root and name.startswith(app_root.rstrip("/") + "/"):
                name = name[len(app_root.rstrip("/")) + 1 :]
            where = f" (at {name}:{frame.lineno})"
            break
    message = str(exc).strip()
    if isinstance(exc, SyntaxError) and exc.lineno:
        message = f"{exc.msg} (line {exc.lineno})"
    return (f"{type(exc).__name__}: {message}" if message else type(exc).__name__) + where


def _add_site_dirs(paths: list[str]) -> None:
    """Put the app environment's site-packages (with its .pth files) first on sys.path."""
    before = list(sys.path)
    for path in paths:
        site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


def load_entry(spec: str) -> Any:
    module_name, _, func = spec.partition(":")
    return getattr(importlib.import_module(module_name), func)


def serve(channel: Channel) -> int:
    """Run the one job the host sends on ``channel``. Returns the exit code."""
    link = HostLink(channel)
    try:
        start, _ = channel.recv()
    except PeerGone:
        return 3
    _add_site_dirs(start.get("sys_path", []))
    out, err = capture_output(link)
    try:
        load_entry(start["entry"])(link, start)
        return 0
    except PeerGone:
        return 3
    except BaseException as exc:  # noqa: BLE001 - the host must hear about anything
        out.close_out()
        err.close_out()
        app_root = start.get("app_root")
        try:
            link.call(
                "done",
                status="error",
                error=error_summary(exc, app_root),
                traceback=user_traceback(exc, app_root),
            )
        except Exception:
            pass
        return 1
    finally:
        for stream in (out, err):
            try:
                stream.close_out()
            except Exception:
                pass


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[0]))
    code = serve(Channel(sock))
    sys.stdout.flush = lambda: None  # the channel may be gone; skip interpreter flushes
    os._exit(code)


if __name__ == "__main__":
    main()
