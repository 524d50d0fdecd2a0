"""The Ray executor end to end: `stepwell run --executor ray` starts a real local
Ray cluster, each run is a Ray task (in a Ray worker process, sandboxed by that
node's fork-server), and the store is a real PostgreSQL database."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from apputil import cli, rows, write_app

from stepwell.engine.hosts import this_host
from stepwell.store import ids, open_store
from stepwell.store.base import RunRecord

pytest.importorskip("ray", reason="the ray extra is not installed (uv sync --extra ray)")

APP = {
    "stepwell.yml": """
        title: fan-in
        steps:
          - name: left
            node: produce.py
            parameters: {side: left, count: 3}
            outputs: {out: left_rows}
          - name: right
            node: produce.py
            parameters: {side: right, count: 4}
            outputs: {out: right_rows}
          - name: combine
            node: combine.py
            inputs: {left: left_rows, right: right_rows}
            outputs: {out: combined}
          - name: again
            node: again.py
          - name: broken
            node: broken.py
    """,
    "produce.py": """
        import os
        from patterns import Parameter, Table
        side, count = Parameter("side"), Parameter("count", type=int)
        Table("out", "w").append([{"side": side, "n": i, "pid": os.getpid()} for i in range(count)])
    """,
    "combine.py": """
        from patterns import Parameter, Table
        out = Table("out", "w")
        for port in ("left", "right"):
            for row in Table(port).as_stream().consume_records():
                out.append({"side": row["side"], "n": row["n"], "secret_len": len(Parameter("token"))})
    """,
    "again.py": """
        from patterns import State
        state = State()
        n = state.get_value("n", 0) + 1
        state.set_value("n", n)
        if n < 3:
            state.request_new_run()
    """,
    "broken.py": "raise ValueError('on purpose')\n",
}


def test_run_with_the_ray_executor(tmp_path, make_pg_database):
    url = make_pg_database()
    app_files = dict(APP)
    app_files["stepwell.yml"] = APP["stepwell.yml"].replace(
        "outputs: {out: combined}", 'outputs: {out: combined}\n            parameters: {token: "${{ secrets.token }}"}'
    )
    app = write_app(tmp_path / "app", app_files)
    env = {**os.environ, "STEPWELL_SECRET_TOKEN": "s3cr3t-value"}
    result = cli("run", str(app), "--executor", "ray", "--store", url, env=env, timeout=300)
    # the failing step fails the command, naming the step; the others still ran
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: step 'broken' failed: ValueError: on purpose (at broken.py:1)"), result.stderr
    store = open_store(url, app)
    try:
        runs = store.list_runs(limit=100)
        by_step: dict[str, list] = {}
        for run in runs:
            by_step.setdefault(run.step, []).append(run)
        assert {s: len(r) for s, r in by_step.items()} == {
            "left": 1, "right": 1, "combine": 1, "again": 3, "broken": 1}
        assert all(r.status == "succeeded" for s in ("left", "right", "combine") for r in by_step[s])
        assert sorted(r.trigger for r in by_step["again"]) == ["manual", "request_new_run", "request_new_run"]
        assert store.get_state("again") == {"n": 3}
        # the fan-in step ran after both producers and saw all their rows once
        combined = [row for b in store.scan("combined") for row in b.to_pylist()]
        assert sorted((r["side"], r["n"]) for r in combined) == (
            [("left", i) for i in range(3)] + [("right", i) for i in range(4)])
        assert {r["secret_len"] for r in combined} == {len("s3cr3t-value")}
        # the secret reached the step, never the logs
        for run in runs:
            assert all("s3cr3t-value" not in line.message for line in store.get_logs(run.id))
    finally:
        store.close()


def test_the_ray_executor_needs_a_shared_store(tmp_path):
    app = write_app(tmp_path / "app", {"stepwell.yml": "steps:\n  - name: s\n    node: s.py\n",
                                       "s.py": "print('hi')\n"})
    result = cli("run", str(app), "--executor", "ray")
    assert result.returncode == 1
    assert "needs a PostgreSQL store" in result.stderr and "--store postgresql://" in result.stderr
    assert not (app / ".stepwell").exists() or not any((app / ".stepwell").glob("*.duckdb"))
    unknown = cli("run", str(app), "--executor", "dask")
    assert unknown.returncode != 0 and "unknown executor 'dask'" in unknown.stderr
    served = cli("serve", str(app), "--executor", "ray", "--port", "0", timeout=60)
    assert served.returncode == 1 and "needs a PostgreSQL store" in served.stderr, served.stderr


#: A step copying a stream, with a commit point every 10 rows, slow enough to be
#: killed in the middle.
COPY_APP = {
    "stepwell.yml": "steps:\n  - name: copy\n    node: copy.py\n"
                    "    inputs: {src: src}\n    outputs: {out: out}\n",
    "copy.py": """
        import time
        from patterns import Table
        src = Table("src").as_stream()
        out = Table("out", "w")
        for i, row in enumerate(src.consume_records()):
            out.append({"n": row["n"]})
            if i % 10 == 9:
                src.checkpoint()
                time.sleep(0.2)
    """,
}


def test_a_killed_ray_worker_loses_and_duplicates_nothing(tmp_path, make_pg_database):
    url = make_pg_database()
    app = write_app(tmp_path / "app", COPY_APP)
    source = tmp_path / "src.jsonl"
    source.write_text("".join(json.dumps({"n": n}) + "\n" for n in range(200)))
    assert cli("load", str(app), "src", str(source), "--store", url).returncode == 0
    store = open_store(url, app)
    try:
        # what a Ray task of this node leaves when its driver is killed mid-run: the
        # next task on the node closes it
        gone = subprocess.Popen(["true"])
        gone.wait()
        orphan = RunRecord(id=ids.new_id(), step="copy", status="running", host_pid=gone.pid,
                           started_at=dt.datetime.now(dt.UTC), info={"host": this_host()})
        store.create_run(orphan)
        command = subprocess.Popen(
            [sys.executable, "-m", "stepwell.cli", "run", str(app), "--executor", "ray",
             "--store", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # a run with a commit point behind it
                runs = [r for r in store.list_runs(step="copy", statuses=("running",))
                        if r.id != orphan.id and r.rows_out >= 20]  # fmt: skip
                if runs:
                    break
                time.sleep(0.1)
            assert runs, "the run never got going"
            os.kill(runs[0].host_pid, signal.SIGKILL)  # the Ray worker hosting the run
            _out, err = command.communicate(timeout=120)
        finally:
            command.kill()
        # the command ends, naming the run and what happened to it
        assert command.returncode == 1, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(
            "error: step 'copy' killed: the Ray worker running it died"), err
        assert f"stepwell logs {app} {runs[0].id}" in errors[0]
        killed = store.get_run(runs[0].id)
        assert killed.status == "killed" and killed.ended_at is not None
        recovered = store.get_run(orphan.id)
        assert recovered.status == "killed" and f"pid {gone.pid}" in recovered.error
        # running again goes on from the last commit point: every row exactly once
        again = cli("run", str(app), "--executor", "ray", "--store", url, timeout=300)
        assert again.returncode == 0, again.stderr
        assert sorted(r["n"] for r in rows(app, "out", url)) == list(range(200))
        assert not store.list_runs(statuses=("running", "queued"))
    finally:
        store.close()


def test_a_wrong_ray_address_is_one_clear_error(tmp_path, make_pg_database, pg_cluster):
    url = make_pg_database()
    app = write_app(tmp_path / "app", {"stepwell.yml": "steps:\n  - name: s\n    node: s.py\n",
                                       "s.py": "print('hi')\n"})
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        for address, says in [
            (f"127.0.0.1:{closed.getsockname()[1]}", "cannot reach a Ray cluster at"),
            (f"127.0.0.1:{pg_cluster.port}", "does not answer like a Ray cluster"),  # not Ray
        ]:
            result = cli("run", str(app), "--executor", "ray", "--ray-address", address,
                         "--store", url, timeout=60)  # (Ray itself would retry for minutes)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode == 1 and len(lines) == 1, result.stderr
            assert lines[0].startswith("error: ") and says in lines[0], result.stderr
            assert "ray start --head" in lines[0]
    finally:
        closed.close()


def test_a_follow_up_run_waiting_for_its_time_holds_up_no_other_step(tmp_path, make_pg_database):
    """A run asking for another one in 15 s: the driver slept those 15 s, and a step
    whose upstream ended meanwhile waited with it. Then a Ctrl-C cancels the runs in
    progress (their tasks killed), says so and exits 130."""
    url = make_pg_database()
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - {name: again, node: again.py}
              - {name: slow, node: slow.py, outputs: {out: made}}
              - {name: after, node: after.py, inputs: {made: made}}
              - {name: sleepy, node: sleepy.py}
        """,
        "again.py": """
            from patterns import State
            state = State()
            if not state.get_value("asked"):
                state.set_value("asked", True)
                state.request_new_run(wait_atleast_seconds=15)
        """,
        "slow.py": "import time\nfrom patterns import Table\ntime.sleep(2)\nTable('out', 'w').append({'n': 1})\n",
        "after.py": "print('after')\n",
        "sleepy.py": "import time\ntime.sleep(120)\n",
    })  # fmt: skip
    result = cli("run", str(app), "again", "slow", "after", "--executor", "ray", "--store", url,
                 timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    store = open_store(url, app)
    try:
        (slow,), (after,) = store.list_runs(step="slow"), store.list_runs(step="after")
        follow_up, first = store.list_runs(step="again")
        assert follow_up.trigger == "request_new_run"
        assert follow_up.started_at - first.ended_at >= dt.timedelta(seconds=15)
        assert after.started_at - slow.ended_at < dt.timedelta(seconds=6), (slow.ended_at, after.started_at)
        command = subprocess.Popen(
            [sys.executable, "-m", "stepwell.cli", "run", str(app), "sleepy", "--executor", "ray",
             "--store", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not store.list_runs(step="sleepy", statuses=("running",)):
                time.sleep(0.1)
            (running,) = store.list_runs(step="sleepy", statuses=("running",))
            command.send_signal(signal.SIGINT)
            _out, err = command.communicate(timeout=60)
        finally:
            command.kill()
        assert command.returncode == 130, err
        assert f"interrupted: step 'sleepy' cancelled (run {running.id})" in err, err
        cancelled = store.get_run(running.id)
        assert cancelled.status == "cancelled" and cancelled.error.startswith("interrupted (Ctrl-C)")
    finally:
        store.close()


def test_serve_with_the_ray_executor(tmp_path, make_pg_database):
    """`stepwell serve --executor ray`: each run a Ray task (not in the server's
    process), upstream triggers from what the task committed, log lines live on
    the run's event stream while the task runs, and a cancel that kills the task."""
    from serverutil import ServerProcess, runs_of, sse_events, table_rows, wait_for, wait_run

    url = make_pg_database()
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - {name: produce, node: produce.py, outputs: {out: made}}
              - {name: consume, node: consume.py, inputs: {made: made}, outputs: {out: seen},
                 trigger: upstream}
              - {name: chatty, node: chatty.py}
              - {name: sleepy, node: sleepy.py}
        """,
        "produce.py": "import os\nfrom patterns import Table\n"
                      "Table('out', 'w').append([{'n': n, 'pid': os.getpid()} for n in range(3)])\n",
        "consume.py": """
            from patterns import Table
            out = Table("out", "w")
            for row in Table("made").as_stream().consume_records():
                out.append({"n": row["n"] * 10})
        """,
        "chatty.py": "import time\nfor i in range(4):\n    print(f'line {i}', flush=True)\n    time.sleep(0.7)\n",
        "sleepy.py": "import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n",
    })  # fmt: skip
    with ServerProcess(app, "--executor", "ray", "--store", url, timeout=180) as server, \
            server.client() as client:  # fmt: skip
        produced = client.post("/api/runs", json={"step": "produce"}).json()["run_id"]
        assert wait_run(client, produced, timeout=120)["status"] == "succeeded"
        consumed = wait_for(lambda: runs_of(client, "consume"), 60, what="the upstream run")
        assert wait_run(client, consumed[0]["id"], timeout=120)["status"] == "succeeded"
        assert sorted(r["n"] for r in table_rows(client, "seen")) == [0, 10, 20]
        assert {r["pid"] for r in table_rows(client, "made")} != {server.proc.pid}
        assert client.get(f"/api/runs/{produced}").json()["host_pid"] != server.proc.pid

        chatty = client.post("/api/runs", json={"step": "chatty"}).json()["run_id"]
        with client.stream("GET", f"/api/runs/{chatty}/events", timeout=120) as response:
            events = sse_events(response)
        logs = [(t, e) for t, k, e in events if k == "log"]
        assert [e["message"] for _, e in logs] == [f"line {i}" for i in range(4)]
        assert events[-1][2]["status"] == "succeeded_no_data"
        assert events[-1][0] - logs[0][0] > 1.0  # the first line came while the run went on

        sleepy = client.post("/api/runs", json={"step": "sleepy"}).json()["run_id"]
        wait_for(lambda: client.get(f"/api/runs/{sleepy}").json()["status"] == "running", 120,
                 what="the sleepy run to start")  # fmt: skip
        # its one line comes live while it sleeps (the task wrote it to the store at its
        # next line or its end: never, here)
        with client.stream("GET", f"/api/runs/{sleepy}/events", timeout=10) as response:
            kinds = (line[6:].strip() for line in response.iter_lines() if line.startswith("event:"))
            assert next(kind for kind in kinds if kind != "status") == "log"
        assert client.post(f"/api/runs/{sleepy}/cancel").json()["status"] == "cancelling"
        ended = wait_run(client, sleepy, timeout=60)
        assert ended["status"] == "cancelled", ended
        kept = client.get(f"/api/runs/{sleepy}/logs").json()["lines"]
        assert [line["message"] for line in kept] == ["sleeping"]
    assert server.proc.returncode == 0, server.output()


def _descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid``: their command lines, by pid."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                commands[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = commands.get(child, "")
        todo += children.get(child, [])
    return found


def test_serve_stops_when_its_ray_cluster_dies(tmp_path, make_pg_database):
    """The raylet of the server's Ray cluster dies: every run was then recorded
    `killed` at once while the server went on and said it was fine. It stops, exit 1,
    saying why; the run that could not start stays queued and the next start runs it."""
    from serverutil import ServerProcess, wait_run

    url = make_pg_database()
    app = write_app(tmp_path / "app", {"stepwell.yml": "steps:\n  - {name: s, node: s.py}\n",
                                       "s.py": "print('ran', flush=True)\n"})  # fmt: skip
    server = ServerProcess(app, "--executor", "ray", "--store", url, timeout=180)
    ray_processes: dict[int, str] = {}
    try:
        with server.client() as client:
            first = client.post("/api/runs", json={"step": "s"}).json()["run_id"]
            assert wait_run(client, first, timeout=120)["status"] == "succeeded_no_data"
            ray_processes = _descendants(server.proc.pid)
            (raylet,) = [pid for pid, command in ray_processes.items() if "raylet/raylet" in command]
            os.kill(raylet, signal.SIGKILL)
            time.sleep(1)
            second = client.post("/api/runs", json={"step": "s"}).json()["run_id"]
        code = server.proc.wait(timeout=60)
    finally:
        server.stop()
        for pid in ray_processes:  # (its workers outlive the raylet)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 1, server.output()
    assert "error: the Ray cluster's raylet on this machine died" in server.output()
    store = open_store(url, app)
    try:
        assert store.get_run(second).status == "queued"
    finally:
        store.close()
    with ServerProcess(app, "--executor", "ray", "--store", url, timeout=180) as again, \
            again.client() as client:  # fmt: skip
        assert wait_run(client, second, timeout=120)["status"] == "succeeded_no_data"
    assert again.proc.returncode == 0, again.output()
