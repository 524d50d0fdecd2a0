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
