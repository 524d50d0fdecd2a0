"""Node steps (Patterns style) end to end: real worker processes, real stores."""

from __future__ import annotations

import json
import re

import pytest
from apputil import NULL_ORDER_APP, app_runner, logs, rows, run_app, write_app


@pytest.fixture(params=["duckdb", "postgres"])
def store_url(request):
    if request.param == "duckdb":
        return None
    return request.getfixturevalue("make_pg_database")()


PIPELINE = {
    "stepwell.yml": """
        title: pipeline
        tables:
          - name: messages
          - name: enriched
        steps:
          - name: produce
            node: produce.py
            parameters: {count: 5}
          - name: enrich
            node: enrich.py
            parameters: {label: hello}
    """,
    "produce.py": """
        from patterns import Parameter, State, Table
        out = Table("messages", "w")
        state = State()
        count = Parameter("count", type=int)
        start = state.get_value("next", 0)
        out.append([{"n": start + i, "text": f"m{start + i}"} for i in range(count)])
        state.set_value("next", start + count)
    """,
    "enrich.py": """
        from stepwell import Parameter, State, Table
        messages = Table("messages")
        enriched = Table("enriched", mode="w")
        label = Parameter("label")
        state = State()
        seen = state.get_value("seen", 0)
        for record in messages.as_stream().consume_records():
            record["label"] = label
            record["double"] = record["n"] * 2
            enriched.append(record)
            seen += 1
        state.set_value("seen", seen)
        print(f"seen={seen}")
    """,
}


def test_rows_in_counts_the_rows_a_stream_handed_to_the_code(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: make
                node: make.py
              - name: some
                node: some.py
        """,
        "make.py": """
            from patterns import Table
            Table("items", "w").append([{"n": n} for n in range(50)])
        """,
        "some.py": """
            from patterns import Table
            out = Table("taken", "w")
            taken = 0
            for row in Table("items").as_stream():
                out.append({"n": row["n"]})
                taken += 1
                if taken == 10:
                    break  # the rest of the batch was sent, and is left for the next run
        """,
    })
    make, first = run_app(app, store_url)
    assert (first.status, first.rows_in, first.rows_out) == ("succeeded", 10, 10)
    (second,) = run_app(app, store_url, steps=["some"])
    assert (second.rows_in, second.rows_out) == (10, 10)
    assert [r["n"] for r in rows(app, "taken", store_url, order_by="n")] == list(range(20))


def test_stream_processes_each_row_once_across_runs(tmp_path, store_url):
    app = write_app(tmp_path / "app", PIPELINE)
    first = run_app(app, store_url)
    assert [r.status for r in first] == ["succeeded", "succeeded"]
    assert [(r.rows_in, r.rows_out) for r in first] == [(0, 5), (5, 5)]
    second = run_app(app, store_url)
    assert [(r.rows_in, r.rows_out) for r in second] == [(0, 5), (5, 5)]
    third = run_app(app, store_url, steps=["enrich"])
    assert third[0].status == "succeeded_no_data"
    out = rows(app, "enriched", store_url, order_by="n")
    assert [r["n"] for r in out] == list(range(10))
    assert {r["label"] for r in out} == {"hello"}
    assert [r["double"] for r in out] == [2 * n for n in range(10)]
    assert logs(app, second[1].id, store_url)[-1] == "seen=10"
    ids = [r["patterns_id"] for r in out]
    assert all(re.fullmatch(r"[0-9a-hjkmnp-tv-z]{26}", i) for i in ids)
    assert len(set(ids)) == 10
    # patterns_id is the default stream order and is monotonic in write order
    produced = rows(app, "messages", store_url, order_by="patterns_id")
    assert [r["n"] for r in produced] == list(range(10))


def test_each_scan_request_carries_a_batch_and_says_when_it_is_the_last(tmp_path, monkeypatch):
    """A small input costs one round trip (not open, batch, end); a large one
    one request per batch; every row arrives once, in order."""
    from stepwell.engine.worker_session import WorkerSession

    requests: list[str] = []
    dispatch = WorkerSession._dispatch

    def counted(self, op, message, body):
        if str(op).startswith("scan"):
            requests.append(op)
        return dispatch(self, op, message, body)

    monkeypatch.setattr(WorkerSession, "_dispatch", counted)
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: produce
                node: produce.py
              - name: small
                node: small.py
              - name: large
                node: large.py
        """,
        "produce.py": """
            from patterns import Table
            Table("few", "w").append([{"n": i} for i in range(3)])
            Table("many", "w").append([{"n": i} for i in range(25_000)])
        """,
        "small.py": """
            from patterns import Table
            print([r["n"] for r in Table("few").as_stream().consume_records()])
        """,
        "large.py": """
            from patterns import Table
            chunks = list(Table("many").read(chunksize=10_000))
            values = [r["n"] for chunk in chunks for r in chunk]
            print(len(chunks), values == list(range(25_000)))
        """,
    })  # fmt: skip
    produce, small, large = run_app(app)
    assert [r.status for r in (produce, small, large)] == ["succeeded"] * 3
    assert logs(app, small.id) == ["[0, 1, 2]"] and small.rows_in == 3
    assert logs(app, large.id) == ["3 True"] and large.rows_in == 25_000
    assert requests == ["scan_open", "scan_open", "scan_next", "scan_next"]


def test_failing_node_leaves_nothing_after_last_commit_point(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: produce
                node: produce.py
              - name: copy
                node: copy.py
        """,
        "produce.py": """
            from patterns import Table
            Table("src", "w").append([{"i": i} for i in range(10)])
        """,
        "copy.py": """
            from patterns import State, Table
            src = Table("src")
            dst = Table("dst", "w")
            state = State()
            stream = src.as_stream(order_by="i")
            for record in stream.consume_records():
                dst.append(record)
                state.set_value("last", record["i"])
                if record["i"] == 3:
                    stream.checkpoint()
                if record["i"] == 6:
                    try:
                        {}["config"]
                    except KeyError as exc:
                        raise RuntimeError("boom at six") from exc
        """,
    })
    runs = run_app(app, store_url)
    failed = runs[1]
    assert failed.status == "failed"
    assert "RuntimeError: boom at six" in failed.error
    assert "copy.py:15" in failed.error
    assert 'File "copy.py", line 15' in failed.traceback
    # the cause comes first, as Python prints it
    cause, _, effect = failed.traceback.partition("The above exception was the direct cause")
    assert 'File "copy.py", line 13' in cause and "KeyError: 'config'" in cause
    assert "RuntimeError: boom at six" in effect
    assert "stepwell" not in failed.traceback.replace("stepwell.yml", "")
    assert [r["i"] for r in rows(app, "dst", store_url, order_by="i")] == [0, 1, 2, 3]
    # the next run continues from the commit point: 4..9 once, nothing twice
    write_app(app, {"copy.py": """
        from patterns import Table
        dst = Table("dst", "w")
        for record in Table("src").as_stream(order_by="i").consume_records():
            dst.append(record)
    """})
    run_app(app, store_url, steps=["copy"])
    assert [r["i"] for r in rows(app, "dst", store_url, order_by="i")] == list(range(10))


def test_upsert_reset_and_versions(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: write
                node: write.py
        """,
        "write.py": """
            from patterns import State, Table
            t = Table("people", "w")
            t.init(unique_on="id")
            state = State()
            n = state.get_value("n", 0)
            if n == 0:
                t.upsert([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 1, "name": "a2"}])
            elif n == 1:
                t.upsert({"id": 2, "name": "b2"})
                t.upsert({"id": 3, "name": "c"})
            else:
                t.reset()
                t.append({"id": 9, "name": "fresh"})
            state.set_value("n", n + 1)
        """,
    })
    run_app(app, store_url)
    assert [(r["id"], r["name"]) for r in rows(app, "people", store_url, "id")] == [(1, "a2"), (2, "b")]
    run_app(app, store_url)
    assert [(r["id"], r["name"]) for r in rows(app, "people", store_url, "id")] == [
        (1, "a2"), (2, "b2"), (3, "c")]
    run_app(app, store_url)
    assert [(r["id"], r["name"]) for r in rows(app, "people", store_url, "id")] == [(9, "fresh")]
    from stepwell.store import open_store

    store = open_store(store_url, app)
    try:
        versions = store.table_versions("people")
        assert [v.version for v in versions][-2:] == [1, 2]
        assert [v.active for v in versions][-2:] == [False, True]
        assert [v.row_count for v in versions][-2:] == [3, 1]
    finally:
        store.close()


def test_stream_restarts_after_input_reset(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: source
                node: source.py
              - name: sink
                node: sink.py
        """,
        "source.py": """
            from patterns import State, Table
            t = Table("src", "w")
            s = State()
            n = s.get_value("n", 0)
            if n == 1:
                t.replace([{"v": "new"}])
            else:
                t.append([{"v": "old"}])
            s.set_value("n", n + 1)
        """,
        "sink.py": """
            from patterns import Table
            out = Table("seen", "w")
            for r in Table("src").as_stream().consume_records():
                out.append({"v": r["v"]})
        """,
    })
    run_app(app)
    run_app(app)
    assert sorted(r["v"] for r in rows(app, "seen")) == ["new", "old"]


def test_ties_in_order_by_are_broken_by_patterns_id(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: source
                node: source.py
              - name: sink
                node: sink.py
        """,
        "source.py": """
            from patterns import Table
            Table("events", "w").append([{"day": i // 10, "n": i} for i in range(50)])
        """,
        "sink.py": """
            from patterns import State, Table
            out = Table("seen", "w")
            state = State()
            # take 7 rows per run: the cut falls inside groups of equal `day`
            taken = 0
            for r in Table("events").as_stream(order_by="day").consume_records():
                out.append({"n": r["n"]})
                taken += 1
                if taken == 7:
                    state.request_new_run()
                    break
        """,
    })
    runs = run_app(app, store_url)
    assert len(runs) == 1 + 8  # source, then sink runs until the stream is drained
    assert sorted(r["n"] for r in rows(app, "seen", store_url)) == list(range(50))


def test_rollback_rewind_seek_and_consume_with_rollback(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: source
                node: source.py
              - name: sink
                node: sink.py
        """,
        "source.py": """
            from patterns import Table
            Table("nums", "w").append([{"n": i} for i in range(6)])
        """,
        "sink.py": """
            from patterns import State, Table
            out = Table("log", "w")
            state = State()
            phase = state.get_value("phase", 0)
            stream = Table("nums").as_stream(order_by="n")
            if phase == 0:
                # consume two, write, then roll back: nothing written, nothing consumed
                for r in stream.consume_records():
                    out.append({"phase": 0, "n": r["n"]})
                    if r["n"] == 1:
                        break
                stream.rollback()
                state.set_value("phase", 1)
                state.set_value("rolled_back", True)
            elif phase == 1:
                with stream.consume_with_rollback() as records:
                    for r in records:
                        out.append({"phase": 1, "n": r["n"]})
                        if r["n"] == 3:
                            state.set_value("phase", 2)
                            raise ValueError("bad record 3")
            elif phase == 2:
                stream.seek(4)
                for r in stream.consume_records():
                    out.append({"phase": 2, "n": r["n"]})
                state.set_value("phase", 3)
            else:
                stream.rewind()
                for r in stream.consume_records():
                    out.append({"phase": 3, "n": r["n"]})
                state.set_value("phase", 4)
        """,
    })
    run_app(app)
    assert rows(app, "log") == []
    from stepwell.store import open_store

    store = open_store(None, app)
    assert store.get_state("sink") == {"phase": 1, "rolled_back": True}
    store.close()
    failed = run_app(app, steps=["sink"])[0]
    assert failed.status == "failed" and "bad record 3" in failed.error
    # rows 0..2 were done: what they wrote is kept and they are not read again; the
    # failing row's own writes and state change are dropped, and it comes again
    done = [{"phase": 1, "n": n} for n in range(3)]
    assert [{k: r[k] for k in ("phase", "n")} for r in rows(app, "log", order_by="n")] == done
    again = run_app(app, steps=["sink"])[0]  # phase is still 1: row 3 raises again
    assert again.status == "failed"
    assert len(rows(app, "log")) == 3


@pytest.mark.parametrize("row_also", ["counts in state", "truncates a table", "reads a second stream"])
def test_consume_with_rollback_keeps_the_rows_done_before_the_failing_one(tmp_path, row_also):
    """Each row done counts as committed; where the failing row already changed the
    store (a truncate) or a second stream is read, the block goes back to the last
    commit point instead, so nothing is half kept."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: source\n    node: source.py\n"
                        "  - name: sink\n    node: sink.py\n",
        "source.py": """
            from patterns import Table
            Table("nums", "w").append([{"n": i} for i in range(6)])
            Table("other", "w").append([{"n": i} for i in range(2)])
        """,
        "sink.py": f"""
            from patterns import State, Table
            out, scratch, state = Table("out", "w"), Table("scratch", "w"), State()
            mode = {row_also!r}
            if mode == "reads a second stream":
                list(Table("other").as_stream().consume_records())
            with Table("nums").as_stream(order_by="n").consume_with_rollback() as records:
                for r in records:
                    out.append({{"n": r["n"]}})
                    state.set_value("count", state.get_value("count", 0) + 1)
                    if r["n"] == 3:
                        if mode == "truncates a table":
                            scratch.truncate()
                        raise ValueError("bad record 3")
        """,
    })
    run_app(app, steps=["source"])
    failed = run_app(app, steps=["sink"])[0]
    assert failed.status == "failed" and "bad record 3" in failed.error
    written = sorted(r["n"] for r in rows(app, "out"))
    from stepwell.store import open_store

    store = open_store(None, app)
    try:
        state = store.get_state("sink")
    finally:
        store.close()
    if row_also == "counts in state":
        assert written == [0, 1, 2] and state == {"count": 3}
        assert failed.rows_out == 3 and failed.rows_in > 0  # what its commit counted
    else:  # back to the last commit point (the start of the run)
        assert written == [] and state == {}


def test_seek_and_rewind(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: source
                node: source.py
              - name: sink
                node: sink.py
        """,
        "source.py": """
            from patterns import Table
            Table("nums", "w").append([{"n": i} for i in range(6)])
        """,
        "sink.py": """
            from patterns import State, Table
            out = Table("log", "w")
            state = State()
            run = state.get_value("run", 0)
            stream = Table("nums").as_stream(order_by="n")
            if run == 0:
                stream.seek(3)
            elif run == 2:
                stream.rewind()
            for r in stream.consume_records():
                out.append({"run": run, "n": r["n"]})
            state.set_value("run", run + 1)
        """,
    })
    run_app(app)
    run_app(app, steps=["sink"])
    run_app(app, steps=["sink"])
    got = sorted((r["run"], r["n"]) for r in rows(app, "log"))
    assert got == [(0, 4), (0, 5)] + [(2, n) for n in range(6)]


def test_read_sql_only_over_own_tables(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: source
                node: source.py
              - name: query
                node: query.py
              - name: sneaky
                node: sneaky.py
        """,
        "source.py": """
            from patterns import Table
            Table("orders", "w").append([{"c": "a", "v": 1}, {"c": "a", "v": 2}, {"c": "b", "v": 5}])
            Table("secret_table", "w").append({"x": 1})
        """,
        "query.py": """
            from patterns import Table
            orders = Table("orders")
            out = Table("totals", "w")
            result = orders.read_sql(f"select c, sum(v) as total from {orders} group by c order by c")
            out.append(result)
            df = orders.read_sql("select count(*) as n from orders", as_format="dataframe")
            print("count", int(df["n"][0]))
        """,
        "sneaky.py": """
            from patterns import Table
            orders = Table("orders")
            orders.read_sql("select * from secret_table")
        """,
    })
    runs = run_app(app, store_url)
    assert [r.status for r in runs] == ["succeeded", "succeeded", "failed"]
    assert [(r["c"], int(r["total"])) for r in rows(app, "totals", store_url, "c")] == [("a", 3), ("b", 5)]
    assert "count 3" in logs(app, runs[1].id, store_url)
    assert "secret_table" in runs[2].error and "not one of this step's tables" in runs[2].error


def test_ports_map_code_names_to_app_tables(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: source
                node: source.py
                outputs: {out: raw_events}
              - name: sink
                node: sink.py
                inputs: {events: raw_events}
                outputs: {result: final}
        """,
        "source.py": """
            from patterns import Table
            Table("out", "w").append({"k": 1})
        """,
        "sink.py": """
            from patterns import Table
            res = Table("result", "w")
            for r in Table("events").as_stream().consume_records():
                res.append({"k": r["k"] + 1})
        """,
    })
    assert [r.status for r in run_app(app)] == ["succeeded", "succeeded"]
    assert [r["k"] for r in rows(app, "raw_events")] == [1]
    assert [r["k"] for r in rows(app, "final")] == [2]


def test_relative_imports_dataframes_and_no_monotonic_id(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: node
                node: nodes/node.py
        """,
        "__init__.py": "",
        "nodes/__init__.py": "",
        "common.py": "def shout(x):\n    return x.upper()\n",
        "nodes/helpers.py": "FACTOR = 10\n",
        "nodes/node.py": """
            import pandas as pd
            from patterns import Table
            from .. import common
            from .helpers import FACTOR
            t = Table("plain", "w")
            t.init(add_monotonic_id=None)
            t.append(pd.DataFrame({"word": [common.shout("a"), common.shout("b")], "v": [FACTOR, 2 * FACTOR]}))
            df = Table("plain").read_dataframe()
            print("rows before commit", len(df))
        """,
    })
    run = run_app(app)[0]
    assert run.status == "succeeded", run.error
    got = rows(app, "plain", order_by="v")
    assert got == [{"word": "A", "v": 10}, {"word": "B", "v": 20}]


def test_parameters_types_defaults_and_secrets(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: params
                node: params.py
                parameters:
                  n: "42"
                  ratio: 0.5
                  flag: "true"
                  names: "a, b"
                  api_key: "${{ secrets.api_key }}"
        """,
        "params.py": """
            from datetime import date, datetime
            from patterns import Connection, Parameter, Table
            values = {
                "n": Parameter("n", type=int),
                "ratio": Parameter("ratio", type=float),
                "flag": Parameter("flag", type=bool),
                "names": Parameter("names", type=list),
                "since": Parameter("since", type=datetime, default="2000-01-02"),
                "day": Parameter("day", type=date, default="2001-02-03"),
                "missing_ok": Parameter("missing_ok", default=None),
            }
            key = Parameter("api_key", description="service key")
            print("the key is", key)
            Table("out", "w").append({k: str(v) for k, v in values.items()} | {"key_len": len(key)})
        """,
    })
    run = run_app(app, environ={"STEPWELL_SECRET_API_KEY": "sk-very-secret-123"})[0]
    assert run.status == "succeeded", run.error
    (row,) = rows(app, "out")
    assert row["n"] == "42" and row["ratio"] == "0.5" and row["flag"] == "True"
    assert row["names"] == "['a', 'b']"
    assert row["since"] == "2000-01-02 00:00:00" and row["day"] == "2001-02-03"
    assert row["missing_ok"] == "None" and row["key_len"] == 18
    lines = logs(app, run.id)
    assert "the key is ***" in lines
    assert not any("sk-very-secret-123" in line for line in lines)


def test_a_parameter_the_code_never_reads_is_warned_about(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: p
                node: p.py
                parameters: {limt: 3, used: 1}
        """,
        "p.py": """
            from patterns import Parameter
            print("limit", Parameter("limit", type=int, default=5), Parameter("used"))
        """,
    })
    run = run_app(app)[0]
    assert run.status == "succeeded_no_data", run.error
    lines = logs(app, run.id)
    assert "limit 5 1" in lines
    (warning,) = [line for line in lines if "never read" in line]
    assert "parameter 'limt' is set for step 'p'" in warning
    assert "the code read 'limit'" in warning


def test_missing_parameter_and_missing_secret_are_clear(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: a
                node: a.py
              - name: b
                node: a.py
                parameters: {token: "${{ secrets.nope }}"}
        """,
        "a.py": """
            from patterns import Parameter
            Parameter("token")
        """,
    })
    a, b = run_app(app, environ={})
    assert a.status == "failed"
    assert "parameter 'token' has no value" in a.error
    assert b.status == "failed" and "nope" in b.error


def test_bad_records_types_and_unserialisable_values(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: good
                node: good.py
              - name: conflict
                node: conflict.py
              - name: mixed
                node: mixed.py
              - name: weird
                node: weird.py
        """,
        "good.py": """
            from patterns import Table
            Table("t", "w").append({"a": 1, "b": "x"})
        """,
        "conflict.py": """
            from patterns import Table
            Table("t", "w").append({"a": "not a number"})
        """,
        "mixed.py": """
            from patterns import Table
            Table("u", "w").append([{"a": 1}, {"a": 2}, {"a": "three"}])
        """,
        "weird.py": """
            from patterns import Table
            Table("v", "w").append([{"a": 1}, {"a": object()}])
        """,
    })
    good, conflict, mixed, weird = run_app(app, store_url)
    assert good.status == "succeeded"
    assert conflict.status == "failed" and "'t'" in conflict.error and "'a'" in conflict.error
    assert mixed.status == "failed" and "row 2" in mixed.error and "field 'a'" in mixed.error
    assert weird.status == "failed" and "row 1" in weird.error and "object" in weird.error
    assert rows(app, "t", store_url) and len(rows(app, "t", store_url)) == 1
    assert rows(app, "u", store_url) == [] and rows(app, "v", store_url) == []


def test_json_values_nested_records(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: n\n    node: n.py\n",
        "n.py": """
            from decimal import Decimal
            from datetime import datetime, timezone
            from patterns import Table
            t = Table("docs", "w")
            t.append({"id": 1, "doc": {"a": [1, 2]}, "price": Decimal("1.50"),
                      "at": datetime(2026, 1, 1, tzinfo=timezone.utc)})
            t.append({"id": 2, "doc": {"b": "x"}, "price": Decimal("2.25"),
                      "at": datetime(2026, 1, 2, tzinfo=timezone.utc)})
        """,
    })
    run = run_app(app, store_url)[0]
    assert run.status == "succeeded", run.error
    got = rows(app, "docs", store_url, "id")
    import json

    assert [json.loads(r["doc"]) if isinstance(r["doc"], str) else r["doc"] for r in got] == [
        {"a": [1, 2]}, {"b": "x"}]
    assert str(got[1]["price"]) in ("2.25", "2.250")


def test_a_value_nested_too_deeply_is_refused_naming_row_and_field(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: n\n    node: n.py\n    memory: 1GiB\n",
        "n.py": """
            from patterns import Table
            def nest(levels):
                value = 1
                for _ in range(levels):
                    value = {"k": value}
                return value
            t = Table("docs", "w")
            t.append({"id": 1, "doc": nest(100)})  # as deep as a value may be
            t.append({"id": 2, "doc": nest(5000)})
        """,
    })
    run = run_app(app)[0]
    assert run.status == "failed"
    assert run.error.startswith("RecordError: table 'docs', row 1, field 'doc': the value is "
                                "nested more than 100 levels deep"), run.error


@pytest.mark.parametrize(("value", "problem"), [
    ('Decimal("NaN")', "Decimal NaN is not a number a column can hold; write None, or a float"),
    ('"a\\udcffb"', "the text is not valid Unicode (surrogates not allowed at position 1"),
])
def test_values_of_a_storable_type_that_cannot_be_stored(tmp_path, value, problem):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: n\n    node: n.py\n",
        "n.py": f"""
            from decimal import Decimal
            from patterns import Table
            Table("t", "w").append([{{"v": Decimal("1.5") if {value!r}.startswith("Dec") else "ok"}},
                                    {{"v": {value}}}])
        """,
    })
    (run,) = run_app(app)
    assert run.status == "failed"
    assert run.error.startswith(f"RecordError: table 't', row 1, field 'v': {problem}"), run.error
    assert "(in the rows written from n.py:3 on)" in run.error  # (checked when sent, at the end)


def test_bytes_written_to_sys_stdout_buffer_reach_the_log(tmp_path):
    """`sys.stdout.buffer` (used by code and libraries writing bytes) was missing:
    AttributeError: 'LogStream' object has no attribute 'buffer'."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: n\n    node: n.py\n",
        "n.py": """
            import sys
            assert sys.stdout.encoding == "utf-8"
            sys.stdout.buffer.write("caf\u00e9 ".encode()[:4])  # a character split over writes
            sys.stdout.buffer.write("caf\u00e9 ".encode()[4:] + b"\\xff\\n")
            sys.stderr.buffer.write(b"to stderr\\n")
            sys.stdout.buffer.flush()
            print("after")
        """,
    })
    (run,) = run_app(app)
    assert run.status == "succeeded_no_data", run.error
    assert logs(app, run.id) == ["caf\u00e9 \ufffd", "to stderr", "after"]


def test_printing_from_a_signal_handler_or_del_while_printing(tmp_path):
    """A print that starts inside another print (a signal handler, a __del__ run by
    the garbage collector) neither deadlocks nor loses or repeats a line; nor do
    threads printing at once."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: p\n    node: p.py\n    timeout: 30s\n",
        "p.py": """
            import signal, threading

            class Cycle:
                def __init__(self):
                    self.me = self
                def __del__(self):
                    print("collected")

            signal.signal(signal.SIGALRM, lambda *_: print("alarm"))
            signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
            for i in range(3000):
                Cycle()
                print(f"main {i}")
            signal.setitimer(signal.ITIMER_REAL, 0)

            def chatter(t):
                for i in range(500):
                    print(f"thread {t} {i}")

            threads = [threading.Thread(target=chatter, args=(t,)) for t in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print("END")
        """,
    })
    (run,) = run_app(app)
    assert run.status == "succeeded_no_data", run.error
    lines = logs(app, run.id)
    assert lines[-1] == "END"
    # (a handler may print between print()'s text and its newline, as on a terminal:
    # "main 7alarm"; each line is there once, in order)
    text = "\n".join(lines)
    assert [int(i) for i in re.findall(r"main (\d+)", text)] == list(range(3000))
    threaded = re.findall(r"thread \d+ \d+", text)
    assert sorted(threaded) == sorted(f"thread {t} {i}" for t in range(8) for i in range(500))


def test_killed_worker_and_timeout(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: suicide
                node: suicide.py
              - name: slow
                node: slow.py
                timeout: 1s
              - name: graceful
                node: graceful.py
                timeout: 3s
        """,
        "suicide.py": """
            import os, signal
            from patterns import Table
            Table("k", "w").append({"a": 1})
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        "slow.py": """
            import time
            from patterns import Table
            Table("s", "w").append({"a": 1})
            print("first")
            print("sleeping now")  # right after another line: sent by the log's thread
            time.sleep(30)
        """,
        "graceful.py": """
            import time
            from patterns import State, Table
            state = State()
            n = 0
            while state.should_continue(pct_of_limit=0.3):
                time.sleep(0.05)
                n += 1
            Table("g", "w").append({"loops": n})
        """,
    })
    suicide, slow, graceful = run_app(app)
    assert suicide.status == "killed" and "SIGKILL, not by a stepwell limit" in suicide.error
    assert slow.status == "timed_out"
    # the error says where the code was when the limit passed; the traceback too
    assert slow.error == "the step exceeded its time limit (timeout 1s); it was stopped at slow.py:6"
    assert 'File "slow.py", line 6' in slow.traceback and "TimeLimitReached" in slow.traceback
    # what it printed just before it hung reached the log
    assert logs(app, slow.id) == ["first", "sleeping now"]
    assert graceful.status == "succeeded", graceful.error
    assert rows(app, "k") == [] and rows(app, "s") == []
    assert 5 < rows(app, "g")[0]["loops"] < 40


def test_sql_step_with_patterns_templates(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: source
                node: source.py
              - name: summary
                sql: summary.sql
                output: summary
              - name: bad
                sql: bad.sql
                output: nothing
              - name: early
                sql: early.sql
                output: nothing2
        """,
        "source.py": """
            from patterns import Table
            Table("sales", "w").append([{"c": "x", "v": 1}, {"c": "x", "v": 2}, {"c": "y", "v": 3}])
        """,
        "summary.sql": "select c, sum(v) as total from {{ Table(\"sales\") }} group by c order by c\n",
        "bad.sql": "delete from sales\n",
        "early.sql": "select * from {{ Table(\"later\") }}\n",
    })
    (early,) = run_app(app, store_url, steps=["early"])
    assert early.status == "failed"  # the database's words were 'Catalog Error: ... pg_sequences'
    assert early.error == ("early.sql: table 'later' does not exist yet (nothing "
                           "has written it): run the step that writes it first, or load rows "
                           "into it with `stepwell load`")
    runs = run_app(app, store_url, steps=["source", "summary", "bad"])
    assert [r.status for r in runs] == ["succeeded", "succeeded", "failed"]
    assert [(r["c"], int(r["total"])) for r in rows(app, "summary", store_url, "c")] == [("x", 3), ("y", 3)]
    assert "only SELECT" in runs[2].error and "bad.sql" in runs[2].error
    run_app(app, store_url, steps=["source", "summary"])
    assert [(r["c"], int(r["total"])) for r in rows(app, "summary", store_url, "c")] == [("x", 6), ("y", 6)]


def test_common_model_schema_fixes_column_types_and_keys(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            schemas:
              - schema_file: schemas/Payment.yml
            tables:
              - name: payments
                schema: Payment
            steps:
              - name: pay
                node: pay.py
              - name: loose
                node: loose.py
              - name: keyed
                node: keyed.py
        """,
        "schemas/Payment.yml": """
            name: Payment
            unique_on: [payment_id]
            fields:
              payment_id: {type: Integer}
              amount:
                type: Decimal(12,2)
              paid_on: {type: Date}
              note: {type: Text}
        """,
        "pay.py": """
            from patterns import Table
            t = Table("payments", "w")
            t.upsert([{"payment_id": 1, "amount": 10, "paid_on": "2026-01-02", "note": "five"},
                      {"payment_id": 1, "amount": 12.5, "paid_on": "2026-01-03", "note": "x"}])
        """,
        "loose.py": """
            from patterns import Table
            Table("other", "w", schema="Payment").append({"payment_id": 7, "amount": 1.25})
            Table("bad", "w", schema="Nope").append({"a": 1})
        """,
        "keyed.py": """
            from patterns import Table
            t = Table("keyed", "w", schema="Payment")  # its keys come from the schema
            t.append({"payment_id": 7, "amount": 1.25})
            t.upsert({"payment_id": 7, "amount": 2.5})
        """,
    })
    pay, loose, keyed = run_app(app, store_url)
    assert keyed.status == "succeeded", keyed.error
    assert [str(r["amount"]) for r in rows(app, "keyed", store_url)] == ["2.50"]
    assert pay.status == "succeeded", pay.error
    (row,) = rows(app, "payments", store_url)
    assert row["payment_id"] == 1 and str(row["amount"]) == "12.50"
    assert str(row["paid_on"]) == "2026-01-03" and row["note"] == "x"
    from stepwell.store import open_store

    store = open_store(store_url, app)
    try:
        columns = {c.name: c.type for c in store.table_info("payments").columns}
        assert columns["amount"] == "decimal(12,2)" and columns["paid_on"] == "date"
    finally:
        store.close()
    assert loose.status == "failed" and "schema='Nope'" in loose.error
    assert rows(app, "other", store_url) == []


def test_state_and_positions_are_written_only_when_they_change(tmp_path, store_url, monkeypatch):
    from stepwell.store.sql import SQLTransaction

    writes: list[str] = []
    for name in ("set_state", "set_position", "replace_positions"):
        original = getattr(SQLTransaction, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            writes.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(SQLTransaction, name, counted)
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: produce
                node: produce.py
              - name: count
                node: count.py
        """,
        "produce.py": """
            import os
            from patterns import Table
            out = Table("seen", "w")
            if os.path.exists("produce"):
                out.append([{"x": i} for i in range(3)])
        """,
        "count.py": """
            import os
            from patterns import State, Table
            state = State()
            rows = list(Table("seen").as_stream().consume_records())
            if os.path.exists("bump"):
                state.set_value("bumps", state.get_value("bumps", 0) + 1)
            print(f"rows={len(rows)} bumps={state.get_value('bumps', 0)}")
        """,
    })  # fmt: skip

    def run(*flags: str) -> list[str]:
        for flag in ("bump", "produce"):
            (app / flag).unlink(missing_ok=True)
            if flag in flags:
                (app / flag).write_text("")
        writes.clear()
        results = run_app(app, store_url)
        assert all(r.status.startswith("succeeded") for r in results), results
        return [line for line in logs(app, results[-1].id, store_url) if line.startswith("rows=")]

    assert run("produce", "bump") == ["rows=3 bumps=1"]
    assert sorted(set(writes)) == ["replace_positions", "set_state"]
    assert run() == ["rows=0 bumps=1"] and writes == []  # nothing changed: nothing written
    assert run("produce") == ["rows=3 bumps=1"]
    assert "replace_positions" in writes and "set_state" not in writes
    assert run("bump") == ["rows=0 bumps=2"] and writes == ["set_state"]
    assert run() == ["rows=0 bumps=2"] and writes == []


def test_json_fields_read_back_as_python_values(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: write
                node: write.py
              - name: read
                node: read.py
        """,
        "write.py": """
            from patterns import Table
            Table("docs", "w").append([{"k": 1, "payload": {"a": [1, 2], "b": None}},
                                       {"k": 2, "payload": None}])
        """,
        "read.py": """
            import json
            from patterns import Table
            docs = Table("docs")
            seen = {
                "read": [r["payload"] for r in docs.read()],
                "stream": [r["payload"] for r in docs.as_stream().consume_records()],
                "sql": [r["payload"] for r in docs.read_sql('select payload from docs order by k')],
                "frame": list(docs.read(as_format="dataframe")["payload"]),
            }
            print("SEEN " + json.dumps(seen))
        """,
    })  # fmt: skip
    write, read = run_app(app, store_url)
    assert read.status == "succeeded", read.error
    (line,) = [m for m in logs(app, read.id, store_url) if m.startswith("SEEN ")]
    seen = json.loads(line[len("SEEN "):])
    expected = [{"a": [1, 2], "b": None}, None]
    assert seen == {"read": expected, "stream": expected, "sql": expected, "frame": expected}


def test_schema_dicts_and_hints_set_column_types(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: write
                node: write.py
              - name: bad
                node: bad.py
        """,
        "write.py": """
            from patterns import Table
            hinted = Table("hinted", "w")
            hinted.init(schema_hints={"amount": "Decimal(12,2)", "code": "Text"})
            hinted.append([{"amount": 1.25, "code": 123, "n": 1}])
            Table("typed", "w", schema={"amount": "Float"}).append([{"amount": 2}])
        """,
        "bad.py": """
            from patterns import Table
            Table("other", "w", schema={"x": "Colour"}).append([{"x": 1}])
        """,
    })  # fmt: skip
    write, bad = run_app(app, store_url)
    assert write.status == "succeeded", write.error
    from stepwell.store import open_store

    store = open_store(store_url, app)
    try:
        hinted = {c.name: c.type for c in store.table_info("hinted").columns}
        typed = {c.name: c.type for c in store.table_info("typed").columns}
    finally:
        store.close()
    assert hinted["amount"] == "decimal(12,2)" and hinted["code"] == "str" and hinted["n"] == "int"
    assert typed["amount"] == "float"
    assert rows(app, "hinted", store_url)[0]["code"] == "123"
    assert bad.status == "failed"
    assert "'other'" in bad.error and "'x'" in bad.error and "'Colour'" in bad.error


def test_optional_ports_left_unconnected_read_nothing_and_write_nowhere(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: feed
                node: feed.py
              - name: use
                node: use.py
                inputs: {events: events}
                outputs: {out: out}
              - name: implicit
                node: implicit.py
        """,
        "feed.py": """
            from patterns import Table
            Table("events", "w").append([{"n": 1}])
            Table("extra", "w").append([{"n": 2}])
        """,
        "use.py": """
            import json
            from patterns import Table
            events, extra = Table("events"), Table("extra", required=False)
            sink = Table("sink", "w", required=False)
            sink.append({"n": 3})
            sink.truncate()
            Table("out", "w").append(events.read())
            print("SEEN " + json.dumps({
                "connected": [events.is_connected, extra.is_connected, sink.is_connected],
                "extra": extra.read(), "stream": list(extra.as_stream().consume_records()),
                "exists": extra.exists, "count": extra.record_count,
            }))
        """,
        "implicit.py": """
            from patterns import Table
            assert Table("extra", required=False).is_connected  # no ports declared: by name
            assert [r["n"] for r in Table("extra", required=False).read()] == [2]
        """,
    })  # fmt: skip
    feed, use, implicit = run_app(app, store_url)
    assert use.status == "succeeded" and implicit.status == "succeeded", (use.error, implicit.error)
    (line,) = [m for m in logs(app, use.id, store_url) if m.startswith("SEEN ")]
    assert json.loads(line[len("SEEN "):]) == {
        "connected": [True, False, False], "extra": [], "stream": [], "exists": False, "count": 0,
    }
    assert rows(app, "sink", store_url) == []  # never created
    assert [r["n"] for r in rows(app, "out", store_url)] == [1]


def test_stream_by_a_column_of_a_table_without_patterns_id(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: feed
                node: feed.py
              - name: consume
                node: consume.py
        """,
        "feed.py": """
            from patterns import State, Table
            state = State()
            start = state.get_value("next", 0)
            messages = Table("messages", "w")
            messages.init(add_monotonic_id=None)
            messages.append([{"ts": start + i, "text": f"m{start + i}"} for i in range(3)])
            state.set_value("next", start + 3)
        """,
        "consume.py": """
            from patterns import Table
            out = Table("seen", "w")
            for record in Table("messages").as_stream(order_by="ts").consume_records():
                out.append({"ts": record["ts"]})
        """,
    })  # fmt: skip
    for _ in range(3):
        feed, consume = run_app(app, store_url)
        assert consume.status == "succeeded", consume.error
    assert "patterns_id" not in rows(app, "messages", store_url)[0]
    assert sorted(r["ts"] for r in rows(app, "seen", store_url)) == list(range(9))


def test_a_monotonic_id_or_created_column_from_init_is_the_default_stream_order(tmp_path, store_url):
    """Patterns: init(add_monotonic_id="id") (or add_created="created_at", with no
    monotonic id) fills the schema's ordering role, so a downstream as_stream()
    with no order_by goes by that column; the writer's run is long over by then."""
    app = write_app(tmp_path / "app", {
        "graph.yml": """
            functions:
              - node_file: feed.py
              - node_file: consume.py
        """,
        "feed.py": """
            from patterns import State, Table
            state = State()
            start = state.get_value("next", 0)
            by_id = Table("by_id", "w")
            by_id.init(add_monotonic_id="id")
            by_id.append([{"n": start + i} for i in range(3)])
            by_created = Table("by_created", "w")
            by_created.init(add_monotonic_id=None, add_created="created_at")
            by_created.append([{"n": start + i} for i in range(3)])
            state.set_value("next", start + 3)
        """,
        "consume.py": """
            from patterns import Table
            out = Table("seen", "w")
            for name in ("by_id", "by_created"):
                stream = Table(name).as_stream()
                for record in stream.consume_records():
                    out.append({"table": name, "order": stream.order_by_field, "n": record["n"]})
        """,
    })  # fmt: skip
    for _ in range(2):
        feed, consume = run_app(app, store_url)
        assert consume.status == "succeeded", consume.error
    seen = rows(app, "seen", store_url, order_by="patterns_id")
    assert [(r["table"], r["order"], r["n"]) for r in seen] == [
        *(("by_id", "id", n) for n in range(3)),
        *(("by_created", "created_at", n) for n in range(3)),
        *(("by_id", "id", n) for n in range(3, 6)),
        *(("by_created", "created_at", n) for n in range(3, 6)),
    ]


def test_replace_starts_a_version_with_the_shape_of_the_new_rows(tmp_path, store_url):
    """Patterns: replace() is reset() + append(), and a reset table's new version has
    no schema yet, so the new rows may change a column's type or drop a column
    (the old version, kept, still has them)."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: snap\n    node: snap.py\n",
        "snap.py": """
            from patterns import State, Table
            state = State()
            first = state.get_value("first", True)
            snapshot = Table("snapshot", "w")
            if first:
                snapshot.replace([{"x": 1, "old": "a"}])
            else:
                snapshot.replace([{"x": "one", "new": 2.5}])
            state.set_value("first", False)
        """,
    })  # fmt: skip
    (first,) = run_app(app, store_url)
    assert first.status == "succeeded", first.error
    (second,) = run_app(app, store_url)
    assert second.status == "succeeded", second.error
    assert [{k: v for k, v in r.items() if k != "patterns_id"}
            for r in rows(app, "snapshot", store_url)] == [{"x": "one", "new": 2.5}]  # fmt: skip


def test_table_versions_from_a_node(tmp_path, store_url):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: v
                node: v.py
        """,
        "v.py": """
            import json
            from patterns import State, Table
            state = State()
            phase = state.get_value("phase", 0)
            t = Table("t", "w")
            if phase == 0:
                before = t.has_active_version()
                t.append([{"n": 1}, {"n": 2}])
                print("SEEN " + json.dumps({"before": before}))
            elif phase == 1:
                active = t.get_active_version()
                new = t.create_new_version()
                t.append({"n": 3})
                t.signal_reset()
                print("SEEN " + json.dumps({"active": [active.version, active.record_count,
                                                       sorted(active.schema)],
                                            "new": new.version}))
            elif phase == 2:
                print("SEEN " + json.dumps({"active": t.get_active_version().version}))
                t.set_active_version(1)  # reads see it after this run's commit
            else:
                print("SEEN " + json.dumps({"active": t.get_active_version().version}))
            state.set_value("phase", phase + 1)
        """,
    })  # fmt: skip
    seen = []
    for _ in range(4):
        (run,) = run_app(app, store_url)
        assert run.status.startswith("succeeded"), run.error
        (line,) = [m for m in logs(app, run.id, store_url) if m.startswith("SEEN ")]
        seen.append(json.loads(line[len("SEEN "):]))
        if len(seen) == 2:
            assert [r["n"] for r in rows(app, "t", store_url, order_by="n")] == [3]
        if len(seen) == 3:
            assert [r["n"] for r in rows(app, "t", store_url, order_by="n")] == [1, 2]
    assert seen[0] == {"before": False}
    assert seen[1] == {"active": [1, 2, ["n", "patterns_id"]], "new": 2}
    assert seen[2] == {"active": 2}
    assert seen[3] == {"active": 1}


def test_reading_a_table_the_run_is_resetting(tmp_path, store_url):
    """Reads see committed data. On PostgreSQL a table the run itself reset is
    locked until the run commits: the read gives up with a clear error instead of
    waiting for ever."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: r
                node: r.py
        """,
        "r.py": """
            from patterns import Table
            t = Table("t", "w")
            if t.has_active_version():
                t.reset()
                print(f"rows={len(t.read())}")
            else:
                t.append({"n": 1})
        """,
    })  # fmt: skip
    (first,) = run_app(app, store_url)
    assert first.status == "succeeded", first.error
    (second,) = run_app(app, store_url)
    if store_url is None:  # DuckDB: the committed version is read
        assert second.status == "succeeded", second.error
        assert "rows=1" in logs(app, second.id, store_url)
    else:
        assert second.status == "failed"
        assert "being changed by a transaction not yet committed" in second.error


EXECUTE_SQL = {
    "stepwell.yml": """
        steps:
          - name: seed
            node: seed.py
          - name: derive
            node: derive.py
            inputs: {orders: orders}
            outputs: {big: big_orders, summary: summary}
          - name: sneaky
            node: sneaky.py
            inputs: {orders: orders}
    """,
    "seed.py": """
        from patterns import Table
        Table("orders", "w").append([{"id": i, "amount": i * 10} for i in range(1, 6)])
    """,
    "derive.py": """
        from patterns import Table
        orders, big, summary = Table("orders"), Table("big", "w"), Table("summary", "w")
        big.append({"id": 0, "amount": 0})
        n = big.execute_sql(f"INSERT INTO {big} (id, amount) SELECT id, amount FROM orders WHERE amount >= 30")
        big.execute_sql("INSERT INTO big (id, amount) VALUES (100, 1000), (101, 1010)")
        d = big.execute_sql("DELETE FROM big WHERE amount = 0")
        u = big.execute_sql("UPDATE big SET amount = amount + 1 WHERE big.id >= 100 AND id IN (SELECT 100 + orders.id - id FROM orders UNION SELECT 101)")
        # the query sees what this run wrote so far; a replace starts a new version
        summary.execute_sql(
            'CREATE OR REPLACE TABLE summary AS SELECT count(*) AS n, sum(amount) AS total FROM {{ Table("big") }}'
        )
        print(f"inserted {n} deleted {d} updated {u}")
    """,
    "sneaky.py": """
        from patterns import Table
        Table("orders_copy", "w").execute_sql("DELETE FROM orders")
    """,
}


def test_execute_sql_appends_and_replaces_only_its_table(tmp_path, store_url):
    app = write_app(tmp_path / "app", EXECUTE_SQL)
    seed, derive, sneaky = run_app(app, store_url)
    assert seed.status == "succeeded" and derive.status == "succeeded", derive.error
    assert "inserted 3 deleted 1 updated 2" in logs(app, derive.id, store_url)
    big = rows(app, "big_orders", store_url, order_by="patterns_id")
    assert [(r["id"], r["amount"]) for r in big] == [(3, 30), (4, 40), (5, 50), (100, 1001), (101, 1011)]
    assert all(r["patterns_id"] for r in big)
    (summary,) = rows(app, "summary", store_url)
    assert (summary["n"], summary["total"]) == (5, 2132)
    # a second run replaces the summary (a new version) and changes big_orders again
    again = run_app(app, store_url, steps=["derive"])[0]
    assert again.status == "succeeded", again.error
    assert "inserted 3 deleted 1 updated 4" in logs(app, again.id, store_url)
    assert len(rows(app, "big_orders", store_url)) == 10
    (summary,) = rows(app, "summary", store_url)
    assert summary["n"] == 10
    # a statement that changes another table is refused, naming the forms that work
    assert sneaky.status == "failed"
    assert "may only change table 'orders_copy' itself, not orders" in sneaky.error
    assert "sneaky.py:2" in sneaky.error
    assert len(rows(app, "orders", store_url)) == 5


SQL_THEN_STREAM = {
    "stepwell.yml": """
        tables: [orders, totals, big, seen]
        steps:
          - name: seed
            node: seed.py
          - name: totals
            sql: totals.sql
            output: totals
          - name: big
            sql: big.sql
            output: big
          - name: watch
            node: watch.py
    """,
    "seed.py": """
        from patterns import Table
        Table("orders", "w").append([{"amount": a} for a in (10, 20, 30)])
    """,
    "totals.sql": "SELECT count(*) AS n, sum(amount) AS total FROM orders",
    "big.sql": "SELECT * FROM orders WHERE amount > 15",
    "watch.py": """
        from patterns import Table
        seen = Table("seen", "w")
        for row in Table("totals").as_stream().consume_records():
            seen.append({"n": row["n"], "total": row["total"]})
    """,
}


def test_a_sql_steps_output_streams_each_new_result_once(tmp_path, store_url):
    app = write_app(tmp_path / "app", SQL_THEN_STREAM)
    first = run_app(app, store_url)
    assert [r.status for r in first] == ["succeeded"] * 4, [r.error for r in first]
    second = run_app(app, store_url)
    assert [r.status for r in second] == ["succeeded"] * 4, [r.error for r in second]
    seen = rows(app, "seen", store_url, order_by="patterns_id")
    assert [(r["n"], r["total"]) for r in seen] == [(3, 60), (6, 120)]
    (totals,) = rows(app, "totals", store_url)  # the output holds the latest result only
    assert totals["n"] == 6 and totals["patterns_id"]
    with app_runner(app, store_url) as runner:  # a result of the same shape: no new version
        assert runner.store.table_info("totals").version == 1
    # a result that selects an input's patterns_id keeps those ids
    orders = {r["patterns_id"]: r["amount"] for r in rows(app, "orders", store_url)}
    big = rows(app, "big", store_url)
    assert len(big) == 4 and all(orders[r["patterns_id"]] == r["amount"] for r in big)


def test_a_sql_steps_output_takes_the_shape_of_each_result(tmp_path, store_url):
    """A SQL step replaces its output's rows, so an edited query may change a
    column's type (text -> int, int -> text) or drop one: a result of another shape
    starts a new version with its shape, and a stream over the output still reads
    each new result once (a result of the same shape keeps the version)."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: gen
                node: gen.py
              - name: summary
                sql: summary.sql
                output: summary
              - name: follow
                node: follow.py
        """,
        "gen.py": """
            from patterns import Table
            Table("src", "w").append({"k": 1})
        """,
        "summary.sql": "select 'n' || cast(count(*) as varchar) as c, 'x' as extra from src\n",
        "follow.py": """
            from patterns import Table
            seen = Table("seen", "w")
            for r in Table("summary").as_stream():
                seen.append({"got": f"{r['c']!r} {r.get('extra')}"})
        """,
    })  # fmt: skip

    def run(query: str | None = None) -> None:
        if query:
            (app / "summary.sql").write_text(query)
        runs = run_app(app, store_url)
        assert [r.status for r in runs] == ["succeeded"] * 3, [r.error for r in runs]

    def shape() -> tuple[dict[str, str], int]:
        with app_runner(app, store_url) as runner:
            info = runner.store.table_info("summary")
        return {c.name: c.type for c in info.columns}, info.version

    run()
    run()  # the same shape: rows replaced in place
    assert shape() == ({"c": "str", "extra": "str", "patterns_id": "str"}, 1)
    run("select count(*) as c from src\n")  # text -> int (was kept text), extra dropped
    run()
    assert shape() == ({"c": "int", "patterns_id": "str"}, 2)
    run("select cast(count(*) as varchar) as c from src\n")  # int -> text (failed)
    assert shape() == ({"c": "str", "patterns_id": "str"}, 3)
    assert [r["got"] for r in rows(app, "seen", store_url, order_by="patterns_id")] == [
        "'n1' x", "'n2' x", "3 None", "4 None", "'5' None",
    ]


def test_state_and_positions_are_read_only_by_nodes_that_use_them(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: plain\n    node: plain.py\n  - name: keeps\n    node: keeps.py\n",
        "plain.py": "from patterns import Table\nTable('out', 'w').append({'a': 1})\n",
        "keeps.py": "from patterns import State\nState().set_value('n', State().get_value('n', 0) + 1)\n",
    })  # fmt: skip
    with app_runner(app) as runner:
        reads: list[str] = []
        real_get_state = runner.store.get_state
        runner.store.get_state = lambda step: reads.append(step) or real_get_state(step)
        for _ in range(2):
            assert runner.run_step("plain").status == "succeeded"
            assert runner.run_step("keeps").status == "succeeded_no_data"
        assert reads == ["keeps", "keeps"]  # one read per run that uses State, none otherwise
        assert real_get_state("keeps") == {"n": 2} and real_get_state("plain") == {}


def test_workers_run_node_code_the_host_compiled(tmp_path):
    import marshal

    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: n\n    node: nodes/n.py\n",
        "nodes/n.py": "from patterns import Table\nfrom stepwell_app import helper\nTable('t', 'w').append({'v': helper.VALUE})\n",
        "helper.py": "VALUE = 1\n",
    })  # fmt: skip
    helper = app / "helper.py"
    with app_runner(app) as runner:
        # the host's code for the helper says otherwise than its source: a run that
        # reads 2 loaded the shipped code instead of compiling the file
        code = runner.bytecode.for_node("nodes/n.py")["files"]
        assert sorted(code) == [str(helper), str(app / "nodes" / "n.py")]
        mtime, size, _ = code[str(helper)]
        runner.bytecode._code[helper] = (mtime, size, marshal.dumps(compile("VALUE = 2\n", str(helper), "exec")))
        assert runner.run_step("n").status == "succeeded"
        # an edited file is compiled afresh for the next run
        helper.write_text("VALUE = 30\n")
        assert runner.run_step("n").status == "succeeded"
    assert [r["v"] for r in rows(app, "t")] == [2, 30]
    assert not any(app.rglob("__pycache__"))  # nothing written into the app folder


def test_shipped_code_per_run_is_capped_node_file_first(tmp_path, monkeypatch):
    from stepwell.engine import bytecode

    app = write_app(tmp_path / "app", {
        "n.py": "import helper\n" + "x = 1\n" * 50,
        "helper.py": "VALUE = 1\n" * 50,
        "broken.py": "def (:\n",
    })  # fmt: skip
    compiled = bytecode.AppBytecode(app)
    assert sorted(compiled.for_node("n.py")["files"]) == [str(app / "helper.py"), str(app / "n.py")]
    node_size = len(compiled.for_node("n.py")["files"][str(app / "n.py")][2])
    monkeypatch.setattr(bytecode, "MAX_SHIPPED_BYTES", node_size)
    assert list(compiled.for_node("n.py")["files"]) == [str(app / "n.py")]
    assert compiled.for_node("broken.py")["files"] == {}  # the worker reports its error


def test_shipped_code_is_used_only_for_the_file_as_it_was_compiled(tmp_path, monkeypatch):
    import importlib
    import importlib.util
    import marshal
    import sys

    from stepwell.runtimes.node import shipped_code

    module = tmp_path / "mod_a.py"
    module.write_text("VALUE = 'source'\n")
    info = module.stat()
    shipped = marshal.dumps(compile("VALUE = 'shipped'\n", str(module), "exec"))
    monkeypatch.setattr(sys, "path_hooks", list(sys.path_hooks))
    monkeypatch.setattr(sys, "path_importer_cache", {})
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setattr(shipped_code, "_shipped", {})
    monkeypatch.setattr(shipped_code, "_hooked", set())
    for name, size, expected in (("mod_a", info.st_size, "shipped"), ("mod_b", info.st_size + 1, "source")):
        if name == "mod_b":
            module = module.rename(tmp_path / "mod_b.py")
        shipped_code.use_shipped_code(
            {"magic": importlib.util.MAGIC_NUMBER, "files": {str(module): [info.st_mtime_ns, size, shipped]}},
            str(tmp_path),
        )
        try:
            assert importlib.import_module(name).VALUE == expected
        finally:
            sys.modules.pop(name, None)
    # code from another Python version is never loaded
    shipped_code._shipped.clear()
    shipped_code.use_shipped_code({"magic": b"\0\0\r\n", "files": {str(module): [0, 0, b""]}}, str(tmp_path))
    assert shipped_code._shipped == {}


def test_a_run_that_writes_then_runs_on_commits_its_end(tmp_path, store_url):
    # it outlasts RECORD_AFTER after its first write: its record must not be one its
    # open transaction cannot see (DuckDB: "update_run: no run with id ...")
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: w\n    node: w.py\n",
        "w.py": "import time\nfrom patterns import Table\n"  # 20,000 rows: shipped at once
                "Table('t', 'w').append([{'a': i} for i in range(20_000)])\ntime.sleep(0.5)\n",
    })  # fmt: skip
    (run,) = run_app(app, store_url)
    assert run.status == "succeeded", run.error
    assert run.rows_out == 20_000 and len(rows(app, "t", store_url)) == 20_000


class _RecordingLink:
    """Stands in for the host link in the worker-side unit test below."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def notify(self, op: str, body: bytes = b"", **args) -> None:
        self.sent.append((op, args))


def test_a_prepared_node_module_is_taken_over_by_its_run(tmp_path, monkeypatch):
    """Worker side: ``prepare`` loads the node without running it; the run with the
    same file and code runs that module (and loads nothing again)."""
    import sys

    from stepwell.engine.bytecode import AppBytecode
    from stepwell.runtimes.node import worker as node_worker
    from stepwell.runtimes.node.host import prepare_message, start_message
    from stepwell.sandbox.worker import _prepare

    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: s\n    node: s.py\n",
        "s.py": "import builtins\nbuiltins.stepwell_test_ran = getattr(builtins, 'stepwell_test_ran', 0) + 1\n",
    })  # fmt: skip
    step = type("Step", (), {"name": "s", "file": "s.py", "inputs": {}, "outputs": {}})()
    code = AppBytecode(app).for_node("s.py")
    import builtins

    from stepwell.runtimes.node import shipped_code

    # what a worker changes for its run, put back afterwards
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "path_hooks", list(sys.path_hooks))
    monkeypatch.setattr(shipped_code, "_shipped", {})
    monkeypatch.setattr(shipped_code, "_hooked", set())
    for name in ("stepwell_app", "stepwell_app.s", "patterns"):  # (put back as they were)
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))
        del sys.modules[name]

    monkeypatch.setattr(builtins, "stepwell_test_ran", 0, raising=False)
    _prepare(prepare_message(step=step, app_root=str(app), code=code))
    assert node_worker._prepared is not None and builtins.stepwell_test_ran == 0  # loaded, not run
    loads = []
    monkeypatch.setattr(node_worker, "_ready_for", lambda message: loads.append(message))
    start = start_message(run_id="r1", step=step, app_root=str(app), parameters={},
                          time_limit=None, sys_path=[])  # fmt: skip
    start["code"] = code
    link = _RecordingLink()
    node_worker.run(link, start)
    assert builtins.stepwell_test_ran == 1 and loads == [] and node_worker._prepared is None
    assert [op for op, _ in link.sent] == ["done"]


def test_an_int_parameter_refuses_a_fraction_instead_of_dropping_it():
    from stepwell.runtimes.node.api import _coerce

    assert _coerce("n", 3.0, int) == 3 and _coerce("n", "4", int) == 4
    with pytest.raises(ValueError, match=r"parameter 'n': cannot use 3.7 as int \(not a whole number\)"):
        _coerce("n", 3.7, int)


def test_a_succeeding_run_keeps_its_last_unfinished_line_and_the_log_limit_note(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - {name: short, node: short.py}\n  - {name: chatty, node: chatty.py}\n",
        "short.py": "print('done', end='')\n",
        "chatty.py": "for i in range(100_050):\n    print('line', i)\n",
    })
    short, chatty = run_app(app)
    assert short.status.startswith("succeeded") and logs(app, short.id) == ["done"]
    assert chatty.status.startswith("succeeded")
    lines = logs(app, chatty.id)
    assert len(lines) == 100_000 and "log limit reached" in lines[-1] and "51 more lines" in lines[-1]


def test_an_integer_beyond_64_bits_is_named_as_such():
    from stepwell.runtimes.node.records import RecordError, records_to_arrow

    with pytest.raises(RecordError, match=r"row 1, field 'a': the integer 1180591620717411303424 "
                                          r"is outside the 64-bit range"):
        records_to_arrow([{"a": 1}, {"a": 2**70}], "t")


@pytest.mark.parametrize(("value", "problem"), [
    (float("nan"), "the value holds NaN or an infinity, which JSON cannot; write None instead"),
    (float("inf"), "the value holds NaN or an infinity, which JSON cannot; write None instead"),
    (type("Foo", (), {})(), "a value of type Foo cannot be stored in JSON (inside a dict or list)"),
])
def test_a_nested_value_json_cannot_hold_is_named_not_stored_as_garbage(value, problem):
    """Inside a dict or list, NaN was stored as `NaN` (not JSON: PostgreSQL's jsonb
    refused it with a raw COPY error) and an object as '<Foo object at 0x…>'."""
    from stepwell.runtimes.node.records import RecordError, records_to_arrow

    with pytest.raises(RecordError) as info:
        records_to_arrow([{"a": {"k": 1}}, {"a": {"k": [value]}}], "t")
    assert str(info.value).startswith(f"table 't', row 1, field 'a': {problem}"), info.value


def test_nested_bytes_and_objects_with_their_own_str_are_stored_as_json():
    import json
    from pathlib import PurePosixPath

    from stepwell.runtimes.node.records import records_to_arrow

    table = records_to_arrow([{"a": {"b": b"\x00\xff", "p": PurePosixPath("/x"), "s": (1,)}}], "t")
    assert json.loads(table.column("a")[0].as_py()) == {"b": "AP8=", "p": "/x", "s": [1]}


@pytest.mark.parametrize(
    ("limit", "elapsed", "expected"),
    [(60, 47.0, True), (60, 49.0, False), (3600, 3470.0, True), (3600, 3490.0, False)],
)
def test_should_continue_stops_at_the_later_of_80_percent_and_120_s_before(
    monkeypatch, limit, elapsed, expected
):
    """As in Patterns: 'which ever is greater' of 80 % of the limit and 120 s before it."""
    from types import SimpleNamespace

    from stepwell.runtimes.node import api

    fake = SimpleNamespace(time_limit=limit, elapsed=lambda: elapsed)
    monkeypatch.setattr(api, "_session", fake)
    assert api.State().should_continue() is expected


def test_a_second_as_stream_continues_the_first_and_reset_restarts_it(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: gen\n    node: gen.py\n  - name: proc\n    node: proc.py\n",
        "gen.py": """
            from patterns import State, Table
            state = State()
            k = state.get_value("k", 0)
            Table("src", "w").append([{"n": k * 3 + i} for i in range(3)])
            state.set_value("k", k + 1)
        """,
        "proc.py": """
            import os
            from patterns import State, Table
            src, out = Table("src"), Table("out", "w")
            out.append([{"n": r["n"]} for r in src.as_stream().consume_records()])
            again = Table("src").as_stream()  # e.g. a helper asks for the stream again
            assert list(again.consume_records()) == []
            if os.path.exists("reset-now"):
                State().reset()  # the stream made above starts again
                print("after reset", [r["n"] for r in again.consume_records()])
        """,
    })
    for _ in range(3):
        run_app(app, steps=["gen"])
        assert run_app(app, steps=["proc"])[0].status == "succeeded"
    assert sorted(r["n"] for r in rows(app, "out")) == list(range(9))
    (app / "reset-now").write_text("")
    run = run_app(app, steps=["proc"])[0]
    assert run.status == "succeeded" and logs(app, run.id) == [f"after reset {list(range(9))}"]


def test_a_null_order_value_behind_a_streams_position_is_warned(tmp_path):
    app = write_app(tmp_path / "app", NULL_ORDER_APP)
    run_app(app)
    gen, read = run_app(app)
    assert read.status == "succeeded"
    assert sorted(r["n"] for r in rows(app, "seen")) == [1, 4]
    assert any("table 'events': 1 row(s) have no ts (null); a stream ordered by ts has read past "
               "them" in line for line in logs(app, read.id))


def test_a_stream_refuses_rows_without_an_order_value(tmp_path):
    """A null in the order_by column would be skipped once later rows are read: the
    run fails naming the row, and nothing is consumed."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: gen\n    node: gen.py\n  - name: read\n    node: read.py\n",
        "gen.py": """
            from patterns import Table
            Table("events", "w").append([{"n": 1, "ts": 10}, {"n": 2, "ts": None}, {"n": 3, "ts": 30}])
        """,
        "read.py": """
            from patterns import Table
            out = Table("seen", "w")
            for r in Table("events").as_stream(order_by="ts").consume_records():
                out.append({"n": r["n"]})
        """,
    })
    gen, read = run_app(app)
    assert gen.status == "succeeded" and read.status == "failed"
    assert "cannot stream table 'events' by 'ts': the row with patterns_id '" in read.error
    assert "has no value (null) in it" in read.error
    assert rows(app, "seen") == []


def test_default_stream_order_comes_from_the_schema_field_roles(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            schemas:
              - schema_file: schemas/Event.yml
            tables:
              - name: events
                schema: Event
              - name: logged
                schema: Event
            steps:
              - name: gen
                node: gen.py
              - name: read
                node: read.py
              - name: plain
                node: plain.py
        """,
        "schemas/Event.yml": """
            name: Event
            field_roles: {created_ordering: at}
            fields:
              at: {type: Integer}
              what: {type: Text}
        """,
        "gen.py": """
            from patterns import Table
            events = Table("events", "w")
            events.init(add_monotonic_id=None)
            events.append([{"at": 3, "what": "c"}, {"at": 1, "what": "a"}, {"at": 2, "what": "b"}])
            bare = Table("bare", "w")
            bare.init(add_monotonic_id=None)
            bare.append({"n": 1})
            Table("logged", "w").append({"at": 1, "what": "x"})  # with patterns_id
        """,
        "read.py": """
            from patterns import Table
            stream = Table("events").as_stream()  # no order named: the schema's role
            print([r["what"] for r in stream.consume_records()], stream.order_by_field)
            print(Table("logged").as_stream().order_by_field)  # its ids still go first
        """,
        "plain.py": """
            from patterns import Table
            list(Table("bare").as_stream().consume_records())
        """,
    })
    gen, read, plain = run_app(app)
    assert read.status == "succeeded", read.error
    assert logs(app, read.id) == ["['a', 'b', 'c'] at", "patterns_id"]
    assert plain.status == "failed"
    assert "cannot stream table 'bare' in its default order: it has no patterns_id column" in plain.error
    assert "as_stream(order_by='<column>'), with one of its columns (n)" in plain.error


def test_init_takes_a_strictly_monotonic_ordering(tmp_path):
    """init(strictly_monotonic_ordering=...) (used by Patterns templates) names the
    table's default stream order when it has no patterns_id; with patterns_id, the
    ids stay the order (they increase in commit order, a column of values need not)."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            steps:
              - name: w
                node: w.py
              - name: r
                node: r.py
              - name: typo
                node: typo.py
        """,
        "w.py": """
            from patterns import Table
            alerts = Table("alerts", mode="w")
            alerts.init(strictly_monotonic_ordering="timestamp")
            alerts.append([{"timestamp": 2, "what": "b"}, {"timestamp": 1, "what": "a"}])
            bare = Table("bare", "w")
            bare.init(add_monotonic_id=None, strictly_monotonic_ordering="timestamp")
            bare.append([{"timestamp": 2, "what": "b"}, {"timestamp": 1, "what": "a"}])
        """,
        "r.py": """
            from patterns import Table
            for name in ("alerts", "bare"):
                stream = Table(name).as_stream()
                print(name, stream.order_by_field, [r["what"] for r in stream])
        """,
        "typo.py": """
            from patterns import Table
            t = Table("other", "w")
            t.init(strictly_monotonic_ordering="timestmap")
            t.append({"timestamp": 1})
        """,
    })  # fmt: skip
    w, r, typo = run_app(app)
    assert w.status == "succeeded", w.error
    assert r.status == "succeeded", r.error
    assert logs(app, r.id) == ["alerts patterns_id ['b', 'a']", "bare timestamp ['a', 'b']"]
    assert typo.status == "failed"
    assert "init(strictly_monotonic_ordering='timestmap') names no column of the rows" in typo.error


def test_a_dataframe_column_of_mixed_shapes_is_stored_as_json(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: w\n    node: w.py\n",
        "w.py": """
            import pandas as pd
            from patterns import Table
            frame = pd.DataFrame({"n": [1, 2, 3], "d": [{"k": 1}, None, {"k": [1, 2]}]})
            Table("shapes", "w").append(frame)
        """,
    })
    (run,) = run_app(app)
    assert run.status == "succeeded", run.error
    got = {r["n"]: r["d"] for r in rows(app, "shapes")}
    assert got[2] is None and json.loads(got[1]) == {"k": 1} and json.loads(got[3]) == {"k": [1, 2]}


def test_uuid_values_are_stored_as_their_text(tmp_path):
    """pyarrow types uuid.UUID values as 16 raw bytes: they are stored as a text
    column of their canonical form, from records, DataFrames and into a declared
    Text field alike, so they read back (and compare in SQL) as strings."""
    app = write_app(tmp_path / "app", {
        "stepwell.yml": """
            schemas:
              - schema_file: schemas/Thing.yml
            tables:
              - name: things
                schema: Thing
            steps:
              - name: w
                node: w.py
              - name: r
                node: r.py
        """,
        "schemas/Thing.yml": "name: Thing\nfields:\n  id: {type: Text}\n",
        "w.py": """
            import uuid
            import pandas as pd
            from patterns import Table
            ids = Table("ids", "w")
            ids.append([{"n": 1, "u": uuid.UUID(int=1)}, {"n": 2, "u": None}])
            ids.append(pd.DataFrame({"n": [3], "u": [uuid.UUID(int=3)]}))
            Table("things", "w").append({"id": uuid.UUID(int=4)})
        """,
        "r.py": """
            from patterns import Table
            for r in Table("ids").read():
                print(r["n"], type(r["u"]).__name__, r["u"])
            print(Table("things").read()[0]["id"])
            print(Table("ids").read_sql(
                "select n from ids where u = '00000000-0000-0000-0000-000000000003'"))
        """,
    })  # fmt: skip
    w, r = run_app(app)
    assert w.status == "succeeded", w.error
    assert r.status == "succeeded", r.error
    assert logs(app, r.id) == [
        "1 str 00000000-0000-0000-0000-000000000001",
        "2 NoneType None",
        "3 str 00000000-0000-0000-0000-000000000003",
        "00000000-0000-0000-0000-000000000004",
        "[{'n': 3}]",
    ]
    with app_runner(app) as runner:
        types = {c.name: c.type for c in runner.store.table_info("ids").columns}
    assert types["u"] == "str"


def test_a_huge_error_message_is_kept_short_in_the_run_record(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: loud\n    node: loud.py\n",
        "loud.py": "raise ValueError('x' * 3_000_000)\n",
    })
    (run,) = run_app(app)
    assert run.status == "failed" and len(run.error) < 2200
    assert run.error.endswith("more characters; the whole text is in the run's traceback)")
    assert "x" * 100_000 in run.traceback


def test_a_cut_error_closes_the_right_to_left_override_it_holds(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: rtl\n    node: rtl.py\n",
        "rtl.py": "raise ValueError('\\u202e boom ' + 'Z' * 5000)\n",
    })
    (run,) = run_app(app)
    assert "\u202e boom" in run.error
    # the override ends before stepwell's own words, which then read left to right
    assert "Z\u202c... (" in run.error, run.error
    assert run.error.endswith("more characters; the whole text is in the run's traceback)")


def test_read_sql_takes_jinja_names_and_says_when_a_table_is_missing(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: w\n    node: w.py\n  - name: r\n    node: r.py\n",
        "w.py": "from patterns import Table\nTable('events', 'w').append([{'n': 1}, {'n': 2}])\n",
        "r.py": """
            from patterns import Table
            events, later, o = Table("events"), Table("later"), Table("o", "w")
            print(events.read_sql("select count(*) as c from {{ events }}"))
            for sql in ("select nope from events", 'select nope, n as "later" from events'):
                try:  # an error of the query itself, not blamed on a table it does not read
                    events.read_sql(sql)
                except Exception as exc:
                    print(type(exc).__name__, "nope" in str(exc), "'o'" in str(exc) or "later" in str(exc))
            later.read_sql("select * from later")
        """,
    })
    w, r = run_app(app)
    assert r.status == "failed"
    assert logs(app, r.id)[:3] == ["[{'c': 2}]", *["HostError True False"] * 2]  # {{ }}: older docs
    assert "read_sql: table 'later' does not exist yet (nothing has written it)" in r.error


def test_an_exception_whose_str_fails_is_still_named(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: odd\n    node: odd.py\n",
        "odd.py": """
            class Odd(Exception):
                def __str__(self):
                    raise ValueError("str broke")
            raise Odd()
        """,
    })
    (run,) = run_app(app)
    assert run.status == "failed"
    assert run.error.startswith("Odd: (its message could not be made: ValueError in its __str__)")
    assert "(at odd.py:4)" in run.error


def test_an_error_raised_inside_a_library_names_the_line_of_the_step_that_called_it(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: parse\n    node: parse.py\n",
        "parse.py": """
            import json

            def load(text):
                return json.loads(text)

            load("{not json")
        """,
    })
    (run,) = run_app(app)
    assert run.status == "failed"
    assert run.error.startswith("JSONDecodeError: Expecting property name"), run.error
    assert run.error.endswith("(at parse.py:4)"), run.error  # not json/decoder.py
    assert "json/decoder.py" in run.traceback  # the library's frames stay in the traceback


def test_what_subprocesses_and_c_code_print_joins_the_log_in_order(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: tools\n    node: tools.py\n",
        "tools.py": """
            import os, subprocess
            print("first")
            os.system("echo from-system")
            subprocess.run(["echo", "from-subprocess"])
            os.write(1, "from-fd1 é\\n".encode())
            print("from-print")
            os.write(1, b"no newline at the end")
        """,
    })
    (run,) = run_app(app)
    assert run.status == "succeeded_no_data", run.error
    assert logs(app, run.id) == ["first", "from-system", "from-subprocess", "from-fd1 é",
                                 "from-print", "no newline at the end"]


def test_reading_a_table_nothing_has_written_says_so_in_the_log(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: s\n    node: s.py\n    inputs: {x: nowhere}\n",
        "s.py": """
            from patterns import Table
            print(Table("x").read())
            print(list(Table("x").as_stream().consume_records()))
        """,
    })
    (run,) = run_app(app)
    assert run.status == "succeeded_no_data"
    assert logs(app, run.id) == [
        "[stepwell] table 'nowhere' does not exist (nothing has written it yet): the step read "
        "no rows from it", "[]", "[]"]


def test_a_write_the_host_refuses_names_the_line_its_rows_came_from(tmp_path):
    app = write_app(tmp_path / "app", {
        "stepwell.yml": "steps:\n  - name: s\n    node: s.py\n",
        "s.py": """
            from patterns import Table
            t = Table("out", "w")
            t.append({"x": 1})
            t.flush()
            t.append({"x": "two"})
            t.flush()
        """,
    })
    (run,) = run_app(app)
    assert run.status == "failed"
    assert "column 'x': existing type int cannot hold incoming str values" in run.error
    assert "(in the rows written from s.py:5 on)" in run.error, run.error
    assert rows(app, "out") == [{"x": 1, "patterns_id": rows(app, "out")[0]["patterns_id"]}]
