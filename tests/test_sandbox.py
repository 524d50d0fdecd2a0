"""The sandbox: fork-server, isolation of each run, limits and statuses, secrets.

Everything runs through real fork-server workers and real stores. The
fork-server is one per host process (here: the pytest process), so several
tests also check that it is started once and survives what its children do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from apputil import app_runner, cli, logs, rows, run_app, write_app

from stepwell.engine.logs import Redactor
from stepwell.sandbox.forkserver import FORK_HOOK_MODULES
from stepwell.sandbox.launcher import forkserver
from stepwell.sandbox.policy import (
    MEMORY_EXIT_CODE,
    PRELOAD_ENV,
    describe_exit,
    format_bytes,
    sandbox_mode,
    skipped_features,
)

FACTS = """
import json, os, socket
from patterns import Parameter, Table

def attempt(action):
    try:
        return ["ok", action()]
    except Exception as exc:
        return ["error", f"{type(exc).__name__}: {exc}"]

def connect():
    socket.create_connection(("127.0.0.1", Parameter("port", type=int)), timeout=2).close()
    return "connected"

def write_tmp():
    with open("/tmp/mine.txt", "w") as out:
        out.write("private")
    return sorted(os.listdir("/tmp"))

facts = {
    "uid": os.getuid(),
    "pid": os.getpid(),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:50],
    "env": sorted(os.environ),
    "home": os.environ.get("HOME"),
    "tmpdir": os.environ.get("TMPDIR"),
    "cwd": os.getcwd(),
    "app_file": attempt(lambda: open("data.txt").read()),
    "write_app": attempt(lambda: open("new.txt", "w").write("x")),
    "write_tmp": attempt(write_tmp),
    "tmp_fs": [line.split()[2] for line in open("/proc/self/mounts") if line.split()[1] == "/tmp"],
    "tmp_bytes": os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize,
    "store_dir": attempt(lambda: os.listdir(".stepwell")),
    "connect": attempt(connect),
    "no_new_privs": [line.split()[1] for line in open("/proc/self/status") if line.startswith("NoNewPrivs")],
    "seccomp": [line.split()[1] for line in open("/proc/self/status") if line.startswith("Seccomp:")],
    "cap_eff": [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")],
}
print("FACTS " + json.dumps(facts))
Table("facts", "w").append({"n": 1})
"""


def _facts(app, run) -> dict:
    (line,) = [line for line in logs(app, run.id) if line.startswith("FACTS ")]
    return json.loads(line[len("FACTS "):])


@pytest.fixture
def listener():
    """A TCP listener on the host's loopback: reachable only with network on."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def _facts_app(tmp_path, port, extra: str = "", defaults: str = ""):
    return write_app(tmp_path / "app", {
        "stepwell.yml": f"""
            {defaults}
            steps:
              - name: offline
                node: facts.py
                network: false
                parameters: {{port: {port}}}
              - name: online
                node: facts.py
                parameters: {{port: {port}}}
            {extra}
        """,
        "facts.py": FACTS,
        "data.txt": "app data",
    })  # fmt: skip


def _ways_under_tmp(*paths: Path) -> list[str]:
    """First components under /tmp of the paths the sandbox must show (the app, and
    Python itself when the checkout and its venv live under /tmp, as in CI)."""
    return sorted({str(p).split("/")[2] for p in paths if str(p).startswith("/tmp/")})


def test_isolation_of_a_run(tmp_path, listener):
    app = _facts_app(tmp_path, listener)
    offline, online = run_app(app)
    assert offline.status == online.status == "succeeded", (offline.error, online.error)
    facts = _facts(app, offline)
    assert facts["uid"] == 0  # root of its own user namespace, nobody outside
    assert facts["pid"] == 2 and facts["pids"] == [2]  # own PID namespace, only itself visible
    assert facts["env"] == ["HOME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE", "TMPDIR"] or set(
        facts["env"]) <= {"HOME", "LANG", "LC_ALL", "PATH", "PYTHONDONTWRITEBYTECODE", "TMPDIR", "TZ"}
    assert facts["home"] == facts["tmpdir"] == "/tmp"
    assert facts["cwd"] == str(app.resolve())
    assert facts["app_file"] == ["ok", "app data"]
    assert facts["write_app"][0] == "error" and "Read-only file system" in facts["write_app"][1]
    # a fresh private /tmp (holding only the way to the app when the app is under /tmp)
    way = _ways_under_tmp(app.resolve(), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())
    assert facts["write_tmp"] == ["ok", sorted(["mine.txt", *way])]
    # a file system in memory of its own, of the default `tmp` size
    assert facts["tmp_fs"] == ["tmpfs"] and facts["tmp_bytes"] == 1024**3
    assert facts["store_dir"] == ["ok", []]  # the store's folder is hidden
    assert facts["connect"][0] == "error" and "Network is unreachable" in facts["connect"][1]
    assert facts["no_new_privs"] == ["1"] and facts["seccomp"] == ["2"]
    assert int(facts["cap_eff"][0], 16) == 0
    # with network on, the host's loopback is reachable
    assert _facts(app, online)["connect"] == ["ok", "connected"]
    # a second run gets a new empty /tmp: nothing leaks between runs
    again = run_app(app, steps=["offline"])[0]
    assert _facts(app, again)["write_tmp"] == ["ok", sorted(["mine.txt", *way])]
    assert not os.path.exists(app / "new.txt")


PEEK = """
import json, sys
from patterns import Parameter

def read(path):
    try:
        return open(path).read()
    except OSError as exc:
        return type(exc).__name__

print("PEEK " + json.dumps({"own": read("data.txt"), "other": read(Parameter("other"))}))
"""


def test_spare_worker_views_follow_the_app(tmp_path):
    """Spare workers build the last app's filesystem view ahead of time; a run of
    another app must get its own view, never the prepared one."""
    apps = {}
    for name, other in (("a", "b"), ("b", "a")):
        apps[name] = write_app(tmp_path / name, {
            "stepwell.yml": f"""
                steps:
                  - name: peek
                    node: peek.py
                    parameters: {{other: "{tmp_path / other / 'data.txt'}"}}
            """,
            "peek.py": PEEK,
            "data.txt": f"data of {name}",
        })  # fmt: skip
    def peek(name: str) -> dict:
        (run,) = run_app(apps[name])
        assert run.status == "succeeded_no_data", run.error
        (line,) = [m for m in logs(apps[name], run.id) if m.startswith("PEEK ")]
        return json.loads(line[len("PEEK "):])

    for name in ("a", "a", "b", "a", "b", "b"):  # same app (prepared view) and switches
        seen = peek(name)
        assert seen["own"] == f"data of {name}"
        assert seen["other"] in ("FileNotFoundError", "PermissionError"), seen
    # the app folder replaced by a new one at the same path (a fresh checkout, say):
    # the spare prepared for the old folder must not serve it
    stale = tmp_path / "b-old"
    apps["b"].rename(stale)
    shutil.copytree(stale, apps["b"], ignore=shutil.ignore_patterns(".stepwell"))
    shutil.rmtree(stale)
    (apps["b"] / "data.txt").write_text("new data of b")
    assert peek("b")["own"] == "new data of b"


def test_network_defaults_from_app_and_strict_mode(tmp_path, listener):
    app = _facts_app(tmp_path, listener, defaults="defaults: {network: false}")
    offline, online = run_app(app)
    assert _facts(app, online)["connect"][0] == "error"  # app default: no network
    # strict mode: no network unless the step sets it
    plain = write_app(tmp_path / "strict", {
        "stepwell.yml": f"""
            steps:
              - name: unset
                node: facts.py
                parameters: {{port: {listener}}}
              - name: allowed
                node: facts.py
                network: true
                parameters: {{port: {listener}}}
        """,
        "facts.py": FACTS,
        "data.txt": "x",
    })  # fmt: skip
    from stepwell.app import load_app
    from stepwell.engine.app_run import run_steps
    from stepwell.engine.runner import Runner
    from stepwell.store import open_store

    spec = load_app(plain)
    store = open_store(None, spec.root)
    try:
        unset, allowed = run_steps(Runner(spec, store, sandbox="strict"), ["unset", "allowed"])
    finally:
        store.close()
    assert "Network is unreachable" in _facts(plain, unset)["connect"][1]
    assert _facts(plain, allowed)["connect"] == ["ok", "connected"]


def test_refused_namespace_is_logged_and_strict_refuses(tmp_path, listener, monkeypatch):
    app = _facts_app(tmp_path, listener)
    monkeypatch.setenv("STEPWELL_SANDBOX_SKIP", "net,pid")
    offline = run_app(app, steps=["offline"])[0]
    assert offline.status == "succeeded", offline.error
    lines = logs(app, offline.id)
    assert any(line.startswith("[stepwell] sandbox: network namespace unavailable (disabled by "
                               "STEPWELL_SANDBOX_SKIP); running with the host's network") for line in lines)
    assert any("PID namespace unavailable" in line for line in lines)
    assert _facts(app, offline)["connect"] == ["ok", "connected"]  # said so, not silently
    # strict mode refuses to run with less isolation
    monkeypatch.setenv("STEPWELL_SANDBOX", "strict")
    refused = run_app(app, steps=["offline"])[0]
    assert refused.status == "failed"
    assert "sandbox mode `strict` refuses to run" in refused.error
    assert "network namespace unavailable" in refused.error
    assert rows(app, "facts") and len(rows(app, "facts")) == 1  # the refused run wrote nothing


def test_sandbox_none_runs_a_plain_subprocess_and_says_so(tmp_path, monkeypatch):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: plain\n    node: plain.py\n",
        "plain.py": "import os\nprint('PID', os.getpid())\n",
    })  # fmt: skip
    monkeypatch.setenv("STEPWELL_SANDBOX", "none")
    plain = run_app(app)[0]
    assert plain.status == "succeeded_no_data", plain.error
    lines = logs(app, plain.id)
    assert lines[0].startswith("[stepwell] sandbox: disabled (STEPWELL_SANDBOX=none)")
    assert lines[1] != "PID 2"  # no PID namespace: a plain subprocess


LIMITS_APP = {
    "stepwell.yml": """
        defaults: {memory: 512MiB}
        steps:
          - name: memory
            node: memory.py
            memory: 256MiB
          - name: cpu
            node: cpu.py
            cpu: 1s
            timeout: 30s
          - name: wall
            node: wall.py
            timeout: 1s
          - name: processes
            node: processes.py
            processes: 16
          - name: app_default_memory
            node: memory.py
          - name: graceful
            node: graceful.py
            timeout: 2s
    """,
    "memory.py": """
        from patterns import Table
        Table("m", "w").append({"a": 1})
        chunks = []
        while True:
            chunks.append(bytearray(16 * 1024**2))
    """,
    "cpu.py": """
        from patterns import Table
        Table("c", "w").append({"a": 1})
        while True:
            pass
    """,
    "wall.py": """
        import time
        from patterns import Table
        Table("w", "w").append({"a": 1})
        time.sleep(60)
    """,
    "processes.py": """
        import subprocess, sys
        from patterns import Table
        Table("p", "w").append({"a": 1})
        children = [subprocess.Popen(["sleep", "30"]) for _ in range(40)]
    """,
    "graceful.py": """
        import time
        from patterns import State, Table
        loops = 0
        while State().should_continue(pct_of_limit=0.8):
            time.sleep(0.05)
            loops += 1
        Table("g", "w").append({"loops": loops})
    """,
}


def test_limits_end_runs_with_named_statuses(tmp_path):
    app = write_app(tmp_path / "app", LIMITS_APP)
    memory, cpu, wall, processes, default_memory, graceful = run_app(app)
    assert memory.status == "killed" and "memory limit 256MiB exceeded" in memory.error
    assert default_memory.status == "killed" and "memory limit 512MiB exceeded" in default_memory.error
    assert cpu.status == "timed_out" and "CPU time limit 1s exceeded" in cpu.error
    assert wall.status == "timed_out" and "timeout 1s" in wall.error
    assert processes.status == "failed"
    assert "Resource temporarily unavailable" in processes.error
    assert "process limit 16 reached" in processes.error
    # should_continue() follows the real limit: 80 % of 2 s
    assert graceful.status == "succeeded", graceful.error
    assert 15 <= rows(app, "g")[0]["loops"] <= 33
    for table in ("m", "c", "w", "p"):
        assert rows(app, table) == [], table


def test_fork_server_is_started_once_and_survives_crashes(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: segfault
                node: segfault.py
              - name: abort
                node: abort.py
              - name: oom
                node: oom.py
                memory: 128MiB
              - name: self_kill
                node: self_kill.py
              - name: fine
                node: fine.py
        """,
        "segfault.py": "import ctypes\nctypes.string_at(0)\n",
        "abort.py": "import os\nos.abort()\n",
        "oom.py": "x = bytearray(1024**3)\n",
        "self_kill.py": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        "fine.py": "from patterns import Table\nTable('ok', 'w').append({'a': 1})\n",
    })  # fmt: skip
    client = forkserver(pandas=False)  # the one node steps without pandas use
    client.ensure()
    pid, starts = client.pid, client.starts
    began = time.perf_counter()
    segfault, abort, oom, self_kill, fine = run_app(app)
    assert segfault.status == "killed" and "SIGSEGV" in segfault.error
    assert abort.status == "killed" and "SIGABRT" in abort.error
    assert oom.status == "killed" and "memory limit 128MiB exceeded" in oom.error
    assert self_kill.status == "killed" and "SIGKILL" in self_kill.error
    assert fine.status == "succeeded"
    assert client.pid == pid and client.starts == starts, "the fork-server was restarted"
    # five runs, no cold start among them
    assert time.perf_counter() - began < 30
    # a dead fork-server takes its spare worker and that worker's namespace along...
    children = _children(pid)
    assert children, "the fork-server keeps a spare worker (and its namespace's init)"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{c}") for c in children):
        time.sleep(0.05)
    assert not [c for c in children if os.path.exists(f"/proc/{c}")], "orphans were left behind"
    # ...and is replaced on the next run
    (again,) = run_app(app, steps=["fine"])
    assert again.status == "succeeded", again.error
    assert client.pid not in (None, pid) and client.starts == starts + 1


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def test_fork_server_holds_no_host_environment(monkeypatch):
    monkeypatch.setenv("SW_HOST_ONLY", "do-not-copy")
    for pandas in (True, False):
        client = forkserver(pandas)
        client.ensure()
        with open(f"/proc/{client.pid}/environ", "rb") as handle:
            environ = handle.read().decode()
        assert "SW_HOST_ONLY" not in environ and "STEPWELL_SECRET" not in environ
        assert "ARROW_DEFAULT_MEMORY_POOL=system" in environ


FORK_STATE_NODE = """
import logging, random, subprocess, sys, threading
from patterns import Table
seen = []
thread = threading.Thread(target=lambda: seen.append(threading.get_ident()))
thread.start()
thread.join()
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
logging.getLogger("step").info("logged from the step")
child = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
Table("facts", "w").append({
    "random": random.random(),
    "thread_ran": seen != [] and seen[0] != threading.get_ident(),
    "main_thread": threading.current_thread() is threading.main_thread(),
    "child": child.stdout.strip(),
})
"""


def test_workers_forked_without_python_fork_hooks_start_in_a_sound_state(tmp_path):
    # both fork-servers are single-threaded with no Python signal handler, so they
    # fork workers with libc's fork alone (forkserver.python_fork_hooks_needed)
    for pandas in (False, True):
        client = forkserver(pandas)
        client.ensure()
        assert client.info["os_fork"] is None, client.info
        assert os.listdir(f"/proc/{client.pid}/task") == [str(client.pid)]
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: lean
                node: facts.py
              - name: full
                node: facts_pandas.py
        """,
        "facts.py": FORK_STATE_NODE,
        "facts_pandas.py": "import pandas\n" + FORK_STATE_NODE,
    })  # fmt: skip
    runs = run_app(app) + run_app(app)
    assert [r.status for r in runs] == ["succeeded"] * 4, [r.error for r in runs]
    facts = rows(app, "facts")
    assert len({f["random"] for f in facts}) == 4, "runs share a random sequence"
    assert all(f["thread_ran"] and f["main_thread"] and f["child"] == "42" for f in facts), facts
    for run in runs:
        assert any("step: logged from the step" in line for line in logs(app, run.id))


def test_a_fork_server_that_may_need_python_fork_hooks_uses_os_fork(tmp_path):
    script = textwrap.dedent("""
        import signal, threading, time
        from stepwell.sandbox.forkserver import python_fork_hooks_needed as needed
        signal.signal(signal.SIGINT, signal.default_int_handler)  # (ignored if started so)
        print(needed([]))  # Python's own SIGINT handler counts
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the fork-server has it
        print(needed([]))
        print(needed(["json"]))
        signal.signal(signal.SIGUSR2, lambda *args: None)
        print(needed([]))
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        threading.Thread(target=time.sleep, args=(1,)).start()
        print(needed([]))
    """)
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout.splitlines() == [
        f"a Python handler for signal {int(signal.SIGINT)}",
        "None",
        "modules preloaded on request may register fork hooks",
        f"a Python handler for signal {int(signal.SIGUSR2)}",
        "2 threads",
    ]
    # extra preloads: workers come from os.fork, as before, and run as usual
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: s\n    node: s.py\n",
        "s.py": FORK_STATE_NODE,
    })  # fmt: skip
    env = {**os.environ, PRELOAD_ENV: "json"}
    for _ in range(2):
        result = cli("run", str(app), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    facts = rows(app, "facts")
    assert len({f["random"] for f in facts}) == 2 and all(f["child"] == "42" for f in facts)


def test_only_known_modules_register_python_fork_hooks():
    """The fork-servers skip Python's fork hooks (see python_fork_hooks_needed):
    every hook their modules register must be one that only repairs what other
    threads left (or random's, which the fork-server runs itself)."""
    script = textwrap.dedent("""
        import os, sys
        callers = set()
        register = os.register_at_fork
        def recording(**hooks):
            callers.add(sys._getframe(1).f_globals.get("__name__"))
            register(**hooks)
        os.register_at_fork = recording
        from stepwell.sandbox import forkserver
        forkserver.load_worker_modules(forkserver.preload_plan()[0])
        print(sorted(callers))
    """)
    for preload in ("-pandas", ""):
        env = {**os.environ, PRELOAD_ENV: preload}
        done = subprocess.run([sys.executable, "-I", "-c", script], env=env, capture_output=True,
                              text=True, timeout=120, check=True)  # fmt: skip
        callers = set(json.loads(done.stdout.strip().replace("'", '"')))
        assert "threading" in callers  # the recording works
        assert callers <= set(FORK_HOOK_MODULES), callers


def test_concurrent_runs_are_isolated_from_each_other(tmp_path):
    apps = [
        write_app(tmp_path / f"app{i}", {
            "stepwell.yml": "steps:\n  - name: s\n    node: s.py\n",
            "s.py": f"""
                import os, time
                from patterns import Table
                open("/tmp/who", "w").write("{i}")
                time.sleep(0.3)
                Table("t", "w").append({{"me": {i}, "seen": open("/tmp/who").read(),
                                         "pids": len([p for p in os.listdir("/proc") if p.isdigit()])}})
            """,
        })
        for i in range(3)
    ]  # fmt: skip
    results: dict[int, object] = {}

    def go(i):
        results[i] = run_app(apps[i])[0]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(3):
        assert results[i].status == "succeeded", results[i].error
        (row,) = rows(apps[i], "t")
        assert row["seen"] == str(i) and row["pids"] == 1


SECRET = "sk-live-7b2f9e41c0d3"

SECRETS_APP = {
    "stepwell.yml": """
        steps:
          - name: owner
            node: owner.py
            parameters: {api_key: "${{ secrets.api_key }}"}
          - name: other
            node: other.py
    """,
    "owner.py": """
        import sys
        from patterns import Parameter, State
        key = Parameter("api_key")
        print("whole:", key)
        for ch in key:            # one character per line
            print(ch)
        for ch in key:            # character by character on one line
            print(ch, end="", flush=True)
        print()
        half = len(key) // 2
        print("first half", key[:half])
        print(key[half:], "second half")
        print({"nested": [key]})
        sys.stderr.write("err " + key + "\\n")
        State().set_value("note", "kept for the run")
        raise ValueError(f"could not use {key!r} with the service")
    """,
    "other.py": """
        import os
        from patterns import Parameter, Table
        found = [k for k in os.environ if "SECRET" in k or "API" in k]
        try:
            value = Parameter("api_key")
        except Exception as exc:
            value = f"no: {exc}"
        Table("seen", "w").append({"env": ",".join(found), "param": str(value)})
    """,
}


def test_secrets_are_per_step_and_redacted_everywhere(tmp_path):
    app = write_app(tmp_path / "app", SECRETS_APP)
    owner, other = run_app(app, environ={"STEPWELL_SECRET_API_KEY": SECRET})
    assert owner.status == "failed"
    stored = "\n".join(logs(app, owner.id)) + owner.error + (owner.traceback or "")
    for piece in (SECRET, SECRET[: len(SECRET) // 2 + 1], SECRET[len(SECRET) // 2 - 1:]):
        assert piece not in stored, piece
    lines = logs(app, owner.id)
    assert "whole: ***" in lines and "{'nested': ['***']}" in lines
    assert "err ***" in lines
    assert "could not use '***' with the service" in owner.error
    # the char-by-char lines are masked one by one, and nothing of the key survives
    assert not any(len(line) == 1 and line in SECRET and line != "*" for line in lines[1:1 + len(SECRET)])
    # only the declaring step gets it
    assert other.status == "succeeded", other.error
    (seen,) = rows(app, "seen")
    assert seen["env"] == "" and "has no value" in seen["param"]


def test_secret_split_across_log_batches_is_redacted():
    from stepwell.engine.logs import RunLog

    class Sink:
        def __init__(self):
            self.lines = []

        def append_logs(self, lines):
            self.lines.extend(lines)

    sink = Sink()
    log = RunLog(sink, "run", Redactor([SECRET]), flush_seconds=0)
    log.add("info", ["hello", SECRET[:5]])
    log.add("info", [SECRET[5:12]])
    log.add("info", [SECRET[12:], "after"])
    log.flush()
    messages = [line.message for line in sink.lines]
    assert messages == ["hello", "***", "***", "***", "after"]
    assert [line.seq for line in sink.lines] == [0, 1, 2, 3, 4]


def test_redactor_variants_and_lines():
    redact = Redactor(['pa"ss\\word', "abc"])  # short values are not redacted
    assert redact.values == ['pa"ss\\word']
    assert redact(repr('pa"ss\\word')) == "'***'"
    assert redact(json.dumps({"k": 'pa"ss\\word'})) == '{"k": "***"}'
    assert redact('x pa"ss\n\\word y') == "x ***\n*** y"
    masked, release = redact.mask_lines(["ok", 'pa"s'], final=False)
    assert masked == ["ok", 'pa"s'] and release == 1


def test_redactor_masks_pieces_of_a_secret_on_one_line_and_in_any_case():
    key = "SuperSecretValue123XYZ"
    redact = Redactor([key])
    assert redact(f"bad key {key[:8]} / {key[8:]}") == "bad key *** / ***"
    assert redact(f"{key.lower()} and {key[1:]} and {key.upper()}") == "*** and *** and ***"
    assert redact(f"ends {key[-9:]}, short {key[:7]}") == f"ends ***, short {key[:7]}"
    assert redact("x\n" + key[:4] + "\n" + key[4:] + "\ny") == "x\n***\n***\ny"
    assert redact("nothing secret here") == "nothing secret here"


def test_exit_descriptions_name_the_limit():
    assert format_bytes(256 * 1024**2) == "256MiB" and format_bytes(1024**3) == "1GiB"
    assert describe_exit(signal.SIGXCPU, cpu=2.0) == ("timed_out", "CPU time limit 2s exceeded (killed by SIGXCPU)")
    assert describe_exit(signal.SIGKILL, cpu=2.0, cpu_used=3.0)[1].startswith("CPU time limit 2s")
    assert describe_exit(signal.SIGKILL) == ("killed", "the worker process was killed by SIGKILL")
    assert describe_exit(MEMORY_EXIT_CODE << 8, memory=256 * 1024**2) == ("killed", "memory limit 256MiB exceeded")
    assert describe_exit(3 << 8, stderr_tail="boom")[1] == (
        "the worker process exited with code 3 before the step finished (os._exit() in the step, "
        "or a library ending the process?): boom"
    )
    assert sandbox_mode("STRICT") == "strict"
    with pytest.raises(ValueError):
        sandbox_mode("loose")
    assert skipped_features("net, pid") == ["net", "pid"]
    with pytest.raises(ValueError):
        skipped_features("everything")


def test_cli_run_with_sandbox_option(tmp_path, listener):
    app = _facts_app(tmp_path, listener)
    result = cli("run", str(app), "online", "--sandbox", "strict")
    assert result.returncode == 0, result.stderr
    (run_line,) = [line for line in logs(app, _last_run_id(app)) if line.startswith("FACTS ")]
    assert "Network is unreachable" in run_line  # strict: no network unless the step sets it
    bad = cli("run", str(app), "--sandbox", "loose")
    assert bad.returncode != 0 and "unknown sandbox mode 'loose'" in bad.stderr


def _last_run_id(app) -> str:
    from stepwell.store import open_store

    store = open_store(None, app)
    try:
        return store.list_runs(limit=1)[0].id
    finally:
        store.close()


def test_a_run_temp_dir_is_reused_only_when_left_empty(tmp_path):
    """(The host folders that are a run's /tmp where the kernel refuses a mount
    namespace.)"""
    from stepwell.sandbox.forkserver import _reset_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = os.stat(run_dir).st_uid
    os.chmod(run_dir, 0o777)
    try:
        os.setxattr(run_dir, "user.left", b"behind")
    except OSError:  # a file system without user attributes: nothing to clear
        pass
    assert _reset_run_dir(str(run_dir), owner)
    assert os.listxattr(run_dir) == [] and os.stat(run_dir).st_mode & 0o777 == 0o700
    assert not _reset_run_dir(str(run_dir), owner + 1)  # not the sandbox user's
    (run_dir / "note.txt").write_text("left by the run")
    assert not _reset_run_dir(str(run_dir), owner)
    (run_dir / "note.txt").unlink()
    (run_dir / "inner").mkdir()
    assert not _reset_run_dir(str(run_dir), owner)
    (run_dir / "inner").rmdir()
    assert _reset_run_dir(str(run_dir), owner)
    run_dir.rmdir()
    run_dir.symlink_to("/etc")  # the folder swapped for a link
    assert not _reset_run_dir(str(run_dir), owner)


def test_nothing_a_run_leaves_on_its_temp_dir_reaches_later_runs(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: mark\n    node: mark.py\n",
        "mark.py": """
            import os
            from patterns import Table
            seen = {"found": ",".join(sorted(os.listxattr("/tmp"))),
                    "mode": oct(os.stat("/tmp").st_mode & 0o777)}
            try:
                os.setxattr("/tmp", "user.mark", b"left by an earlier run")
            except OSError:
                pass
            os.chmod("/tmp", 0o777)
            Table("seen", "w").append(seen)
        """,
    })  # fmt: skip
    with app_runner(app) as runner:
        for _ in range(6):  # more runs than the fork-server keeps temp dirs
            run = runner.run_step("mark")
            assert run.status == "succeeded", run.error
    assert [(r["found"], r["mode"]) for r in rows(app, "seen")] == [("", "0o700")] * 6


FIRST_THEN_SECOND = """
    steps:
      - name: first
        node: first.py
      - name: second
        node: second.py
"""


def test_the_next_steps_worker_is_made_ahead_but_runs_nothing_early(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": FIRST_THEN_SECOND,
        "first.py": "import time\nfrom patterns import Table\ntime.sleep(0.3)\nTable('t', 'w').append({'step': 'first'})\n",
        "second.py": "import time\nfrom patterns import Table\nTable('t', 'w').append({'step': 'second', 'at': time.time()})\n",
    })  # fmt: skip
    with app_runner(app) as runner:
        first = runner.run_step("first", then="second")
        assert "second" in runner._prepared  # made while the first run went on
        second = runner.run_step("second")
        assert not runner._prepared
        assert first.status == second.status == "succeeded", (first.error, second.error)
        (row,) = [r for r in rows(app, "t") if r["step"] == "second"]
        assert row["at"] >= first.ended_at.timestamp()  # its code began after the commit
        # one that died while waiting (and the fork-server said so) is replaced
        runner.run_step("first", then="second")
        dead = runner._prepared["second"][1]
        os.kill(dead.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not dead.ended() and time.monotonic() < deadline:
            time.sleep(0.02)
        again = runner.run_step("second")
        assert again.status == "succeeded", again.error
        # one whose run does not come is ended
        runner.run_step("first", then="second")
        worker = runner._prepared["second"][1]
        pid = worker.pid
        assert os.path.exists(f"/proc/{pid}")
        runner.discard_prepared()
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{pid}")


def test_a_worker_made_ahead_loads_its_node_but_runs_the_code_of_its_start(tmp_path):
    # a worker made ahead gets its node's code first (a prepare frame) and loads it;
    # the run must still run the file as it is when the run starts
    app = write_app(tmp_path / "app", {
        "stepwell.yml": FIRST_THEN_SECOND,
        "first.py": "from patterns import Table\nTable('t', 'w').append({'step': 'first'})\n",
        "second.py": "from patterns import Table\nTable('t', 'w').append({'step': 'second v1'})\n",
    })  # fmt: skip
    with app_runner(app) as runner:
        runner.run_step("first", then="second")
        assert "second" in runner._prepared
        (app / "second.py").write_text(
            "from patterns import Table\nTable('t', 'w').append({'step': 'second, v2'})\n"
        )
        assert runner.run_step("second").status == "succeeded"
        runner.run_step("first", then="second")
        (app / "second.py").write_text("x = (\n")  # broken while its worker waits
        broken = runner.run_step("second")
        runner.run_step("first", then="second")
        (app / "second.py").write_text("from patterns import Table\nTable('t', 'w').append({'step': 'second v3'})\n")
        assert runner.run_step("second").status == "succeeded"
    assert broken.status == "failed" and "SyntaxError" in broken.error and "(at second.py:1)" in broken.error
    assert [r["step"] for r in rows(app, "t")] == ["first", "second, v2", "first", "first", "second v3"]


def test_a_failed_final_commit_is_the_runs_error(tmp_path, monkeypatch):
    from stepwell.engine.staging import StagedRun

    original = StagedRun.commit

    def refuse_the_last(self, positions, state, run_fields=None):
        if run_fields is not None:
            raise RuntimeError("the store refused the final commit")
        return original(self, positions, state, run_fields=run_fields)

    monkeypatch.setattr(StagedRun, "commit", refuse_the_last)
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: write\n    node: write.py\n",
        "write.py": "from patterns import Table\nTable('t', 'w').append({'a': 1})\n",
    })  # fmt: skip
    (run,) = run_app(app)
    assert run.status == "failed" and run.error == "the store refused the final commit"
    assert rows(app, "t") == []


def test_namespace_init_waits_for_the_lifeline_then_exits():
    import platform

    from stepwell.sandbox.ns_init import InitProgram

    program = InitProgram()
    try:
        assert program.path is not None
        if platform.machine() == "x86_64":  # the static program, not `cat`
            assert program.path.startswith("/proc/self/fd/")
        read, write = os.pipe()
        pid = os.posix_spawn(program.path, ["stepwell-init"], {},
                             file_actions=[(os.POSIX_SPAWN_DUP2, read, 0)])  # fmt: skip
        os.close(read)
        time.sleep(0.2)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still waiting on its input
        os.close(write)  # the fork-server is gone
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        program.close()


def test_a_relative_hidden_folder_is_refused_by_name():
    from stepwell.sandbox.policy import hidden_folders

    assert hidden_folders("/srv/keys: /data/private ") == ["/srv/keys", "/data/private"]
    with pytest.raises(ValueError, match=r"STEPWELL_SANDBOX_HIDE: 'keys' is not an absolute path"):
        hidden_folders("/srv/ok:keys")


def test_hidden_folders_are_empty_in_every_view_but_for_what_a_step_needs(monkeypatch):
    import tempfile

    # outside /tmp (each sandbox has its own) and readable by all, as a home may be
    private = Path(tempfile.mkdtemp(prefix="stepwell-hide-", dir="/var/tmp"))
    private.chmod(0o755)
    (private / "keys").mkdir(mode=0o755)
    (private / "keys" / "id_key").write_text("do not read")
    app = write_app(private / "projects" / "app", {  # the app itself lives in the folder
        "stepwell.yml": "steps:\n  - name: look\n    node: look.py\n",
        "data.txt": "app data",
        "look.py": f"""
            import os
            from patterns import Table
            def seen(path):
                try:
                    return ",".join(sorted(os.listdir(path)))
                except OSError as exc:
                    return type(exc).__name__
            Table("seen", "w").append({{"private": seen({str(private)!r}),
                                        "keys": seen({str(private / "keys")!r}),
                                        "app": open("data.txt").read()}})
        """,
    })  # fmt: skip
    monkeypatch.setenv("STEPWELL_SANDBOX_HIDE", f"{private}:/no/such/folder")
    for pandas in (False, True):
        forkserver(pandas).shutdown()  # the setting is the fork-server's: start afresh
    try:
        (run,) = run_app(app)
        assert run.status == "succeeded", run.error
        (row,) = rows(app, "seen")
        assert row == {"private": "projects", "keys": "FileNotFoundError", "app": "app data",
                       "patterns_id": row["patterns_id"]}  # fmt: skip
    finally:
        monkeypatch.delenv("STEPWELL_SANDBOX_HIDE")
        for pandas in (False, True):
            forkserver(pandas).shutdown()
        shutil.rmtree(private, ignore_errors=True)


def test_a_missing_standard_library_module_is_not_sent_to_a_requirements_file(monkeypatch):
    """A stdlib module a sandbox cannot import: left out of the build (tkinter on
    Debian), or unreadable (a Python under /root, without a mount namespace to show
    it): neither is fixed by pip, which is what the error said."""
    from stepwell.sandbox import worker

    missing = ModuleNotFoundError("No module named 'tkinter'", name="tkinter")
    assert worker.exception_text(missing).endswith(
        "(part of Python's standard library, but left out of this Python's build)")
    monkeypatch.setattr(worker.os, "access", lambda path, mode: False)
    text = worker.exception_text(ModuleNotFoundError("No module named 'asyncio'", name="asyncio"))
    assert "which the sandbox's user may not read" in text and "requirements" not in text
    other = ModuleNotFoundError("No module named 'bs4'", name="bs4")
    assert "add beautifulsoup4 to a requirements file" in worker.exception_text(other)
