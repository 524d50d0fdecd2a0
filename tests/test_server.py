"""`stepwell serve` end to end: a real uvicorn server on a free loopback port,
real worker processes, real stores (DuckDB, and PostgreSQL where marked)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import signal
import threading
import time

import httpx
import pytest
from apputil import cli, write_app
from serverutil import (
    ServerProcess,
    ThreadServer,
    runs_of,
    sse_events,
    table_rows,
    wait_for,
    wait_idle,
    wait_run,
)

from stepwell.engine.scheduler import BOOKKEEPING_KEY
from stepwell.store import open_store
from stepwell.store.base import PartitionRecord, RunRecord
from stepwell.store.ids import new_id

HOOK_SECRET = "s3cret-hook-token-value"

PIPELINE = {
    "stepwell.yml": """
        title: hooks
        tables: [{name: messages}, {name: enriched}]
        webhooks:
          - name: ingest
            table: messages
          - name: secured
            table: messages
            token: "${{ secrets.hook_token }}"
        steps:
          - name: enrich
            node: enrich.py
            inputs: {messages: messages}
            outputs: {enriched: enriched}
            trigger: upstream
            parameters: {api_key: "${{ secrets.hook_token }}"}
    """,
    "enrich.py": """
        from patterns import Table
        out = Table("enriched", "w")
        count = 0
        for record in Table("messages").as_stream().consume_records():
            out.append({"n": record["n"], "double": record["n"] * 2, "source": record["patterns_id"]})
            count += 1
        print(f"enriched {count}")
    """,
}

STEPS = {
    "stepwell.yml": """
        title: steps
        tables: [{name: out}]
        steps:
          - name: slow
            node: slow.py
            parameters: {seconds: 1.5}
          - name: chatty
            node: chatty.py
          - name: again
            node: again.py
          - name: stuck
            node: stuck.py
    """,
    "slow.py": """
        import time
        from patterns import Parameter, Table
        time.sleep(Parameter("seconds", type=float))
        Table("out", "w").append({"step": "slow"})
    """,
    "chatty.py": """
        import time
        for i in range(5):
            print(f"line {i}", flush=True)
            time.sleep(0.4)
    """,
    "again.py": """
        from patterns import State
        state = State()
        n = state.get_value("n", 0)
        state.set_value("n", n + 1)
        if n == 0:
            state.request_new_run(wait_atleast_seconds=1.5)
    """,
    "stuck.py": """
        import time
        from patterns import Table
        Table("out", "w").append({"step": "stuck"})
        print("wrote a row, now waiting", flush=True)
        time.sleep(120)
    """,
}


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "STEPWELL_SECRET_HOOK_TOKEN": HOOK_SECRET}


def _iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _no_overlap(runs: list[dict]) -> None:
    for before, after in zip(runs, runs[1:], strict=False):
        assert _iso(after["started_at"]) >= _iso(before["ended_at"]), (before, after)


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request):
    """None (the app's DuckDB file) or the URL of a fresh PostgreSQL database."""
    if request.param == "duckdb":
        return None
    return request.getfixturevalue("make_pg_database")()


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPWELL_SECRET_HOOK_TOKEN", HOOK_SECRET)
    return write_app(tmp_path / "hooks", PIPELINE)


@pytest.fixture
def steps_app(tmp_path):
    return write_app(tmp_path / "steps", STEPS)


# -- webhook -> row -> upstream step -> output ----------------------------------------------
def _webhook_pipeline(server, client: httpx.Client) -> None:
    posted = client.post("/api/webhooks/ingest", json={"n": 1})
    assert posted.status_code == 202, posted.text
    body = posted.json()
    assert body["table"] == "messages" and body["rows"] == 1 and len(body["ids"]) == 1
    many = client.post("/api/webhooks/ingest", json=[{"n": 2}, {"n": 3}, {"n": 4}])
    assert many.status_code == 202 and len(many.json()["ids"]) == 3
    ids = body["ids"] + many.json()["ids"]
    # rows are committed before the response: visible at once
    stored = table_rows(client, "messages")
    assert sorted(r["patterns_id"] for r in stored) == sorted(ids)
    # the upstream step runs by itself, pushed by the commit
    out = wait_for(lambda: len(table_rows(client, "enriched")) == 4 and table_rows(client, "enriched"),
                   60, what="enriched rows")
    assert sorted(r["double"] for r in out) == [2, 4, 6, 8]
    assert sorted(r["source"] for r in out) == sorted(ids)
    wait_idle(client)
    runs = runs_of(client, "enrich")
    assert runs and {r["trigger"] for r in runs} == {"upstream"}
    assert all(r["status"] in ("succeeded", "succeeded_no_data") for r in runs)
    _no_overlap([r for r in runs if r["ended_at"]])


def test_webhook_row_upstream_step_output_duckdb(pipeline):
    with ServerProcess(pipeline) as server, server.client() as client:
        _webhook_pipeline(server, client)


@pytest.mark.postgres
def test_webhook_row_upstream_step_output_postgres(pipeline, make_pg_database):
    url = make_pg_database()
    with ServerProcess(pipeline, "--store", url) as server, server.client() as client:
        _webhook_pipeline(server, client)
        assert client.get("/api/health").json()["store"] == "postgresql"
        app = client.get("/api/app").json()
        assert "postgres@" in app["store"]
    store = open_store(url, pipeline)
    try:
        assert store.table_info("enriched").row_count == 4
    finally:
        store.close()


def test_webhook_bad_bodies_give_json_errors_and_lose_nothing(pipeline):
    with ThreadServer(pipeline) as server, server.client() as client:
        bad = client.post("/api/webhooks/ingest", content=b"{not json")
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "bad_request"
        assert "not JSON" in bad.json()["error"]["message"]
        scalar = client.post("/api/webhooks/ingest", json=[{"n": 1}, 5])
        assert scalar.status_code == 422
        assert "element 1" in scalar.json()["error"]["message"]
        unknown = client.post("/api/webhooks/nope", json={})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["message"] == "no webhook 'nope' (webhooks: ingest, secured)"
        assert client.post("/api/webhooks/ingest", json={"n": 1}).status_code == 202
        # a value that does not fit the column: this post fails, concurrent good ones do not
        results: list[int] = []

        def post(body: dict) -> None:
            results.append(client.post("/api/webhooks/ingest", json=body).status_code)

        threads = [threading.Thread(target=post, args=({"n": i},)) for i in range(2, 12)]
        threads.append(threading.Thread(target=post, args=({"n": "not a number"},)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [202] * 10 + [422]
        assert sorted(r["n"] for r in table_rows(client, "messages")) == list(range(1, 12))
        assert client.post("/api/webhooks/ingest", json=[]).json()["ids"] == []
        nan = client.post("/api/webhooks/ingest", content=b'{"n": NaN}')
        assert nan.status_code == 400 and "NaN is not a JSON value" in nan.json()["error"]["message"]
        deep = client.post("/api/webhooks/ingest", content=b"[" * 100_000 + b"]" * 100_000)
        assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
        nested: object = 1
        for _ in range(150):
            nested = {"k": nested}
        refused = client.post("/api/webhooks/ingest", json={"n": 21, "doc": nested})
        assert refused.status_code == 422 and "more than 100 levels" in refused.text, refused.text
        archived = client.post("/api/tables/messages__v1/rows", json=[{"n": 19}])
        assert archived.status_code == 422 and "earlier versions" in archived.json()["error"]["message"]
        assert client.get("/api/tables/messages__v1").status_code == 422
        empty = client.post("/api/webhooks/ingest", json=[{"n": 20}, {}])
        assert empty.status_code == 422 and "element 1" in empty.json()["error"]["message"]
        # a field only later rows have is a column too (not only the first row's fields)
        later = client.post("/api/webhooks/ingest", json=[{"n": 21}, {"n": 22, "note": "kept"}])
        assert later.status_code == 202
        notes = {r["n"]: r.get("note") for r in table_rows(client, "messages")}
        assert notes[21] is None and notes[22] == "kept"


def test_webhook_rows_losing_a_race_to_another_change_are_written_again(tmp_path, monkeypatch):
    """DuckDB refuses the later of two transactions changing one table at once; the
    ingest writer writes such a batch again instead of failing its requests."""
    import asyncio

    import pyarrow as pa

    from stepwell.server.ingest import Ingest, IngestError
    from stepwell.store import ConcurrentChange

    monkeypatch.setattr("stepwell.server.ingest.CONFLICT_ATTEMPTS", 50)  # however slow the machine
    store = open_store(None, tmp_path)
    ingest = Ingest(store)
    lost_once = threading.Event()
    real_commit = ingest._commit

    def commit(table, batch):
        try:
            return real_commit(table, batch)
        except ConcurrentChange:
            lost_once.set()
            raise

    ingest._commit = commit
    try:
        other = store.transaction()
        other.append("fresh", pa.table({"a": [1]}))  # creates the table, not committed yet

        def commit_other_after_the_first_loss() -> None:
            assert lost_once.wait(30)
            other.commit()

        committer = threading.Thread(target=commit_other_after_the_first_loss)
        committer.start()
        ids = asyncio.run(ingest.add("fresh", [{"a": 2}]))
        committer.join()
        assert lost_once.is_set() and len(ids) == 1
        assert sorted(r["a"] for r in store.query("SELECT a FROM fresh").to_pylist()) == [1, 2]

        def always_lose(table, batch):
            raise ConcurrentChange("append to table 'fresh': write-write conflict")

        ingest._commit = always_lose
        monkeypatch.setattr("stepwell.server.ingest.CONFLICT_ATTEMPTS", 3)
        with pytest.raises(IngestError) as raised:
            asyncio.run(ingest.add("fresh", [{"a": 3}]))
        error = raised.value.api_error()
        assert error.status_code == 503 and error.headers == {"Retry-After": "1"}
    finally:
        ingest.close()
        store.close()


# -- triggers ----------------------------------------------------------------------------
def test_cron_per_second_runs_never_overlap(tmp_path):
    app = write_app(tmp_path / "cron", {
        "stepwell.yml": """
            steps:
              - name: tick
                node: tick.py
                trigger: "* * * * * *"
        """,
        "tick.py": """
            import time
            time.sleep(1.2)
        """,
    })
    with ThreadServer(app) as server, server.client() as client:
        step = client.get("/api/steps/tick").json()
        assert step["trigger"] == "* * * * * *" and step["next_tick"]
        runs = wait_for(lambda: [r for r in runs_of(client, "tick") if r["ended_at"]][:3]
                        if len([r for r in runs_of(client, "tick") if r["ended_at"]]) >= 3 else None,
                        30, what="three cron runs")
    assert {r["trigger"] for r in runs} == {"cron"}
    _no_overlap(runs)


def test_servers_sharing_a_store_run_each_cron_tick_once(tmp_path, pg_url):
    files = {
        "stepwell.yml": """
            steps:
              - name: tick
                node: tick.py
                trigger: "* * * * * *"
        """,
        "tick.py": "print('tick')\n",
    }
    # two copies of the app (one server per app folder), one PostgreSQL store
    first, second = write_app(tmp_path / "a", files), write_app(tmp_path / "b", files)
    began = time.time()
    with ThreadServer(first, store_url=pg_url) as one, ThreadServer(second, store_url=pg_url):
        with one.client() as client:
            wait_for(lambda: len([r for r in runs_of(client, "tick") if r["ended_at"]]) >= 8,
                     30, what="eight ended runs of the tick step")
    ended = time.time()
    store = open_store(pg_url, first)
    try:
        runs = store.list_runs(step="tick", limit=None)
    finally:
        store.close()
    by_status: dict[str, list] = {}
    for run in runs:
        by_status.setdefault(run.status, []).append(run)
    ran = by_status.get("succeeded_no_data", [])
    ticks = int(ended) - int(began) + 1  # whole seconds in the window: ticks at most
    assert 3 <= len(ran) <= ticks, (len(ran), ticks, sorted(by_status))
    assert not by_status.get("failed"), by_status["failed"][0].error  # no lock conflicts
    skipped = by_status.get("cancelled", [])
    assert skipped, "the second server never lost a tick"
    assert all("was already run by run" in r.error and "each tick once" in r.error for r in skipped)
    assert set(by_status) <= {"succeeded_no_data", "cancelled", "queued", "running"}


@pytest.mark.parametrize("busy", [True, False])
def test_a_cron_run_that_found_its_step_running_elsewhere_gives_its_tick_back(tmp_path, busy):
    """Unit: a run that claimed its cron tick but did nothing because the step runs on
    another server (its run lock is taken) gives the tick back, for that server's run
    queued behind to serve; a run that did run keeps it."""
    from stepwell.app import load_app
    from stepwell.engine.scheduler import Scheduler, _Pending
    from stepwell.store.base import RUN_LOCK_BUSY

    app = write_app(tmp_path / "app", {
        "stepwell.yml": 'steps:\n  - name: tick\n    node: tick.py\n    trigger: "0 * * * *"\n',
        "tick.py": "",
    })
    spec = load_app(app)
    store = open_store(None, spec.root)

    class OneRunRunner:  # the run's outcome only: the lock is another server's in one case
        def __init__(self, _app, _store, **_settings):
            self.recovered = []

        def run_step(self, step, trigger, run_id=None):
            error = f"{RUN_LOCK_BUSY}, so this run did nothing" if busy else None
            store.update_run(run_id, status="failed" if busy else "succeeded_no_data", error=error)
            return store.get_run(run_id)

    try:
        scheduler = Scheduler(spec, store, runner_factory=OneRunRunner)
        scheduler._slots["tick"].cron = "0 * * * *"
        before = {"expr": "0 * * * *", "last_tick": 3600.0, "run_id": "earlier", "host": "h"}
        with store.transaction() as tx:
            tx.set_state(BOOKKEEPING_KEY, {"cron": {"tick": before}})
            tx.commit()
        with scheduler._cv:
            ticket = scheduler._enqueue("tick", "cron", cron_tick=7200.0)
            pending = scheduler._slots["tick"].pending
        assert isinstance(pending, _Pending)
        scheduler._execute("tick", pending)
        entry = store.get_state(BOOKKEEPING_KEY)["cron"]["tick"]
        if busy:
            assert entry == before  # the other server's queued run claims 7200 itself
        else:
            assert entry["last_tick"] == 7200.0 and entry["run_id"] == ticket.run_id
        scheduler.shutdown(timeout=1)
    finally:
        store.close()


def test_missed_cron_ticks_run_once_after_restart(tmp_path, store_url):
    app = write_app(tmp_path / "hourly", {
        "stepwell.yml": """
            steps:
              - name: hourly
                node: hourly.py
                trigger: "0 * * * *"
        """,
        "hourly.py": "print('tick')\n",
    })
    with ThreadServer(app, store_url=store_url) as server, server.client() as client:
        time.sleep(1.0)
        assert runs_of(client, "hourly") == []  # a new schedule has missed nothing
    store = open_store(store_url, app)
    try:
        book = store.get_state(BOOKKEEPING_KEY)
        assert book["cron"]["hourly"]["expr"] == "0 * * * *"
        book["cron"]["hourly"]["last_tick"] = time.time() - 5 * 3600  # five ticks missed
        with store.transaction() as tx:
            tx.set_state(BOOKKEEPING_KEY, book)
            tx.commit()
    finally:
        store.close()
    with ThreadServer(app, store_url=store_url) as server, server.client() as client:
        runs = wait_for(lambda: runs_of(client, "hourly"), 30, what="the missed-tick run")
        wait_run(client, runs[0]["id"])
        time.sleep(1.0)
        runs = runs_of(client, "hourly")
        assert len(runs) == 1 and runs[0]["trigger"] == "cron"
        assert runs[0]["status"] == "succeeded_no_data"
    with ThreadServer(app, store_url=store_url) as server, server.client() as client:
        time.sleep(1.5)
        assert len(runs_of(client, "hourly")) == 1  # not again on the next restart
    store = open_store(store_url, app)
    try:
        last = store.get_state(BOOKKEEPING_KEY)["cron"]["hourly"]["last_tick"]
    finally:
        store.close()
    now = time.time()
    assert now - 3600 < last <= now and int(last) % 3600 == 0  # the latest missed tick


def test_rows_of_a_run_killed_with_its_host_reach_their_readers_after_restart(tmp_path, store_url):
    import subprocess
    import sys

    import pyarrow as pa

    from stepwell.store.base import RunRecord

    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: writer
                node: writer.py
                outputs: {ticks: ticks}
              - name: reader
                node: reader.py
                trigger: upstream
                inputs: {ticks: ticks}
                outputs: {copied: copied}
        """,
        "writer.py": "from patterns import Table\nTable('ticks', 'w').append({'n': 0})\n",
        "reader.py": """
            from patterns import Table
            out = Table("copied", "w")
            for row in Table("ticks").as_stream(order_by="n"):
                out.append({"n": row["n"]})
        """,
    })
    # what a server killed mid-run leaves: rows committed at a commit point, the run
    # still `running` under a process that is gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    store = open_store(store_url, app)
    try:
        store.create_run(RunRecord(id="01killed", step="writer", status="running",
                                   started_at=dt.datetime.now(dt.UTC), rows_out=3,
                                   host_pid=int(gone.stdout)))  # fmt: skip
        with store.transaction() as tx:
            tx.append("ticks", pa.table({"n": [1, 2, 3]}))
            tx.commit()
    finally:
        store.close()
    with ThreadServer(app, store_url=store_url) as server, server.client() as client:
        runs = wait_for(lambda: runs_of(client, "reader"), 30, what="the reader's run")
        ended = wait_run(client, runs[0]["id"])
        assert ended["status"] == "succeeded", ended["error"]
        assert sorted(r["n"] for r in table_rows(client, "copied")) == [1, 2, 3]
        assert client.get("/api/runs/01killed").json()["status"] == "killed"


def test_rows_left_unread_by_a_killed_server_reach_their_readers_after_restart(tmp_path, store_url):
    """A server SIGKILLed in a reader's run (nothing queued behind it), or between a
    webhook commit and queuing the readers, leaves committed rows no queued run will
    read: the restart queues the readers whose streams have rows left."""
    import subprocess
    import sys

    import pyarrow as pa

    from stepwell.store.base import RunRecord, StreamPosition

    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            tables: [{name: events}, {name: copied}, {name: other}, {name: seen}]
            steps:
              - name: copy
                node: copy.py
                trigger: upstream
              - name: watch
                node: watch.py
                trigger: upstream
        """,
        "copy.py": """
            from patterns import Table
            out = Table("copied", "w")
            for row in Table("events").as_stream():
                out.append({"n": row["n"]})
        """,
        "watch.py": """
            from patterns import Table
            out = Table("seen", "w")
            for row in Table("other").as_stream():
                out.append({"n": row["n"]})
        """,
    })  # fmt: skip
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    store = open_store(store_url, app)
    try:
        from stepwell.store import ids

        keys = [ids.new_id() for _ in range(5)]
        with store.transaction() as tx:  # webhook rows: 1 and 2 copied, 3 and 4 not yet
            tx.append("events", pa.table({"n": [1, 2, 3, 4], "patterns_id": keys[:4]}))
            tx.append("copied", pa.table({"n": [1, 2]}))
            tx.append("other", pa.table({"n": [7], "patterns_id": keys[4:]}))
            tx.commit()
        version = store.table_info("events", count_rows=False).version
        with store.transaction() as tx:
            tx.replace_positions("copy", [StreamPosition("copy", "events", ("patterns_id",), version, keys[1], None)])
            tx.commit()
        # copy's run died with its host after its commit point; nothing was queued
        store.create_run(RunRecord(id="01killed", step="copy", status="running", trigger="upstream",
                                   started_at=dt.datetime.now(dt.UTC), rows_out=2,
                                   host_pid=int(gone.stdout)))  # fmt: skip
    finally:
        store.close()
    with ThreadServer(app, store_url=store_url) as server, server.client() as client:
        for step in ("copy", "watch"):  # watch: its rows' commit never queued it
            runs = wait_for(lambda step=step: [r for r in runs_of(client, step) if r["id"] != "01killed"],
                            15, what=f"a run of {step}")
            ended = wait_run(client, runs[0]["id"])
            assert ended["status"] == "succeeded", ended["error"]
        assert sorted(r["n"] for r in table_rows(client, "copied")) == [1, 2, 3, 4]
        assert [r["n"] for r in table_rows(client, "seen")] == [7]


def test_rows_a_killed_server_never_showed_a_whole_table_reader_reach_it_after_restart(
    tmp_path, store_url
):
    """A reader without a stream (a SQL step reading the table whole) whose writer
    committed just before the server was SIGKILLed, with the reader not queued yet:
    the restart runs it, as the writer's rows came after its last run began. A
    reader that ran after its writer's last rows is left alone."""
    import pyarrow as pa

    from stepwell.store.base import RunRecord

    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            tables: [{name: ticks}, {name: other}]
            steps:
              - {name: writer, node: writer.py, outputs: {ticks: ticks}}
              - {name: total, sql: total.sql, trigger: upstream}
              - {name: other_writer, node: writer.py, outputs: {other: other}}
              - {name: other_total, sql: other_total.sql, trigger: upstream}
        """,
        "writer.py": "from patterns import Table\nTable('ticks', 'w').append({'n': 0})\n",
        "total.sql": "select count(*) as n from {{ Table('ticks') }}",
        "other_total.sql": "select count(*) as n from {{ Table('other') }}",
    })  # fmt: skip
    now = dt.datetime.now(dt.UTC)

    def run(id: str, step: str, began: int, ended: int, rows_out: int = 0) -> RunRecord:
        return RunRecord(id=id, step=step, status="succeeded", started_at=now + dt.timedelta(seconds=began),
                         ended_at=now + dt.timedelta(seconds=ended), rows_out=rows_out)  # fmt: skip

    store = open_store(store_url, app)
    try:
        with store.transaction() as tx:
            tx.append("ticks", pa.table({"n": [1, 2, 3]}))
            tx.append("other", pa.table({"n": [1]}))
            tx.commit()
        for record in (run("01total", "total", 0, 1), run("01writer", "writer", 2, 3, rows_out=3),
                       run("01other", "other_writer", 0, 1, rows_out=1),
                       run("01othertotal", "other_total", 2, 3)):  # fmt: skip
            store.create_run(record)
    finally:
        store.close()
    with ThreadServer(app, store_url=store_url) as server, server.client() as client:
        runs = wait_for(lambda: [r for r in runs_of(client, "total") if r["id"] != "01total"],
                        15, what="a run of total")  # fmt: skip
        ended = wait_run(client, runs[0]["id"])
        assert ended["status"] == "succeeded", ended["error"]
        assert [row["n"] for row in table_rows(client, "total")] == [3]
        assert server.ctx.scheduler.wait_idle(30)
        assert [r["id"] for r in runs_of(client, "other_total")] == ["01othertotal"]


def test_triggers_coalesce_and_a_step_never_runs_twice_at_once(steps_app):
    with ThreadServer(steps_app) as server, server.client() as client:
        tickets = [client.post("/api/runs", json={"step": "slow"}).json() for _ in range(5)]
        assert [t["coalesced"] for t in tickets] == [False, False, True, True, True]
        assert len({t["run_id"] for t in tickets[1:]}) == 1
        queued = client.get(f"/api/runs/{tickets[1]['run_id']}").json()
        assert queued["status"] == "queued"
        assert client.get("/api/steps/slow").json()["queued_run"] == tickets[1]["run_id"]
        assert server.ctx.scheduler.wait_idle(60)
        runs = runs_of(client, "slow")
        assert [r["id"] for r in runs] == [tickets[0]["run_id"], tickets[1]["run_id"]]
        assert all(r["status"] == "succeeded" for r in runs)
        _no_overlap(runs)
        assert len(table_rows(client, "out")) == 2


def test_request_new_run_waits_at_least_the_requested_seconds(steps_app):
    with ThreadServer(steps_app) as server, server.client() as client:
        first = client.post("/api/runs", json={"step": "again"}).json()["run_id"]
        wait_run(client, first)
        runs = wait_for(lambda: len(runs_of(client, "again")) == 2 and runs_of(client, "again"),
                        30, what="the requested run")
        second = wait_run(client, runs[1]["id"])
        assert second["trigger"] == "request_new_run" and second["status"] == "succeeded_no_data"
        gap = _iso(second["started_at"]) - _iso(runs[0]["ended_at"])
        assert gap.total_seconds() >= 1.5
        time.sleep(0.5)
        assert len(runs_of(client, "again")) == 2  # the second run asked for nothing


def test_request_new_run_without_trigger_downstream_holds_readers_back(tmp_path):
    app = write_app(tmp_path / "chain", {
        "stepwell.yml": """
            steps:
              - name: produce
                node: produce.py
                outputs: {items: items}
              - name: consume
                node: consume.py
                inputs: {items: items}
                trigger: upstream
        """,
        "produce.py": """
            from patterns import State, Table
            state = State()
            n = state.get_value("n", 0)
            state.set_value("n", n + 1)
            Table("items", "w").append({"n": n})
            if n == 0:
                state.request_new_run(trigger_downstream=False, wait_atleast_seconds=1)
        """,
        "consume.py": """
            from patterns import Table
            print(len(list(Table("items").as_stream().consume_records())))
        """,
    })
    with ThreadServer(app) as server, server.client() as client:
        client.post("/api/runs", json={"step": "produce"})
        wait_for(lambda: runs_of(client, "consume"), 30, what="the reader's run")
        assert server.ctx.scheduler.wait_idle(30)
        produced = runs_of(client, "produce")
        consumed = runs_of(client, "consume")
        assert len(produced) == 2 and len(consumed) == 1
        assert _iso(consumed[0]["started_at"]) >= _iso(produced[1]["ended_at"])
        assert consumed[0]["rows_in"] == 2


# -- live logs, cancel ---------------------------------------------------------------------
def test_sse_streams_log_lines_live_then_the_end(steps_app):
    with ThreadServer(steps_app) as server, server.client() as client:
        run_id = client.post("/api/runs", json={"step": "chatty"}).json()["run_id"]
        with client.stream("GET", f"/api/runs/{run_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        logs = [(t, e) for t, k, e in events if k == "log"]
        assert [e["message"] for _, e in logs] == [f"line {i}" for i in range(5)]
        assert [e["seq"] for _, e in logs] == list(range(5))
        end_time, _, end = events[-1]
        assert end["status"] == "succeeded_no_data" and end["id"] == run_id
        assert end_time - logs[0][0] > 1.0  # the first line arrived while the run went on
        # a finished run's stream replays the stored lines, then ends
        with client.stream("GET", f"/api/runs/{run_id}/events") as response:
            text = response.read().decode()
        assert text.count("event: log") == 5 and text.rstrip().endswith("}")
        assert "event: end" in text
        # the last lines only, after how many there are before them
        with client.stream("GET", f"/api/runs/{run_id}/events", params={"tail": 2}) as response:
            text = response.read().decode()
        assert 'event: earlier\ndata: {"lines":3}' in text and text.count("event: log") == 2
        assert '"message":"line 3"' in text and '"message":"line 2"' not in text
        tail = client.get(f"/api/runs/{run_id}/logs", params={"tail": 2}).json()["lines"]
        assert [line["message"] for line in tail] == ["line 3", "line 4"]
        assert client.get(f"/api/runs/{run_id}/logs", params={"tail": 0}).status_code == 422
        missing = client.get("/api/runs/nope/events")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_finished_runs_stored_log_lines_go_out_in_few_writes(tmp_path):
    # one write per stored line: a 100,000-line log took ~10 s to reach a browser
    from stepwell.server.routes.runs import _events

    app = write_app(tmp_path / "loud", {"stepwell.yml": "steps: [{name: loud, node: loud.py}]\n",
                                        "loud.py": "for i in range(1200):\n    print(f'line {i}')\n"})
    with ThreadServer(app) as server, server.client() as client:
        run_id = client.post("/api/runs", json={"step": "loud"}).json()["run_id"]
        assert wait_run(client, run_id)["status"] == "succeeded_no_data"
        ctx = server.ctx
        queue, recent = ctx.hub.subscribe(run_id)

        async def writes() -> list[bytes]:
            return [w async for w in _events(None, ctx, ctx.store.get_run(run_id), queue, recent)]

        sent = asyncio.run(writes())
        text = b"".join(sent).decode()
        assert text.startswith("event: status") and "event: end" in text
        assert [json.loads(line[5:])["message"] for line in text.splitlines()
                if line.startswith("data:") and '"seq"' in line] == [f"line {i}" for i in range(1200)]
        assert len(sent) <= 10, len(sent)  # status, the lines 500 at a time, end


def test_cancel_running_and_queued_runs(steps_app, store_url):
    with ThreadServer(steps_app, store_url=store_url) as server, server.client() as client:
        running = client.post("/api/runs", json={"step": "stuck"}).json()["run_id"]
        queued = client.post("/api/runs", json={"step": "stuck"}).json()["run_id"]
        gone = client.post(f"/api/runs/{queued}/cancel")
        assert gone.status_code == 202 and gone.json()["status"] == "cancelled"
        with server.client() as events, events.stream("GET", f"/api/runs/{running}/events") as stream:
            lines = stream.iter_lines()
            for line in lines:  # follow the live log until the step has written its row
                if line.startswith("data:") and "wrote a row" in line:
                    break
            started = time.monotonic()
            stop = client.post(f"/api/runs/{running}/cancel")
            assert stop.status_code == 202 and stop.json()["status"] == "cancelling", stop.text
            ending = [line for line in lines if line.startswith("event:")]
        assert ending[-1] == "event: end"
        record = wait_run(client, running, 30)
        assert time.monotonic() - started < 10
        assert record["status"] == "cancelled" and record["error"] == "stopped on request"
        assert client.get(f"/api/runs/{queued}").json()["status"] == "cancelled"
        assert table_rows(client, "out") == []  # the uncommitted row was rolled back
        again = client.post(f"/api/runs/{running}/cancel")
        assert again.status_code == 409 and "already ended" in again.json()["error"]["message"]
        by_status = client.get("/api/runs", params={"status": "cancelled"}).json()["runs"]
        assert {r["id"] for r in by_status} == {running, queued}
        bogus = client.get("/api/runs", params={"status": "bogus"})
        assert bogus.status_code == 422 and "no run status 'bogus'" in bogus.text
        assert server.ctx.scheduler.wait_idle(10)


# -- security ------------------------------------------------------------------------------
def test_the_api_docs_page_shows_the_app_title_as_text(tmp_path):
    # the title was pasted into /docs' markup as it is: `</title><script>` ran there
    title = '</title><script>window.__xss = 1</script> & co'
    app = write_app(tmp_path / "titled", {"stepwell.yml": f"title: {json.dumps(title)}\n"})
    with ThreadServer(app) as server, server.client() as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "<script>window.__xss" not in page.text
        assert "</title><script>" not in page.text
        assert "<title>stepwell: &lt;/title&gt;&lt;script&gt;window.__xss = 1&lt;/script&gt; &amp; co" in page.text
        assert client.get("/openapi.json").json()["info"]["title"] == f"stepwell: {title}"


def test_loopback_needs_no_token_but_webhook_tokens_hold(pipeline):
    with ThreadServer(pipeline) as server, server.client() as client:
        assert client.get("/api/health").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200
        denied = client.post("/api/webhooks/secured", json={"n": 1})
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "unauthorized"
        wrong = client.post("/api/webhooks/secured", json={"n": 1},
                            headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.post("/api/webhooks/secured", json={"n": 1},
                         headers={"Authorization": f"Bearer {HOOK_SECRET}"})
        assert ok.status_code == 202
        # no endpoint shows a secret's value
        for path in ("/api/app", "/api/webhooks", "/api/steps", "/api/steps/enrich", "/openapi.json"):
            text = client.get(path).text
            assert HOOK_SECRET not in text, path
        hooks = {h["name"]: h for h in client.get("/api/webhooks").json()}
        assert hooks["secured"]["has_token"] is True and hooks["ingest"]["has_token"] is False
        step = client.get("/api/steps/enrich").json()
        assert step["parameters"] == {"api_key": "${{ secrets.hook_token }}"}
        assert step["secrets"] == ["hook_token"]


def test_a_server_without_token_refuses_other_sites_and_other_host_names(pipeline):
    """Cross-site request forgery and DNS rebinding: a loopback server has no token,
    so it must not serve what a browser sends on another site's behalf."""
    with ThreadServer(pipeline) as server, server.client() as client:
        host = httpx.URL(server.url).netloc.decode()
        attacks = [
            ("POST", "/api/webhooks/ingest", {"Origin": "https://evil.example", "Content-Type": "text/plain"}),
            ("POST", "/api/tables/messages/truncate", {"Origin": "http://localhost:3000"}),
            ("POST", "/api/tables/messages/truncate", {"Sec-Fetch-Site": "cross-site"}),
            ("GET", "/api/tables/messages/rows", {"Host": "attacker.example:" + host.split(":")[1]}),
            ("GET", "/api/health", {"Origin": "null"}),
        ]
        assert client.post("/api/webhooks/ingest", json={"n": 1}).status_code == 202
        for method, path, headers in attacks:
            refused = client.request(method, path, content=b'{"n": 666}', headers=headers)
            assert refused.status_code == 403, (method, path, headers)
            assert refused.json()["error"]["code"] == "forbidden"
        assert [r["n"] for r in table_rows(client, "messages")] == [1]
        # the web UI's own requests (same origin) and clients that send no Origin pass
        same = client.post("/api/webhooks/ingest", json={"n": 2}, headers={"Origin": f"http://{host}"})
        assert same.status_code == 202
        localhost = client.get("/api/health", headers={"Host": "localhost:" + host.split(":")[1]})
        assert localhost.status_code == 200


def test_beyond_loopback_every_request_needs_the_token(pipeline):
    with ThreadServer(pipeline, host="0.0.0.0") as server:
        token = (pipeline / ".stepwell" / "token").read_text().strip()
        assert len(token) >= 32
        with server.client() as anonymous:
            for method, path in (("GET", "/api/health"), ("GET", "/openapi.json"), ("GET", "/docs"),
                                 ("GET", "/api/tables"), ("POST", "/api/runs"),
                                 ("POST", "/api/webhooks/ingest"), ("GET", "/api/webhooks"),
                                 ("POST", "/api/webhooks/unknown")):  # no 404 naming the webhooks
                response = anonymous.request(method, path, json={"n": 1})
                assert response.status_code == 401, (method, path)
                assert response.json()["error"]["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
            own = anonymous.post("/api/webhooks/secured", json={"n": 1},
                                 headers={"Authorization": f"Bearer {HOOK_SECRET}"})
            assert own.status_code == 202  # a webhook's own token is enough for it
            assert anonymous.get("/api/health", headers={
                "Authorization": f"Bearer {HOOK_SECRET}"}).status_code == 401
        with server.client(token) as authed:
            assert authed.get("/api/health").status_code == 200
            assert authed.post("/api/webhooks/ingest", json={"n": 2}).status_code == 202
        rotated = cli("token", str(pipeline), "--rotate")
        assert rotated.returncode == 0, rotated.stderr
        new_token = rotated.stdout.strip()
        assert new_token != token and cli("token", str(pipeline)).stdout.strip() == new_token
        with server.client(token) as old:
            assert old.get("/api/health").status_code == 401
        with server.client(new_token) as new:
            assert new.get("/api/health").status_code == 200


def test_request_size_limits(pipeline):
    with ThreadServer(pipeline, max_webhook_bytes=2000, max_body_bytes=300) as server, \
            server.client() as client:
        big = [{"n": i, "pad": "x" * 50} for i in range(60)]
        response = client.post("/api/webhooks/ingest", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert "2000 bytes" in response.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit applies while the body streams in
            for i in range(60):
                yield json.dumps({"n": i, "pad": "x" * 50}).encode()

        streamed = client.post("/api/webhooks/ingest", content=chunks())
        assert streamed.status_code == 413
        assert client.post("/api/runs", json={"step": "x" * 400}).status_code == 413
        assert client.post("/api/webhooks/ingest", json={"n": 1}).status_code == 202
        assert len(table_rows(client, "messages")) == 1


# -- the rest of the API -----------------------------------------------------------------------
def test_api_resources(pipeline):
    with ThreadServer(pipeline) as server, server.client() as client:
        app = client.get("/api/app").json()
        assert app["title"] == "hooks" and [s["name"] for s in app["steps"]] == ["enrich"]
        assert app["tables"] == ["messages", "enriched"]
        edges = {(e["source"], e["target"]) for e in app["graph"]["edges"]}
        assert ("webhook:ingest", "table:messages") in edges
        assert ("table:messages", "step:enrich") in edges
        assert ("step:enrich", "table:enriched") in edges
        assert client.get("/api/graph").json() == app["graph"]
        step = client.get("/api/steps/enrich").json()
        assert step["inputs"] == ["messages"] and step["trigger"] == "upstream"
        missing = client.get("/api/steps/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "no step named 'nope' (known steps: enrich)"

        ids = client.post("/api/webhooks/ingest", json=[{"n": i} for i in range(5)]).json()["ids"]
        assert server.ctx.scheduler.wait_idle(30)
        tables = {t["name"]: t for t in client.get("/api/tables").json()["tables"]}
        assert tables["messages"]["rows"] == 5 and tables["messages"]["columns"]["n"] == "int"
        schema = client.get("/api/tables/messages").json()
        assert schema["columns"] == {"n": "int", "patterns_id": "str"}
        page = client.get("/api/tables/messages/rows", params={"limit": 2, "offset": 1}).json()
        assert page["total"] == 5 and [r["patterns_id"] for r in page["rows"]] == ids[1:3]
        nothing = client.get("/api/tables/nope")
        assert nothing.status_code == 404
        assert nothing.json()["error"]["message"].startswith("table 'nope' does not exist")

        state = client.get("/api/steps/enrich/state").json()
        assert state["stream_positions"][0]["table"] == "messages"
        assert state["stream_positions"][0]["value"] == ids[-1]
        changed = client.patch("/api/steps/enrich/state", json={"values": {"k": [1, 2]}}).json()
        assert changed["state"] == {"k": [1, 2]} and changed["stream_positions"]
        moved = client.put("/api/steps/enrich/positions", json={
            "table": "messages", "order_by": ["patterns_id"], "table_version": 1,
            "value": ids[2], "last_id": None}).json()
        assert moved["stream_positions"][0]["value"] == ids[2]
        # positions a run could not use are refused, and the position stays
        position = {"table": "messages", "order_by": ["n"], "table_version": 1, "value": 2}
        for change, problem in (
            ({"table": "nope"}, "the table does not exist"),
            ({"order_by": ["missing"]}, "order_by needs columns of the table"),
            ({"table_version": 9}, "table_version 9 does not exist"),
            ({"value": "not a number"}, "does not compare with column 'n'"),
        ):
            refused = client.put("/api/steps/enrich/positions", json={**position, **change})
            assert refused.status_code == 422, change
            assert problem in refused.json()["error"]["message"], refused.json()
        assert client.put("/api/steps/enrich/positions", json=position).status_code == 200
        nan = client.patch("/api/steps/enrich/state", content=b'{"values": {"k": NaN}}',
                           headers={"Content-Type": "application/json"})
        assert nan.status_code == 422 and "NaN" in nan.json()["error"]["message"]
        reset = client.delete("/api/steps/enrich/state").json()
        assert reset["state"] == {} and reset["stream_positions"] == []
        assert client.get("/api/steps/enrich/partitions").json() == {"step": "enrich", "partitions": []}
        with server.ctx.store.transaction() as tx:
            tx.set_partition(PartitionRecord("enrich", "a.csv", "f1", "c1", rows=3))
            tx.commit()
        parts = client.get("/api/steps/enrich/partitions").json()["partitions"]
        assert [(p["name"], p["fingerprint"], p["rows"], p["status"]) for p in parts] == [
            ("a.csv", "f1", 3, "succeeded")]
        # `stepwell state` through the server shows them too, as it does locally
        from stepwell.engine.state_admin import describe_state
        from stepwell.server.client import ServerClient

        with ServerClient(server.url) as remote:
            described = remote.describe_state("enrich")
        assert [p["name"] for p in described["partitions"]] == ["a.csv"]
        assert described == describe_state(server.ctx.store, "enrich")

        new = client.post("/api/tables/enriched/reset").json()
        assert new == {"table": "enriched", "version": 2}
        versions = client.get("/api/tables/enriched/versions").json()["versions"]
        assert [(v["version"], v["active"], v["row_count"]) for v in versions] == [(1, False, 5), (2, True, 0)]
        client.post("/api/tables/messages/truncate")
        assert client.get("/api/tables/messages").json()["rows"] == 0

        loaded = client.post("/api/tables/extra/rows", json=[{"a": 1}, {"a": 2}])
        assert loaded.json() == {"table": "extra", "rows": 2}
        client.post("/api/runs", json={"step": "enrich"})
        assert server.ctx.scheduler.wait_idle(30)
        all_runs = client.get("/api/runs").json()["runs"]
        assert all_runs and client.get("/api/runs", params={"status": "nope"}).status_code == 422
        assert client.get("/api/runs", params={"trigger": "upstream", "limit": 1}).json()["runs"]
        # paging: each page starts below the last id of the one before
        assert len(all_runs) == 2, all_runs
        first, second = (client.get("/api/runs", params={"limit": 1, **extra}).json()["runs"]
                         for extra in ({}, {"before": all_runs[0]["id"]}))  # fmt: skip
        assert [first[0]["id"], second[0]["id"]] == [r["id"] for r in all_runs[:2]]
        step = client.get("/api/steps/enrich").json()
        assert step["last_run"]["id"] == client.get(
            "/api/runs", params={"step": "enrich", "limit": 1}).json()["runs"][0]["id"]
        detail = client.get(f"/api/runs/{all_runs[0]['id']}").json()
        assert "traceback" in detail and "info" in detail
        logs = client.get(f"/api/runs/{all_runs[-1]['id']}/logs").json()["lines"]
        assert "enriched 5" in [line["message"] for line in logs]
        bad = client.get("/api/runs", params={"limit": 0})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid"
        # JSON sent as `curl -d` sends it (a form type, or no type) is read as JSON
        for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):
            plain = client.post("/api/runs", content=b'{"step": "enrich"}', headers=headers)
            assert plain.status_code == 202 and plain.json()["step"] == "enrich", plain.text
        assert server.ctx.scheduler.wait_idle(30)
        not_json = client.post("/api/runs", content=b"step=enrich",
                               headers={"content-type": "application/x-www-form-urlencoded"})
        assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "bad_request"
        assert not_json.json()["error"]["message"].startswith("the body is not JSON: ")
        cut = client.post("/api/runs", content=b'{"step":')  # as the action routes say it
        assert cut.status_code == 400, cut.text
        assert cut.json()["error"]["message"].startswith("the body is not JSON: ")
        assert client.get("/api/nothing").json()["error"]["code"] == "not_found"
        health = client.get("/api/health").json()
        assert health["status"] == "ok" and health["store"] == "duckdb"
        spec = client.get("/openapi.json").json()
        assert "/api/webhooks/{name}" in spec["paths"] and "/api/runs/{run_id}/events" in spec["paths"]


def test_runs_paging_refuses_a_before_that_is_no_run_id(steps_app):
    # compared as text, `before=garbage` listed every run and `before=` none: a 422 says why
    with ThreadServer(steps_app) as server, server.client() as client:
        run_id = client.post("/api/runs", json={"step": "slow"}).json()["run_id"]
        assert server.ctx.scheduler.wait_idle(30)
        for before in ("garbage", "", run_id.upper(), run_id + "0", "u" * 26):
            bad = client.get("/api/runs", params={"before": before})
            assert bad.status_code == 422, (before, bad.text)
            assert bad.json()["error"]["message"].startswith(f"before={before!r} is not a run id")
        assert client.get("/api/runs", params={"before": run_id}).json()["runs"] == []
        newer = "z" * 26  # a well-formed id of no run still pages
        assert [r["id"] for r in client.get("/api/runs", params={"before": newer}).json()["runs"]] == [run_id]


def test_state_changes_wait_for_a_running_step(steps_app):
    with ThreadServer(steps_app) as server, server.client() as client:
        run_id = client.post("/api/runs", json={"step": "slow"}).json()["run_id"]
        wait_for(lambda: client.get(f"/api/runs/{run_id}").json()["status"] == "running", 30,
                 what="the run to start")
        busy = client.patch("/api/steps/slow/state", json={"values": {"a": 1}})
        assert busy.status_code == 409 and "is running" in busy.json()["error"]["message"]
        wait_run(client, run_id)
        assert client.patch("/api/steps/slow/state", json={"values": {"a": 1}}).status_code == 200


# -- shutdown and restart --------------------------------------------------------------------------
def test_sigterm_lets_short_runs_finish_and_cancels_the_rest(steps_app):
    server = ServerProcess(steps_app, "--shutdown-timeout", "6")
    with server.client() as client:
        stuck = client.post("/api/runs", json={"step": "stuck"}).json()["run_id"]
        slow = client.post("/api/runs", json={"step": "slow"}).json()["run_id"]
        wait_for(lambda: all(client.get(f"/api/runs/{r}").json()["status"] == "running"
                             for r in (stuck, slow)), 30, what="both runs to start")
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    # while it drains, the API still answers: reads and the CLI work, triggers get 503
    with server.client() as client:
        wait_for(lambda: client.get("/api/health").json()["status"] == "stopping", 10,
                 what="the server to start draining")
        refused = client.post("/api/runs", json={"step": "chatty"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        rows = client.post("/api/tables/out/rows", json=[{"step": "late"}])
        assert rows.status_code == 503 and rows.headers["retry-after"] == "1"
        assert client.get(f"/api/runs/{stuck}").json()["status"] == "running"
    listed = cli("runs", str(steps_app))
    assert listed.returncode == 0 and stuck in listed.stdout, listed.stderr
    assert server.proc.wait(60) == 0  # the first signal did it all
    server.stop()
    assert time.monotonic() - started < 30
    assert not (steps_app / ".stepwell" / "server.json").exists()
    assert "stepwell server stopped" in server.output()
    store = open_store(None, steps_app)
    try:
        assert store.get_run(slow).status == "succeeded"
        record = store.get_run(stuck)
        assert record.status == "cancelled" and "server shut down" in record.error
        rows = store.query('select step from "out"').to_pylist()
        assert rows == [{"step": "slow"}]  # nothing of the cancelled run was kept
    finally:
        store.close()


def test_a_second_sigterm_cancels_running_steps_at_once(steps_app):
    server = ServerProcess(steps_app, "--shutdown-timeout", "120")
    with server.client() as client:
        stuck = client.post("/api/runs", json={"step": "stuck"}).json()["run_id"]
        wait_for(lambda: client.get(f"/api/runs/{stuck}").json()["status"] == "running", 30,
                 what="the run to start")
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: client.get("/api/health").json()["status"] == "stopping", 10,
                 what="the server to start draining")
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    server.stop()
    assert time.monotonic() - started < 30  # not the 120 s shutdown timeout
    store = open_store(None, steps_app)
    try:
        record = store.get_run(stuck)
        assert record.status == "cancelled" and "told to stop again" in record.error, record
    finally:
        store.close()


def test_restart_runs_what_was_queued_once(steps_app, store_url):
    with ThreadServer(steps_app, store_url=store_url, shutdown_timeout=30) as server, server.client() as client:
        first = client.post("/api/runs", json={"step": "slow"}).json()["run_id"]
        second = client.post("/api/runs", json={"step": "slow"}).json()["run_id"]
        wait_for(lambda: client.get(f"/api/runs/{first}").json()["status"] == "running", 30,
                 what="the first run")
    store = open_store(store_url, steps_app)
    try:
        assert store.get_run(first).status == "succeeded"  # finished within the timeout
        assert store.get_run(second).status == "queued"  # kept for the next start
    finally:
        store.close()
    with ThreadServer(steps_app, store_url=store_url) as server, server.client() as client:
        record = wait_run(client, second)
        assert record["status"] == "succeeded"
        assert server.ctx.scheduler.wait_idle(30)
        assert len(runs_of(client, "slow")) == 2


def test_rows_committed_during_the_drain_are_read_after_the_restart(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: slow
                node: slow.py
              - name: reader
                node: reader.py
                trigger: upstream
        """,
        "slow.py": """
            import time
            from patterns import Table
            time.sleep(1.5)
            Table("out", "w").append({"n": 1})
        """,
        "reader.py": """
            from patterns import Table
            copied = Table("copied", "w")
            for r in Table("out").as_stream().consume_records():
                copied.append({"n": r["n"]})
        """,
    })
    with ThreadServer(app, store_url=store_url, shutdown_timeout=30) as server, server.client() as client:
        slow = client.post("/api/runs", json={"step": "slow"}).json()["run_id"]
        wait_for(lambda: client.get(f"/api/runs/{slow}").json()["status"] == "running", 30,
                 what="the slow run")
    # slow committed while the server drained: its reader is queued for the next one
    store = open_store(store_url, app)
    try:
        assert store.get_run(slow).status == "succeeded"
        assert [r.status for r in store.list_runs(step="reader")] == ["queued"]
    finally:
        store.close()
    with ThreadServer(app, store_url=store_url) as server, server.client() as client:
        wait_for(lambda: [r["n"] for r in table_rows(client, "copied")] == [1], 60,
                 what="the reader after the restart")


def test_a_declared_table_nothing_wrote_yet_says_so(steps_app):
    with ThreadServer(steps_app) as server, server.client() as client:
        response = client.get("/api/tables/out")
        assert response.status_code == 404
        assert response.json()["error"]["message"].startswith(
            "table 'out' has no rows yet: the app names it")


def test_a_run_waiting_for_a_free_worker_can_be_cancelled(steps_app, store_url):
    with ThreadServer(steps_app, store_url=store_url, workers=1) as server, server.client() as client:
        busy = client.post("/api/runs", json={"step": "slow"}).json()["run_id"]
        waiting = client.post("/api/runs", json={"step": "chatty"}).json()["run_id"]
        wait_for(lambda: client.get(f"/api/runs/{busy}").json()["status"] == "running", 30,
                 what="the first run")
        # the API shows it queued (not running) while it waits for the worker
        step = client.get("/api/steps/chatty").json()
        assert step["running_run"] is None and step["queued_run"] == waiting, step
        health = client.get("/api/health").json()
        assert (health["running"], health["queued"]) == (1, 1), health
        stop = client.post(f"/api/runs/{waiting}/cancel")
        assert stop.status_code in (200, 202) and stop.json()["status"] == "cancelled", stop.text
        # gone from the step's status at once; a new trigger is the step's queued run
        assert client.get("/api/steps/chatty").json()["queued_run"] is None
        again = client.post("/api/runs", json={"step": "chatty"}).json()["run_id"]
        assert client.get("/api/steps/chatty").json()["queued_run"] == again
        wait_run(client, busy)
        assert server.ctx.scheduler.wait_idle(30)
        record = client.get(f"/api/runs/{waiting}").json()
        assert record["status"] == "cancelled" and record["started_at"] is None
        assert client.get(f"/api/runs/{again}").json()["status"] == "succeeded_no_data"


def test_a_queued_follow_up_keeps_its_wait_across_a_restart(steps_app, store_url):
    with ThreadServer(steps_app, store_url=store_url) as server, server.client() as client:
        first = client.post("/api/runs", json={"step": "again"}).json()["run_id"]
        wait_run(client, first)
        follow = wait_for(lambda: [r for r in runs_of(client, "again") if r["status"] == "queued"],
                          30, what="the queued follow-up")[0]
    store = open_store(store_url, steps_app)
    try:
        not_before = store.get_run(follow["id"]).info["not_before"]
        ended = store.get_run(first).ended_at.timestamp()
        assert not_before >= ended + 1.4  # wait_atleast_seconds=1.5, kept in the record
    finally:
        store.close()
    with ThreadServer(steps_app, store_url=store_url) as server, server.client() as client:
        record = wait_run(client, follow["id"])
        assert record["status"] in ("succeeded", "succeeded_no_data")
        started = dt.datetime.fromisoformat(record["started_at"]).timestamp()
        assert started >= not_before - 0.05  # not at once after the restart


# -- the CLI while a server runs ----------------------------------------------------------------------
def test_cli_goes_through_the_api_while_serving_with_the_same_output(tmp_path, pipeline):
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps([{"n": 10}, {"n": 20}]))
    app = str(pipeline)
    with ServerProcess(pipeline, env=_env()) as server:
        loaded = cli("load", app, "messages", str(rows_file), env=_env())
        assert loaded.returncode == 0, loaded.stderr
        assert "Loaded 2 rows into messages." in loaded.stdout
        with server.client() as client:
            wait_for(lambda: len(table_rows(client, "enriched")) == 2, 60, what="the upstream run")
            assert server.info["pid"] == client.get("/api/health").json()["pid"]
        ran = cli("run", app, "enrich", env=_env())
        assert ran.returncode == 0, ran.stderr
        assert "enrich" in ran.stdout and "succeeded" in ran.stdout
        commands = [
            ("tables", app, "--json"),
            ("table", app, "enriched", "--json"),
            ("table", app, "enriched"),
            ("runs", app, "--json"),
            ("state", app, "enrich"),
        ]
        remote = {c: cli(*c, env=_env()) for c in commands}
        run_id = json.loads(remote[("runs", app, "--json")].stdout)[0]["id"]
        remote[("logs",)] = cli("logs", app, run_id, env=_env())
        changed = cli("state", app, "enrich", "--set", "k=5", env=_env())
        assert json.loads(changed.stdout)["state"] == {"k": 5}
        missing = cli("table", app, "nope", env=_env())
        assert missing.returncode == 1
        assert "error: table 'nope' does not exist" in missing.stderr
        assert "Traceback" not in missing.stderr
    local = {c: cli(*c, env=_env()) for c in commands}
    local[("logs",)] = cli("logs", app, run_id, env=_env())
    for command, result in remote.items():
        assert result.returncode == 0, (command, result.stderr)
        expected = local[command]
        if command == ("state", app, "enrich"):
            assert json.loads(result.stdout)["stream_positions"] == json.loads(expected.stdout)["stream_positions"]
            continue
        assert result.stdout == expected.stdout, command
    assert len(json.loads(local[("table", app, "enriched", "--json")].stdout)) == 2


def test_cli_runs_limit_is_the_same_through_the_api(steps_app):
    now = dt.datetime.now(dt.UTC)
    store = open_store(None, steps_app)
    try:  # more runs than the API gives in one page
        store.create_runs([RunRecord(new_id(), "chatty", "succeeded", started_at=now, ended_at=now)
                           for _ in range(1005)])
    finally:
        store.close()
    app = str(steps_app)
    commands = [("runs", app, "--json", "--limit", "0"), ("runs", app, "--json", "--limit", "1003")]
    local = [cli(*c) for c in commands]
    with ThreadServer(steps_app):
        remote = [cli(*c) for c in commands]
    assert [(r.returncode, r.stdout, r.stderr) for r in remote] == [
        (r.returncode, r.stdout, r.stderr) for r in local]
    assert json.loads(local[0].stdout) == [] and len(json.loads(local[1].stdout)) == 1003


def test_ctrl_c_on_cli_run_cancels_the_run_on_the_server(steps_app):
    import subprocess
    import sys

    with ServerProcess(steps_app) as server, server.client() as client:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stepwell.cli", "run", str(steps_app), "stuck", "chatty"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            def running() -> str | None:
                runs = client.get("/api/runs", params={"step": "stuck"}).json()["runs"]
                return runs[0]["id"] if runs and runs[0]["status"] == "running" else None

            wait_for(running, 60, what="the run to start on the server")
            run_id = running()
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 130, err
        assert f"step 'stuck' cancelled (run {run_id})" in err and "later steps not run" in err
        assert client.get(f"/api/runs/{run_id}").json()["status"] == "cancelled"
        (chatty,) = client.get("/api/runs", params={"step": "chatty"}).json()["runs"]
        assert chatty["status"] == "succeeded_no_data"  # it came first (app order)


def test_ctrl_c_leaves_a_run_that_another_trigger_queued_too(steps_app):
    import subprocess
    import sys

    with ServerProcess(steps_app, "--workers", "1") as server, server.client() as client:
        busy = client.post("/api/runs", json={"step": "stuck"}).json()["run_id"]
        client.post("/api/runs", json={"step": "chatty"})  # handed on, waits for the worker
        queued = client.post("/api/runs", json={"step": "chatty"}).json()["run_id"]  # queued
        proc = subprocess.Popen(
            [sys.executable, "-m", "stepwell.cli", "run", str(steps_app), "chatty"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(3)  # it triggers chatty (merged into the queued run) and follows it
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 130, err
        assert f"run {queued} of step 'chatty' was queued by another trigger too" in err, err
        assert client.get(f"/api/runs/{queued}").json()["status"] == "queued"
        client.post(f"/api/runs/{busy}/cancel")
        wait_run(client, queued)
        assert client.get(f"/api/runs/{queued}").json()["status"] == "succeeded_no_data"


def test_cli_run_reports_failures_through_the_api(tmp_path):
    app = write_app(tmp_path / "fails", {
        "stepwell.yml": """
            steps:
              - name: boom
                node: boom.py
        """,
        "boom.py": "raise ValueError('bad input')\n",
    })
    with ServerProcess(app):
        result = cli("run", str(app))
    assert result.returncode == 1
    assert "error: step 'boom' failed:" in result.stderr and "bad input" in result.stderr


def test_a_second_server_for_the_same_app_is_refused(steps_app):
    with ServerProcess(steps_app) as server:
        result = cli("serve", str(steps_app), "--port", "0")
        assert result.returncode == 1
        assert f"a server already runs for this app at {server.url}" in result.stderr
        other = write_app(steps_app.parent / "other", {"stepwell.yml": "title: other\n"})
        taken = cli("serve", str(other), "--port", str(server.info["port"]))
        assert taken.returncode == 1
        assert f"cannot listen on 127.0.0.1:{server.info['port']}" in taken.stderr
        assert "choose another port with --port" in taken.stderr


def test_steps_run_in_parallel_beside_webhooks_on_one_store(tmp_path, store_url):
    steps = "".join(f"  - {{name: p{i}, node: produce.py, parameters: {{table: t{i}}}}}\n"
                    for i in range(3))
    files = {
        "stepwell.yml": "webhooks: [{name: ingest, table: inbox}]\nsteps:\n" + steps,
        "produce.py": """
            from patterns import Parameter, Table
            out = Table(Parameter("table"), "w")
            for batch in range(5):
                out.append([{"batch": batch, "k": k} for k in range(200)])
                out.flush()
        """,
    }
    app = write_app(tmp_path / "parallel", files)
    with ThreadServer(app, store_url=store_url, workers=3) as server, server.client() as client:
        tickets = [client.post("/api/runs", json={"step": f"p{i}"}).json() for i in range(3)]
        posted = 0
        while server.ctx.scheduler.counts()[0] or not posted:
            assert client.post("/api/webhooks/ingest", json=[{"n": posted}]).status_code == 202
            posted += 1
        runs = [wait_run(client, t["run_id"]) for t in tickets]
        assert [r["status"] for r in runs] == ["succeeded"] * 3
        starts = sorted(_iso(r["started_at"]) for r in runs)
        ends = sorted(_iso(r["ended_at"]) for r in runs)
        assert starts[-1] < ends[0]  # they really ran at the same time
        tables = {t["name"]: t["rows"] for t in client.get("/api/tables").json()["tables"]}
        assert tables == {"t0": 1000, "t1": 1000, "t2": 1000, "inbox": posted}


def test_a_stale_server_file_is_ignored_and_removed(steps_app):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = steps_app / ".stepwell" / "server.json"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps({"url": "http://127.0.0.1:9", "host": "127.0.0.1", "port": 9,
                                "pid": dead.pid, "token_path": "", "store_key": "x",
                                "started_at": "2020-01-01T00:00:00+00:00",
                                "app_root": str(steps_app)}))
    result = cli("tables", str(steps_app), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert not info.exists()


def test_a_server_file_copied_from_another_app_is_not_its_server(steps_app, tmp_path):
    other = write_app(tmp_path / "other", {"stepwell.yml": "steps:\n  - {name: own, node: own.py}\n",
                                           "own.py": "print('own step')\n"})
    with ThreadServer(steps_app):
        (other / ".stepwell").mkdir()
        shutil.copy(steps_app / ".stepwell" / "server.json", other / ".stepwell")  # a copied folder
        ran = cli("run", str(other), "own")  # (the other app's server has no step 'own')
        assert ran.returncode == 0, ran.stderr
        runs = json.loads(cli("runs", str(other), "--json").stdout)
        assert [r["step"] for r in runs] == ["own"]


def test_a_killed_server_leaves_nothing_half_committed(steps_app):
    server = ServerProcess(steps_app)
    with server.client() as client:
        run_id = client.post("/api/runs", json={"step": "stuck"}).json()["run_id"]
        with client.stream("GET", f"/api/runs/{run_id}/events") as stream:
            for line in stream.iter_lines():
                if "wrote a row" in line:
                    break
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    assert (steps_app / ".stepwell" / "server.json").exists()  # stale now
    with ThreadServer(steps_app) as restarted, restarted.client() as client:
        record = client.get(f"/api/runs/{run_id}").json()
        assert record["status"] == "killed" and "stopped while this run was in progress" in record["error"]
        assert table_rows(client, "out") == []
        assert [r["id"] for r in runs_of(client)] == [run_id]  # nothing ran it again
