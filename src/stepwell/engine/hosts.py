"""Which host a run belongs to: a run's ``host_pid`` means something only on the
machine (and in the PID namespace) that recorded it."""

from __future__ import annotations

import functools
import os
import socket
from typing import Any


@functools.cache
def this_host() -> str:
    """This machine and PID namespace, as run records name it (``info["host"]``)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def on_this_host(run: Any) -> bool:
    """Whether ``run`` was recorded here (runs recorded before hosts were named count
    as local)."""
    return (run.info or {}).get("host", this_host()) == this_host()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_elsewhere(run: Any) -> bool:
    """Whether ``run`` belongs to a process other than this one that may still be
    there: one of another host (which this one cannot look at), or a live one here."""
    if not on_this_host(run):
        return True
    return bool(run.host_pid) and run.host_pid != os.getpid() and process_alive(run.host_pid)
