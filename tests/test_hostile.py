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
    "frame_then_silence": Case(
        'os.write(3, struct.pack("!II", 1000, 0) + b"\\x81")\nimport time\ntime.sleep(30)',
        "timed_out", r"timeout 2s",
        settings={"timeout": "2s"},
    ),
}  # fmt: skip


def _app(root: Path, case: Case, unix_path: str, port: int) -> Path:
    settings = "".join(f"\n    {k}: {v if not isinstance(v, bool) else str(v).lower()}"
                       for k, v in case.settings.items())  # fmt: skip
    parameters = {"port": port, "unix_path": unix_path, "app": str(root), **case.parameters}
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


@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    """A loopback TCP listener and a unix socket in a host folder: targets to reach."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    path = str(tmp_path_factory.mktemp("host") / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen(16)
    yield tcp.getsockname()[1], path
    tcp.close()
    unix.close()


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
