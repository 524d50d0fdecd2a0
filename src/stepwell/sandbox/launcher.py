"""Starting worker processes and describing how they ended.

By default every worker is a fresh fork of the host's **fork-server** (one per
host process, started lazily with a clean environment, restarted if it dies),
isolated in namespaces with rlimits (see ``forkserver`` and ``isolate``).
``STEPWELL_SANDBOX=none`` starts a plain subprocess instead (for debugging:
no isolation besides a scrubbed environment), and ``strict`` refuses to run a
step without full isolation and turns the network off unless a step asks.

Runners only see ``start_worker(...) -> WorkerProcess``: a data channel to the
worker, ``kill()``, ``wait()``, and ``exit_outcome()`` naming how it ended.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from stepwell.sandbox.policy import (
    DEFAULT_PROCESSES,
    DEFAULT_TMP,
    HIDE_ENV,
    PRELOAD_ENV,
    SKIP_ENV,
    TIME_LIMIT_SIGNAL,
    SandboxSpec,
    describe_exit,
    hidden_folders,
    sandbox_mode,
    skipped_features,
)
from stepwell.sandbox.protocol import Channel

_PR_SET_PDEATHSIG = 1

#: Environment variables a worker inherits from the host; everything else is dropped.
_PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")
#: Variables the fork-server itself needs from the host (never secrets).
_FORKSERVER_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", PRELOAD_ENV,
                   "STEPWELL_SANDBOX_UID", "OPENBLAS_NUM_THREADS")  # fmt: skip
_MAX_REPLY = 1024 * 1024
#: Seconds to wait for a fork-server to import its libraries and say it is ready.
STARTUP_TIMEOUT = 60.0


@dataclass
class WorkerLimits:
    """A run's resource limits (``None``: no limit of that kind)."""

    memory: int | None = None
    cpu: float | None = None
    processes: int | None = None
    network: bool = True
    #: size of the private /tmp (None: ``DEFAULT_TMP``)
    tmp: int | None = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


class WorkerProcess:
    """A running worker: its data channel, and how to stop it and learn how it ended."""

    channel: Channel
    #: lines for the run log about isolation the worker runs without
    notes: list[str]
    limits: WorkerLimits

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def stop_at_time_limit(self) -> bool:
        """Send the worker ``TIME_LIMIT_SIGNAL`` (its step's code then stops where it
        is and reports where); False when that cannot be done."""
        return False

    def wait(self, timeout: float = 5.0) -> int | None:
        """The raw wait status once the worker has ended (None if unknown)."""
        raise NotImplementedError

    def ended(self) -> bool:
        """Whether the worker is known to have ended already (does not wait)."""
        raise NotImplementedError

    def stderr_tail(self, limit: int = 2000) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def exit_outcome(self) -> tuple[str, str]:
        """``(run status, message)`` for a worker that died before finishing its run."""
        status = self.wait()
        return describe_exit(
            status,
            memory=self.limits.memory,
            cpu=self.limits.cpu,
            cpu_used=self.cpu_used(),
            stderr_tail=self.stderr_tail(),
        )

    def exit_description(self) -> str:
        return self.exit_outcome()[1]

    def cpu_used(self) -> float:
        return 0.0


class SubprocessWorker(WorkerProcess):
    """A worker started as a plain ``python -m stepwell.sandbox.worker`` subprocess."""

    def __init__(self, proc: subprocess.Popen, channel: Channel, tmpdir: tempfile.TemporaryDirectory,
                 stderr_path: Path, notes: list[str], limits: WorkerLimits):  # fmt: skip
        self.proc = proc
        self.channel = channel
        self.tmpdir = tmpdir
        self.stderr_path = stderr_path
        self.notes = notes
        self.limits = limits

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def stop_at_time_limit(self) -> bool:
        if self.proc.poll() is not None:
            return False
        self.proc.send_signal(TIME_LIMIT_SIGNAL)
        return True

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def wait(self, timeout: float = 5.0) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        # back to a wait status, as describe_exit expects
        return (-code) & 0x7F if code < 0 else (code & 0xFF) << 8

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:].strip()

    def close(self) -> None:
        self.kill()
        self.proc.wait()
        self.channel.close()
        self.tmpdir.cleanup()


class ForkedWorker(WorkerProcess):
    """A worker forked and sandboxed by the fork-server."""

    def __init__(self, pid: int | None, run_sock: socket.socket, channel: Channel, notes: list[str],
                 limits: WorkerLimits, server_pid: int):  # fmt: skip
        #: None until the fork-server's first reply has been read (it is read lazily,
        #: so the host can send the run's start frame while the worker is being made)
        self._pid = pid
        self.run_sock = run_sock
        self.channel = channel
        self.notes = notes
        self.limits = limits
        self.server_pid = server_pid
        self._ended = False
        self._status: int | None = None
        self._cpu = 0.0
        self._stderr = ""

    @property
    def pid(self) -> int:
        while self._pid is None and not self._ended:
            self._read_reply(30.0)
        return self._pid if self._pid is not None else -1

    def kill(self) -> None:
        if not self._ended:
            try:
                self.run_sock.send(msgpack.packb({"op": "kill"}))
            except OSError:
                pass

    def stop_at_time_limit(self) -> bool:
        if self._ended:
            return False
        try:
            self.run_sock.send(msgpack.packb({"op": "stop_at_time_limit"}))
        except OSError:
            return False
        return True

    def ended(self) -> bool:
        while not self._ended and select.select([self.run_sock], [], [], 0)[0]:
            self._read_reply(1.0)  # what the fork-server said so far
        return self._ended

    def wait(self, timeout: float = 5.0) -> int | None:
        if not self._ended:
            if not self._receive_exit(timeout):
                self.kill()
                self._receive_exit(10.0)
        return self._status

    def _receive_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read_reply(remaining):
                return False
        return True

    def _read_reply(self, timeout: float) -> bool:
        """Read one message from the fork-server about this run (False: timed out)."""
        try:
            self.run_sock.settimeout(timeout)
            data = self.run_sock.recv(_MAX_REPLY)
        except TimeoutError:
            return False
        except OSError:
            data = b""
        if not data:  # the fork-server went away without a word
            self._ended = True
            self._stderr = self._stderr or "the fork-server stopped"
            return True
        message = msgpack.unpackb(data, raw=False)
        if "pid" in message:
            self._pid = int(message["pid"])
        elif "error" in message:  # the worker could not be started at all
            self._ended = True
            self._stderr = str(message["error"])
        elif "exit" in message:
            self._ended = True
            self._status = message["exit"]
            self._cpu = float(message.get("cpu") or 0.0)
            self._stderr = str(message.get("stderr") or "")
        return True

    def cpu_used(self) -> float:
        return self._cpu

    def stderr_tail(self, limit: int = 2000) -> str:
        self.wait()
        return self._stderr[-limit:].strip()

    def close(self) -> None:
        # closing the run's socket makes the fork-server kill whatever is left of the
        # run and clean up; the worker has normally exited already, so do not wait
        self.channel.close()
        try:
            self.run_sock.close()
        except OSError:
            pass


class ForkServerError(Exception):
    """The fork-server could not be started or does not answer."""


class ForkServerClient:
    """The host's handle on one of its fork-servers: the one with numpy and pandas
    imported or the lean one without them (each started when first needed)."""

    def __init__(self, *, pandas: bool = True) -> None:
        #: whether this fork-server imports numpy and pandas ahead of its workers
        self.pandas = pandas
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._owner = 0
        self._ready = False
        self._stderr_path: str | None = None
        self.info: dict[str, Any] = {}
        self.starts = 0

    # -- lifecycle -------------------------------------------------------
    def _alive(self) -> bool:
        return (
            self._proc is not None
            and self._owner == os.getpid()
            and self._proc.poll() is None
        )

    def _launch(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: os.environ[k] for k in _FORKSERVER_ENV if k in os.environ}
        if not self.pandas:
            env[PRELOAD_ENV] = ",".join(filter(None, [env.get(PRELOAD_ENV, ""), "-pandas"]))
        # no allocator threads: the fork-server stays single-threaded (see
        # forkserver.python_fork_hooks_needed)
        env.update(ARROW_DEFAULT_MEMORY_POOL="system", JE_ARROW_MALLOC_CONF="background_thread:false")
        if folders := hidden_folders():  # (a bad value fails here, saying why)
            env[HIDE_ENV] = ":".join(folders)
        # numpy's BLAS would start a thread per core that spins for a while (CPU the
        # fork-server's start-up needs); in a worker, threads count against its
        # process limit. The host's own setting, if any, is kept.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        fd, self._stderr_path = tempfile.mkstemp(prefix="stepwell-forkserver-", suffix=".log")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "stepwell.sandbox.forkserver", str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fd,
                start_new_session=True,
            )
        finally:
            os.close(fd)
            child.close()
        self._sock = parent
        self._owner = os.getpid()
        self._ready = False
        self.starts += 1

    def _await_ready(self) -> None:
        assert self._sock is not None
        self._sock.settimeout(STARTUP_TIMEOUT)
        try:
            data = self._sock.recv(_MAX_REPLY)
        except (TimeoutError, OSError) as exc:
            data = b""
            reason = str(exc)
        else:
            reason = "it exited"
        self._sock.settimeout(None)
        if not data:
            detail = self._stderr()
            self._stop()
            raise ForkServerError(f"the fork-server did not start ({reason}){': ' + detail if detail else ''}")
        self.info = msgpack.unpackb(data, raw=False)
        self._ready = True

    def _stderr(self) -> str:
        try:
            return Path(self._stderr_path or "").read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None and self._owner == os.getpid():
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        self._ready = False
        if self._stderr_path:
            try:
                os.unlink(self._stderr_path)
            except OSError:
                pass
            self._stderr_path = None

    def prestart(self) -> None:
        """Start the fork-server in the background (it warms while the host works)."""
        with self._lock:
            if not self._alive():
                self._launch()

    def ensure(self) -> dict[str, Any]:
        """Start the fork-server if needed and wait until it is ready; its info."""
        with self._lock:
            self._ensure_locked()
            return self.info

    def _ensure_locked(self) -> None:
        if not self._alive():
            if self._proc is not None and self._owner == os.getpid():
                self._stop()
            self._launch()
        if not self._ready:
            self._await_ready()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._alive() else None

    def shutdown(self) -> None:
        with self._lock:
            if self._proc is not None and self._owner == os.getpid():
                self._stop()

    # -- forking ---------------------------------------------------------
    def fork(self, spec: SandboxSpec, channel: Channel, channel_fd: int,
             limits: WorkerLimits) -> ForkedWorker:  # fmt: skip
        """Have the fork-server fork a sandboxed worker serving ``channel``'s peer
        (``channel_fd``, which the caller closes afterwards)."""
        request = msgpack.packb({"op": "fork", "spec": spec.to_dict()}, use_bin_type=True)
        last_error: Exception | None = None
        for _attempt in range(2):  # a dead fork-server is restarted once
            run_host, run_remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                with self._lock:
                    self._ensure_locked()
                    assert self._sock is not None
                    server_pid = self._proc.pid if self._proc else 0
                    socket.send_fds(self._sock, [request], [run_remote.fileno(), channel_fd])
                run_remote.close()
            except (OSError, ForkServerError) as exc:
                last_error = exc
                run_host.close()
                run_remote.close()
                with self._lock:
                    if self._proc is not None and self._proc.poll() is None and isinstance(exc, OSError):
                        self._proc.kill()
                    self._stop()
                continue
            # the reply (the worker's pid, or why it could not start) is read when needed
            return ForkedWorker(None, run_host, channel, [], limits, server_pid)
        raise ForkServerError(f"the fork-server is not available: {last_error}")


_FORKSERVERS = {True: ForkServerClient(pandas=True), False: ForkServerClient(pandas=False)}
for _client in _FORKSERVERS.values():
    atexit.register(_client.shutdown)


def forkserver(pandas: bool = True) -> ForkServerClient:
    """This host process's fork-server client: the one with numpy and pandas
    imported ahead (steps that use them start ~150 ms sooner) or the lean one
    (under a third of the memory, so every fork and exit costs less)."""
    return _FORKSERVERS[pandas]


def sandbox_environment(env: dict[str, str] | None, tmp: str) -> dict[str, str]:
    """The environment of a process running user code: a few harmless variables of
    the host's (``PATH``, the locale, the time zone), ``tmp`` as its home and temp
    dir, and ``env``; never the host's secrets or the store's URL."""
    clean_env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
    clean_env.update(HOME=tmp, TMPDIR=tmp, PYTHONDONTWRITEBYTECODE="1")
    clean_env.update(env or {})
    return clean_env


def _start_subprocess(cwd: Path, env: dict[str, str] | None, limits: WorkerLimits,
                      notes: list[str]) -> SubprocessWorker:  # fmt: skip
    host_sock, worker_sock = socket.socketpair()
    tmpdir = tempfile.TemporaryDirectory(prefix="stepwell-run-")
    stderr_path = Path(tmpdir.name) / ".worker-stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "stepwell.sandbox.worker", str(worker_sock.fileno())],
            pass_fds=(worker_sock.fileno(),),
            cwd=str(cwd),
            env=sandbox_environment(env, tmpdir.name),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            preexec_fn=_die_with_parent,
        )
    worker_sock.close()
    return SubprocessWorker(proc, Channel(host_sock), tmpdir, stderr_path, notes, limits)


def start_worker(
    cwd: Path,
    env: dict[str, str] | None = None,
    *,
    limits: WorkerLimits | None = None,
    app_root: Path | None = None,
    read_paths: Sequence[str] = (),
    hide_paths: Sequence[str] = (),
    mode: str | None = None,
    pandas: bool = True,
) -> WorkerProcess:
    """Start a fresh worker for one run (forked from ``forkserver(pandas)``).

    Only the variables in ``env`` (declared parameters/secrets, if any) and a few
    harmless basics reach the worker; the store's URL and credentials never do.
    ``app_root`` (default ``cwd``) stays readable, its ``.stepwell`` folder (the
    store) and ``hide_paths`` are hidden, ``read_paths`` (an app environment)
    stay readable. ``mode`` overrides ``$STEPWELL_SANDBOX``.

    ``env`` passes through the fork-server, whose memory every later worker
    inherits: never put secrets there; they travel in the run's start frame,
    straight from the host to this one worker."""
    limits = limits or WorkerLimits()
    mode = sandbox_mode(mode)
    if mode == "none":
        note = ("[stepwell] sandbox: disabled (STEPWELL_SANDBOX=none); running as a plain "
                "subprocess with the host's user, filesystem and network")  # fmt: skip
        return _start_subprocess(cwd, env, limits, [note])
    root = Path(app_root) if app_root is not None else Path(cwd)
    spec = SandboxSpec(
        cwd=str(cwd),
        env=sandbox_environment(env, "/tmp"),
        app_root=str(root.resolve()),
        read_paths=[str(p) for p in read_paths],
        hide_paths=[str(p) for p in hide_paths],
        memory=limits.memory,
        cpu=limits.cpu,
        processes=limits.processes if limits.processes is not None else DEFAULT_PROCESSES,
        network=limits.network,
        tmp=limits.tmp if limits.tmp is not None else DEFAULT_TMP,
        skip=skipped_features(os.environ.get(SKIP_ENV, "")),
        strict=mode == "strict",
    )
    store_dir = root / ".stepwell"
    try:  # the store is never the sandbox's business (belt and braces with the mount)
        if store_dir.is_dir() and store_dir.stat().st_uid == os.geteuid():
            os.chmod(store_dir, 0o700)
    except OSError:
        pass
    host_sock, worker_sock = socket.socketpair()
    try:
        worker = forkserver(pandas).fork(spec, Channel(host_sock), worker_sock.fileno(), limits)
    except ForkServerError as exc:
        host_sock.close()
        worker_sock.close()
        if mode == "strict":
            raise
        note = (f"[stepwell] sandbox: fork-server unavailable ({exc}); running as a plain "
                f"subprocess without isolation")  # fmt: skip
        return _start_subprocess(cwd, env, limits, [note])
    worker_sock.close()
    return worker
