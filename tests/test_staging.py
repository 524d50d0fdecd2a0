"""Staged runs: the visibility watermark that keeps streams exactly-once when
several writers commit out of id order."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stepwell.engine.staging import StagedRun, visibility_watermark


@pytest.fixture(params=["duckdb", "postgres"])
def any_store(request, tmp_path):
    from stepwell.store import open_store

    url = None if request.param == "duckdb" else request.getfixturevalue("make_pg_database")()
    store = open_store(url, tmp_path)
    yield store
    store.close()


def _ids(store, after=None, below=None):
    batches = store.scan("events", order_by=["patterns_id"], after=after, below_id=below)
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
    assert _ids(store, below=visibility_watermark()) == [0]
    assert _ids(store) == [0, 3, 4]  # what a stream without the watermark would pass
    slow.commit(None, None)
    assert visibility_watermark() is None
    assert _ids(store, below=visibility_watermark()) == [0, 1, 2, 3, 4]


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
