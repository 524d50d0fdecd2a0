"""Staged runs: the visibility watermark that keeps streams exactly-once when
several writers commit out of id order."""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow as pa
import pytest

from stepwell.engine.staging import StagedRun
from stepwell.store.visibility import watermark as visibility_watermark


@pytest.fixture(params=["duckdb", "postgres"])
def any_store(request, tmp_path):
    from stepwell.store import open_store

    url = None if request.param == "duckdb" else request.getfixturevalue("make_pg_database")()
    store = open_store(url, tmp_path)
    yield store
    store.close()


def _ids(store, after=None, stream=False):
    batches = store.scan("events", order_by=["patterns_id"], after=after, stream=stream)
    return [r["n"] for b in batches for r in b.to_pylist()]


def test_late_commit_never_lands_behind_a_stream(any_store):
    store = any_store
    seed = StagedRun(store, "seed", "seed")
    seed.write("events", pa.table({"n": [0]}))
    seed.commit(None, None)
    slow = StagedRun(store, "slow-run", "a")
    fast = StagedRun(store, "fast-run", "b")
    assert visibility_watermark() is None
    slow.write("events", pa.table({"n": [1, 2]}))        # smaller ids, not committed yet
    watermark = visibility_watermark()
    assert watermark is not None
    fast.write("events", pa.table({"n": [3, 4]}))        # larger ids, committed first
    fast.commit(None, None)
    assert visibility_watermark() == watermark          # the slow writer still holds it
    # a stream reading now must not pass rows 1, 2 (they would be skipped forever)
    assert _ids(store, stream=True) == [0]
    assert _ids(store) == [0, 3, 4]  # what a stream without the watermark would pass
    slow.commit(None, None)
    assert visibility_watermark() is None
    assert _ids(store, stream=True) == [0, 1, 2, 3, 4]


def test_rollback_releases_the_watermark(any_store):
    run = StagedRun(any_store, "r", "s")
    run.write("events", pa.table({"n": [1]}))
    assert visibility_watermark() is not None
    run.rollback()
    assert visibility_watermark() is None
    assert any_store.table_info("events") is None or _ids(any_store) == []


def _record(run_id: str, step: str = "s"):
    import datetime as dt

    from stepwell.store.base import RunRecord

    return RunRecord(id=run_id, step=step, status="running", started_at=dt.datetime.now(dt.UTC))


def test_an_unrecorded_run_is_written_by_its_first_commit_with_its_effects(any_store):
    store = any_store
    run = StagedRun(store, "late", "s", unrecorded=_record("late"))
    run.commit(None, {"k": 1})  # a commit point with state only
    assert store.get_run("late").status == "running"  # recorded in the same transaction
    run.commit(None, {"k": 2}, run_fields={"status": "succeeded", "rows_out": 0})
    record = store.get_run("late")
    assert (record.status, record.step) == ("succeeded", "s")
    assert store.get_state("s") == {"k": 2}
    quiet = StagedRun(store, "quiet", "s", unrecorded=_record("quiet"))
    quiet.commit(None, {"k": 3}, run_fields={"status": "succeeded"})  # one transaction
    assert store.get_run("quiet").status == "succeeded" and store.get_state("s") == {"k": 3}


def test_a_run_that_writes_is_recorded_before_its_transaction_opens(any_store):
    """A record written while the run's transaction is open would be invisible to it
    (snapshot isolation, as in DuckDB), and the commit could not close it."""
    store = any_store
    run = StagedRun(store, "writer", "s", unrecorded=_record("writer"))
    run.write("events", pa.table({"n": [1]}))
    assert store.get_run("writer").status == "running" and store.table_info("events") is None
    run.record()  # what the session does once a run has lasted RECORD_AFTER: a no-op now
    run.commit(None, {"k": 1}, run_fields={"status": "succeeded", "rows_out": 1})
    record = store.get_run("writer")
    assert (record.status, record.rows_out) == ("succeeded", 1)
    assert store.get_state("s") == {"k": 1} and _ids(store) == [1]
    # later commit points update the record written by the first one
    run.write("events", pa.table({"n": [2]}))
    run.commit(None, None, run_fields={"rows_out": 2})
    assert store.get_run("writer").rows_out == 2


def test_an_unrecorded_run_that_fails_or_stages_nothing_is_still_recorded(any_store, monkeypatch):
    store = any_store
    failed = StagedRun(store, "failed", "s", unrecorded=_record("failed"))
    failed.write("events", pa.table({"n": [1]}))
    failed.rollback()
    failed.close_record({"status": "failed", "error": "boom"})
    assert (store.get_run("failed").status, store.get_run("failed").error) == ("failed", "boom")
    empty = StagedRun(store, "empty", "s", unrecorded=_record("empty"))
    empty.commit(None, None)  # an intermediate commit point with nothing in it
    assert store.get_run("empty") is None
    empty.commit(None, None, run_fields={"status": "succeeded_no_data"})
    assert store.get_run("empty").status == "succeeded_no_data"
    # a run whose commit fails stays recorded as running (its writes recorded it)
    # until the failure path closes it
    broken = StagedRun(store, "broken", "s", unrecorded=_record("broken"))
    broken.write("events", pa.table({"n": [9]}))
    tx = broken.tx()

    def commit_fails() -> None:  # as when the disk is full or the server goes away
        tx.rollback()
        raise RuntimeError("commit failed")

    monkeypatch.setattr(tx, "commit", commit_fails)
    with pytest.raises(RuntimeError):
        broken.commit(None, None, run_fields={"status": "succeeded"})
    assert store.get_run("broken").status == "running"
    broken.rollback()
    broken.close_record({"status": "failed"})
    assert store.get_run("broken").status == "failed"
    assert store.table_info("events") is None  # none of the three kept a row


def test_a_long_run_is_visible_as_running_while_a_short_one_is_recorded_once(tmp_path):
    import threading
    import time

    from apputil import app_runner, write_app

    from stepwell.engine.worker_session import RECORD_AFTER

    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: slow\n    node: slow.py\n  - name: quick\n    node: quick.py\n",
        "slow.py": "import time\ntime.sleep(3)\n",
        "quick.py": "print('hi')\n",
    })  # fmt: skip
    with app_runner(app) as runner:
        store = runner.store
        assert runner.run_step("quick").status == "succeeded_no_data"
        finished: list = []
        thread = threading.Thread(target=lambda: finished.append(runner.run_step("slow")))
        thread.start()
        seen = []
        deadline = time.monotonic() + 2.5
        while not seen and time.monotonic() < deadline:
            time.sleep(RECORD_AFTER / 4)
            seen = [r for r in store.list_runs("slow") if r.status == "running"]
        thread.join()
        assert seen, f"the slow run was not recorded as running within {RECORD_AFTER}s"
        assert finished[0].status == "succeeded_no_data"
        assert store.get_run(finished[0].id).status == "succeeded_no_data"
        assert [r.status for r in store.list_runs("quick")] == ["succeeded_no_data"]


# -- several hosts on one PostgreSQL store ---------------------------------------------
# Each "host" below is a process of its own, so its ids come from its own clock and
# it shares no in-process watermark with the test (another host).

OTHER_HOST = """
import os, sys, time
import pyarrow as pa
from stepwell.engine.staging import StagedRun
from stepwell.store import ids, open_store

url, action, skew_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_now = ids._now_ms
ids._now_ms = lambda: real_now() - skew_ms  # this host's clock is behind
store = open_store(url, None)
run = StagedRun(store, "other-host-run", "other")
run.write("events", pa.table({"n": [int(n) for n in sys.argv[4:]]}))
print("written", flush=True)
if action == "commit-now":
    run.commit(None, None)
else:
    command = sys.stdin.readline().strip()
    if command == "die":
        os._exit(9)  # as if killed: the transaction and its connections just go
    run.commit(None, None)
store.close()
print("done", flush=True)
"""


def _other_host(url: str, action: str, rows: list[int], skew_ms: int = 0) -> subprocess.Popen:
    host = subprocess.Popen(
        [sys.executable, "-c", OTHER_HOST, url, action, str(skew_ms), *map(str, rows)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert host.stdout.readline().strip() == "written"
    return host


def _finish(host: subprocess.Popen, command: str) -> None:
    host.stdin.write(command + "\n")
    host.stdin.flush()
    host.wait(timeout=60)


@pytest.fixture
def pg_store(make_pg_database, tmp_path):
    from stepwell.store import open_store

    url = make_pg_database()
    store = open_store(url, tmp_path)
    yield url, store
    store.close()


def _commit(store, rows: list[int]) -> None:
    run = StagedRun(store, "this-host-run", "this")
    run.write("events", pa.table({"n": rows}))
    run.commit(None, None)


def test_a_stream_never_passes_ids_another_host_has_in_flight(pg_store):
    url, store = pg_store
    _commit(store, [0])
    slow = _other_host(url, "wait", [1, 2])  # ids handed out there, not committed
    _commit(store, [3, 4])  # greater ids (a later clock reading), committed first
    assert visibility_watermark() is None  # nothing in flight in this process
    assert _ids(store) == [0, 3, 4]  # what a stream without leases would pass
    assert _ids(store, stream=True) == [0]  # it stops below the other host's lease
    _finish(slow, "commit")
    assert slow.returncode == 0
    assert _ids(store, stream=True) == [0, 1, 2, 3, 4]
    rows = store.query("SELECT count(*) AS n FROM stepwell.id_leases").to_pylist()
    assert rows == [{"n": 0}]  # a lease ends with its transaction


def test_a_host_that_dies_holding_a_lease_does_not_stall_streams(pg_store):
    url, store = pg_store
    _commit(store, [0])
    dying = _other_host(url, "wait", [1])
    _commit(store, [2])
    assert _ids(store, stream=True) == [0]
    _finish(dying, "die")
    assert dying.returncode == 9
    deadline = time.monotonic() + 30  # PostgreSQL notices the lost connection
    while _ids(store, stream=True) != [0, 2] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ids(store, stream=True) == [0, 2]
    assert store.query("SELECT count(*) AS n FROM stepwell.id_leases").to_pylist() == [{"n": 0}]


def test_a_host_whose_clock_is_behind_never_commits_behind_a_stream(pg_store):
    url, store = pg_store
    _commit(store, [0, 1])
    batches = list(store.scan("events", order_by=["patterns_id"], stream=True))
    position = batches[-1].column("patterns_id")[-1].as_py()  # a stream has read both
    behind = _other_host(url, "commit-now", [2], skew_ms=3_600_000)  # an hour behind
    behind.wait(timeout=60)
    assert behind.returncode == 0
    after = list(store.scan("events", order_by=["patterns_id"], after=(position, None), stream=True))
    assert [r["n"] for b in after for r in b.to_pylist()] == [2]  # read next, not skipped


def test_ids_never_go_below_a_position_recorded_before_leases_existed(pg_store):
    from stepwell.store import ids, open_store
    from stepwell.store.base import StreamPosition

    url, store = pg_store
    ahead = ids._encode((ids._now_ms() + 86_400_000) << 80)  # read by a host a day ahead
    with store.transaction() as tx:
        tx.set_position(StreamPosition("reader", "events", ("patterns_id",), 1, ahead, None))
        tx.commit()
    with store.transaction() as tx:  # as a store made before id leases: clock at zero
        tx._s.execute("UPDATE stepwell.id_clock SET value = ?", ["0" * ids.ULID_LENGTH])
        tx.commit()
    reopened = open_store(url, None)  # raises the clock to the recorded position
    try:
        _commit(reopened, [1])
        (row,) = reopened.query("SELECT patterns_id FROM events").to_pylist()
        assert row["patterns_id"] > ahead
    finally:
        reopened.close()


def test_writers_racing_to_create_or_widen_a_table_wait_for_each_other(pg_store):
    import threading

    _url, store = pg_store
    first = store.transaction()
    first.append("fresh", pa.table({"a": [1]}))  # creates it; not committed yet
    errors: list[BaseException] = []

    def second_writer() -> None:
        try:
            with store.transaction() as tx:  # would fail: "duplicate key ... pg_type"
                tx.append("fresh", pa.table({"a": [2], "b": ["x"]}))  # and widen it
                tx.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=second_writer)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive()  # waiting for the first writer's table
    first.commit()
    thread.join(30)
    assert errors == []
    rows = store.query("SELECT a, b FROM fresh ORDER BY a").to_pylist()
    assert rows == [{"a": 1, "b": None}, {"a": 2, "b": "x"}]


def test_on_duckdb_a_run_losing_a_race_to_create_a_table_is_told_to_run_again(tmp_path):
    from stepwell.store import ConcurrentChange, open_store

    store = open_store(None, tmp_path)
    try:
        first, second = store.transaction(), store.transaction()
        first.append("fresh", pa.table({"a": [1]}))
        with pytest.raises(ConcurrentChange, match="at the same moment .* run it again"):
            second.append("fresh", pa.table({"a": [2]}))
        second.rollback()
        first.commit()
        assert store.query("SELECT a FROM fresh").to_pylist() == [{"a": 1}]
    finally:
        store.close()
