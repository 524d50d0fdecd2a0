"""Starting worker processes and describing how they ended."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from stepwell.sandbox.protocol import Channel

_PR_SET_PDEATHSIG = 1

#: Environment variables a worker inherits from the host; everything else is dropped.
_PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    channel: Channel
    tmpdir: tempfile.TemporaryDirectory
    stderr_path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = 5.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def exit_description(self) -> str:
        code = self.wait()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"the worker process was killed by {name}"
        tail = self.stderr_tail()
        return f"the worker process exited with code {code}" + (f": {tail}" if tail else "")

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


def start_worker(cwd: Path, env: dict[str, str] | None = None) -> WorkerProcess:
    """Start a fresh worker with a scrubbed environment and a private temp dir.

    Only the variables in ``env`` (declared parameters/secrets, if any) and a
    few harmless basics reach the worker; the store's URL and credentials never do.
    """
    host_sock, worker_sock = socket.socketpair()
    tmpdir = tempfile.TemporaryDirectory(prefix="stepwell-run-")
    clean_env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
    clean_env.update(HOME=tmpdir.name, TMPDIR=tmpdir.name, PYTHONDONTWRITEBYTECODE="1")
    clean_env.update(env or {})
    stderr_path = Path(tmpdir.name) / ".worker-stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "stepwell.sandbox.worker", str(worker_sock.fileno())],
            pass_fds=(worker_sock.fileno(),),
            cwd=str(cwd),
            env=clean_env,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            preexec_fn=_die_with_parent,
        )
    worker_sock.close()
    return WorkerProcess(proc, Channel(host_sock), tmpdir, stderr_path)
