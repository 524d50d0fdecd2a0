"""Processor steps (Integray style) end to end: real worker processes, real stores."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from apputil import rows, run_app, write_app

from stepwell.store import open_store


@pytest.fixture(params=["duckdb", "postgres"])
def store_url(request):
    if request.param == "duckdb":
        return None
    return request.getfixturevalue("make_pg_database")()


def log_lines(app, run_id, store_url=None):
    """(level, message) pairs of a run's log."""
    store = open_store(store_url, app)
    try:
        return [(line.level, line.message) for line in store.get_logs(run_id)]
    finally:
        store.close()


def state_of(app, step, store_url=None):
    store = open_store(store_url, app)
    try:
        return store.get_state(step)
    finally:
        store.close()


def by_step(runs):
    return {run.step: run for run in runs}


PRODUCE = """
    from stepwell import Parameter, State, Table
    state = State()
    start = state.get_value("next", 0)
    count = Parameter("count", type=int, default=3)
    Table("numbers", "w").append(
        [{"n": start + i, "label": f"n{start + i}", "doc": {"k": start + i}} for i in range(count)]
    )
    state.set_value("next", start + count)
"""


def processor_app(tmp_path, statement, *, mode="row", schema="{y: int}", extra="", files=None):
    """An app with a node producing `numbers` and a processor `proc` reading it."""
    app_file = f"""
        title: processor test
        tables:
          - name: numbers
          - name: out
        steps:
          - name: produce
            node: produce.py
          - name: proc
            processor: proc.py
            mode: {mode}
            input: numbers
            output: out
            output_schema: {schema}
    """
    app_file = app_file.rstrip() + "\n"
    app_file += "".join(f"            {line}\n" for line in extra.splitlines() if line.strip())
    return write_app(
        tmp_path / "app",
        {"stepwell.yml": app_file, "produce.py": PRODUCE, "proc.py": statement, **(files or {})},
    )


# -- modes and INPUT_DATA ---------------------------------------------------------------


def test_row_mode_adds_returned_fields_to_each_input_row(tmp_path):
    app = processor_app(
        tmp_path,
        """
        row = INPUT_DATA[0]
        assert isinstance(INPUT_DATA, list) and len(INPUT_DATA) == 1
        assert row["doc"] == {"k": row["n"]}          # JSON columns arrive parsed
        assert "patterns_id" not in row
        if row["n"] == 0:
            return []                                 # zero objects: the row is filtered out
        if row["n"] == 1:
            return [{"y": 10}]                        # one object: the row, extended (label omitted: null)
        return [{"y": 20, "label": "replaced"}, {"y": 21, "label": "second"}]  # several rows
        """,
        schema="{y: int, label: str}",
    )
    runs = by_step(run_app(app))
    assert runs["proc"].status == "succeeded", runs["proc"].error
    assert (runs["proc"].rows_in, runs["proc"].rows_out) == (3, 3)
    out = rows(app, "out", order_by="patterns_id")
    assert [(r["n"], r["label"], r["y"]) for r in out] == [
        (1, None, 10),  # a schema field replaces the input column of that name
        (2, "replaced", 20),
        (2, "second", 21),
    ]
    assert all(isinstance(r["doc"], str | dict) for r in out)  # input JSON passed through
    assert len({r["patterns_id"] for r in out}) == 3


def test_bulk_mode_sees_all_rows_once(tmp_path):
    app = processor_app(
        tmp_path,
        """
        log.info(f"rows={len(INPUT_DATA)}")
        return [{"total": sum(r["n"] for r in INPUT_DATA), "count": len(INPUT_DATA)}]
        """,
        mode="bulk",
        schema="{total: int, count: int}",
    )
    runs = by_step(run_app(app))
    assert runs["proc"].status == "succeeded", runs["proc"].error
    assert rows(app, "out") and rows(app, "out")[0]["total"] == 3
    assert set(rows(app, "out")[0]) == {"total", "count", "patterns_id"}  # bulk: returned objects only
    assert ("info", "rows=3") in log_lines(app, runs["proc"].id)
    again = run_app(app, steps=["proc"])[0]  # nothing new: the statement does not run
    assert again.status == "succeeded_no_data"
    assert any("no new input rows" in m for _, m in log_lines(app, again.id))


def test_no_input_runs_once_with_empty_input(tmp_path):
    app = write_app(
        tmp_path / "app",
        {
            "stepwell.yml": """
                steps:
                  - name: gen
                    processor: gen.py
                    output: generated
                    output_schema: {id: int}
            """,
            "gen.py": """
                assert INPUT_DATA == []
                return [{"id": 1}, {"id": 2}]
            """,
        },
    )
    run = run_app(app)[0]
    assert run.status == "succeeded", run.error
    assert [r["id"] for r in rows(app, "generated", order_by="id")] == [1, 2]


# -- DATA_CHECKPOINT ------------------------------------------------------------------------


CYCLE = """
    start = DATA_CHECKPOINT or 0
    log.info(f"checkpoint={DATA_CHECKPOINT!r}")
    if start >= 20:
        return []
    return [{"id": start + i, "note": "x"} for i in range(1, 11)]
"""


def test_data_checkpoint_is_the_last_output_value_of_the_last_successful_run(tmp_path):
    app = write_app(
        tmp_path / "app",
        {
            "stepwell.yml": """
                steps:
                  - name: cycle
                    processor: cycle.py
                    mode: bulk
                    output: ids
                    output_schema: {id: int, note: str}
                    checkpoint_column: id
            """,
            "cycle.py": CYCLE,
        },
    )
    first, second, third = (run_app(app)[0] for _ in range(3))
    assert [r.status for r in (first, second, third)] == ["succeeded", "succeeded", "succeeded_no_data"]
    assert ("info", "checkpoint=None") in log_lines(app, first.id)
    assert ("info", "checkpoint=10") in log_lines(app, second.id)
    assert ("info", "checkpoint=20") in log_lines(app, third.id)
    assert state_of(app, "cycle")["DATA_CHECKPOINT"] == 20  # unchanged by the run with no output
    fourth = run_app(app)[0]
    assert ("info", "checkpoint=20") in log_lines(app, fourth.id)
    assert [r["id"] for r in rows(app, "ids", order_by="id")] == list(range(1, 21))


def test_failed_run_keeps_checkpoint_and_input_position(tmp_path):
    app = processor_app(
        tmp_path,
        """
        row = INPUT_DATA[0]
        if row["n"] == 4 and DATA_CHECKPOINT == 2:
            raise ValueError("boom on 4")
        return [{"y": row["n"]}]
        """,
        extra="checkpoint_column: y",
    )
    runs = by_step(run_app(app))
    assert runs["proc"].status == "succeeded"
    assert state_of(app, "proc")["DATA_CHECKPOINT"] == 2
    runs = by_step(run_app(app))  # produces 3, 4, 5; fails on 4
    assert runs["proc"].status == "failed"
    assert "ValueError: boom on 4" in runs["proc"].error
    assert "proc.py" in runs["proc"].traceback and "line 3" in runs["proc"].traceback
    assert [r["y"] for r in rows(app, "out", order_by="y")] == [0, 1, 2]  # nothing of the failed run
    assert state_of(app, "proc")["DATA_CHECKPOINT"] == 2
    (proc,) = run_app(app, steps=["proc"])  # same rows again (checkpoint still 2: fails again)
    assert proc.status == "failed" and proc.rows_out == 0


# -- log, statuses, sleep ------------------------------------------------------------------------


def test_log_levels_and_log_error_in_row_mode(tmp_path):
    app = processor_app(
        tmp_path,
        """
        n = INPUT_DATA[0]["n"]
        log.trace(f"trace {n}")
        log.debug(f"debug {n}")
        log.info(f"info {n}")
        log.warn(f"warn {n}")
        if n == 1:
            log.error(f"bad row {n}")
            log.info("execution continues after log.error")
        return [{"y": n}]
        """,
    )
    runs = by_step(run_app(app))
    proc = runs["proc"]
    assert proc.status == "succeeded_with_errors"
    assert "log.error was called in 1 of 3 executions" in proc.error and "bad row 1" in proc.error
    assert proc.info["failed_executions"] == 1
    assert [r["y"] for r in rows(app, "out", order_by="y")] == [0, 2]  # row 1's output dropped
    lines = log_lines(app, proc.id)
    for level in ("trace", "debug", "info", "warn"):
        assert (level, f"{level} 0") in lines
    assert ("error", "bad row 1") in lines
    assert ("info", "execution continues after log.error") in lines
    # the failed row was consumed: the next run starts after it
    again = by_step(run_app(app))["proc"]
    assert (again.status, again.rows_in, again.error) == ("succeeded", 3, None)
    assert [r["y"] for r in rows(app, "out", order_by="y")] == [0, 2, 3, 4, 5]


def test_log_error_in_every_execution_fails_the_run(tmp_path):
    app = processor_app(
        tmp_path,
        """
        log.error("cannot process " + INPUT_DATA[0]["label"])
        return [{"y": 1}]
        """,
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert "log.error was called in 3 of 3 executions" in proc.error
    assert rows(app, "out") == []
    again = run_app(app, steps=["proc"])[0]  # nothing was consumed: the same rows come again
    assert "3 of 3 executions" in again.error and "cannot process n0" in again.error


def test_log_error_in_bulk_mode_fails_the_run_but_execution_continues(tmp_path):
    app = processor_app(
        tmp_path,
        """
        log.error("upstream data is incomplete")
        log.info("still running")
        return [{"y": 1}]
        """,
        mode="bulk",
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert proc.error == "log.error was called: upstream data is incomplete"
    assert ("info", "still running") in log_lines(app, proc.id)
    assert rows(app, "out") == []


def test_succeeded_no_data_when_nothing_is_returned(tmp_path):
    app = processor_app(tmp_path, "return []")
    assert by_step(run_app(app))["proc"].status == "succeeded_no_data"


def test_sleep_and_unawaited_coroutine_warning(tmp_path):
    app = processor_app(
        tmp_path,
        """
        await sleep(0.01)
        sleep(5)
        return [{"y": INPUT_DATA[0]["n"]}]
        """,
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "succeeded", proc.error
    warnings = [m for level, m in log_lines(app, proc.id) if level == "warn"]
    assert any("proc.py, line 2" in m and "coroutine 'sleep' was never awaited" in m for m in warnings)
    assert any("repeated 3 times" in m for m in warnings)  # one line, counted, not one per row


def test_prints_and_log_lines_keep_their_order_in_the_run_log(tmp_path):
    statement = (
        'print("p1", INPUT_DATA[0]["n"])\n'
        'log.info("l2 " + str(INPUT_DATA[0]["n"]))\n'
        'print("p3")\n'
        'log.warn("l4")\n'
        'return [{"y": 1}]'
    )
    app = processor_app(tmp_path, statement)
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "succeeded", proc.error
    mine = [(level, m) for level, m in log_lines(app, proc.id) if m[:1] in "pl"]
    assert mine == [
        entry for n in range(3)
        for entry in (("info", f"p1 {n}"), ("info", f"l2 {n}"), ("info", "p3"), ("warn", "l4"))
    ]


def test_an_exception_in_row_mode_names_the_input_row(tmp_path):
    statement = 'if INPUT_DATA[0]["n"] == 1:\n    raise ValueError("boom")\nreturn [{"y": 1}]'
    app = processor_app(tmp_path, statement)
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert proc.error.startswith("ValueError: boom [input row 1] (at proc.py:2)"), proc.error
    assert "<stepwell row loop>" not in proc.traceback and 'File "proc.py", line 2' in proc.traceback


def test_timeout_is_timed_out(tmp_path):
    app = processor_app(tmp_path, "await sleep(30)\nreturn []", mode="bulk", extra="timeout: 1s")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "timed_out"
    assert proc.error == "the step exceeded its time limit (timeout 1s); it was stopped at proc.py:1"


@pytest.mark.parametrize("busy", ["while True:\n        pass", "await sleep(30)"])
def test_a_timeout_in_row_mode_names_the_input_row(tmp_path, busy):
    statement = f'if INPUT_DATA[0]["n"] == 2:\n    {busy}\nreturn [{{"y": 1}}]'
    app = processor_app(tmp_path, statement, extra="timeout: 1s")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "timed_out"
    assert proc.error == (
        "the step exceeded its time limit (timeout 1s); it was stopped at proc.py:2, input row 2"
    )
    assert rows(app, "out") == []  # nothing of a timed-out run is kept


# -- output schema -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement, fragments",
    [
        ('return [{"y": 1}, {"y": "two"}]',
         ["output row 1", "field 'y'", "expected int", "got str 'two'"]),
        ('return [{"y": True}]', ["output row 0", "field 'y'", "expected int", "got bool True"]),
        ('return [{"y": 1, "z": 2}]', ["output row 0", "field 'z' is not in the output schema"]),
        ('return [{"y": 1}, 5]', ["output row 1", "expected an object (dict)", "got int 5"]),
        ("return None", ["returned None", "return <list of objects>"]),
        ('return {"y": 1}', ["returned dict", "not a list"]),
        ('return [{"y": 1.5}]', ["field 'y'", "expected int", "got float 1.5"]),
    ],
)
def test_output_schema_errors_name_row_field_and_types(tmp_path, statement, fragments):
    app = processor_app(tmp_path, statement, mode="bulk")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    for fragment in fragments:
        assert fragment in proc.error, proc.error
    assert rows(app, "out") == []


@pytest.mark.parametrize("depth", [150, 3000])
def test_json_nested_too_deep_is_refused_naming_row_and_field(tmp_path, depth):
    statement = f"v = 1\nfor _ in range({depth}):\n    v = [v]\nreturn [{{'y': 1}}, {{'y': v}}]"
    app = processor_app(tmp_path, statement, mode="bulk", schema="{y: json}")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert "output row 1, field 'y'" in proc.error and "nested more than 100 levels" in proc.error
    assert rows(app, "out") == []


def test_row_mode_accepts_the_input_row_returned_with_its_fields_added(tmp_path):
    """The common Integray statement: extend the row, return it."""
    app = processor_app(
        tmp_path,
        'row = INPUT_DATA[0]\nrow["y"] = row["n"] * 2\nreturn [row]',
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "succeeded", proc.error
    assert [(r["n"], r["y"]) for r in rows(app, "out", order_by="n")] == [(0, 0), (1, 2), (2, 4)]
    changed = processor_app(
        tmp_path / "changed",
        'row = INPUT_DATA[0]\nrow["y"] = 1\nrow["n"] = 99\nreturn [row]',
    )
    proc = by_step(run_app(changed))["proc"]
    assert proc.status == "failed"
    assert "output row 0 (input row 0): the input fields it returns (" in proc.error
    assert "must come back unchanged" in proc.error and "n" in proc.error


def test_row_mode_schema_error_names_output_and_input_row(tmp_path):
    app = processor_app(
        tmp_path,
        'n = INPUT_DATA[0]["n"]\nreturn [{"y": n if n < 2 else str(n)}]',
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert "output row 2 (input row 2), field 'y': expected int, got str '2'" in proc.error


def test_datetime_decimal_numpy_and_pandas_values(tmp_path):
    app = processor_app(
        tmp_path,
        """
        import datetime
        import numpy as np
        import pandas as pd
        from decimal import Decimal
        rows = []
        for r in INPUT_DATA:
            n = r["n"]
            rows.append({
                "i": np.int64(n), "f": np.float32(0.5) + n, "b": np.bool_(n % 2 == 0),
                "d": Decimal("1.25") * n, "d2": n, "d3": 0.1,
                "ts": pd.Timestamp("2024-01-02 03:04:05") + pd.Timedelta(days=n),
                "ts2": np.datetime64("2024-05-06T07:08:09"),
                "aware": datetime.datetime(2024, 1, 1, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
                "day": datetime.date(2024, 2, n + 1),
                "j": {"n": np.int32(n), "when": datetime.date(2024, 1, 1), "amount": Decimal("2.5"),
                      "list": np.arange(2)},
                "nat": pd.NaT,
            })
        return rows
        """,
        mode="bulk",
        schema=(
            "{i: int, f: float, b: bool, d: 'decimal(12,2)', d2: decimal, d3: 'decimal(5,1)', "
            "ts: datetime, ts2: datetime, aware: datetime, day: date, j: json, nat: datetime}"
        ),
        extra="allowed_imports: [decimal]",
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "succeeded", proc.error
    out = rows(app, "out", order_by="i")
    first, last = out[0], out[-1]
    assert (first["i"], first["f"], first["b"]) == (0, 0.5, True)
    assert last["d"] == Decimal("2.50") and last["d2"] == 2 and first["d3"] == Decimal("0.1")
    assert first["ts"] == dt.datetime(2024, 1, 2, 3, 4, 5)
    assert last["ts"] == dt.datetime(2024, 1, 4, 3, 4, 5)
    assert first["ts2"] == dt.datetime(2024, 5, 6, 7, 8, 9)
    assert first["aware"] == dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)
    assert last["day"] == dt.date(2024, 2, 3)
    doc = first["j"] if isinstance(first["j"], dict) else __import__("json").loads(first["j"])
    assert doc == {"n": 0, "when": "2024-01-01", "amount": 2.5, "list": [0, 1]}
    assert first["nat"] is None


def test_decimal_with_too_many_places_is_an_error(tmp_path):
    app = processor_app(
        tmp_path,
        'from decimal import Decimal\nreturn [{"price": Decimal("1.234")}]',
        mode="bulk",
        schema="{price: 'decimal(10,2)'}",
        extra="allowed_imports: [decimal]",
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert "field 'price': expected decimal(10,2), got Decimal Decimal('1.234')" in proc.error
    assert "more than 2 decimal places" in proc.error


def test_checkpoint_column_must_exist(tmp_path):
    app = processor_app(tmp_path, "return []", mode="bulk", extra="checkpoint_column: nope")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert "checkpoint_column 'nope'" in proc.error


# -- restricted Python --------------------------------------------------------------------------


def test_documented_imports_work(tmp_path):
    app = processor_app(
        tmp_path,
        """
        import string
        import pandas as pd
        from json import dumps
        from xml import etree
        import math, itertools, random, warnings, base64, io, json, xml, ssl, time, datetime
        import yaml, numpy
        return [{"y": len(dumps({"a": string.ascii_lowercase})) + int(math.sqrt(4))}]
        """,
        mode="bulk",
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "succeeded", proc.error


def test_integrays_third_party_modules_work(tmp_path):
    """The modules Integray provides besides the standard library (installed with
    the `integray` extra, which `make setup` includes)."""
    app = processor_app(
        tmp_path,
        """
        import deepdiff, openai, matplotlib, matplotlib.pyplot
        import passlib.hash
        from jose import jwt
        token = jwt.encode({"sub": "ada"}, "secret", algorithm="HS256")
        hashed = passlib.hash.sha256_crypt.hash("pw")
        return [{"y": int(jwt.decode(token, "secret", algorithms=["HS256"])["sub"] == "ada")
                 + int(passlib.hash.sha256_crypt.verify("pw", hashed))
                 + len(deepdiff.DeepDiff({"a": 1}, {"a": 2}))}]
        """,
        mode="bulk",
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "succeeded", proc.error
    assert [r["y"] for r in rows(app, "out")] == [3]


@pytest.mark.parametrize(
    "statement, module, line",
    [
        ("x = 1\nimport os\nreturn []", "os", 2),
        ("import sys\nreturn []", "sys", 1),
        ("x = 1\ny = 2\nfrom xml.etree import ElementTree\nreturn []", "xml.etree", 3),
        ("import xml.etree\nreturn []", "xml.etree", 1),
    ],
)
def test_import_outside_the_allow_list_fails_naming_module_line_and_allowed(
    tmp_path, statement, module, line
):
    app = processor_app(tmp_path, statement, mode="bulk")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert f"line {line}: import of module {module!r} is not allowed" in proc.error
    assert "Allowed modules: base64, datetime," in proc.error and "yaml" in proc.error
    if module == "xml.etree":
        assert "'xml' is allowed, but that does not allow its submodule 'xml.etree'" in proc.error
    assert f"proc.py:{line}" in proc.error


def test_allowed_imports_extends_the_list_visibly(tmp_path):
    statement = 'import decimal\nfrom xml.etree import ElementTree\nreturn [{"y": 1}]'
    app = processor_app(tmp_path, statement, mode="bulk")
    assert "import of module 'decimal' is not allowed" in by_step(run_app(app))["proc"].error
    app = processor_app(
        tmp_path / "extended", statement, mode="bulk",
        extra="allowed_imports: [decimal, xml.etree]",
    )
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "succeeded", proc.error
    assert any(
        "allowed_imports of this step adds to the default allow-list: decimal, xml.etree" in m
        for _, m in log_lines(app, proc.id)
    )


def test_annotated_assignment_is_a_syntax_error_naming_the_line(tmp_path):
    app = processor_app(tmp_path, "number = 1\nnumber: int = 1\nreturn []")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert proc.error.startswith("SyntaxError: annotated assignments (type hints) are not allowed")
    assert "(proc.py, line 2)" in proc.error
    assert "number: int = 1" in proc.traceback


def test_plain_syntax_error_names_the_line(tmp_path):
    app = processor_app(tmp_path, "x = 1\nreturn [\n")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed" and proc.error.startswith("SyntaxError:")
    assert "proc.py, line 2" in proc.error


def test_allowed_but_not_installed_module(tmp_path):
    app = processor_app(tmp_path, "import stepwell_absent_module\nreturn []", mode="bulk",
                        extra="allowed_imports: [stepwell_absent_module]")
    proc = by_step(run_app(app))["proc"]
    assert proc.status == "failed"
    assert ("module 'stepwell_absent_module' is allowed in processor statements but is not "
            "installed") in proc.error


# -- exactly once ------------------------------------------------------------------------------------


def test_table_input_is_processed_exactly_once_across_runs(tmp_path, store_url):
    app = processor_app(
        tmp_path,
        'return [{"y": INPUT_DATA[0]["n"] * 2}]',
        extra="checkpoint_column: n",
    )
    for expected_in in (3, 3):
        runs = by_step(run_app(app, store_url))
        assert runs["proc"].status == "succeeded", runs["proc"].error
        assert runs["proc"].rows_in == expected_in
    idle = run_app(app, store_url, steps=["proc"])[0]
    assert (idle.status, idle.rows_in, idle.rows_out) == ("succeeded_no_data", 0, 0)
    out = rows(app, "out", store_url, order_by="n")
    assert [(r["n"], r["y"]) for r in out] == [(n, 2 * n) for n in range(6)]
    assert state_of(app, "proc", store_url)["DATA_CHECKPOINT"] == 5


def test_after_chains_on_the_previous_steps_output(tmp_path, store_url):
    app = write_app(
        tmp_path / "app",
        {
            "stepwell.yml": """
                steps:
                  - name: generate
                    processor: generate.py
                    mode: bulk
                    output: orders
                    output_schema: {id: int, amount: float}
                    checkpoint_column: id
                  - name: enrich
                    processor: enrich.py
                    after: generate
                    output: enriched
                    output_schema: {vat: float}
            """,
            "generate.py": """
                start = DATA_CHECKPOINT or 0
                return [{"id": start + i, "amount": 10.0 * (start + i)} for i in range(1, 4)]
            """,
            "enrich.py": """
                return [{"vat": INPUT_DATA[0]["amount"] * 0.2}]
            """,
        },
    )
    first = by_step(run_app(app, store_url))
    assert first["enrich"].status == "succeeded" and first["enrich"].rows_in == 3
    second = by_step(run_app(app, store_url))
    assert second["enrich"].rows_in == 3  # only the rows of generate's latest run
    alone = run_app(app, store_url, steps=["enrich"])[0]
    assert alone.status == "succeeded_no_data"
    out = rows(app, "enriched", store_url, order_by="id")
    assert [(r["id"], r["vat"]) for r in out] == [(i, pytest.approx(2.0 * i)) for i in range(1, 7)]


def test_after_needs_a_step_with_one_output_table(tmp_path):
    app = write_app(
        tmp_path / "app",
        {
            "stepwell.yml": """
                steps:
                  - name: split
                    node: split.py
                    outputs: {a: a, b: b}
                  - name: use
                    processor: use.py
                    after: split
                    output: used
                    output_schema: {n: int}
            """,
            "split.py": """
                from stepwell import Table
                Table("a", "w").append([{"n": 1}])
                Table("b", "w").append([{"n": 2}])
            """,
            "use.py": "return []",
        },
    )
    use = by_step(run_app(app))["use"]
    assert use.status == "failed"
    assert "`after: split`, which writes a, b" in use.error
    assert "use `input: <table>` instead" in use.error
