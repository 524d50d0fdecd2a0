"""Exactly-once under SIGKILL: kill the worker or the host at random moments of a
long streaming run, rerun until it completes, and compare output with input."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apputil import rows, write_app

from stepwell.store import open_store

N = 6000

APP = {
    "stepwell.yml": """
        steps:
          - name: copy
            node: copy.py
            timeout: 120s
    """,
    "copy.py": """
        import time
        from patterns import State, Table

        numbers = Table("numbers")
        out = Table("out", "w")
        state = State()
        count = state.get_value("count", 0)
        stream = numbers.as_stream(order_by="k")  # k has ties: patterns_id breaks them
        for i, record in enumerate(stream.consume_records(), 1):
            out.append({"i": record["i"], "k": record["k"]})
            count += 1
            state.set_value("count", count)
            time.sleep(0.001)
            if i % 150 == 0:
                stream.checkpoint()
    """,
}


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _run_cli(app: Path, store_url: str | None) -> subprocess.Popen:
    args = [sys.executable, "-m", "stepwell.cli", "run", str(app), "copy"]
    if store_url:
        args += ["--store", store_url]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _seed_input(app: Path, store_url: str | None) -> None:
    import pyarrow as pa

    from stepwell.engine.staging import StagedRun

    store = open_store(store_url, app)
    try:
        staged = StagedRun(store, run_id="", step="")
        staged.write("numbers", pa.table({"i": list(range(N)), "k": [i // 3 for i in range(N)]}))
        staged.commit(None, None)
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["duckdb", "postgres"])
def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path, backend, request):
    store_url = None if backend == "duckdb" else request.getfixturevalue("make_pg_database")()
    app = write_app(tmp_path / "app", APP)
    _seed_input(app, store_url)
    rng = random.Random(1234)
    kills = {"host": 0, "worker": 0}
    completed = False
    for _attempt in range(40):
        proc = _run_cli(app, store_url)
        deadline = time.monotonic() + rng.uniform(0.3, 1.5)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is not None:
            _, err = proc.communicate()
            assert proc.returncode in (0, 1), err
            if proc.returncode == 0:
                completed = True
                break
            continue  # a run failed cleanly (e.g. its worker was killed): try again
        victims = [p for p in _descendants(proc.pid)]
        if victims and rng.random() < 0.5:
            os.kill(rng.choice(victims), signal.SIGKILL)
            kills["worker"] += 1
            proc.wait(timeout=60)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            kills["host"] += 1
            proc.wait(timeout=60)
        for pid in _descendants(proc.pid):  # nothing of the killed host may linger
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if not completed:
        proc = _run_cli(app, store_url)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert kills["host"] + kills["worker"] >= 5, kills

    out = rows(app, "out", store_url)
    values = [r["i"] for r in out]
    assert len(values) == N, f"{len(values) - len(set(values))} duplicated, {N - len(set(values))} lost"
    assert sorted(values) == list(range(N))
    store = open_store(store_url, app)
    try:
        assert store.get_state("copy")["count"] == N  # state committed with the rows
        runs = store.list_runs(step="copy", limit=None)
        assert "running" not in {r.status for r in runs}  # orphaned runs were closed on restart
        # each run's record counts the rows it kept, killed ones too (with the rows)
        assert sum(r.rows_out for r in runs) == N, [(r.status, r.rows_out) for r in runs]
    finally:
        store.close()


def test_a_step_runs_in_one_process_at_a_time_on_postgres(tmp_path, make_pg_database):
    """Two host processes on one PostgreSQL store (overlapping `stepwell run`s from
    cron, say): a run of a step that is still running elsewhere does nothing and
    says why, so the stream is consumed once."""
    from apputil import run_app

    url = make_pg_database()
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: feed
                node: feed.py
              - name: consume
                node: consume.py
        """,
        "feed.py": """
            from patterns import Table
            Table("events", "w").append([{"n": i} for i in range(5)])
        """,
        "consume.py": """
            import os, time
            from patterns import Table
            out = Table("seen", "w")
            for record in Table("events").as_stream().consume_records():
                out.append(record)
            while os.path.exists("hold"):  # the test lets go
                time.sleep(0.05)
        """,
    })  # fmt: skip
    (feed,) = run_app(app, url, steps=["feed"])
    assert feed.status == "succeeded", feed.error
    (app / "hold").write_text("")
    other = subprocess.Popen(
        [sys.executable, "-m", "stepwell.cli", "run", str(app), "consume", "--store", url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        import psycopg

        deadline = time.monotonic() + 60
        with psycopg.connect(url, autocommit=True) as conn:
            # until the other process holds the step's run lock (not just any advisory
            # lock: opening the store takes one briefly for its schema)
            query = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                     "AND database = (SELECT oid FROM pg_database "
                     "WHERE datname = current_database()) "
                     "AND ((classid::bigint << 32) | objid::bigint) = "
                     "(hashtextextended('stepwell-run:consume', 0) & x'ffffffffffffffff'::bigint)")
            while time.monotonic() < deadline:
                if conn.execute(query).fetchone()[0]:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the other process never started its run")
        (second,) = run_app(app, url, steps=["consume"])
        assert second.status == "failed"
        assert "already running in another process" in second.error
        assert rows(app, "seen", url) == []  # nothing from the refused run
    finally:
        (app / "hold").unlink()
        output, _ = other.communicate(timeout=120)
    assert other.returncode == 0, output
    assert sorted(r["n"] for r in rows(app, "seen", url)) == [0, 1, 2, 3, 4]
    (again,) = run_app(app, url, steps=["consume"])  # the lock went with that run
    assert again.status == "succeeded_no_data", again.error
    assert len(rows(app, "seen", url)) == 5
