"""One running plugin process: private ``/tmp``, control channel, crash restarts.

The ekuiper SDK fixes its socket paths under ``/tmp`` (``plugin_<name>.ipc``,
``func_<symbol>.ipc``, ``<rule>_<op>_<instance>.ipc``). So that several hosts,
tests, a real eKuiper and several processes of one plugin never collide, each
process runs in its own mount namespace (inside a user namespace when the host
is not root) where a private host folder, ``/tmp/swp-XXXX``, is bind-mounted on
``/tmp``. The host listens and dials on the same files through that folder:
``ipc://<folder>/plugin_<name>.ipc`` on the host is ``/tmp/plugin_<name>.ipc``
in the plugin.

Control protocol (``ekuiper-host.md`` section 2): the host listens with a REP
socket *before* spawning; the plugin dials with REQ and sends ``handshake``;
each host command is sent as the REP reply, the plugin's answer (``ok`` or an
error text) arrives as its next request; answers starting with ``h`` are
(keepalive or stale) handshakes, after which the same command is re-sent.

When the process dies unexpectedly it is restarted with exponential backoff
and every remembered ``start`` command is replayed, so sources, sinks and
functions come back; the host's listening sockets stay open throughout.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynng

from stepwell.runtimes.plugin.install import InstalledPlugin
from stepwell.sandbox.launcher import sandbox_environment
from stepwell.sandbox.policy import sandbox_mode

__all__ = [
    "PluginError",
    "PluginProcess",
    "ProcessEvent",
    "control_arg",
    "namespaces_available",
    "request_reply",
]

log = logging.getLogger("stepwell.plugin")

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

HANDSHAKE_TIMEOUT = float(os.environ.get("STEPWELL_PLUGIN_INIT_TIMEOUT", "60"))
COMMAND_TIMEOUT = 30.0
_POLL = 0.5  # seconds between liveness checks while waiting on a socket


class PluginError(RuntimeError):
    """A plugin failed to start, answered a command with an error, or died."""


class PluginCrashed(PluginError):
    """The plugin process exited while the host was waiting for it."""


@dataclasses.dataclass(frozen=True)
class ProcessEvent:
    """What happened to a plugin process, for whoever watches it (a rule's status).

    ``kind`` is ``exited`` (it died: ``requested`` when the host killed it, e.g. a
    hung function call, else a crash), ``restarted`` (running again; ``failed``
    maps each remembered start command that could not be replayed to why) or
    ``restart_failed`` (``text`` says why; it is tried again)."""

    kind: str
    plugin: str
    pid: int | None
    text: str
    status: int | None = None
    requested: bool = False
    failed: dict[str, str] = dataclasses.field(default_factory=dict)


# -- private /tmp -----------------------------------------------------------------

_libc: Any = None
_ns_ok: bool | None = None
_ns_lock = threading.Lock()


def _libc_handle() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _tmp_entries(paths: list[str]) -> list[str]:
    """Top-level names under the real ``/tmp`` that ``paths`` live in.

    Apps, plugin folders and environments may themselves sit under ``/tmp``
    (tests do); those entries stay visible in the private ``/tmp``.
    """
    names = []
    for path in paths:
        for candidate in {os.path.abspath(path), os.path.realpath(path)}:
            parts = Path(candidate).parts
            if len(parts) > 2 and parts[1] == "tmp" and parts[2] not in names:
                names.append(parts[2])
    return names


def _private_tmp_preexec(folder: str, keep: list[str] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` that mounts ``folder`` on ``/tmp`` in a new mount namespace.

    The entries ``keep`` of the real ``/tmp`` are bind-mounted into the
    private one first. Everything is resolved before the fork: the child only
    makes system calls (no imports, no locks).
    """
    binds = []
    for name in keep or []:
        mount_point = os.path.join(folder, name)
        if os.path.isdir(os.path.join("/tmp", name)):
            os.makedirs(mount_point, exist_ok=True)
            binds.append((os.path.join("/tmp", name).encode(), mount_point.encode()))
    libc = _libc_handle()
    unshare, mount = libc.unshare, libc.mount
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS if uid == 0 else CLONE_NEWUSER | CLONE_NEWNS
    maps = [] if uid == 0 else [
        ("/proc/self/setgroups", b"deny"),
        ("/proc/self/uid_map", f"{uid} {uid} 1".encode()),
        ("/proc/self/gid_map", f"{gid} {gid} 1".encode()),
    ]
    source, target, root = folder.encode(), b"/tmp", b"/"

    def preexec() -> None:
        if unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
        for path, text in maps:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text)
            finally:
                os.close(fd)
        if mount(b"none", root, None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "making / private failed")
        for real, inside in binds:
            if mount(real, inside, None, MS_BIND | MS_REC, None) != 0:
                raise OSError(ctypes.get_errno(), "bind-mounting a /tmp entry failed")
        if mount(source, target, None, MS_BIND | MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), "bind-mounting the private /tmp failed")
        os.setsid()

    return preexec


def namespaces_available() -> bool:
    """Whether plugin processes can get a private ``/tmp`` here (checked once)."""
    global _ns_ok
    with _ns_lock:
        if _ns_ok is None:
            folder = tempfile.mkdtemp(prefix="swp-probe-", dir="/tmp")
            try:
                Path(folder, "probe").write_text("ok")
                proc = subprocess.run(
                    ["/bin/cat", "/tmp/probe"],
                    preexec_fn=_private_tmp_preexec(folder),
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
                _ns_ok = proc.returncode == 0 and proc.stdout == b"ok"
            except (OSError, subprocess.SubprocessError):
                _ns_ok = False
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if not _ns_ok:
                log.warning(
                    "plugin processes cannot get a private /tmp here (user/mount namespaces "
                    "refused); they share the machine's /tmp, one process per plugin"
                )
        return _ns_ok


# -- REQ/REP exchange in the inverted roles --------------------------------------------


def request_reply(
    sock: pynng.Socket,
    payload: bytes,
    alive: Callable[[], bool],
    timeout: float,
    what: str,
) -> bytes:
    """Send ``payload`` as a REP reply and return the peer's next real request.

    Implements eKuiper's send loop: on a fresh socket (``BadState``) first
    receive the pending handshake; skip answers that start with ``h`` by
    re-sending. ``alive`` is polled while waiting so a dead peer raises
    :class:`PluginCrashed` instead of hanging.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.send(payload)
        except pynng.BadState:
            _recv(sock, alive, deadline, what)
            continue
        reply = _recv(sock, alive, deadline, what)
        if reply[:1] == b"h":
            continue
        return reply


def _recv(sock: pynng.Socket, alive: Callable[[], bool], deadline: float, what: str) -> bytes:
    while True:
        try:
            return sock.recv()
        except pynng.Timeout:
            if not alive():
                raise PluginCrashed(f"{what}: the plugin process exited") from None
            if time.monotonic() > deadline:
                raise PluginError(f"{what}: no answer from the plugin in time") from None


def control_arg(
    symbol: str,
    plugin_type: str,
    meta: dict[str, Any],
    config: dict[str, Any] | None = None,
    datasource: str | None = None,
) -> dict[str, Any]:
    """The Control object of a start/stop command (sent double-encoded as ``arg``)."""
    ctrl: dict[str, Any] = {"symbolName": symbol, "meta": meta, "pluginType": plugin_type}
    if datasource is not None:
        ctrl["datasource"] = datasource
    if config:
        ctrl["config"] = config
    return ctrl


#: Host folders (separated by ``:``) plugin processes may write to, besides their
#: private /tmp (a file sink's output folder); the sandbox user must be allowed to.
WRITE_PATHS_ENV = "STEPWELL_PLUGIN_WRITE_PATHS"


def plugin_write_paths() -> list[str]:
    """The existing folders of ``$STEPWELL_PLUGIN_WRITE_PATHS``, resolved; one that
    is not a folder is left out with a warning (a plugin writing there would fail
    with a bare "read-only file system")."""
    folders = set()
    for path in filter(None, os.environ.get(WRITE_PATHS_ENV, "").split(":")):
        if os.path.isdir(path):
            folders.add(os.path.realpath(path))
        else:
            log.warning("%s names %s, which is not a folder: plugin processes cannot "
                        "write there; create it, or take it out of %s",
                        WRITE_PATHS_ENV, path, WRITE_PATHS_ENV)  # fmt: skip
    return sorted(folders)


def nng_socket(kind: type[pynng.Socket], timeout_ms: int = int(_POLL * 1000)) -> pynng.Socket:
    """A socket of ``kind`` for the plugin protocol: receives wait ``timeout_ms``,
    sends 5 s, and messages have no size limit."""
    sock = kind(recv_timeout=timeout_ms, send_timeout=5000)
    sock.recv_max_size = 0
    return sock


# -- the process ----------------------------------------------------------------------

_process_ids = itertools.count(1)


class PluginProcess:
    """One OS process of an installed plugin, restarted when it dies.

    ``folder`` is the host side of its private ``/tmp``; :meth:`url` maps a
    plugin-side socket file name to the host URL.
    """

    def __init__(self, plugin: InstalledPlugin, *, private_tmp: bool | None = None,
                 on_restart: Callable[[PluginProcess], None] | None = None) -> None:
        self.plugin = plugin
        self.index = next(_process_ids)
        self.private = namespaces_available() if private_tmp is None else private_tmp
        self.folder = tempfile.mkdtemp(prefix="swp-", dir="/tmp") if self.private else "/tmp"
        #: started in the run sandbox (``sandbox.confine``) rather than with a private
        #: /tmp alone (``STEPWELL_SANDBOX=none`` turns the sandbox off, for debugging)
        self.confined = self.private and sandbox_mode() != "none"
        if self.confined:
            self._give_folder_to_sandbox_user()
        self.generation = 0
        #: times it was started again (after a crash or a kill by the host)
        self.restarts = 0
        #: times it exited without the host asking (a kill by the host is not a crash)
        self.crashes = 0
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.last_exit: int | None = None
        self._on_restart = on_restart
        self._watchers: list[Callable[[ProcessEvent], None]] = []
        #: why the host killed the process (None: it died by itself)
        self._kill_reason: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()  # serialises control commands
        self._started: dict[str, bytes] = {}  # key -> start command, replayed after a crash
        self._stopping = False
        self._ready = threading.Event()
        self._ctrl = nng_socket(pynng.Rep0)
        self.listen(self._ctrl, f"plugin_{plugin.name}.ipc")
        self._watchdog: threading.Thread | None = None

    def _give_folder_to_sandbox_user(self) -> None:
        """The private /tmp belongs to the user the sandbox runs as (when the host is
        root), who must reach the host's sockets in it and may write files there."""
        from stepwell.sandbox.forkserver import sandbox_identity

        uid, gid = sandbox_identity(own_user_namespace=False)
        if uid is not None:
            os.chown(self.folder, uid, gid if gid is not None else -1)

    # -- urls
    def url(self, filename: str) -> str:
        return f"ipc://{self.folder}/{filename}"

    def listen(self, sock: pynng.Socket, filename: str) -> None:
        """Listen on socket file ``filename`` of the private /tmp; a confined process
        (another user) may connect to it."""
        sock.listen(self.url(filename))
        if self.confined:
            os.chmod(os.path.join(self.folder, filename), 0o666)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def stopping(self) -> bool:
        """Being stopped for good (not restarted)."""
        return self._stopping

    def ready(self) -> bool:
        """Running and done replaying its symbols (not dead nor restarting)."""
        return self._ready.is_set() and self.alive()

    # -- lifecycle
    def start(self) -> None:
        """Spawn the process and wait for its handshake."""
        with self._lock:
            self._spawn()
            self._await_handshake()
        self._ready.set()
        self._watchdog = threading.Thread(
            target=self._watch, name=f"plugin-{self.plugin.name}-{self.index}-watch", daemon=True
        )
        self._watchdog.start()

    def _spawn(self) -> None:
        argv = self.plugin.argv()
        cwd = str((self.plugin.path / self.plugin.executable).parent)
        keep = _tmp_entries([argv[0], str(self.plugin.path)])
        env = sandbox_environment(None, "/tmp")  # (the host's secrets stay with it)
        if not self.private:
            command, preexec = argv, os.setsid
        elif self.confined:
            command, preexec = self._confined(argv, cwd, env, keep), os.setsid
        else:
            command, preexec = argv, _private_tmp_preexec(self.folder, keep)
        try:
            self._proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PluginError(f"plugin {self.plugin.name!r}: cannot start {argv[0]}: {exc}") from exc
        self.generation += 1
        self._pump_thread = threading.Thread(
            target=self._pump, args=(self._proc,), name=f"plugin-{self.plugin.name}-out", daemon=True
        )
        self._pump_thread.start()

    def _confined(self, argv: list[str], cwd: str, env: dict[str, str], keep: list[str]) -> list[str]:
        """The command that starts ``argv`` in the run sandbox (``sandbox.confine``):
        it may read its interpreter, its environment and its plugin folder; the rest
        of the app's ``.stepwell`` (the store, secrets, token) it does not see."""
        interpreter = Path(argv[0])
        read_paths = {os.path.realpath(p) for p in (self.plugin.path, interpreter.parent.parent,
                                                     Path(os.path.realpath(interpreter)).parent.parent)}  # fmt: skip
        writable = plugin_write_paths()
        state = self.plugin.path.parent.parent  # APP/.stepwell (plugins/<name> in it)
        hide = [os.path.realpath(state)] if state.name == ".stepwell" else []
        keep = sorted({*keep, *_tmp_entries(writable)})
        for name in keep:  # mount points for them in the private /tmp
            os.makedirs(os.path.join(self.folder, name), exist_ok=True)
        job = {"argv": argv, "cwd": cwd, "env": env, "tmp_folder": self.folder, "keep": keep,
               "read_paths": sorted(read_paths), "write_paths": writable, "hide_paths": hide}  # fmt: skip
        return [sys.executable, "-I", "-m", "stepwell.sandbox.confine", json.dumps(job)]

    def _read_all_output(self, timeout: float = 1.0) -> None:
        """Wait (briefly) until what the dead process printed has been read."""
        pump = getattr(self, "_pump_thread", None)
        if pump is not None:
            pump.join(timeout)

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        plugin_log = logging.getLogger(f"stepwell.plugin.{self.plugin.name}")
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.output.append(line)
                # once stopping, the SDK complains of the sockets closing: not news
                level = logging.DEBUG if self._stopping else logging.INFO
                plugin_log.log(level, "[pid %s] %s", proc.pid, line)

    def _await_handshake(self) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        what = f"plugin {self.plugin.name!r} (pid {self.pid})"
        while True:
            try:
                message = self._ctrl.recv()
            except pynng.Timeout:
                if not self.alive():
                    self._read_all_output()
                    raise PluginCrashed(
                        f"{what} exited with status {self._proc.poll() if self._proc else '?'} "
                        f"before its handshake{self._misnamed()}; its output: {self.tail()}"
                    ) from None
                misnamed = self._misnamed()
                if misnamed:  # (the SDK would retry its dial for 5 s, then exit)
                    self._kill()
                    raise PluginError(f"{what} will never handshake{misnamed}; it was killed. "
                                      f"Its output: {self.tail()}") from None
                if time.monotonic() > deadline:
                    self._kill()
                    self._read_all_output()
                    raise PluginError(self._no_handshake(what)) from None
                continue
            if message[:1] == b"h":
                return

    def _no_handshake(self, what: str) -> str:
        """Why a plugin that runs but never dialled back was given up, and what to check."""
        misnamed = self._misnamed()
        hint = "" if misnamed else (
            f". Its main program must start the ekuiper SDK, "
            f"`plugin.start(PluginConfig({self.plugin.name!r}, ...))`, without blocking "
            "before it (a slow start may get more time with STEPWELL_PLUGIN_INIT_TIMEOUT, "
            "in seconds)")
        return (f"{what} sent no handshake in {HANDSHAKE_TIMEOUT:g}s and was killed{misnamed}; "
                f"its output: {self.tail()}{hint}")

    def _misnamed(self) -> str:
        """Why, when the plugin's code dialled another name's socket than ours."""
        for line in self.output:
            found = re.search(r"plugin_([\w.-]+?)\.ipc", line)
            if found and found.group(1) != self.plugin.name:
                return (f": its code calls PluginConfig({found.group(1)!r}, ...) but the plugin "
                        f"is named {self.plugin.name!r} (its folder and manifest); the names "
                        "must match")  # fmt: skip
        return ""

    def tail(self, lines: int = 5) -> str:
        return " | ".join(list(self.output)[-lines:]) or "(nothing)"

    def command(self, cmd: str, ctrl: dict[str, Any], *, remember: str | None = None,
                forget: str | None = None) -> None:
        """Send a start/stop command and check the answer is ``ok``.

        ``remember`` keeps a start command under that key for replay after a
        crash; ``forget`` drops one.
        """
        payload = json.dumps({"cmd": cmd, "arg": json.dumps(ctrl)}).encode()
        self._ready.wait(HANDSHAKE_TIMEOUT)
        with self._lock:
            if forget is not None:
                self._started.pop(forget, None)
            answer = request_reply(
                self._ctrl, payload, self.alive, COMMAND_TIMEOUT,
                f"plugin {self.plugin.name!r} {cmd} {ctrl.get('symbolName')!r}",
            )
            if answer != b"ok":
                text = answer.decode(errors="replace").strip()
                raise PluginError(
                    f"plugin {self.plugin.name!r} refused to {cmd} {ctrl.get('pluginType')} "
                    f"{ctrl.get('symbolName')!r}: {_last_line(text)}"
                )
            if remember is not None:
                self._started[remember] = payload

    def forget(self, key: str) -> None:
        """Drop a remembered start command (its symbol is being stopped): it is not
        replayed after a crash, even by a restart under way."""
        self._started.pop(key, None)  # (no lock: a restart in progress holds it)

    # -- watchers
    def watch(self, callback: Callable[[ProcessEvent], None]) -> None:
        """Have ``callback`` told of every exit and restart of this process."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[ProcessEvent], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def _notify(self, event: ProcessEvent) -> None:
        for callback in list(self._watchers):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a watcher must not stop the restarts
                log.exception("plugin %r: a watcher of its process failed", self.plugin.name)

    # -- crash handling
    def _watch(self) -> None:
        backoff = 0.1
        while True:
            proc = self._proc
            if proc is None:
                return
            began = time.monotonic()
            status = proc.wait()
            if self._stopping:
                return
            if time.monotonic() - began > 30:
                backoff = 0.1
            self._exited(proc.pid, status, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            if self._stopping:
                return
            self._restart()

    def _exited(self, pid: int, status: int, backoff: float) -> None:
        """Log and tell the watchers that the process ended (a crash, or a kill by the host)."""
        self.last_exit = status
        self._ready.clear()
        reason, self._kill_reason = self._kill_reason, None
        name = self.plugin.name
        if reason is None:
            self.crashes += 1
            text = (f"plugin {name!r} (pid {pid}) exited with status {status} (crash "
                    f"{self.crashes} of this process); restarting in {backoff:.1f}s. "
                    f"Last output: {self.tail()}")
            log.warning("%s", text)
        else:
            text = f"plugin {name!r} (pid {pid}) was killed by the host: {reason}; restarting in {backoff:.1f}s"
            log.info("%s", text)
        self._notify(ProcessEvent("exited", name, pid, text, status=status,
                                  requested=reason is not None))

    def _restart(self) -> None:
        """Start the process again and replay its remembered start commands."""
        name = self.plugin.name
        try:
            with self._lock:
                self._spawn()
                self._await_handshake()
                self.restarts += 1
                replayed, failed = self._replay()
        except (PluginError, pynng.NNGException) as exc:
            if self._stopping:  # stopped meanwhile (its sockets closed under it): the
                self._kill()  # process just started may have missed the stop's kill
                return
            log.error("plugin %r: restart failed: %s", name, exc)
            self._kill_reason = "its restart failed"  # (not one more crash)
            self._kill()
            self._notify(ProcessEvent("restart_failed", name, self.pid,
                                      f"plugin {name!r} could not be restarted: {exc}"))
            return
        self._ready.set()
        text = (f"plugin {name!r} restarted (pid {self.pid}), {replayed} of "
                f"{replayed + len(failed)} symbols replayed")
        if failed:
            text += f" ({len(failed)} failed: {', '.join(failed)})"
        (log.warning if failed else log.info)("%s", text)
        if self._on_restart is not None:
            self._on_restart(self)
        self._notify(ProcessEvent("restarted", name, self.pid, text, failed=failed))

    def _replay(self) -> tuple[int, dict[str, str]]:
        """Send the remembered start commands again: how many the plugin took, and
        the keys of the others with its answer."""
        failed: dict[str, str] = {}
        replayed = 0
        for key, payload in list(self._started.items()):
            if key not in self._started:
                continue  # forgotten meanwhile: its symbol is being stopped
            answer = request_reply(self._ctrl, payload, self.alive, COMMAND_TIMEOUT,
                                   f"plugin {self.plugin.name!r} replay {key}")
            if answer == b"ok":
                replayed += 1
                continue
            failed[key] = _last_line(answer.decode(errors="replace"))
            log.error("plugin %r: replaying %s failed: %s", self.plugin.name, key, failed[key])
        return replayed, failed

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL the process; its watchdog restarts it. ``reason`` says why the
        host does so (a hung call, new code); without one it counts as a crash
        (tests simulate crashes this way)."""
        if self._proc is not None:
            self._kill_reason = reason
            self._proc.kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def quiet(self) -> None:
        """From now on its output is logged at debug level (it is being stopped)."""
        self._stopping = True

    def stop(self) -> None:
        """Kill the process (as eKuiper does) and release the private folder."""
        self._stopping = True
        self._kill()
        self._ctrl.close()
        if self.private:
            shutil.rmtree(self.folder, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(empty answer)"
