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
