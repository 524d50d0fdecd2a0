"""Several hosts on one PostgreSQL store, through the real command line.

Three kinds of host process run at once, each a fresh ``stepwell run`` (its own
id clock, nothing shared in memory): one appends rows and holds them uncommitted
for a while, one appends rows and commits at once (so its larger ids commit
before the slow host's smaller ones), and one streams the table into a copy.
Every row must reach the copy exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from apputil import rows, write_app

APP = {
    "stepwell.yml": """
        steps:
          - name: slow_writer
            node: slow_writer.py
          - name: fast_writer
            node: fast_writer.py
          - name: copier
            node: copier.py
    """,
    "slow_writer.py": """
        import time
        from patterns import Table
        # enough rows to be shipped to the host (and get their ids) before the end
        Table("events", "w").append([{"source": "slow", "n": i} for i in range(SLOW_ROWS)])
        time.sleep(0.8)  # the rows have their ids; they are committed when the run ends
    """,
    "fast_writer.py": """
        from patterns import Table
        Table("events", "w").append([{"source": "fast", "n": i} for i in range(3)])
    """,
    "copier.py": """
        from patterns import Table
        copies = Table("copies", "w")
        for record in Table("events").as_stream().consume_records():
            copies.append({"event": record["patterns_id"]})
    """,
}


SLOW_ROWS = 20_000


def _host(app, url: str, step: str, until: threading.Event | None, times: int | None,
          failures: list[str]) -> None:  # fmt: skip
    done = 0
    while (times is None or done < times) and not (until is not None and until.is_set()):
        result = subprocess.run(
            [sys.executable, "-m", "stepwell.cli", "run", str(app), step, "--store", url],
            capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
        )  # fmt: skip
        if result.returncode != 0:
            failures.append(f"{step}: {result.stdout[-500:]} {result.stderr[-500:]}")
        done += 1


def test_streams_lose_no_row_when_hosts_commit_out_of_id_order(make_pg_database, tmp_path):
    url = make_pg_database()
    app = write_app(tmp_path / "app", {
        name: text.replace("SLOW_ROWS", str(SLOW_ROWS)) for name, text in APP.items()
    })
    failures: list[str] = []
    writers_done = threading.Event()
    writers = [
        threading.Thread(target=_host, args=(app, url, "slow_writer", None, 5, failures)),
        threading.Thread(target=_host, args=(app, url, "fast_writer", None, 8, failures)),
    ]
    copier = threading.Thread(target=_host, args=(app, url, "copier", writers_done, None, failures))
    began = time.monotonic()
    for thread in [*writers, copier]:
        thread.start()
    for thread in writers:
        thread.join()
    writers_done.set()
    copier.join()
    _host(app, url, "copier", None, 1, failures)  # whatever the last writes left
    assert failures == []
    events = {r["patterns_id"] for r in rows(app, "events", url)}
    copied = [r["event"] for r in rows(app, "copies", url)]
    assert len(events) == 5 * SLOW_ROWS + 8 * 3
    assert sorted(copied) == sorted(events)  # each row copied once: none lost, none twice
    assert time.monotonic() - began < 300


def test_runs_of_another_host_are_left_to_it_unless_their_step_lock_shows_it_gone(
    tmp_path, make_pg_database
):
    """A host cannot look at another machine's processes: its runs are neither closed
    as orphans nor adopted here; one whose step's run lock a later run finds free
    (long after it started) has lost its host."""
    import datetime as dt

    from apputil import run_app

    from stepwell.engine.hosts import this_host
    from stepwell.store import open_store
    from stepwell.store.base import RunRecord

    url = make_pg_database()
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: s\n    node: s.py\n  - name: t\n    node: s.py\n",
        "s.py": "print('ran')\n",
    })
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead, now = int(gone.stdout), dt.datetime.now(dt.UTC)
    elsewhere = {"host": "another-machine/4026531836"}
    records = [
        RunRecord(id="01a-recent", step="t", status="running", started_at=now, host_pid=dead,
                  info=elsewhere),
        RunRecord(id="01b-old", step="s", status="running", host_pid=dead, info=elsewhere,
                  started_at=now - dt.timedelta(minutes=5)),
        RunRecord(id="01c-queued", step="t", status="queued", host_pid=dead, info=elsewhere),
        RunRecord(id="01d-local", step="t", status="running", started_at=now, host_pid=dead,
                  info={"host": this_host()}),
    ]  # fmt: skip
    store = open_store(url, app)
    try:
        store.create_runs(records)
    finally:
        store.close()
    assert [r.status for r in run_app(app, url, steps=["s"])] == ["succeeded_no_data"]
    store = open_store(url, app)
    try:
        status = {r.id: (r.status, r.error or "") for r in map(store.get_run, [r.id for r in records])}
    finally:
        store.close()
    assert status["01a-recent"] == ("running", "")  # its host may well be alive
    assert status["01c-queued"] == ("queued", "")  # its server runs it once it is back
    assert status["01b-old"][0] == "killed" and "its host (another-machine/" in status["01b-old"][1]
    assert status["01d-local"][0] == "killed"  # a process of this host that is gone
