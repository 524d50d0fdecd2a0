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
        statuses = {r.status for r in store.list_runs(step="copy", limit=1000)}
        assert "running" not in statuses  # orphaned runs were closed on restart
    finally:
        store.close()
