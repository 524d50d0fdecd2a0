"""The fork-server: a warm parent that forks one sandboxed worker per run.

The host starts it once (``python -I -m stepwell.sandbox.forkserver FD``) with
a clean environment, before it has read any secret or opened any connection
in a way this process could see, so its memory holds neither. It imports the
worker's libraries once (pyarrow, msgpack, the stepwell worker and node runtime;
numpy, pandas and the other step styles' runtimes unless started as a lean
server; more or fewer via
``STEPWELL_FORKSERVER_PRELOAD``), runs the common
code paths once, freezes the GC, and then
serves requests on the control socket ``FD`` (a ``SOCK_SEQPACKET`` socket):

- host -> fork-server, on the control socket: ``{"op": "fork", "spec": {...}}``
  with two file descriptors attached: this run's own control socket and the
  worker's end of the run's data channel;
- fork-server -> host, on the run's socket: ``{"pid": ..., "notes": [...]}``
  once forked (or ``{"error": ...}``), later ``{"exit": <wait status>, "cpu":
  <seconds>, "stderr": <tail>}`` when the worker has ended;
- host -> fork-server, on the run's socket: ``{"op": "kill"}`` (closing the
  run's socket kills the run too), or ``{"op": "stop_at_time_limit"}``: send the
  worker ``TIME_LIMIT_SIGNAL``, which stops the step's code where it is.

Each run gets a fresh PID namespace: the fork-server unshares one for its
next children, spawns a tiny init there (``ns_init``: it reads a pipe only the
fork-server can write; as PID 1 it owns the namespace, killing it kills
everything the run left behind, and it ends by itself when the fork-server
does, however that ends), forks the worker (PID 2, so it can signal itself
like any process) and returns to its own namespace. Then the worker isolates
itself (``isolate.enter_sandbox``) and serves the run. A run's private temp
dir is kept for a later run if the run left it empty, else removed.

The next run's worker is forked ahead of time, while the fork-server is idle
(a *spare*). It also builds the filesystem view of the last run's app
(``isolate.prepare_view``: mount and IPC namespaces, read-only mounts), so
a run of the same app only has to apply its own limits, user namespace,
network and seccomp filter when it arrives.

Crashing, OOM-killed or runaway children only ever end their own run: the
fork-server reaps them and reports how they ended. When the host goes away
(control socket closed) the fork-server kills every run and exits.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import os
import pwd
import selectors
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from stepwell.sandbox import linux
from stepwell.sandbox.isolate import (
    ChildPlan,
    PreparedView,
    detach_process,
    enter_sandbox,
    map_to_root,
    prepare_view,
    traversable_ancestors,
)
from stepwell.sandbox.lazy_numpy import (
    hidden,
    pyarrow_numpy_init,
    resync_pyarrow_on_import,
    settle_pyarrow,
)
from stepwell.sandbox.ns_init import InitProgram
from stepwell.sandbox.policy import (
    PRELOAD_ENV,
    TIME_LIMIT_SIGNAL,
    SandboxSpec,
    hidden_folders,
)

#: Of ``PRELOAD``, what the lean fork-server (``-pandas``) leaves out besides numpy:
#: pandas, and the runtimes of the steps that always come from the other one
#: (``engine.preload``).
FULL_ONLY = (
    "pandas", "stepwell.runtimes.processor.worker", "stepwell.runtimes.connector.worker",
    "stepwell.runtimes.action.worker",
)  # fmt: skip
#: Modules every worker needs, imported once here instead of in every run.
PRELOAD = (
    "json", "decimal", "datetime", "ctypes", "importlib.util", "traceback", "site",
    "pyarrow", "pyarrow.ipc", "msgpack",
    "stepwell.sandbox.worker", "stepwell.sandbox.client", "stepwell.sandbox.protocol",
    "stepwell.runtimes.node.worker", "stepwell.runtimes.node.api",
    *FULL_ONLY,
)  # fmt: skip
#: Unprivileged user a root fork-server runs sandboxes as.
SANDBOX_USER_ENV = "STEPWELL_SANDBOX_UID"
DEFAULT_SANDBOX_USER = "nobody"
MAX_MESSAGE = 4 * 1024 * 1024
#: Temp dirs kept ready for runs at most (making and removing one costs disk writes).
MAX_SPARE_DIRS = 4
#: Entries of a finished run's temp dir removed per idle moment (a few milliseconds),
#: and the most parts removed of one before it is left as it is.
TRASH_BUDGET = 2000
MAX_TRASH_PARTS = 5000
STDERR_TAIL = 4000


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(data, raw=False)
    if not isinstance(message, dict):
        raise ValueError("control message must be a map")
    return message


@dataclass
class Run:
    """A forked worker the fork-server is looking after."""

    pid: int
    pidfd: int
    sock: socket.socket | None
    tmpdir: str
    #: read end of the worker's stdout/stderr pipe; its tail is kept for the exit report
    stderr_fd: int | None
    stderr: bytearray
    init_pid: int | None = None
    init_pidfd: int | None = None
    exited: bool = False


@dataclass
class Spare:
    """A worker forked ahead of time (in its own PID namespace), waiting for a plan."""

    pid: int
    init_pid: int | None
    sock: socket.socket
    notes: list[str]
    #: the private temp dir and ``PreparedView.key`` of the view it built (if any)
    tmpdir: str | None = None
    view_key: tuple | None = None


def sandbox_identity(own_user_namespace: bool) -> tuple[int | None, int | None]:
    """The (uid, gid) sandboxes run as: an unprivileged user when we are root (of
    the host, not of a user namespace of our own, where only our uid exists)."""
    if os.geteuid() != 0 or own_user_namespace:
        return None, None
    wanted = os.environ.get(SANDBOX_USER_ENV, DEFAULT_SANDBOX_USER)
    if wanted.isdigit():
        return int(wanted), int(wanted)
    try:
        entry = pwd.getpwnam(wanted)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def base_read_paths() -> list[str]:
    """Folders a worker reads: the interpreter's prefixes and sys.path."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p)
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    return sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})


#: Modules of the default preloads (both fork-servers) that register Python fork
#: hooks (``os.register_at_fork``; tests/test_sandbox.py keeps this list true)
#: (stepwell.sandbox.client: the run log streams renew their locks, like logging does)
FORK_HOOK_MODULES = (
    "threading", "logging", "random", "concurrent.futures.thread", "stepwell.sandbox.client",
)


def python_fork_hooks_needed(extra_preloads: list[str]) -> str | None:
    """Why this process must fork its workers with ``os.fork`` rather than libc's
    fork alone (``linux.fork_without_python_hooks``); None when nothing needs what
    ``os.fork`` adds.

    In the child, ``os.fork`` repairs what other threads may have left mid-way
    (locks, thread states, the import lock, signals caught but not yet handled)
    and runs the hooks modules registered: those of ``FORK_HOOK_MODULES`` repair
    the same kind of state, but for random's reseeding, which ``fork_process``
    does itself. With one thread and no Python signal handler there is nothing to
    repair, and skipping it spares each worker about 150 page faults of copied
    memory (0.4 ms of CPU time) before it has done anything."""
    if sys.implementation.name != "cpython" or not getattr(sys, "_is_gil_enabled", lambda: True)():
        return "not a CPython with a GIL"
    if extra_preloads:
        return "modules preloaded on request may register fork hooks"
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return "cannot count this process's threads"
    if threads != 1:
        return f"{threads} threads"
    for signum in signal.valid_signals():
        if signal.getsignal(signum) not in (None, signal.SIG_DFL, signal.SIG_IGN):
            return f"a Python handler for signal {signum}"
    return None


class ForkServer:
    def __init__(self, control: socket.socket, own_user_namespace: bool = False,
                 private_paths: list[str] | None = None, libc_fork: bool = False):  # fmt: skip
        self.control = control
        #: fork workers with libc's fork alone (see ``python_fork_hooks_needed``)
        self.libc_fork = libc_fork
        #: folders no view shows (see ``private_folders``)
        self.private_paths = list(private_paths or [])
        self.selector = selectors.DefaultSelector()
        self.runs: dict[int, Run] = {}
        self.uid, self.gid = sandbox_identity(own_user_namespace)
        self.own_user_namespace = own_user_namespace
        self.base_paths = base_read_paths()
        self.base_traversable = traversable_ancestors(self.base_paths, self.uid, self.gid)
        self.base_dir = tempfile.mkdtemp(prefix=f"stepwell-fs-{os.getpid()}-")
        os.chmod(self.base_dir, 0o711)
        #: a PID namespace's init (see ``ns_init``) reads the read end of this
        #: "lifeline" pipe. Only the fork-server holds the write end, so when it ends
        #: (even by SIGKILL) every init reads end-of-file and exits, taking its
        #: namespace along.
        self.init_program = InitProgram()
        self.lifeline_read, self.lifeline_write = os.pipe()
        #: host folders ready to be a run's temp dir where the kernel refuses a mount
        #: namespace (elsewhere /tmp is a file system in memory of the run's own, and
        #: they stay empty): made ahead of time, or left empty by an earlier run
        self.spare_dirs: list[str] = []
        #: the next run's worker, forked while the fork-server had nothing else to do
        self.spare: Spare | None = None
        #: temp dirs of finished runs set aside, removed a part at a time while idle
        #: (a run that left a million files must not hold up the next runs): path ->
        #: parts removed so far
        self.trash: dict[str, int] = {}
        self._trash_names = itertools.count(1)
        #: the last run's sandbox: the next spare prepares its filesystem view
        self.last_spec: SandboxSpec | None = None
        self._spare_retry_at = 0.0
        try:
            self.own_pidns: int | None = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.own_pidns = None

    # -- the loop --------------------------------------------------------
    def serve(self) -> None:
        self.selector.register(self.control, selectors.EVENT_READ, ("control", None))
        while True:
            events = self.selector.select(timeout=self._idle_timeout())
            events.sort(key=lambda event: event[0].data[0] != "control")  # requests first
            if not events:
                if len(self.spare_dirs) < 2:
                    self._make_spare_dir()
                elif self.spare is None:
                    self._make_spare()
                elif self.trash:
                    self._remove_trash()
            for key, _ in events:
                kind, run = key.data
                if kind == "control":
                    if not self._on_control():
                        return
                    continue
                try:
                    self._on_run_event(kind, run, key.fd)
                except Exception:  # a bug here must not end every other run
                    traceback.print_exc()

    def _idle_timeout(self) -> float | None:
        """0 while there is work to do ahead of time, else wait for events (after a
        failure to prepare something, wait a little before trying again)."""
        if len(self.spare_dirs) >= 2 and self.spare is not None and not self.trash:
            return None
        return max(0.0, self._spare_retry_at - time.monotonic())

    def _on_run_event(self, kind: str, run: Run, fd: int) -> None:
        # events of one select() batch may be stale: an earlier one closed the fd
        if kind == "worker" and fd == run.pidfd and not run.exited:
            self._on_worker_exit(run)
        elif kind == "init" and fd == run.init_pidfd:
            self._on_init_exit(run)
        elif kind == "run" and run.sock is not None and fd == run.sock.fileno():
            self._on_run_message(run)
        elif kind == "stderr" and fd == run.stderr_fd:
            self._read_stderr(run)

    def _on_control(self) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(
                self.control, MAX_MESSAGE, 4, socket.MSG_CMSG_CLOEXEC
            )
        except (ConnectionError, OSError):
            data, fds = b"", []
        if not data:
            return False
        try:
            message = unpack(data)
            if message.get("op") != "fork" or len(fds) != 2:
                raise ValueError(f"bad request {message.get('op')!r} with {len(fds)} fds")
        except Exception:
            for fd in fds:
                os.close(fd)
            return True
        self._fork(message, fds[0], fds[1])
        return True

    # -- starting a run -------------------------------------------------
    def _fork(self, message: dict[str, Any], run_fd: int, channel_fd: int) -> None:
        sock = socket.socket(fileno=run_fd)
        try:
            spec = SandboxSpec.from_dict(message["spec"])
            self.last_spec = spec
            spare = self._take_spare(spec)
            if spare is not None and spare.tmpdir is not None:
                tmpdir = spare.tmpdir
            else:
                tmpdir = self.spare_dirs.pop() if self.spare_dirs else self._new_dir()
            stderr_read, stderr_fd = os.pipe()
            os.set_blocking(stderr_read, False)
        except Exception as exc:
            os.close(channel_fd)
            self._reply(sock, {"error": f"cannot prepare the sandbox: {exc}"})
            sock.close()
            return
        try:
            plan = self._plan(spec, tmpdir)
            started = self._use_spare(spare, plan, channel_fd, stderr_fd) if spare else None
            pid, init_pid = started or self._fork_worker(
                plan, lambda: self._child(plan, channel_fd, stderr_fd)
            )
        except Exception as exc:
            os.close(channel_fd)
            os.close(stderr_fd)
            os.close(stderr_read)
            remove_tree(tmpdir)
            self._reply(sock, {"error": f"cannot start a worker: {exc}"})
            sock.close()
            return
        os.close(channel_fd)
        os.close(stderr_fd)
        run = Run(pid, os.pidfd_open(pid), sock, tmpdir, stderr_read, bytearray())
        if init_pid is not None:
            run.init_pid = init_pid
            run.init_pidfd = os.pidfd_open(init_pid)
        self.runs[pid] = run
        self.selector.register(run.pidfd, selectors.EVENT_READ, ("worker", run))
        self.selector.register(sock, selectors.EVENT_READ, ("run", run))
        self.selector.register(stderr_read, selectors.EVENT_READ, ("stderr", run))
        self._reply(sock, {"pid": self._host_pid(run), "pidns": init_pid is not None})

    def _host_pid(self, run: Run) -> int:
        """The run's worker pid as the host sees it (in our own PID namespace, see
        ``_enter_own_namespaces``, ours differ; the host's /proc tells)."""
        if self.own_user_namespace:
            try:
                with open(f"/proc/self/fdinfo/{run.pidfd}") as info:
                    for line in info:
                        if line.startswith("Pid:"):
                            return int(line.split()[1])
            except (OSError, ValueError):
                pass
        return run.pid

    def _plan(self, spec: SandboxSpec, tmpdir: str) -> ChildPlan:
        """The plan of a worker for ``spec`` with its temp dir ``tmpdir``: this
        fork-server's sandbox user and the folders every worker reads."""
        return ChildPlan(spec, tmpdir, self.uid, self.gid, self.base_paths, pidns=False,
                         private_paths=self.private_paths,
                         base_traversable=self.base_traversable)  # fmt: skip

    def _fork_worker(self, plan: ChildPlan, child: Callable[[], None]) -> tuple[int, int | None]:
        """Fork a worker (as PID 2 of a fresh PID namespace, unless ``plan`` can have
        none) that runs ``child()``, which never returns; returns (pid, init pid)."""
        init_pid = self._enter_pid_namespace(plan)
        try:
            pid = self.fork_process()
        except OSError as exc:
            if init_pid is not None:
                self._leave_pid_namespace()
                _kill(init_pid)
                os.waitpid(init_pid, 0)
            raise RuntimeError(f"fork failed: {exc}") from None
        if pid == 0:
            child()  # never returns
        if init_pid is not None:
            self._leave_pid_namespace()
        return pid, init_pid

    # -- spare workers ----------------------------------------------------
    def _make_spare(self) -> None:
        """Fork the next worker now, so a request only has to hand it its plan; it
        builds the filesystem view of the last run's app while it waits."""
        spec = self.last_spec
        tmpdir = self.spare_dirs.pop() if spec is not None and self.spare_dirs else None
        probe = self._plan(spec if tmpdir else SandboxSpec(cwd="/", env={}), tmpdir or "")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid, init_pid = self._fork_worker(probe, lambda: self._spare_child(theirs, probe))
        except Exception:
            ours.close()
            theirs.close()
            if tmpdir:
                self.spare_dirs.append(tmpdir)
            self._spare_retry_at = time.monotonic() + 1.0
            return
        theirs.close()
        view_key = PreparedView.key(spec) if tmpdir else None
        self.spare = Spare(pid, init_pid, ours, probe.notes, tmpdir, view_key)

    def _spare_child(self, sock: socket.socket, probe: ChildPlan) -> None:
        """In a spare worker: build the view ``probe`` names (if any), wait for a
        plan and its file descriptors, then be that run."""
        view: PreparedView | BaseException | None = None
        try:
            self._leave_server()
            detach_process()
            keep = sock.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, 1 << 20)
            if probe.tmpdir:
                try:
                    view = prepare_view(probe)
                except Exception as exc:  # reported to the run that gets this spare
                    view = exc
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
            if not data or len(fds) != 2:
                os._exit(0)
            handed = unpack(data)  # the run's part of its plan (see _use_spare)
            plan = probe
            plan.spec = SandboxSpec.from_dict(handed["spec"])
            plan.tmpdir = handed["tmpdir"]
            plan.notes = [*handed["notes"], *probe.notes]
            plan.detached = True
            sock.close()
        except BaseException:  # noqa: BLE001
            os._exit(70)
        self._child(plan, fds[0], fds[1], view)

    def _take_spare(self, spec: SandboxSpec) -> Spare | None:
        """The spare worker, if it can serve a run of ``spec`` (else it is discarded)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        if "pid" in spec.skip or (  # this run wants no PID namespace: fork afresh
            spare.view_key is not None and spare.view_key != PreparedView.key(spec)
        ):
            self._discard_spare(spare)
            return None
        return spare

    def _use_spare(self, spare: Spare, plan: ChildPlan, channel_fd: int,
                   stderr_fd: int) -> tuple[int, int | None] | None:  # fmt: skip
        """Hand the run to ``spare``; returns (pid, init pid), None if it is gone."""
        # the rest of the plan (paths, user, PID namespace) the spare has already
        handed = {"spec": plan.spec.to_dict(), "tmpdir": plan.tmpdir, "notes": plan.notes}
        try:
            socket.send_fds(spare.sock, [pack(handed)], [channel_fd, stderr_fd])
        except OSError:
            spare.tmpdir = None  # the run's temp dir now: a fresh worker uses it
            self._discard_spare(spare)
            return None
        spare.sock.close()
        return spare.pid, spare.init_pid

    def _discard_spare(self, spare: Spare) -> None:
        spare.sock.close()
        if spare.tmpdir is not None:
            self._recycle_dir(spare.tmpdir)
        # the worker first: its namespace's init cannot finish dying while the
        # worker (our child, not its) is still unreaped
        for pid in (spare.pid, spare.init_pid):
            if pid is not None:
                _kill(pid)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass

    def _enter_pid_namespace(self, plan: ChildPlan) -> int | None:
        """Make our next child PID 2 of a fresh PID namespace; returns its init's pid."""
        reason = None
        if "pid" in plan.spec.skip:
            return None
        if self.init_program.path is None:
            reason = "no program for the namespace's init (stepwell's cannot run here, no `cat`)"
        elif self.own_pidns is None:
            reason = "/proc/self/ns/pid cannot be opened"
        else:
            try:
                linux.unshare(linux.CLONE_NEWPID)
            except OSError as exc:
                reason = linux.errno_name(exc)
        if reason is None:
            try:
                init_pid = os.posix_spawn(
                    self.init_program.path, ["stepwell-init"], {}, setsid=True,
                    file_actions=[(os.POSIX_SPAWN_DUP2, self.lifeline_read, 0)],
                    setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE),
                )  # fmt: skip
            except OSError as exc:
                self._leave_pid_namespace()
                reason = f"cannot start its init: {linux.errno_name(exc)}"
            else:
                plan.pidns = True
                return init_pid
        plan.notes.append(
            f"[stepwell] sandbox: PID namespace unavailable ({reason}); running with "
            "the host's process IDs (processes outside the sandbox may be visible)"
        )
        return None

    def _leave_pid_namespace(self) -> None:
        if self.own_pidns is not None:
            linux.setns(self.own_pidns, linux.CLONE_NEWPID)

    def fork_process(self) -> int:
        """``os.fork()``, or libc's fork alone when ``python_fork_hooks_needed``
        found nothing that needs Python's after-fork steps."""
        if not self.libc_fork:
            return os.fork()
        pid = linux.fork_without_python_hooks()
        if pid == 0 and "random" in sys.modules:
            sys.modules["random"].seed()  # its fork hook: no two runs share a sequence
        return pid

    @staticmethod
    def _leave_server() -> None:
        """In a child, first thing: the fork-server's objects (its sockets, selector
        and run records) are left as they are, never used, and frozen out of garbage
        collection, so none is ever finalised in the worker, where it would close a
        descriptor number the worker may have reused (the descriptors themselves are
        closed when the worker keeps only its own). Cheaper than tidying them up
        one by one, which would copy the pages they are on."""
        gc.freeze()

    def _child(self, plan: ChildPlan, channel_fd: int, stderr_fd: int,
               view: PreparedView | BaseException | None = None) -> None:  # fmt: skip
        """In the forked worker: isolate, serve the run, exit. Never returns."""
        code = 70
        try:
            self._leave_server()
            refuse = None
            try:
                if isinstance(view, BaseException):
                    raise view
                notes = enter_sandbox(plan, channel_fd, stderr_fd, view)
            except Exception as exc:  # never run user code in a half-built sandbox
                notes = plan.notes
                refuse = f"the sandbox could not be set up: {exc}"
                if "Permission denied" in str(exc) and plan.uid is not None:
                    refuse += f" (the sandbox runs as uid {plan.uid})"
            from stepwell.sandbox.worker import serve_forked

            code = serve_forked(notes, strict=plan.spec.strict, refuse=refuse)
        except BaseException:  # noqa: BLE001 - report anything on stderr, then exit
            try:
                os.write(2, traceback.format_exc().encode(errors="replace"))
            except Exception:
                pass
        finally:
            os._exit(code)

    # -- runs ending ----------------------------------------------------
    def _on_worker_exit(self, run: Run) -> None:
        try:
            _pid, status, usage = os.wait4(run.pid, 0)
        except ChildProcessError:
            status, usage = None, None
        run.exited = True
        self.selector.unregister(run.pidfd)
        os.close(run.pidfd)
        self._kill_leftovers(run)
        cpu = (usage.ru_utime + usage.ru_stime) if usage is not None else 0.0
        self._read_stderr(run)
        if run.sock is not None:
            tail = bytes(run.stderr[-STDERR_TAIL:]).decode(errors="replace").strip()
            self._reply(run.sock, {"exit": status, "cpu": cpu, "stderr": tail})
            self._close_run_socket(run)
        if run.init_pid is None:
            self._cleanup(run)

    def _kill_leftovers(self, run: Run) -> None:
        """Kill whatever the run left running (everything in its PID namespace)."""
        if run.init_pid is not None:
            _kill(run.init_pid)
            if run.init_pidfd is not None and run.init_pidfd not in self._registered_fds():
                self.selector.register(run.init_pidfd, selectors.EVENT_READ, ("init", run))
        else:
            _kill(-run.pid)

    def _registered_fds(self) -> set[int]:
        return {key.fd for key in self.selector.get_map().values()}

    def _on_init_exit(self, run: Run) -> None:
        assert run.init_pid is not None and run.init_pidfd is not None
        try:
            os.waitpid(run.init_pid, 0)
        except ChildProcessError:
            pass
        self.selector.unregister(run.init_pidfd)
        os.close(run.init_pidfd)
        run.init_pidfd = None
        self._cleanup(run)

    def _read_stderr(self, run: Run) -> None:
        """Keep the tail of what the worker wrote to its stdout/stderr file descriptors."""
        while run.stderr_fd is not None:
            try:
                chunk = os.read(run.stderr_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # every writer is gone
                self.selector.unregister(run.stderr_fd)
                os.close(run.stderr_fd)
                run.stderr_fd = None
                return
            run.stderr += chunk
            if len(run.stderr) > 4 * STDERR_TAIL:
                del run.stderr[: -STDERR_TAIL]

    def _new_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="run-", dir=self.base_dir)
        if self.uid is not None:
            os.chown(path, self.uid, self.gid if self.gid is not None else -1)
        os.chmod(path, 0o700)
        return path

    def _make_spare_dir(self) -> None:
        try:
            self.spare_dirs.append(self._new_dir())
        except OSError:
            self._spare_retry_at = time.monotonic() + 1.0

    def _cleanup(self, run: Run) -> None:
        self.runs.pop(run.pid, None)
        if run.stderr_fd is not None:
            self._read_stderr(run)
        if run.stderr_fd is not None:
            self.selector.unregister(run.stderr_fd)
            os.close(run.stderr_fd)
            run.stderr_fd = None
        # without a PID namespace, processes the run left (setsid, double fork) may
        # live on with this dir as their /tmp: a later run must not get it
        self._recycle_dir(run.tmpdir, reuse=run.init_pid is not None)

    def _recycle_dir(self, path: str, reuse: bool = True) -> None:
        """Keep a finished run's temp dir for a later run if the run left nothing in
        it (the usual case), else set it aside to be removed while idle."""
        if reuse and len(self.spare_dirs) < MAX_SPARE_DIRS and _reset_run_dir(path, self.uid):
            self.spare_dirs.append(path)
            return
        trash = os.path.join(self.base_dir, f"trash-{next(self._trash_names)}")
        try:  # (at once: a run's folder may hold more than can be removed between runs)
            os.rename(path, trash)
        except OSError:
            remove_tree(path)
        else:
            self.trash[trash] = 0

    def _remove_trash(self) -> None:
        """Remove the next part of the first temp dir set aside. (Given up on after
        ``MAX_TRASH_PARTS``: a process a run without PID namespace left behind may
        keep adding files, and the fork-server must not spin on them for ever.)"""
        path = next(iter(self.trash))
        self.trash[path] += 1
        if remove_tree(path, budget=TRASH_BUDGET) or self.trash[path] >= MAX_TRASH_PARTS:
            del self.trash[path]

    def _on_run_message(self, run: Run) -> None:
        assert run.sock is not None
        try:
            data = run.sock.recv(MAX_MESSAGE)
        except OSError:
            data = b""
        if data:
            try:
                op = unpack(data).get("op")
            except Exception:
                op = None
            if op == "stop_at_time_limit" and not run.exited:
                _kill(run.pid, TIME_LIMIT_SIGNAL)
            if op != "kill":
                return
        # a kill request, or the host closed this run's socket: end the run
        if not run.exited:
            if run.init_pid is not None:
                _kill(run.init_pid)
            _kill(run.pid)
        if not data:
            self._close_run_socket(run)

    def _close_run_socket(self, run: Run) -> None:
        if run.sock is not None:
            try:
                self.selector.unregister(run.sock)
            except (KeyError, ValueError):
                pass
            run.sock.close()
            run.sock = None

    def _reply(self, sock: socket.socket, message: dict[str, Any]) -> None:
        try:
            sock.send(pack(message))
        except OSError:
            pass

    def shutdown(self) -> None:
        if self.spare is not None:
            self._discard_spare(self.spare)
            self.spare = None
        for run in list(self.runs.values()):
            if run.init_pid is not None:
                _kill(run.init_pid)
            _kill(run.pid)
        deadline = time.monotonic() + 5
        for run in list(self.runs.values()):
            for pid in (run.pid, run.init_pid):
                if pid is None:
                    continue
                while time.monotonic() < deadline:
                    try:
                        done, _ = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if done:
                        break
                    time.sleep(0.01)
        remove_tree(self.base_dir)
        self.init_program.close()


def _reset_run_dir(path: str, uid: int | None) -> bool:
    """Whether run temp dir ``path`` is empty, so another run may use it; if so,
    also undo what the run could change on the dir itself (its mode and extended
    attributes, ACLs included)."""
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):
            return False
        if os.listdir(path):
            return False
        for name in os.listxattr(path, follow_symlinks=False):
            os.removexattr(path, name, follow_symlinks=False)
        if stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
            os.chmod(path, 0o700)
    except OSError:
        return False
    return True


#: Names for the folders ``remove_tree`` moves up a level (unique across its calls).
_MOVED_UP = itertools.count(1)


def remove_tree(path: str, budget: int | None = None) -> bool:
    """Remove folder ``path`` and what a run left in it, however deep it nests
    (``shutil.rmtree`` recurses once per level: a run that made a folder 1,000
    levels deep had it fail with RecursionError and its temp dir stay on disk). A
    level at a time: the subfolders of the top folder's subfolders move up into it,
    so the removal needs no recursion and no long paths. Errors are ignored.
    ``budget``: stop after about that many entries, to go on in a later call;
    returns True once ``path`` is gone (or cannot be removed further)."""
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return True
    left = budget if budget is not None else -1
    try:
        for _pass in range(1 << 20):  # (bounded: a process left alive may keep adding)
            names = os.listdir(top)
            if not names:
                break
            progress = False
            for name in names:
                left -= 1
                if left == 0:
                    return False
                try:
                    os.unlink(name, dir_fd=top)
                    progress = True
                    continue
                except IsADirectoryError:
                    pass
                except OSError:
                    continue
                try:
                    inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                except OSError:
                    continue
                try:
                    for child in os.listdir(inner):
                        try:
                            os.unlink(child, dir_fd=inner)
                        except IsADirectoryError:
                            os.rename(child, f".up{next(_MOVED_UP)}", src_dir_fd=inner,
                                      dst_dir_fd=top)
                        except OSError:
                            pass
                    os.rmdir(name, dir_fd=top)
                    progress = True
                except OSError:
                    pass
                finally:
                    os.close(inner)
            if not progress:
                break
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError:
        pass
    return True


def _kill(pid: int, signum: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _warm_up() -> None:
    """Run the worker's common code paths once in the fork-server, before it serves:
    their one-time lazy initialisations then happen here, not in every worker.

    (Spares do not run it again: on a busy host pre-touching pages a run may not
    need costs more CPU time than it saves.)"""
    try:
        from stepwell.runtimes.node.records import records_to_arrow
        from stepwell.sandbox.protocol import Channel, decode_table, encode_table, pack, unpack

        left, right = socket.socketpair()
        try:
            sender, receiver = Channel(left), Channel(right)
            table = records_to_arrow([{"a": 1, "b": "x", "c": 1.5}], "warm_up")
            sender.send(unpack(pack({"op": "start", "entry": "x:y", "parameters": {}})), table)
            message, body = receiver.recv()
            decode_table(encode_table(decode_table(body)))
            traceback.format_exception(ValueError, ValueError("warm"), None)
            linux.warm_up()
        finally:
            left.close()
            right.close()
    except Exception:
        pass


def preload_plan() -> tuple[list[str], list[str]]:
    """(The default modules to import, the extra ones ``STEPWELL_FORKSERVER_PRELOAD``
    asks for), without those it drops."""
    asked = [m.strip() for m in os.environ.get(PRELOAD_ENV, "").split(",") if m.strip()]
    dropped = {m[1:] for m in asked if m.startswith("-")}
    if "pandas" in dropped:
        dropped.update(FULL_ONLY)
    defaults = [m for m in PRELOAD if m not in dropped]
    return defaults, [m for m in asked if not m.startswith("-") and m not in dropped]


def preload(names: list[str]) -> list[str]:
    """Import what workers need; returns the modules that could not be imported."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            missing.append(name)
    return missing


def load_worker_modules(defaults: list[str]) -> list[str]:
    """Import and warm up the default preloads (``preload_plan``); returns the
    modules that could not be imported."""
    # (_warm_up: one-time lazy initialisations happen here, not in every worker)
    if "pandas" in defaults:
        missing = preload(defaults)
        _warm_up()
        return missing
    # the lean fork-server: pyarrow must not import numpy or pandas (see lazy_numpy)
    numpy_init = pyarrow_numpy_init()
    with hidden(("pandas",) if numpy_init is None else ("numpy", "pandas")):
        missing = preload(defaults)
        _warm_up()
        settle_pyarrow()
    resync_pyarrow_on_import(numpy_init)
    return missing


def private_folders() -> list[str]:
    """Folders no sandbox may see: those in ``STEPWELL_SANDBOX_HIDE`` and, when we
    are not root (sandboxes then run under our own uid), our home and runtime
    folders (keys, credentials, an ssh agent's socket)."""
    folders = hidden_folders()
    uid = os.geteuid()
    if uid != 0:
        try:
            folders.append(pwd.getpwuid(uid).pw_dir)
        except KeyError:
            pass
        folders.append(f"/run/user/{uid}")
    return sorted({os.path.realpath(p) for p in folders})


def _enter_own_namespaces() -> bool:
    """Without privileges, become root of a user namespace of our own (our uid as 0,
    no other) and PID 1 of a PID namespace it owns: only there may the fork-server
    give each run a PID namespace (and /proc) of its own; the files, processes and
    network it can reach stay those of its uid. Must run before any thread starts.
    Returns False when the kernel refuses (runs then go without PID namespaces, and
    their logs say so)."""
    if os.geteuid() == 0:
        return False
    try:
        enter_pid_namespace(user_namespace=True)
    except OSError:
        return False  # (a refused map leaves us unable to unshare a PID namespace)
    return True


def enter_pid_namespace(user_namespace: bool) -> None:
    """Go on as PID 1 of a new PID namespace (``user_namespace``: of a new user
    namespace too, where our uid is 0 and no other, which is how a process without
    privileges may). The process the host started stays outside as its handle: it
    waits, then ends as we do (with our exit status, or killed by our signal); we
    die with it. Must run before any thread starts; OSError if the kernel refuses."""
    uid, gid = os.geteuid(), os.getegid()
    linux.unshare(linux.CLONE_NEWPID | (linux.CLONE_NEWUSER if user_namespace else 0))
    if user_namespace:
        map_to_root(uid, gid)
    inside = os.fork()
    if inside:  # outside: the host's handle
        _pid, status = os.waitpid(inside, 0)
        if os.WIFSIGNALED(status):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    control = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the host
    private_paths = private_folders()  # (before: inside our own namespace we are uid 0)
    own_user_namespace = _enter_own_namespaces()
    try:
        linux.prctl(linux.PR_SET_DUMPABLE, 0)  # nobody may ptrace or read our memory
    except OSError:
        pass
    defaults, extra = preload_plan()
    missing = load_worker_modules(defaults) + preload(extra)
    sys.dont_write_bytecode = True  # workers never write .pyc files (their filesystem is read-only)
    python_fork_reason = python_fork_hooks_needed(extra)
    server = ForkServer(control, own_user_namespace, private_paths,
                        libc_fork=python_fork_reason is None)  # fmt: skip
    gc.collect()
    gc.freeze()  # forked workers then never touch (and copy) these pages for GC
    control.send(
        pack(
            {
                "ready": True,
                "pid": int(os.readlink("/proc/self")),  # as the host sees it
                "uid": server.uid,
                "startup_ms": (time.perf_counter() - started) * 1000,
                "missing": missing,
                "os_fork": python_fork_reason,
            }
        )
    )
    try:
        server.serve()
    finally:
        server.shutdown()
        # nothing is left to flush or finalise: skip the interpreter's teardown of
        # pyarrow and pandas, which the host would otherwise wait for
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
