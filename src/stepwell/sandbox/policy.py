"""What a run's sandbox looks like: limits, network, paths, and how limits are named.

``SandboxSpec`` travels from the host to the fork-server as a plain dict
(msgpack), so it only holds simple values. The helpers here also turn limits
and exit statuses into the messages users see ("memory limit 256MiB
exceeded", "CPU time limit 2s exceeded").
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field, fields
from typing import Any

#: Environment variable choosing the sandbox: ``default`` (fork-server + namespaces),
#: ``strict`` (no network unless a step asks, and no run without full isolation),
#: ``none`` (plain subprocess, for debugging).
MODE_ENV = "STEPWELL_SANDBOX"
#: Comma-separated isolation features to skip on purpose (``user,pid,mount,ipc,net,
#: seccomp``), to see how a run behaves on a kernel that refuses them.
SKIP_ENV = "STEPWELL_SANDBOX_SKIP"
#: Comma-separated modules a fork-server imports besides its defaults (``-name``
#: drops a default, e.g. ``-pandas``: the host starts its lean fork-server, without
#: numpy and pandas, that way).
PRELOAD_ENV = "STEPWELL_FORKSERVER_PRELOAD"
#: Folders (separated by ``:``) no sandbox may see: each is an empty folder in
#: every view, but for the folders a step needs inside it (its app, Python).
HIDE_ENV = "STEPWELL_SANDBOX_HIDE"
MODES = ("default", "strict", "none")
SKIPPABLE = ("user", "pid", "mount", "ipc", "net", "seccomp")

#: Limits that apply when neither the step nor the app sets one.
DEFAULT_PROCESSES = 512
DEFAULT_OPEN_FILES = 4096
DEFAULT_FILE_SIZE = 8 * 1024**3
#: Size of a run's private /tmp (a file system in memory) when nothing sets ``tmp``.
DEFAULT_TMP = 1024**3
#: Size of a run's private /dev/shm (whatever its ``tmp`` limit).
SHM_SIZE = 64 * 1024**2
#: Exit code a worker uses when it ran out of memory and could not report it.
MEMORY_EXIT_CODE = 86
#: Signal the host sends (through the fork-server) to a worker whose run has
#: passed its time limit: the step's code stops where it is and the worker
#: reports where that was, before it is killed.
TIME_LIMIT_SIGNAL = signal.SIGUSR2
#: Seconds a worker past its time limit has to say where its code was stopped
#: before it is killed (Python code stops at once; code stuck in C may not).
TIME_LIMIT_GRACE = 1.0
#: Characters of where a stopped step says it was that its error keeps (the step
#: may forge that report: a file, a line and an input row fit in far less).
MAX_STOPPED_AT = 300

#: Where the sandbox's private temp dir is mounted (also HOME and TMPDIR).
SANDBOX_TMP = "/tmp"


def sandbox_mode(value: str | None = None) -> str:
    """The sandbox mode from ``value`` or ``$STEPWELL_SANDBOX`` (``default`` when unset)."""
    mode = (value if value is not None else os.environ.get(MODE_ENV, "")).strip().lower()
    mode = mode or "default"
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r} ({MODE_ENV}): use one of {', '.join(MODES)}")
    return mode


def skipped_features(value: str | None = None) -> list[str]:
    """Isolation features disabled through ``$STEPWELL_SANDBOX_SKIP``."""
    text = value if value is not None else os.environ.get(SKIP_ENV, "")
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SKIPPABLE]
    if unknown:
        raise ValueError(
            f"{SKIP_ENV}: unknown feature(s) {', '.join(unknown)}; known: {', '.join(SKIPPABLE)}"
        )
    return names


def hidden_folders(value: str | None = None) -> list[str]:
    """Folders hidden from every sandbox through ``$STEPWELL_SANDBOX_HIDE``."""
    text = value if value is not None else os.environ.get(HIDE_ENV, "")
    folders = [part.strip() for part in text.split(":") if part.strip()]
    relative = [f for f in folders if not os.path.isabs(f)]
    if relative:
        raise ValueError(
            f"{HIDE_ENV}: {', '.join(map(repr, relative))} is not an absolute path; list "
            "absolute folders separated by ':' (e.g. /srv/keys:/data/private)"
        )
    return folders


@dataclass
class SandboxSpec:
    """Everything the fork-server needs to build one run's sandbox."""

    cwd: str
    env: dict[str, str]
    app_root: str | None = None
    #: folders the step must be able to read (app environment, extra sys.path entries)
    read_paths: list[str] = field(default_factory=list)
    #: folders hidden behind an empty read-only tmpfs (the store's folder)
    hide_paths: list[str] = field(default_factory=list)
    memory: int | None = None
    cpu: float | None = None
    processes: int | None = None
    open_files: int = DEFAULT_OPEN_FILES
    file_size: int = DEFAULT_FILE_SIZE
    #: bytes the private /tmp may hold (its files and folders together)
    tmp: int = DEFAULT_TMP
    network: bool = True
    skip: list[str] = field(default_factory=list)
    #: refuse to run when any isolation feature is unavailable
    strict: bool = False

    def to_dict(self) -> dict[str, Any]:
        # shallow: its values are plain strings, numbers, lists and dicts already
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def format_bytes(size: int) -> str:
    """``268435456`` -> ``"256MiB"`` (the largest binary unit that divides it)."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    if size >= 1024**2:
        return f"{size / 1024**2:.1f}MiB"
    return f"{size}B"


#: What a worker adds to a "no space left" error of its full /dev/shm.
SHM_FULL = "(/dev/shm holds at most"


def shm_full_note() -> str:
    """`` (/dev/shm holds at most 64MiB, ...)`` for a "no space left" error."""
    return f" {SHM_FULL} {format_bytes(SHM_SIZE)}, whatever the `tmp` limit; write big files to /tmp)"


def with_tmp_limit(error: str, tmp: int | None, where: str = "on the step") -> str:
    """``error`` with the ``tmp`` limit named when it says no space was left (in the
    sandbox only /tmp, and /dev/shm, can fill up: the rest is read-only), or when
    the step died of SIGBUS (what touching a memory-mapped file's page gets when
    its file system has no room for the page: the step is told nothing else)."""
    size = format_bytes(tmp if tmp is not None else DEFAULT_TMP)
    if "killed by SIGBUS" in error and "memory limit" not in error:
        return (f"{error} (as a memory-mapped file is when its pages do not fit: /tmp holds "
                f"at most {size}, its `tmp` limit, and /dev/shm {format_bytes(SHM_SIZE)}; "
                f"set a larger `tmp` {where})")  # fmt: skip
    if "[Errno 28]" not in error or SHM_FULL in error:  # (the worker named /dev/shm)
        return error
    return f"{error} (/tmp holds at most {size}, its `tmp` limit; set a larger `tmp` {where})"


def with_network_note(error: str, network: bool, where: str = "on the step") -> str:
    """``error`` with the reason when a step without network was refused a Unix
    socket (its sandbox's seccomp filter answers ``socket(AF_UNIX)`` so)."""
    if network or "[Errno 97]" not in error:
        return error
    return (f"{error} (a step without network may not open Unix sockets either; set "
            f"`network: true` {where} to use them)")  # fmt: skip


def format_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(
    status: int | None,
    *,
    memory: int | None = None,
    cpu: float | None = None,
    cpu_used: float = 0.0,
    stderr_tail: str = "",
) -> tuple[str, str]:
    """Map a worker's raw wait status to ``(run status, message)``.

    ``status`` is what ``waitpid`` returned (``None`` when it is unknown). A
    limit that explains the death is named with its value."""
    tail = f": {stderr_tail}" if stderr_tail else ""
    if status is None:
        return "killed", "the worker process stopped and its exit status is unknown" + tail
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal_name(number)
        if cpu is not None and (
            number == signal.SIGXCPU or (number == signal.SIGKILL and cpu_used >= cpu)
        ):
            return "timed_out", f"CPU time limit {format_seconds(cpu)} exceeded (killed by {name})"
        if memory is not None and number in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and (
            "memory" in stderr_tail.lower() or "bad_alloc" in stderr_tail
        ):
            return "killed", f"memory limit {format_bytes(memory)} exceeded (killed by {name})"
        return "killed", f"the worker process was killed by {name}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    if code == MEMORY_EXIT_CODE and memory is not None:
        return "killed", f"memory limit {format_bytes(memory)} exceeded"
    return "killed", (f"the worker process exited with code {code} before the step finished "
                      f"(os._exit() in the step, or a library ending the process?){tail}")  # fmt: skip
