"""Hostile steps: each node below tries one way out of its sandbox.

Every case is a small node that first writes a row to ``loot`` and then
attempts its escape. Each test asserts the exact containment (the run's
status and the error text naming what stopped it), that nothing the hostile
run wrote is visible (``loot`` stays empty), that nothing leaked to the host,
and that a normal step run right afterwards succeeds. All runs go through real
fork-server workers and real stores; two cases also run on PostgreSQL.
"""

from __future__ import annotations

import os
import re
import socket
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from apputil import logs, rows, run_app, write_app

from stepwell.sandbox.launcher import forkserver
from stepwell.store.base import RunRecord

PRELUDE = """
import ctypes, os, signal, socket, struct, sys
from patterns import Parameter, State, Table
Table("loot", "w").append({"stage": "before the escape"})
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
"""

NORMAL = """
from patterns import Table
Table("ok", "w").append({"fine": 1})
"""


@dataclass
class Case:
    """One escape attempt and how it must end."""

    code: str
    status: str
    error: str  # regular expression searched in the run's error
    settings: dict[str, object] = field(default_factory=dict)
    parameters: dict[str, object] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # -- reading what is not the step's --------------------------------------------
    "host_env": Case(
        'Table("loot", "w").append({"v": os.environ["SW_HOST_CANARY"]})',
        "failed", r"KeyError: 'SW_HOST_CANARY'",
    ),
    "host_secret_env": Case(
        'Table("loot", "w").append({"v": os.environ["STEPWELL_SECRET_OTHER"]})',
        "failed", r"KeyError: 'STEPWELL_SECRET_OTHER'",
    ),
    "proc_1_environ": Case(
        'print(open("/proc/1/environ").read())',
        "failed", r"(FileNotFoundError|PermissionError).*/proc/1/environ",
    ),
    "host_process_environ": Case(
        'print(open(f"/proc/{Parameter(\'host_pid\', type=int)}/environ").read())',
        "failed", r"FileNotFoundError.*/proc/\d+/environ",
        parameters={"host_pid": os.getpid()},
    ),
    "store_file": Case(
        'print(len(open(".stepwell/store.duckdb", "rb").read()))',
        "failed", r"FileNotFoundError.*\.stepwell/store\.duckdb",
    ),
    "store_file_by_absolute_path": Case(
        'print(len(open(Parameter("app") + "/.stepwell/store.duckdb.wal", "rb").read()))',
        "failed", r"FileNotFoundError.*store\.duckdb\.wal",
    ),
    "secrets_file": Case(
        'print(open(".stepwell/secrets.toml").read())',
        "failed", r"FileNotFoundError.*secrets\.toml",
    ),
    "host_shadow_file": Case(
        'print(open("/etc/shadow").read())',
        "failed", r"PermissionError.*/etc/shadow",
    ),
    "other_steps_secret": Case(
        'Table("loot", "w").append({"v": Parameter("victim_key")})',
        "failed", r"parameter 'victim_key' has no value",
    ),
    # -- writing where it may not ------------------------------------------------
    "write_app_folder": Case(
        'open("evil.py", "w").write("import os")',
        "failed", r"OSError: \[Errno 30\] Read-only file system: 'evil.py'",
    ),
    "write_system_folder": Case(
        'open("/etc/stepwell-evil", "w").write("x")',
        "failed", r"Read-only file system: '/etc/stepwell-evil'",
    ),
    "remount_read_write": Case(
        'check(libc.mount(None, b"/", None, 0x20 | 0x1000, None), "mount")',
        "failed", r"PermissionError: \[Errno 1\] mount: Operation not permitted",
    ),
    "new_namespaces": Case(
        'check(libc.unshare(0x10000000 | 0x00020000), "unshare")',
        "failed", r"PermissionError: \[Errno 1\] unshare: Operation not permitted",
    ),
    "raise_own_limits": Case(
        "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (100000, 100000))",
        "failed", r"ValueError: not allowed to raise maximum limit",
        settings={"processes": 20},
    ),
    # -- network and the store's server -------------------------------------------
    "socket_network_off": Case(
        'socket.create_connection(("127.0.0.1", Parameter("port", type=int)), timeout=2)',
        "failed", r"OSError: \[Errno 101\] Network is unreachable",
        settings={"network": False},
    ),
    "host_unix_socket": Case(
        's = socket.socket(socket.AF_UNIX)\ns.connect(Parameter("unix_path"))',
        "failed", r"(FileNotFoundError|PermissionError|ConnectionRefusedError)",
    ),
    "host_unix_socket_network_off": Case(  # (a socket the sandbox can see: see _app)
        's = socket.socket(socket.AF_UNIX)\ns.connect(Parameter("visible_unix_path"))',
        "failed", r"OSError: \[Errno 97\] Address family not supported by protocol \(at hostile\.py:\d+\) "
                  r"\(a step without network may not open Unix sockets either; set `network: true`",
        settings={"network": False},
    ),
    # -- resources ----------------------------------------------------------
    "fork_bomb": Case(
        "while True:\n    os.fork()",
        "failed", r"BlockingIOError: \[Errno 11\] Resource temporarily unavailable.*process limit 20 reached",
        settings={"processes": 20},
    ),
    "thread_bomb": Case(
        "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()",
        "failed", r"RuntimeError: can't start new thread",
        settings={"processes": 20},
    ),
    "memory_bomb": Case(
        "hog = bytearray(2 * 1024**3)",
        "killed", r"memory limit 256MiB exceeded",
        settings={"memory": "256MiB"},
    ),
    "memory_bomb_gradual": Case(
        "hog = []\nwhile True:\n    hog.append(bytearray(8 * 1024**2))",
        "killed", r"memory limit 256MiB exceeded",
        settings={"memory": "256MiB"},
    ),
    "huge_single_row": Case(
        'Table("loot", "w").append({"blob": "x" * (200 * 1024**2), "n": 1})\nTable("loot", "w").flush()',
        "killed", r"memory limit 256MiB exceeded",
        settings={"memory": "256MiB"},
    ),
    "fill_tmp": Case(  # /tmp is memory: its size is the `tmp` limit
        'with open("/tmp/fill", "wb") as out:\n    while True:\n        out.write(b"x" * 1024**2)',
        "failed", r"No space left on device.* \(/tmp holds at most 8MiB, its `tmp` limit",
        settings={"tmp": "8MiB"},
    ),
    "files_fill_tmp": Case(  # and so is every empty file: one inode per 4 KiB of it
        'for i in range(10_000):\n    open(f"/tmp/f{i}", "w").close()',
        "failed", r"No space left on device.* \(/tmp holds at most 8MiB, its `tmp` limit",
        settings={"tmp": "8MiB"},
    ),
    "fill_shm": Case(  # /dev/shm has a size of its own: the `tmp` limit is not to blame
        'with open("/dev/shm/fill", "wb") as out:\n    while True:\n        out.write(b"x" * 1024**2)',
        "failed", r"^(?!.*its `tmp` limit).*No space left on device \(/dev/shm holds at most 64MiB,",
        settings={"tmp": "256MiB"},
    ),
    "mmap_past_tmp": Case(  # pages of a mapped file that /tmp has no room for: SIGBUS
        'import mmap\nfile = open("/tmp/mapped", "wb+")\nfile.truncate(64 * 1024**2)\n'
        'pages = mmap.mmap(file.fileno(), 64 * 1024**2)\n'
        'for i in range(0, 64 * 1024**2, 4096):\n    pages[i] = 1',
        "killed", r"killed by SIGBUS \(.*/tmp holds at most 8MiB, its `tmp` limit",
        settings={"tmp": "8MiB"},
    ),
    "infinite_loop": Case(
        "while True:\n    pass",
        "timed_out", r"the step exceeded its time limit \(timeout 1s\)",
        settings={"timeout": "1s"},
    ),
    "time_limit_signal_ignored": Case(  # the host kills it after its grace second
        "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\nwhile True:\n    pass",
        "timed_out", r"^the step exceeded its time limit \(timeout 1s\)$",
        settings={"timeout": "1s"},
    ),
    "time_limit_swallowed": Case(
        "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass",
        "timed_out", r"^the step exceeded its time limit \(timeout 1s\)$",
        settings={"timeout": "1s"},
    ),
    "cpu_burner": Case(
        "n = 0\nwhile True:\n    n += 1",
        "timed_out", r"CPU time limit 1s exceeded",
        settings={"cpu": "1s", "timeout": "20s"},
    ),
    # -- other processes ------------------------------------------------------------
    "signal_parent": Case(
        "os.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(5)",
        "killed", r"killed by SIGKILL",
    ),
    "signal_init": Case(  # refused (root's fork-server), or ignored by the init (a user's)
        "os.kill(1, signal.SIGKILL)\nos.kill(1, 0)\nraise RuntimeError('the init ignored SIGKILL')",
        "failed", r"PermissionError: \[Errno 1\] Operation not permitted|the init ignored SIGKILL",
    ),
    "signal_host": Case(
        'os.kill(Parameter("host_pid", type=int), signal.SIGTERM)',
        "failed", r"ProcessLookupError: \[Errno 3\] No such process",
        parameters={"host_pid": os.getpid()},
    ),
    "ptrace_attach": Case(
        'check(libc.ptrace(16, 1, None, None), "ptrace")',
        "failed", r"PermissionError: \[Errno 1\] ptrace: Operation not permitted",
    ),
    "native_library_from_tmp": Case(
        'import glob, shutil\nshutil.copy(sorted(glob.glob("/*lib*/*/libc.so.6"))[0], "/tmp/evil.so")\n'
        'ctypes.CDLL("/tmp/evil.so")',
        "failed", r"OSError: /tmp/evil.so: failed to map segment from shared object",
    ),
    "kernel_log": Case(
        'buf = ctypes.create_string_buffer(4096)\ncheck(libc.klogctl(3, buf, 4096), "syslog")',
        "failed", r"PermissionError: \[Errno 1\] syslog: Operation not permitted",
    ),
    # -- the wire protocol ------------------------------------------------------------
    "forge_commit_for_other_step": Case(
        "from stepwell.runtimes.node import api\n"
        'api._session.link.call("commit", step="victim", positions=[], state={"pwned": True})\n'
        'raise RuntimeError("forged")',
        "failed", r"RuntimeError: forged",
    ),
    "forge_done_counts": Case(
        "from stepwell.runtimes.node import api\n"
        'api._session.link.call("done", status="ok", rows_out=10**9, rows_in=10**9, run_fields={"status": "succeeded"})\n',
        "succeeded_no_data", r"^$",
    ),
    "unknown_op": Case(
        "from stepwell.runtimes.node import api\n"
        'api._session.link.call("drop_table", table="ok")',
        "failed", r"unknown request 'drop_table'",
    ),
    "malformed_frame": Case(
        'os.write(3, struct.pack("!II", 5, 0) + b"hello")\nimport time\ntime.sleep(5)',
        "failed", r"the worker broke the wire protocol: malformed control message",
    ),
    "oversized_frame": Case(
        'os.write(3, struct.pack("!II", 2**31, 2**31))\nimport time\ntime.sleep(5)',
        "failed", r"the worker broke the wire protocol: frame too large",
    ),
    "forged_stop_report_in_grace": Case(  # text fields of another type: still timed out
        "import time\nfrom stepwell.runtimes.node import api\n"
        "try:\n    while True:\n        time.sleep(0.01)\nexcept BaseException:\n"
        '    api._session.link.channel.send({"op": "done", "status": "ok", "traceback": 12345,\n'
        '                                    "stopped_at": "nowhere"})\n'
        "    time.sleep(5)",
        "timed_out", r"^the step exceeded its time limit \(timeout 1s\); it was stopped at nowhere$",
        settings={"timeout": "1s"},  # (a secret: the host masks secrets in what the frame says)
        parameters={"victim_key": "${{ secrets.victim_key }}"},
    ),
    "forged_long_stop_report": Case(  # where it says it was: a file and a line fit in 300
        "import time\nfrom stepwell.runtimes.node import api\n"
        "try:\n    while True:\n        time.sleep(0.01)\nexcept BaseException:\n"
        '    api._session.link.channel.send({"op": "done", "status": "ok", "stopped_at": "x" * 10**5})\n'
        "    time.sleep(5)",
        "timed_out", r"^the step exceeded its time limit \(timeout 1s\); it was stopped at x{300}$",
        settings={"timeout": "1s"},
    ),
    "log_flood_in_grace": Case(  # the grace second stays a second
        "import time\nfrom stepwell.runtimes.node import api\n"
        "try:\n    while True:\n        time.sleep(0.01)\nexcept BaseException:\n"
        "    while True:\n"
        '        api._session.link.channel.send({"op": "log", "level": "info", "lines": ["x" * 1000] * 1000})',
        "timed_out", r"^the step exceeded its time limit \(timeout 1s\)$",
        settings={"timeout": "1s"},
    ),
    "stdout_pipe_full_sigio_blocked": Case(  # the writer blocks; the time limit still stops it
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGIO])\nimport subprocess\n"
        "subprocess.run(['head', '-c', '50000000', '/dev/zero'])",
        "timed_out", r"timeout 2s\); it was stopped at hostile\.py:\d+",
        settings={"timeout": "2s"},
    ),
    "time_limit_signal_blocked": Case(
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])\nwhile True:\n    pass",
        "timed_out", r"^the step exceeded its time limit \(timeout 1s\)$",
        settings={"timeout": "1s"},
    ),
    "file_descriptors_exhausted": Case(  # the failure is still reported
        "fds = []\ntry:\n    while True:\n        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError:\n    raise RuntimeError(f'exhausted after {len(fds)}')",
        "failed", r"RuntimeError: exhausted after \d+",
    ),
    "descriptors_to_the_host": Case(  # SCM_RIGHTS on the channel: the host gets none
        "import msgpack\nbody = msgpack.packb({'op': 'log', 'level': 'info', 'lines': ['fd']})\n"
        "s = socket.socket(fileno=os.dup(3))\nfd = os.open('/tmp', os.O_RDONLY)\n"
        "socket.send_fds(s, [struct.pack('!II', len(body), 0) + body], [fd] * 50)\n"
        'raise RuntimeError("sent")',
        "failed", r"RuntimeError: sent",
    ),
    "frame_then_silence": Case(
        'os.write(3, struct.pack("!II", 1000, 0) + b"\\x81")\nimport time\ntime.sleep(30)',
        "timed_out", r"timeout 2s",
        settings={"timeout": "2s"},
    ),
}  # fmt: skip


def _app(root: Path, case: Case, unix_path: str, port: int) -> Path:
    settings = "".join(f"\n    {k}: {v if not isinstance(v, bool) else str(v).lower()}"
                       for k, v in case.settings.items())  # fmt: skip
    parameters = {"port": port, "unix_path": unix_path, "visible_unix_path": VISIBLE_UNIX_SOCKET,
                  "app": str(root), **case.parameters}  # fmt: skip
    params = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in parameters.items())
    return write_app(root, {
        "stepwell.yml": f"""
steps:
  - name: hostile
    node: hostile.py
    parameters: {{{params}}}{settings}
  - name: victim
    node: victim.py
    parameters: {{victim_key: "${{{{ secrets.victim_key }}}}"}}
  - name: normal
    node: normal.py
""",
        "hostile.py": PRELUDE + "\n" + textwrap.dedent(case.code) + "\n",
        "victim.py": "from patterns import Parameter\nassert Parameter('victim_key')\n",
        "normal.py": NORMAL,
        ".stepwell/secrets.toml": 'victim_key = "victim-secret-value-42"\n',
    })  # fmt: skip


#: A Unix socket anyone may connect to, in a folder the sandbox sees (as a host
#: service's, such as /run/dbus/system_bus_socket).
VISIBLE_UNIX_SOCKET = f"/var/tmp/stepwell-hostile-{os.getpid()}/host.sock"


@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    """A loopback TCP listener and Unix sockets: one in a host folder the sandbox
    cannot see, one (``VISIBLE_UNIX_SOCKET``) where it can: targets to reach."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    path = str(tmp_path_factory.mktemp("host") / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen(16)
    visible_dir = Path(VISIBLE_UNIX_SOCKET).parent
    visible_dir.mkdir(mode=0o755)
    visible = socket.socket(socket.AF_UNIX)
    visible.bind(VISIBLE_UNIX_SOCKET)
    os.chmod(VISIBLE_UNIX_SOCKET, 0o777)
    visible.listen(16)
    yield tcp.getsockname()[1], path
    for listener in (tcp, unix, visible):
        listener.close()
    os.unlink(VISIBLE_UNIX_SOCKET)
    visible_dir.rmdir()


@pytest.fixture(scope="module")
def server_pid():
    """The fork-servers' pids before any hostile run: they must survive them all."""
    for pandas in (True, False):
        forkserver(pandas).ensure()
    pids = {pandas: forkserver(pandas).pid for pandas in (True, False)}
    yield pids
    for pandas, pid in pids.items():
        assert forkserver(pandas).pid == pid, "a hostile step took a fork-server down"


def _contained(app: Path, case: Case, store_url: str | None = None) -> RunRecord:
    (hostile,) = run_app(app, store_url, steps=["hostile"],
                         environ={"STEPWELL_SECRET_OTHER": "other-secret-123"})  # fmt: skip
    assert hostile.status == case.status, (hostile.status, hostile.error)
    assert re.search(case.error, hostile.error or ""), hostile.error
    assert rows(app, "loot", store_url) == [], "the hostile run's writes became visible"
    (normal,) = run_app(app, store_url, steps=["normal"])
    assert normal.status == "succeeded", normal.error
    assert len(rows(app, "ok", store_url)) == 1
    return hostile


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_step_is_contained(name, tmp_path, monkeypatch, listeners, server_pid):
    monkeypatch.setenv("SW_HOST_CANARY", "host-only-value")
    monkeypatch.setenv("STEPWELL_SECRET_OTHER", "other-secret-123")
    case = CASES[name]
    app = _app(tmp_path / "app", case, listeners[1], listeners[0])
    hostile = _contained(app, case)
    text = "\n".join(logs(app, hostile.id)) + (hostile.error or "") + (hostile.traceback or "")
    assert "host-only-value" not in text and "other-secret-123" not in text


def test_forged_commit_leaves_other_steps_alone(tmp_path, listeners, server_pid):
    case = CASES["forge_commit_for_other_step"]
    app = _app(tmp_path / "app", case, listeners[1], listeners[0])
    _contained(app, case)
    from stepwell.store import open_store

    store = open_store(None, app)
    try:
        assert store.get_state("victim") == {}
        # the forged commit could only ever commit the hostile step's own state
        assert store.get_state("hostile") in ({}, {"pwned": True})
    finally:
        store.close()


def test_writes_outside_tmp_never_reach_the_host(tmp_path, listeners, server_pid):
    marker = f"/tmp/stepwell-hostile-{os.getpid()}"
    case = Case(f'open("{marker}", "w").write("x")\nos.makedirs("/tmp/deep/er", exist_ok=True)\n'
                'raise RuntimeError("wrote to /tmp")', "failed", r"RuntimeError: wrote to /tmp")  # fmt: skip
    app = _app(tmp_path / "app", case, listeners[1], listeners[0])
    _contained(app, case)
    assert not os.path.exists(marker)


def test_huge_log_output_is_capped_and_cheap(tmp_path, listeners, server_pid):
    case = Case("for i in range(400_000):\n    print('spam', i)\nprint('x' * 3_000_000)\n"
                'raise RuntimeError("flooded")', "failed", r"RuntimeError: flooded")  # fmt: skip
    app = _app(tmp_path / "app", case, listeners[1], listeners[0])
    import time

    began = time.monotonic()
    (hostile,) = run_app(app, steps=["hostile"])
    assert time.monotonic() - began < 60
    assert hostile.status == "failed" and "flooded" in hostile.error
    lines = logs(app, hostile.id)
    assert len(lines) <= 100_000
    assert "log limit reached" in lines[-1]
    assert rows(app, "loot") == []
    (normal,) = run_app(app, steps=["normal"])
    assert normal.status == "succeeded"


def test_huge_output_below_python_is_capped_too(tmp_path, listeners, server_pid):
    """A flood written to fd 1 itself, by the step and by a subprocess (under Python,
    where print's own limits do not see it): the log keeps its limit, the run ends."""
    case = Case("block = b'spam ' * 200 + b'\\n'\nfor i in range(120_000):\n    os.write(1, block)\n"
                "import subprocess\nsubprocess.run(['head', '-c', '50000000', '/dev/zero'])\n"
                'raise RuntimeError("flooded")', "failed", r"RuntimeError: flooded")  # fmt: skip
    app = _app(tmp_path / "app", case, listeners[1], listeners[0])
    (hostile,) = run_app(app, steps=["hostile"])
    assert hostile.status == "failed" and "flooded" in hostile.error
    lines = logs(app, hostile.id)
    assert 10_000 < len(lines) <= 100_000 and lines[0] == "spam " * 200
    assert "log limit reached" in lines[-1]
    (normal,) = run_app(app, steps=["normal"])
    assert normal.status == "succeeded"


@pytest.mark.parametrize("name", ["socket_network_off", "forge_commit_for_other_step"])
def test_hostile_on_postgres(name, tmp_path, make_pg_database, listeners, server_pid):
    """The same containment with a PostgreSQL store; the step cannot reach its server."""
    url = make_pg_database()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    case = CASES[name]
    app = _app(tmp_path / "app", case, listeners[1], port)
    _contained(app, case, url)


def test_announced_huge_frame_costs_the_host_nothing(tmp_path, listeners, server_pid):
    """A frame that announces ~900 MB and never sends them: the run times out and
    the host never allocated the announced size."""
    import resource

    code = (
        'import msgpack\nheader = msgpack.packb({"op": "write", "table": "loot"})\n'
        'os.write(3, struct.pack("!II", len(header), 900 * 1024**2) + header + b"x" * 1000)\n'
        "import time\ntime.sleep(30)"
    )
    case = Case(code, "timed_out", r"timeout 2s", settings={"timeout": "2s"})
    app = _app(tmp_path / "app", case, listeners[1], listeners[0])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _contained(app, case)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024, f"the host grew by {grown_kib} KiB"


def _run_dirs() -> list[Path]:
    """The private temp dirs of runs (used, kept for later runs) of both fork-servers."""
    found = []
    for pandas in (True, False):
        pid = forkserver(pandas).pid
        found += [d for top in Path("/tmp").glob(f"stepwell-fs-{pid}-*") for d in top.iterdir()]
    return found


#: Where the kernel refuses a mount namespace (``STEPWELL_SANDBOX_SKIP=mount``), a run's
#: temp dir (``TMPDIR``) is a folder of the fork-server's on the host's disk; else
#: /tmp is a file system in memory that ends with the run.
TMP_KINDS = ["", "mount"]


@pytest.fixture
def open_dir():
    """A folder the sandbox user may enter (without a mount namespace, a sandbox sees
    the host's /tmp, where pytest's own folders are closed to it)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="stepwell-hostile-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("skip", TMP_KINDS)
def test_deep_tree_in_tmp_is_removed(skip, tmp_path, open_dir, monkeypatch, listeners, server_pid):
    """A folder 1,500 levels deep left in the temp dir (shutil.rmtree recursed per
    level and gave up with RecursionError, leaving the run's files on the host's disk)."""
    monkeypatch.setenv("STEPWELL_SANDBOX_SKIP", skip)
    code = "os.chdir(os.environ['TMPDIR'])\nfor i in range(1500):\n    os.mkdir('d')\n" \
           "    os.chdir('d')\nraise RuntimeError('deep')"
    case = Case(code, "failed", r"RuntimeError: deep")
    app = _app((open_dir if skip else tmp_path) / "app", case, listeners[1], listeners[0])
    _contained(app, case)
    import time

    deadline = time.monotonic() + 10
    while (left := [d for d in _run_dirs() if (d / "d").exists()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "the run's files stayed on the host"


@pytest.mark.parametrize("skip", TMP_KINDS)
def test_many_files_left_in_tmp_are_removed_between_runs(skip, tmp_path, open_dir, monkeypatch,
                                                          listeners, server_pid):  # fmt: skip
    """A run leaving 30,000 files in its temp dir: a host folder is set aside at once
    and removed a part at a time while the fork-server is idle (removing it in one go
    held up the next runs for seconds); the next runs work meanwhile."""
    monkeypatch.setenv("STEPWELL_SANDBOX_SKIP", skip)
    code = "for i in range(30_000):\n    open(os.path.join(os.environ['TMPDIR'], f'f{i}'), 'w').close()\n" \
           'raise RuntimeError("littered")'
    case = Case(code, "failed", r"RuntimeError: littered")
    app = _app((open_dir if skip else tmp_path) / "app", case, listeners[1], listeners[0])
    _contained(app, case)  # (the next run succeeds)
    import time

    deadline = time.monotonic() + 30
    while (left := [d for d in _run_dirs() if d.name.startswith("trash-")]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "the run's files stayed on the host"
    assert not [d for d in _run_dirs() if (d / "f0").exists()]


SURVIVOR = """
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        libc.prctl(1, 0)  # no death signal
        os.closerange(0, 1 << 16)
        import time
        tmp = os.environ["TMPDIR"]
        end = time.monotonic() + 8
        while time.monotonic() < end:  # quiet until another run uses this temp dir
            try:
                names = [n for n in os.listdir(tmp) if n.startswith("secret")]
                if names:
                    open(os.path.join(tmp, "seen"), "w").write(open(os.path.join(tmp, names[0])).read())
            except OSError:
                pass
            time.sleep(0.01)
        os._exit(0)
    os._exit(0)
import time
time.sleep(0.3)  # (until it has left the run's session)
raise RuntimeError("left a process behind")
"""

LATER_RUN = """
import os, time
from patterns import Parameter
tmp = os.environ["TMPDIR"]
open(os.path.join(tmp, "secret"), "w").write(Parameter("victim_key"))
time.sleep(0.3)
assert not os.path.exists(os.path.join(tmp, "seen")), "an earlier run's process read this run's temp dir"
"""


@pytest.mark.parametrize("skip", ["", "pid", "pid,mount"])
def test_process_left_behind_never_sees_a_later_run(skip, open_dir, monkeypatch, listeners, server_pid):
    """A double-forked, setsid process outlives its run where the run has no PID
    namespace (the kernel refused one): the run's temp dir must not be handed to a
    later run, where that process would read the later run's files (its secrets)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("STEPWELL_SANDBOX_SKIP", skip)
    # (apps outside /tmp: host temp dirs are then reused across apps)
    case = Case(SURVIVOR, "failed", r"RuntimeError: left a process behind")
    app = _app(open_dir / "app", case, listeners[1], listeners[0])
    _contained(app, case)
    apps = [_app(open_dir / f"app{i}", case, listeners[1], listeners[0]) for i in range(4)]
    for other in apps:
        (other / "victim.py").write_text(LATER_RUN)
    with ThreadPoolExecutor(4) as pool:  # at once: each takes a temp dir the server has
        for _ in range(2):
            for (victim,) in pool.map(lambda a: run_app(a, steps=["victim"]), apps):
                assert victim.status == "succeeded_no_data", victim.error


@pytest.mark.parametrize("skip", TMP_KINDS)
def test_tmp_left_empty_is_reset_for_the_next_run(skip, tmp_path, open_dir, monkeypatch, listeners,
                                                   server_pid):  # fmt: skip
    """A run that changes its temp dir itself (mode, setgid, extended attributes) and
    leaves it empty: a later run gets it back as new."""
    monkeypatch.setenv("STEPWELL_SANDBOX_SKIP", skip)
    code = "tmp = os.environ['TMPDIR']\ntry:\n    os.setxattr(tmp, 'user.planted', b'1')\n" \
           "except OSError:  # (tmpfs before Linux 6.6 has no user attributes)\n    pass\n" \
           "os.chmod(tmp, 0o3777)\nraise RuntimeError('changed its temp dir')"
    case = Case(code, "failed", r"RuntimeError: changed its temp dir")
    app = _app((open_dir if skip else tmp_path) / "app", case, listeners[1], listeners[0])
    (app / "victim.py").write_text(
        "import os, stat\ntmp = os.environ['TMPDIR']\n"
        "assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o700, oct(os.stat(tmp).st_mode)\n"
        "assert os.listxattr(tmp) == [], os.listxattr(tmp)\n"
    )
    _contained(app, case)
    for _ in range(2):
        (victim,) = run_app(app, steps=["victim"])
        assert victim.status == "succeeded_no_data", victim.error
        assert run_app(app, steps=["hostile"])[0].status == "failed"


def test_without_a_mount_namespace_the_log_says_the_tmp_limit_does_not_hold(
    open_dir, monkeypatch, listeners, server_pid,
):
    """There /tmp is a folder on the host's disk: 20 MiB fit in a `tmp: 8MiB` step's,
    and the run's log must not let the operator think otherwise."""
    monkeypatch.setenv("STEPWELL_SANDBOX_SKIP", "mount")
    code = 'with open(os.environ["TMPDIR"] + "/big", "wb") as out:\n    out.write(b"x" * 20 * 1024**2)'
    case = Case(code, "succeeded", r"^$", settings={"tmp": "8MiB"})
    app = _app(open_dir / "app", case, listeners[1], listeners[0])
    (run,) = run_app(app, steps=["hostile"])
    assert run.status == "succeeded", run.error
    notes = [line for line in logs(app, run.id) if "mount namespace unavailable" in line]
    assert notes and "the `tmp` limit (8MiB) does not hold" in notes[0], notes


def test_step_text_cannot_drive_the_terminal(tmp_path, listeners, server_pid):
    """Escape sequences and rich markup in a step's output, error and rows: the CLI
    shows them as text (`stepwell runs` crashed on "[/]" in an error, `stepwell
    table` on one in a value, and `stepwell logs`/`run` wrote escapes to the terminal)."""
    from apputil import cli

    code = ('print("\\x1b]0;title\\x07\\x1b[2Jcleared")\n'
            'raise RuntimeError("\\x1b]52;c;cHduZWQ=\\x07 [/] [bold]x")')  # fmt: skip
    case = Case(code, "failed", r"RuntimeError: \x1b\]52")
    app = _app(tmp_path / "app", case, listeners[1], listeners[0])
    hostile = _contained(app, case)
    (app / "victim.py").write_text(
        'from patterns import Table\nTable("shown", "w").append({"v": "[/] \\x1b[8mhidden"})\n'
    )
    assert run_app(app, steps=["victim"])[0].status == "succeeded"
    outputs = [
        cli("run", str(app), "hostile"),
        cli("runs", str(app)),
        cli("logs", str(app), hostile.id),
        cli("table", str(app), "shown"),
    ]
    for result in outputs:
        assert "Traceback" not in result.stderr, result.stderr
        assert "\x1b]" not in result.stdout + result.stderr
        assert "\x1b[8m" not in result.stdout + result.stderr
    assert "\\x1b]52;c;cHduZWQ=\\x07" in outputs[0].stderr
    assert "[/]" in outputs[1].stdout and "\\x1b]0;title" in outputs[2].stdout


def test_host_message_queues_stay_out_of_reach(tmp_path, host_message_queue, listeners, server_pid):
    """The run has an IPC namespace of its own, and an ``mqueue`` mount of the host
    (such as /dev/mqueue) shows the run's own queues, not the host's: through the
    host's, open() and mq_receive took the host's messages."""
    mount_point, name = host_message_queue
    code = (f'print(os.listdir("{mount_point}"))\n'
            f'fd = os.open("{mount_point}{name}", os.O_RDONLY)\n'
            "buf = ctypes.create_string_buffer(64)\n"
            'n = ctypes.CDLL("librt.so.1").mq_receive(fd, buf, 64, None)\n'
            'Table("loot", "w").append({"v": buf.raw[:n].decode()})')  # fmt: skip
    case = Case(code, "failed", rf"FileNotFoundError.*{name}")
    app = _app(tmp_path / "app", case, listeners[1], listeners[0])
    hostile = _contained(app, case)
    assert "[]" in logs(app, hostile.id)
    assert "QSIZE:17" in Path(mount_point + name).read_text()
