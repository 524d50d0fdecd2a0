"""Connector steps (Ascend style) end to end: real workers, real stores.

Listing and its validation, the four read interfaces (and the streaming
parsers behind ``read_bytes``), ``infer_schema``, incremental refresh (new,
changed, removed partitions, code changes), parallel partitions, failing
partitions, SIGKILL of a partition worker and of the host, credentials, an
HTTP API read page by page, requirements, and the CLI views.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from textwrap import dedent
from typing import Any

import pyarrow as pa
import pytest
from apputil import cli, logs, rows, run_app, write_app

from stepwell.store import open_store

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "connector_csv"
HEADER = "order_id,day,region,product,amount\n"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=["duckdb", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "duckdb":
        return None
    return request.getfixturevalue("make_pg_database")()


def partitions(app: Path, step: str, store_url: str | None = None) -> dict[str, Any]:
    store = open_store(store_url, app)
    try:
        return {p.name: p for p in store.get_partitions(step)}
    finally:
        store.close()


def connector_app(root: Path, code: str, *, step: str = "", files: dict[str, str] | None = None,
                  output: str = "out") -> Path:
    """An app with one connector step ``load`` (extra step keys in ``step``)."""
    extra = "".join(f"\n    {line}" for line in step.strip().splitlines()) if step.strip() else ""
    return write_app(
        root,
        {
            "stepwell.yml": f"steps:\n  - name: load\n    connector: connector.py\n"
                            f"    output: {output}{extra}\n",
            "connector.py": code,
            **(files or {}),
        },
    )


# -- the example: a folder of CSV files --------------------------------------------------


def test_csv_folder_example_reads_new_and_changed_files_and_drops_deleted_ones(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns(".stepwell"))
    (first,) = run_app(app, steps=["sales"])
    assert first.status == "succeeded", first.error
    assert first.info["partitions"]["listed"] == 4 and first.info["partitions"]["new"] == 4
    out = rows(app, "sales", order_by="order_id")
    assert len(out) == 12 and first.rows_out == 12
    source = {r["order_id"]: r["_partition"] for r in out}
    assert source[1001] == "2024/november.csv" and source[1302] == "2025/q1/february.csv"
    assert {r["region"] for r in out} == {"north", "south", "east", "west"}
    assert isinstance(out[0]["amount"], float) and len(out[0]["patterns_id"]) == 26

    (app / "data/2024/december.csv").write_text(HEADER + "1101,2024-12-01,south,kettle,45.50\n")
    (app / "data/2025/q1/march.csv").write_text(HEADER + "1401,2025-03-02,east,kettle,39.90\n")
    (app / "data/2025/q1/january.csv").unlink()
    (second,) = run_app(app, steps=["sales"])
    assert second.status == "succeeded", second.error
    counts = second.info["partitions"]
    assert (counts["new"], counts["changed"], counts["unchanged"], counts["removed"]) == (1, 1, 2, 1)
    assert second.rows_out == 2
    out = rows(app, "sales", order_by="order_id")
    assert [r["order_id"] for r in out] == [1001, 1002, 1003, 1004, 1101, 1301, 1302, 1303, 1401]
    assert [r["amount"] for r in out if r["order_id"] == 1101] == [45.5]
    stored = partitions(app, "sales")
    assert sorted(stored) == ["2024/december.csv", "2024/november.csv", "2025/q1/february.csv",
                              "2025/q1/march.csv"]
    assert stored["2024/december.csv"].rows == 1 and stored["2024/november.csv"].rows == 4

    (third,) = run_app(app, steps=["sales"])
    assert third.status == "succeeded_no_data"
    assert third.info["partitions"]["unchanged"] == 4 and third.info["partitions"]["read"] == 0
    everything = run_app(app)
    assert [r.status for r in everything] == ["succeeded_no_data", "succeeded"]
    assert {r["region"]: r["orders"] for r in rows(app, "sales_by_region")} == {
        "east": 1, "north": 3, "south": 3, "west": 2,
    }


# -- incremental refresh -------------------------------------------------------------------

SOURCE_CONNECTOR = """
    import json
    import time
    from pathlib import Path

    import pyarrow as pa

    SOURCE = Path(__file__).parent / "source.json"


    def context(credentials):
        return json.loads(SOURCE.read_text())


    def list_objects(context, metadata):
        if context.get("list_error"):
            raise RuntimeError("the listing API is down")
        for name, spec in sorted(context["partitions"].items()):
            yield {"name": name, "fingerprint": spec["fp"], "is_prefix": False, "n": spec["n"]}


    def read_arrow(context, metadata):
        name = metadata["name"]
        if name in context.get("fail", []):
            raise ValueError(f"cannot read {name}")
        time.sleep(context.get("sleep", 0))
        n = metadata["n"]
        return pa.table({"i": list(range(n)), "fp": [metadata["fingerprint"]] * n})
"""


def set_source(app: Path, partitions_: dict[str, tuple[str, int]], **extra: Any) -> None:
    spec = {name: {"fp": fp, "n": n} for name, (fp, n) in partitions_.items()}
    (app / "source.json").write_text(json.dumps({"partitions": spec, **extra}))


def by_partition(app: Path, store_url: str | None = None, table: str = "out") -> dict[str, list]:
    found: dict[str, list] = {}
    for row in rows(app, table, store_url, order_by="i"):
        found.setdefault(row["_partition"], []).append((row["i"], row["fp"]))
    return found


def test_partitions_may_share_a_fingerprint(tmp_path):
    """Two equal files have one content hash, files that arrive together one
    timestamp: each partition is compared with its own last fingerprint."""
    app = connector_app(tmp_path / "app", SOURCE_CONNECTOR)
    set_source(app, {"a": ("same", 2), "b": ("same", 1)})
    (first,) = run_app(app)
    assert first.status == "succeeded", first.error
    assert by_partition(app) == {"a": [(0, "same"), (1, "same")], "b": [(0, "same")]}
    set_source(app, {"a": ("same", 2), "b": ("new", 1)})
    (second,) = run_app(app)
    assert second.info["partitions"]["changed"] == 1 and second.info["partitions"]["read"] == 1
    assert by_partition(app)["b"] == [(0, "new")]


def test_rows_with_their_own_partition_column_are_told_it_is_replaced(tmp_path):
    code = SOURCE_CONNECTOR.replace(
        'return pa.table({"i": list(range(n)), "fp": [metadata["fingerprint"]] * n})',
        'return pa.table({"i": list(range(n)), "fp": [metadata["fingerprint"]] * n, '
        '"_partition": ["mine"] * n})',
    )
    app = connector_app(tmp_path / "app", code)
    set_source(app, {"a": ("a1", 1), "b": ("b1", 1)})
    (run,) = run_app(app)
    assert run.status == "succeeded", run.error
    assert sorted(by_partition(app)) == ["a", "b"]
    said = [line for line in logs(app, run.id) if "_partition column was replaced" in line]
    assert len(said) == 1 and "return that value under another column name" in said[0]


def test_incremental_refresh_reads_only_new_and_changed_partitions(tmp_path, store_url):
    app = connector_app(tmp_path / "app", SOURCE_CONNECTOR, step="parallelism: 2")
    set_source(app, {"a": ("a1", 3), "b": ("b1", 2), "c": ("c1", 1)})
    (first,) = run_app(app, store_url)
    assert first.status == "succeeded", first.error
    assert first.info["partitions"]["new"] == 3 and first.rows_out == 6
    assert by_partition(app, store_url) == {
        "a": [(0, "a1"), (1, "a1"), (2, "a1")], "b": [(0, "b1"), (1, "b1")], "c": [(0, "c1")],
    }

    set_source(app, {"a": ("a1", 3), "b": ("b2", 4), "d": ("d1", 2)})
    (second,) = run_app(app, store_url)
    assert second.status == "succeeded", second.error
    counts = second.info["partitions"]
    assert {k: counts[k] for k in ("listed", "new", "changed", "unchanged", "removed", "read")} == {
        "listed": 3, "new": 1, "changed": 1, "unchanged": 1, "removed": 1, "read": 2,
    }
    assert second.rows_out == 6
    assert by_partition(app, store_url) == {
        "a": [(0, "a1"), (1, "a1"), (2, "a1")],
        "b": [(0, "b2"), (1, "b2"), (2, "b2"), (3, "b2")],
        "d": [(0, "d1"), (1, "d1")],
    }
    stored = partitions(app, "load", store_url)
    assert {n: (p.fingerprint, p.rows, p.status) for n, p in stored.items()} == {
        "a": ("a1", 3, "succeeded"), "b": ("b2", 4, "succeeded"), "d": ("d1", 2, "succeeded"),
    }
    assert stored["a"].run_id == first.id and stored["b"].run_id == second.id
    assert all(p.duration_seconds is not None and p.duration_seconds >= 0 for p in stored.values())
    assert any("1 new, 1 changed, 1 unchanged, 1 removed" in line
               for line in logs(app, second.id, store_url))

    (third,) = run_app(app, store_url)
    assert third.status == "succeeded_no_data" and third.info["partitions"]["read"] == 0

    # a listing that fails changes nothing
    set_source(app, {"a": ("a9", 1)}, list_error=True)
    (broken,) = run_app(app, store_url)
    assert broken.status == "failed"
    assert broken.error.startswith("listing failed: RuntimeError: the listing API is down")
    assert "connector.py" in broken.traceback
    assert sorted(by_partition(app, store_url)) == ["a", "b", "d"]
    assert sorted(partitions(app, "load", store_url)) == ["a", "b", "d"]


def test_a_code_change_reads_every_partition_again(tmp_path):
    app = connector_app(tmp_path / "app", SOURCE_CONNECTOR)
    set_source(app, {"a": ("a1", 2), "b": ("b1", 3)})
    run_app(app)
    before = {r["patterns_id"] for r in rows(app, "out")}
    (same,) = run_app(app)
    assert same.info["partitions"]["read"] == 0
    with open(app / "connector.py", "a") as code:
        code.write("\n# a comment changes the code hash\n")
    (again,) = run_app(app)
    assert again.status == "succeeded", again.error
    assert again.info["partitions"]["changed"] == 2 and again.info["partitions"]["read"] == 2
    assert any("the connector's code changed" in line for line in logs(app, again.id))
    after = rows(app, "out")
    assert len(after) == 5 and not before & {r["patterns_id"] for r in after}
    (settled,) = run_app(app)
    assert settled.info["partitions"]["read"] == 0


def test_a_change_to_an_app_module_the_connector_imports_reads_every_partition_again(tmp_path):
    app = connector_app(tmp_path / "app", dedent("""
        import pandas as pd
        from helpers import FACTOR
        from lib.scale import offset
        def context(credentials):
            return {}
        def list_objects(context, metadata):
            yield {"name": "only", "fingerprint": "v1", "is_prefix": False}
        def read_pandas_dataframe(context, metadata):
            return pd.DataFrame({"v": [10 * FACTOR + offset()]})
    """), files={"helpers.py": "FACTOR = 1\n", "lib/__init__.py": "",
                 "lib/scale.py": "from .base import BASE\ndef offset():\n    return BASE\n",
                 "lib/base.py": "BASE = 0\n", "unrelated.py": "X = 1\n"})
    assert run_app(app)[0].status == "succeeded"
    (app / "unrelated.py").write_text("X = 2\n")  # not imported: nothing to read again
    assert run_app(app)[0].info["partitions"]["read"] == 0
    for file, text, expected in (("helpers.py", "FACTOR = 2\n", 20), ("lib/base.py", "BASE = 5\n", 25)):
        (app / file).write_text(text)
        (again,) = run_app(app)
        assert again.status == "succeeded", again.error
        assert again.info["partitions"]["read"] == 1, file
        assert [r["v"] for r in rows(app, "out")] == [expected]


def test_a_reset_output_table_makes_every_partition_be_read_again(tmp_path):
    app = connector_app(tmp_path / "app", SOURCE_CONNECTOR)
    set_source(app, {"a": ("a1", 2), "b": ("b1", 3)})
    run_app(app)
    store = open_store(None, app)
    try:
        with store.transaction() as tx:
            tx.reset("out")
            tx.commit()
    finally:
        store.close()
    (again,) = run_app(app)
    assert again.status == "succeeded" and again.info["partitions"]["read"] == 2
    assert len(rows(app, "out")) == 5


# -- listing ---------------------------------------------------------------------------------


NESTED = """
    import pyarrow as pa

    TREE = {
        None: [("top/", True), ("root.txt", False)],
        "top/": [("top/mid/", True), ("top/a", False)],
        "top/mid/": [("top/mid/deep/", True), ("top/mid/b", False)],
        "top/mid/deep/": [("top/mid/deep/c", False)],
    }
    SEEN = []


    def context(credentials):
        return {"calls": []}


    def list_objects(context, metadata):
        key = None if metadata is None else metadata["name"]
        if metadata is not None:
            assert metadata["is_prefix"] is True and metadata["depth"] == key.count("/")
        context["calls"].append(key)
        for name, is_prefix in TREE[key]:
            obj = {"name": name, "is_prefix": is_prefix, "depth": name.count("/")}
            if not is_prefix:
                obj["fingerprint"] = "fp-" + name
            yield obj


    def read_arrow(context, metadata):
        return pa.table({"name": [metadata["name"]], "depth": [metadata["depth"]],
                         "calls": [",".join(str(c) for c in context["calls"])]})
"""


def test_list_objects_is_called_again_for_every_prefix(tmp_path):
    app = connector_app(tmp_path / "app", NESTED)
    (run,) = run_app(app)
    assert run.status == "succeeded", run.error
    out = rows(app, "out", order_by="name")
    assert [(r["name"], r["_partition"], r["depth"]) for r in out] == [
        ("root.txt", "root.txt", 0), ("top/a", "top/a", 1), ("top/mid/b", "top/mid/b", 2),
        ("top/mid/deep/c", "top/mid/deep/c", 3),
    ]
    # the read worker called context afresh (its own process): no listing calls there
    assert {r["calls"] for r in out} == {""}


CONTRACT = {
    "head": "import pyarrow as pa\n\ndef context(credentials):\n    return {}\n\n",
    "list": "def list_objects(context, metadata):\n    yield {'name': 'a', 'fingerprint': 'f'}\n\n",
    "read": "def read_arrow(context, metadata):\n    return pa.table({'x': [1]})\n",
}


def _listing(body: str) -> str:
    return CONTRACT["head"] + "def list_objects(context, metadata):\n" + body + "\n\n" + CONTRACT["read"]


@pytest.mark.parametrize(
    ("code", "step", "message"),
    [
        pytest.param(
            CONTRACT["head"] + CONTRACT["list"]
            + "def read_dataframe(context, metadata):\n    return None\n",
            "",
            "connector connector.py defines no read function: define exactly one of read_bytes, "
            "read_pandas_dataframe, read_spark_dataframe, read_arrow (found: context, "
            "list_objects, read_dataframe); read_dataframe is not one of them",
            id="no-read-function",
        ),
        pytest.param(
            CONTRACT["head"] + CONTRACT["list"] + CONTRACT["read"]
            + "def read_pandas_dataframe(context, metadata):\n    return None\n",
            "",
            "connector connector.py defines 2 read functions (read_pandas_dataframe, read_arrow): "
            "keep exactly one",
            id="two-read-functions",
        ),
        pytest.param(
            CONTRACT["head"] + CONTRACT["read"], "",
            "connector connector.py does not define `list_objects(context, metadata)` (found: "
            "context, read_arrow)",
            id="no-list-objects",
        ),
        pytest.param(
            CONTRACT["list"] + CONTRACT["read"].replace("pa.table", "dict"), "",
            "connector connector.py does not define `context(credentials)`",
            id="no-context",
        ),
        pytest.param(
            _listing("    yield 'a.csv'"), "",
            "list_objects (at the root) yielded a str 'a.csv': yield dicts",
            id="not-a-dict",
        ),
        pytest.param(
            _listing("    yield {'fingerprint': 'x'}"), "",
            "list_objects (at the root) yielded an object whose 'name' is missing",
            id="no-name",
        ),
        pytest.param(
            _listing("    yield {'name': 'p/', 'is_prefix': True} if metadata is None else "
                     "{'name': 'p/a', 'fingerprint': 5}"), "",
            "object 'p/a' (under prefix 'p/'): 'fingerprint' must be a string, got int 5",
            id="fingerprint-not-a-string",
        ),
        pytest.param(
            _listing("    yield {'name': 'a', 'fingerprint': 'f1'}\n"
                     "    yield {'name': 'a', 'fingerprint': 'f2'}"), "",
            "object 'a' was listed twice (at the root and at the root)",
            id="duplicate-name",
        ),
        pytest.param(
            _listing("    yield {'name': 'a', 'fingerprint': 'f', 'is_prefix': 'no'}"), "",
            "object 'a' (at the root): 'is_prefix' must be True or False, got 'no'",
            id="is-prefix-not-bool",
        ),
        pytest.param(
            _listing("    yield {'name': 'loop/', 'is_prefix': True}"), "",
            "prefix 'loop/' (under prefix 'loop/') was listed twice",
            id="prefix-cycle",
        ),
        pytest.param(
            _listing("    return None"), "",
            "list_objects (at the root) returned None: it must yield dicts",
            id="returns-none",
        ),
        pytest.param(
            _listing("    yield {'name': 'a', 'fingerprint': 'f', 'client': object()}"), "",
            "object 'a': its metadata cannot be handed to the read function",
            id="metadata-not-sendable",
        ),
        pytest.param(
            CONTRACT["head"] + CONTRACT["list"]
            + "def read_bytes(context, metadata):\n    yield b'x\\n1\\n'\n", "",
            "connector connector.py reads with read_bytes: set the step's `parser:` to csv, "
            "jsonl or parquet",
            id="read-bytes-without-parser",
        ),
    ],
)
def test_contract_errors_name_what_was_found(tmp_path, code, step, message):
    app = connector_app(tmp_path / "app", code, step=step)
    (run,) = run_app(app)
    assert run.status == "failed"
    assert run.error.startswith("listing failed: ConnectorError: "), run.error
    assert message in run.error, run.error
    assert rows(app, "out") == [] and partitions(app, "load") == {}


# -- read interfaces -----------------------------------------------------------------------

INTERFACE_HEAD = """
    import io
    import json
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    DATA = {
        "p1": [{"id": 1, "name": "ann", "score": 1.5}, {"id": 2, "name": "bob", "score": 2.0}],
        "p2": [{"id": 3, "name": "cy", "score": 0.25}],
    }


    def context(credentials):
        return {}


    def list_objects(context, metadata):
        for name in DATA:
            yield {"name": name, "fingerprint": "v1-" + name}


    def pieces(data, size=7):
        for start in range(0, len(data), size):
            yield data[start:start + size]

"""

INTERFACES = {
    "pandas": ("", """
        def read_pandas_dataframe(context, metadata):
            return pd.DataFrame(DATA[metadata["name"]])
    """),
    "arrow-batches": ("", """
        def read_arrow(context, metadata):
            for row in DATA[metadata["name"]]:
                yield pa.RecordBatch.from_pylist([row])
    """),
    "arrow-table": ("", """
        def read_arrow(context, metadata):
            return pa.Table.from_pylist(DATA[metadata["name"]])
    """),
    "csv": ("parser: csv", """
        def read_bytes(context, metadata):
            lines = ["id,name,score"] + [f"{r['id']},{r['name']},{r['score']}"
                                         for r in DATA[metadata["name"]]]
            yield from pieces(("\\n".join(lines) + "\\n").encode())
    """),
    "jsonl": ("parser: jsonl", """
        def read_bytes(context, metadata):
            text = "".join(json.dumps(r) + "\\n" for r in DATA[metadata["name"]])
            yield from pieces(text.encode())
    """),
    "parquet": ("parser: parquet", """
        def read_bytes(context, metadata):
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(DATA[metadata["name"]]), buffer)
            yield from pieces(buffer.getvalue(), 100)
    """),
}


@pytest.mark.parametrize("interface", list(INTERFACES))
def test_read_interfaces(tmp_path, interface):
    step, reader = INTERFACES[interface]
    code = dedent(INTERFACE_HEAD) + dedent(reader)
    app = connector_app(tmp_path / "app", code, step=step)
    (run,) = run_app(app)
    assert run.status == "succeeded", (run.error, run.traceback)
    out = rows(app, "out", order_by="id")
    assert [(r["id"], r["name"], r["score"], r["_partition"]) for r in out] == [
        (1, "ann", 1.5, "p1"), (2, "bob", 2.0, "p1"), (3, "cy", 0.25, "p2"),
    ]
    assert run.info["read_function"] == (
        "read_pandas_dataframe" if interface == "pandas"
        else "read_arrow" if interface.startswith("arrow") else "read_bytes"
    )


def test_a_parquet_partition_larger_than_tmp_names_the_limit(tmp_path):
    """Parquet partitions are spooled to the worker's /tmp (a file system in memory of
    the step's `tmp` size) before they are read."""
    code = dedent(INTERFACE_HEAD) + dedent("""
        def read_bytes(context, metadata):
            rows = [{"id": i, "blob": f"{i:08d}" * 64} for i in range(8000)]
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buffer, compression="none")
            yield buffer.getvalue()
    """)
    app = connector_app(tmp_path / "app", code, step="parser: parquet\ntmp: 2MiB")
    (run,) = run_app(app)
    assert run.status == "failed"
    assert "No space left on device" in run.error
    assert "(/tmp holds at most 2MiB, its `tmp` limit; set a larger `tmp` on the step" in run.error
    (app / "stepwell.yml").write_text((app / "stepwell.yml").read_text().replace("2MiB", "64MiB"))
    (run,) = run_app(app)
    assert run.status == "succeeded", run.error
    assert len(rows(app, "out")) == 16000


SCHEMA_CONNECTOR = """
    import pyarrow as pa
    import pandas as pd

    FILES = {"a.csv": "zip,amount\\n00123,5\\n09000,7\\n"}


    def context(credentials):
        return {}


    def list_objects(context, metadata):
        for name in FILES:
            yield {"name": name, "fingerprint": "1"}


    def read_bytes(context, metadata):
        yield FILES[metadata["name"]].encode()


    def infer_schema():
        return SCHEMA
"""


@pytest.mark.parametrize(
    "schema",
    [
        'pa.schema([("zip", pa.string()), ("amount", pa.float64()), ("note", pa.string())])',
        '{"zip": "str", "amount": "float", "note": "string"}',
        'pd.DataFrame({"zip": pd.Series([], dtype=object), "amount": pd.Series([], dtype=float),'
        ' "note": pd.Series([], dtype=object)})',
    ],
    ids=["arrow", "mapping", "pandas"],
)
def test_infer_schema_fixes_column_types_without_reading_data(tmp_path, schema):
    app = connector_app(tmp_path / "app", dedent(SCHEMA_CONNECTOR) + f"\n\nSCHEMA = {schema}\n",
                        step="parser: csv")
    (run,) = run_app(app)
    assert run.status == "succeeded", (run.error, run.traceback)
    out = rows(app, "out", order_by="zip")
    assert [(r["zip"], r["amount"], r["note"]) for r in out] == [("00123", 5.0, None),
                                                                  ("09000", 7.0, None)]
    store = open_store(None, app)
    try:
        columns = {c.name: c.type for c in store.table_info("out").columns}
    finally:
        store.close()
    assert columns == {"zip": "str", "amount": "float", "note": "str", "_partition": "str",
                       "patterns_id": "str"}


def test_type_hints_copied_without_their_import_get_a_hint(tmp_path):
    code = CONTRACT["head"].replace("def context(credentials):", "def context(credentials) -> Dict:")
    (run,) = run_app(connector_app(tmp_path / "app", code + CONTRACT["list"] + CONTRACT["read"]))
    assert run.status == "failed"
    assert "NameError: name 'Dict' is not defined (add `from typing import Dict` at the top" in run.error


@pytest.mark.parametrize("result, message", [
    ("[{'a': 1}]", "returned a list of dict; return a pandas DataFrame (or yield DataFrames), "
                   "e.g. pd.DataFrame(rows)"),
    ("pd.DataFrame({'a': [1, 'x', 2.5, None]})", "column 'a' cannot be stored: it mixes float, "
                                                  "int, str values"),
])
def test_read_results_that_cannot_be_stored_say_what_to_return(tmp_path, result, message):
    code = (CONTRACT["head"] + "import pandas as pd\n" + CONTRACT["list"]
            + f"def read_pandas_dataframe(context, metadata):\n    return {result}\n")
    (run,) = run_app(connector_app(tmp_path / "app", code))
    assert run.status == "failed"
    assert run.error.startswith("partition 'a' failed: ConnectorError: "), run.error
    assert message in run.error, run.error


def test_infer_schema_creates_the_table_before_any_partition_exists(tmp_path):
    code = SCHEMA_CONNECTOR.replace('FILES = {"a.csv"', 'FILES = {} or {"a.csv"').replace(
        "for name in FILES:", "for name in []:"
    )
    app = connector_app(tmp_path / "app", dedent(code) + "\n\nSCHEMA = {'zip': 'str', 'amount': 'float'}\n",
                        step="parser: csv")
    (run,) = run_app(app)
    assert run.status == "succeeded_no_data", run.error
    store = open_store(None, app)
    try:
        info = store.table_info("out")
    finally:
        store.close()
    assert info is not None and info.row_count == 0
    assert [c.name for c in info.columns] == ["zip", "amount", "_partition", "patterns_id"]


def test_read_bytes_parsers_stream_without_holding_the_partition():
    """About 50 MB of CSV (and of JSON lines) parse with bounded memory: the parser
    reads a bounded distance ahead, so the first batch comes out long before the
    generator is exhausted and Arrow's memory stays far below the input's size."""
    from stepwell.runtimes.connector.readers import parse_bytes

    total_chunks = 1200
    line_block = "".join(f"{i},name-{i},{i * 0.5}\n" for i in range(2000)).encode()  # ~40 KB
    json_block = "".join(
        json.dumps({"id": i, "name": f"name-{i}", "v": i * 0.5}) + "\n" for i in range(800)
    ).encode()

    for parser, header, block, per_block in (
        ("csv", b"id,name,v\n", line_block, 2000),
        ("jsonl", b"", json_block, 800),
    ):
        state = {"chunks": 0, "peak": 0, "first_batch_at": None}

        def chunks(header: bytes = header, block: bytes = block, state: dict = state):
            if header:
                yield header
            for _ in range(total_chunks):
                state["chunks"] += 1
                state["peak"] = max(state["peak"], pa.total_allocated_bytes())
                yield block

        rows_seen = 0
        for batch in parse_bytes(chunks(), parser, None):
            if state["first_batch_at"] is None:
                state["first_batch_at"] = state["chunks"]
            rows_seen += batch.num_rows
        size = total_chunks * len(block)
        assert rows_seen == total_chunks * per_block
        assert state["first_batch_at"] < total_chunks / 2, (parser, state)
        assert state["peak"] < size / 2, (parser, state["peak"], size)


def test_read_bytes_empty_partitions_and_bad_chunks():
    from stepwell.runtimes.connector.contract import ConnectorError
    from stepwell.runtimes.connector.readers import parse_bytes

    for parser in ("csv", "jsonl", "parquet"):
        assert list(parse_bytes(iter([]), parser, None)) == []
    with pytest.raises(ConnectorError, match="read_bytes yielded a int; read_bytes must yield bytes"):
        list(parse_bytes(iter([b"a\n", 5]), "csv", None))


# -- parallel partitions, failures, crashes --------------------------------------------------------


def test_partitions_are_read_in_parallel_by_several_workers(tmp_path):
    code = """
        import time
        import pyarrow as pa

        def context(credentials):
            return {}

        def list_objects(context, metadata):
            for i in range(4):
                yield {"name": f"p{i}", "fingerprint": str(i)}

        def read_arrow(context, metadata):
            start = time.time()
            time.sleep(0.6)
            return pa.table({"start": [start], "end": [time.time()]})
    """
    app = connector_app(tmp_path / "app", code, step="parallelism: 2")
    (run,) = run_app(app)
    assert run.status == "succeeded", run.error
    assert run.info["partitions"]["parallelism"] == 2
    spans = [(r["start"], r["end"]) for r in rows(app, "out")]

    def running_at(t: float) -> int:
        return sum(1 for s, e in spans if s <= t < e)

    assert max(running_at(s) for s, _ in spans) == 2  # two at a time, never more
    # default: as many workers as cores (at most one per partition to read)
    code_default = code.replace("range(4)", "range(3)").replace("time.sleep(0.6)", "")
    other = connector_app(tmp_path / "other", code_default)
    (run,) = run_app(other)
    assert run.info["partitions"]["parallelism"] == min(os.cpu_count() or 1, 3)


def test_a_failing_partition_fails_the_run_and_keeps_committed_partitions(tmp_path):
    app = connector_app(tmp_path / "app", SOURCE_CONNECTOR, step="parallelism: 1")
    set_source(app, {n: (f"{n}1", 2) for n in "abcd"})
    assert run_app(app)[0].status == "succeeded"
    set_source(app, {n: (f"{n}2", 3) for n in "abcd"}, fail=["c"])
    (run,) = run_app(app)
    assert run.status == "failed"
    assert run.error.startswith("partition 'c' failed: ValueError: cannot read c (at connector.py:")
    assert "2 partitions committed, 1 failed, 1 not read" in run.error
    assert 'File "connector.py"' in run.traceback and "raise ValueError" in run.traceback
    assert run.rows_out == 6
    assert (run.info["partitions"]["succeeded"], run.info["partitions"]["failed"],
            run.info["partitions"]["skipped"]) == (2, 1, 1)
    found = by_partition(app)
    assert {n: {fp for _, fp in v} for n, v in found.items()} == {
        "a": {"a2"}, "b": {"b2"}, "c": {"c1"}, "d": {"d1"},
    }
    stored = partitions(app, "load")
    assert (stored["c"].status, stored["c"].fingerprint, stored["c"].rows) == ("failed", "c1", 2)
    assert "cannot read c" in stored["c"].error
    assert (stored["d"].status, stored["d"].fingerprint) == ("succeeded", "d1")

    set_source(app, {n: (f"{n}2", 3) for n in "abcd"})
    (fixed,) = run_app(app)
    assert fixed.status == "succeeded", fixed.error
    assert fixed.info["partitions"]["read"] == 2 and fixed.info["partitions"]["unchanged"] == 2
    assert {n: len(v) for n, v in by_partition(app).items()} == {"a": 3, "b": 3, "c": 3, "d": 3}


def test_fields_of_json_credentials_are_masked_in_errors_and_logs(tmp_path):
    """Ascend hands credentials over as a string, usually JSON: a field of it
    printed or raised is a secret too."""
    app = connector_app(tmp_path / "app", dedent("""
        import json
        def context(credentials):
            return json.loads(credentials)
        def list_objects(context, metadata):
            yield {"name": "only", "fingerprint": "v1", "is_prefix": False}
        def read_pandas_dataframe(context, metadata):
            print("using", context["token"], "on", context["region"])
            raise RuntimeError("upstream 503, token=" + context["token"])
    """), step='credentials: "${{ secrets.cf }}"')
    token = "Zq93xw"  # shorter than a masked piece of the whole string
    credentials = json.dumps({"token": token, "region": "eu", "fail": True})
    (run,) = run_app(app, environ={**os.environ, "STEPWELL_SECRET_CF": credentials})
    assert run.status == "failed"
    assert "token=***" in run.error and token not in run.traceback
    assert "using *** on eu" in logs(app, run.id)
    assert token not in partitions(app, "load")["only"].error


def test_the_step_time_limit_covers_the_whole_refresh(tmp_path):
    app = connector_app(tmp_path / "app", SOURCE_CONNECTOR, step="parallelism: 2\ntimeout: 3s")
    set_source(app, {"fast": ("f1", 1), "slow1": ("s1", 1), "slow2": ("s2", 1)})
    assert run_app(app)[0].status == "succeeded"
    set_source(app, {"fast": ("f2", 2), "slow1": ("s3", 1), "slow2": ("s4", 1)}, sleep=30)
    started = time.monotonic()
    (run,) = run_app(app)
    assert time.monotonic() - started < 20
    assert run.status == "timed_out", (run.status, run.error)
    # the partition being read when the limit passed, and the line its code was at
    assert re.match(r"partition '\w+' failed: the step exceeded its time limit \(timeout 3s\); "
                    r"it was stopped at connector\.py:\d+ ", run.error), run.error
    stored = partitions(app, "load")
    assert {n: p.fingerprint for n, p in stored.items()} == {"fast": "f1", "slow1": "s1",
                                                            "slow2": "s2"}
    assert {n: len(v) for n, v in by_partition(app).items()} == {"fast": 1, "slow1": 1, "slow2": 1}


class Beacon:
    """An abstract Unix socket that connector code connects to from inside its worker:
    the test learns the worker's pid as the host sees it (SO_PEERCRED) and the
    worker waits until the test closes the connection (or kills it)."""

    def __init__(self) -> None:
        self.name = f"stepwell-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind("\0" + self.name)
        self.sock.listen(8)
        self.sock.settimeout(120)

    def accept(self) -> tuple[socket.socket, int]:
        conn, _ = self.sock.accept()
        pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        return conn, pid

    def close(self) -> None:
        self.sock.close()


BEACON_CONNECTOR = SOURCE_CONNECTOR + """

    import socket as _socket

    def _wait_for_test(name):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.connect("\\0" + name)
        sock.recv(1)


    _plain_read = read_arrow


    def read_arrow(context, metadata):
        if metadata["name"] == context.get("block"):
            _wait_for_test(context["beacon"])
        return _plain_read(context, metadata)
"""


def test_sigkill_of_a_partition_worker_keeps_each_partition_whole(tmp_path):
    app = connector_app(tmp_path / "app", BEACON_CONNECTOR, step="parallelism: 1\nnetwork: true")
    set_source(app, {n: (f"{n}1", 2) for n in "abc"})
    assert run_app(app)[0].status == "succeeded"
    beacon = Beacon()
    set_source(app, {n: (f"{n}2", 4) for n in "abc"}, block="b", beacon=beacon.name)
    result: list = []
    thread = threading.Thread(target=lambda: result.extend(run_app(app)))
    thread.start()
    try:
        conn, pid = beacon.accept()  # partition b is being read; a is committed
        os.kill(pid, signal.SIGKILL)
        thread.join(120)
        conn.close()
    finally:
        beacon.close()
    (run,) = result
    assert run.status == "killed", (run.status, run.error)
    assert "partition 'b' failed" in run.error and "SIGKILL" in run.error
    found = by_partition(app)
    assert found["a"] == [(i, "a2") for i in range(4)]
    assert found["b"] == [(0, "b1"), (1, "b1")] and found["c"] == [(0, "c1"), (1, "c1")]
    stored = partitions(app, "load")
    assert (stored["b"].status, stored["b"].fingerprint) == ("failed", "b1")
    set_source(app, {n: (f"{n}2", 4) for n in "abc"})
    (again,) = run_app(app)
    assert again.status == "succeeded" and again.info["partitions"]["read"] == 2
    assert all(v == [(i, f"{n}2") for i in range(4)] for n, v in by_partition(app).items())


def _check_partitions_whole(app: Path) -> int:
    """Every partition's rows match its record (count and fingerprint); returns the
    number of partitions holding the final fingerprint."""
    found = by_partition(app)
    stored = partitions(app, "load")
    assert set(found) <= set(stored), f"rows without a record: {set(found) - set(stored)}"
    final = 0
    for name, record in stored.items():
        got = found.get(name, [])
        assert len(got) == record.rows, (name, len(got), record)
        assert {fp for _, fp in got} <= {record.fingerprint}, (name, record)
        assert [i for i, _ in got] == list(range(record.rows)), name
        final += record.fingerprint.endswith("-v2")
    return final


TICKING_CONNECTOR = SOURCE_CONNECTOR + """

    import socket as _socket

    _plain_read = read_arrow


    def read_arrow(context, metadata):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.connect("\\0" + context["ticker"])  # tell the test a read started
        sock.close()
        return _plain_read(context, metadata)
"""


class Ticker(Beacon):
    """Counts the partition reads that started (one connection each)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()
            self.count += 1

    def wait_for(self, count: int, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.count >= count


def test_sigkill_of_the_host_at_random_points_never_half_replaces_a_partition(tmp_path):
    """Kill the host (and with it every worker) after a random number of partition
    reads have started, plus a random delay (so kills land while rows stream in,
    while partitions wait to commit and while they commit); after each kill every
    partition holds exactly the rows of the fingerprint its record names."""
    app = connector_app(tmp_path / "app", TICKING_CONNECTOR,
                        step="parallelism: 2\ntimeout: 120s\nnetwork: true")
    names = [f"part{i:02d}" for i in range(24)]
    ticker = Ticker()
    set_source(app, {n: (f"{n}-v1", 3) for n in names}, ticker=ticker.name)
    assert run_app(app)[0].status == "succeeded"
    set_source(app, {n: (f"{n}-v2", 400 + i) for i, n in enumerate(names)}, sleep=0.15,
               ticker=ticker.name)
    rng = random.Random(4321)
    progress = []  # partitions holding the new fingerprint after each kill
    try:
        for _attempt in range(6):
            proc = subprocess.Popen(
                [sys.executable, "-m", "stepwell.cli", "run", str(app)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            )
            target = ticker.count + rng.randint(2, 5)
            while proc.poll() is None and not ticker.wait_for(target, timeout=0.2):
                pass
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is not None:
                assert proc.returncode == 0, proc.stderr.read().decode()
                break
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            progress.append(_check_partitions_whole(app))
    finally:
        ticker.close()
    assert len(progress) >= 3, progress
    # the kills landed in the middle of the refresh, with part of it committed
    assert any(0 < done < len(names) for done in progress), progress
    ticker = Ticker()
    try:
        set_source(app, {n: (f"{n}-v2", 400 + i) for i, n in enumerate(names)},
                   ticker=ticker.name)
        (final,) = run_app(app)
    finally:
        ticker.close()
    assert final.status in ("succeeded", "succeeded_no_data"), final.error
    assert _check_partitions_whole(app) == len(names)
    store = open_store(None, app)
    try:
        statuses = [r.status for r in store.list_runs(step="load", limit=100)]
    finally:
        store.close()
    assert "running" not in statuses and statuses.count("killed") == len(progress), statuses


# -- credentials, HTTP, requirements ---------------------------------------------------------------

SECRET = "s3cr3t-token-4711"

CREDENTIALS_CONNECTOR = f"""
    import hashlib
    import os
    import sys

    import pyarrow as pa

    SECRET_SHA = {hashlib.sha256(SECRET.encode()).hexdigest()!r}


    def _has_secret(value, depth=0):
        if isinstance(value, str):
            return any(
                hashlib.sha256(value[i:i + {len(SECRET)}].encode()).hexdigest() == SECRET_SHA
                for i in range(max(len(value) - {len(SECRET)} + 1, 0))
            )
        if depth > 6:
            return False
        if isinstance(value, dict):
            return any(_has_secret(k, depth + 1) or _has_secret(v, depth + 1)
                       for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return any(_has_secret(v, depth + 1) for v in value)
        return False


    def _leaks(*values):
        frames = []
        frame = sys._getframe(1)
        while frame is not None:
            frames.append(dict(frame.f_locals))
            frame = frame.f_back
        return (_has_secret(dict(os.environ)) or _has_secret(list(values))
                or _has_secret(frames) or _has_secret(sys.argv))


    def context(credentials):
        assert hashlib.sha256(credentials.encode()).hexdigest() == SECRET_SHA
        print("connecting with", credentials)
        return {{"client": "ready"}}


    def list_objects(context, metadata):
        yield {{"name": "one", "fingerprint": "1", "leak": _leaks(context, metadata)}}


    def read_arrow(context, metadata):
        return pa.table({{"listing_saw_secret": [metadata["leak"]],
                          "read_saw_secret": [_leaks(context, metadata)]}})
"""


def test_credentials_come_from_a_secret_and_reach_only_context(tmp_path):
    app = connector_app(tmp_path / "app", CREDENTIALS_CONNECTOR,
                        step='credentials: "${{ secrets.api_token }}"')
    environ = {**os.environ, "STEPWELL_SECRET_API_TOKEN": SECRET}
    (run,) = run_app(app, environ=environ)
    assert run.status == "succeeded", (run.error, run.traceback)
    (row,) = rows(app, "out")
    assert (row["listing_saw_secret"], row["read_saw_secret"]) == (False, False)
    lines = logs(app, run.id)
    assert "connecting with ***" in lines and not any(SECRET in line for line in lines)
    (missing,) = run_app(app, environ={k: v for k, v in os.environ.items()
                                       if k != "STEPWELL_SECRET_API_TOKEN"})
    assert missing.status == "failed" and "secret 'api_token' used by step 'load' is not set" in missing.error


class _Api(http.server.BaseHTTPRequestHandler):
    """A paged JSON API: /versions, and /items/<resource>?page=N (bearer token needed)."""

    token = "api-key-1"
    versions = {"orders": "1", "customers": "1"}
    data = {"orders": [{"id": i, "total": i * 2.5} for i in range(7)],
            "customers": [{"id": i, "total": float(i)} for i in range(3)]}
    page_size = 3
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.requests.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self._send(401, {"error": "unauthorized"})
        elif self.path == "/versions":
            self._send(200, self.versions)
        elif self.path.startswith("/items/"):
            resource, _, query = self.path[len("/items/"):].partition("?")
            page = int(query.split("=")[1]) if query else 0
            items = self.data[resource][page * self.page_size:(page + 1) * self.page_size]
            more = (page + 1) * self.page_size < len(self.data[resource])
            self._send(200, {"items": items, "next": page + 1 if more else None})
        else:
            self._send(404, {"error": "no such path"})

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


HTTP_CONNECTOR = """
    import json
    import urllib.request


    def context(credentials):
        settings = json.loads(credentials)
        return {"base": settings["url"], "headers": {"Authorization": "Bearer " + settings["key"]}}


    def _get(context, path):
        request = urllib.request.Request(context["base"] + path, headers=context["headers"])
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


    def list_objects(context, metadata):
        for resource, version in sorted(_get(context, "/versions").items()):
            yield {"name": resource, "fingerprint": f"{resource}-v{version}", "is_prefix": False}


    def read_bytes(context, metadata):
        page = 0
        while page is not None:
            body = _get(context, f"/items/{metadata['name']}?page={page}")
            yield "".join(json.dumps(item) + "\\n" for item in body["items"]).encode()
            page = body["next"]
"""


def test_http_api_read_page_by_page(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Api.requests.clear()
    try:
        app = connector_app(tmp_path / "app", HTTP_CONNECTOR,
                            step='credentials: "${{ secrets.api }}"\nparser: jsonl\nnetwork: true')
        secret = json.dumps({"url": f"http://127.0.0.1:{server.server_port}", "key": _Api.token})
        environ = {**os.environ, "STEPWELL_SECRET_API": secret}
        (run,) = run_app(app, environ=environ)
        assert run.status == "succeeded", (run.error, run.traceback)
        out = rows(app, "out", order_by="total")
        assert sorted((r["_partition"], r["id"]) for r in out) == sorted(
            [("orders", i) for i in range(7)] + [("customers", i) for i in range(3)]
        )
        assert sorted(p for p in _Api.requests if "orders" in p) == [
            "/items/orders?page=0", "/items/orders?page=1", "/items/orders?page=2",
        ]
        _Api.requests.clear()
        _Api.versions["customers"] = "2"
        _Api.data["customers"].append({"id": 3, "total": 3.0})
        (again,) = run_app(app, environ=environ)
        assert again.status == "succeeded" and again.info["partitions"]["read"] == 1
        assert [p for p in _Api.requests if p.startswith("/items")] == ["/items/customers?page=0",
                                                                         "/items/customers?page=1"]
        assert len(rows(app, "out")) == 11
    finally:
        server.shutdown()
        server.server_close()


def test_packages_from_the_requirements_file_are_available_and_cached(tmp_path, monkeypatch):
    from test_envs import make_wheel

    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("STEPWELL_CACHE_DIR", str(tmp_path / "cache"))
    app = tmp_path / "app"
    app.mkdir()
    wheel = make_wheel(app, "conndep", "1.2.3")
    (app / "requirements.txt").write_text(f"./{wheel.name}\n")
    write_app(app, {
        "stepwell.yml": """
            requirements_file: requirements.txt
            steps:
              - name: load
                connector: connector.py
                output: out
        """,
        "connector.py": """
            import pyarrow as pa

            def context(credentials):
                import conndep
                return {"version": conndep.VERSION}

            def list_objects(context, metadata):
                yield {"name": "only", "fingerprint": context["version"]}

            def read_arrow(context, metadata):
                import conndep
                return pa.table({"version": [conndep.VERSION]})
        """,
    })
    (first,) = run_app(app)
    assert first.status == "succeeded", (first.error, first.traceback)
    assert rows(app, "out")[0]["version"] == "1.2.3"
    (second,) = run_app(app)
    assert second.status == "succeeded_no_data"
    assert any("environment" in line and "reused" in line for line in logs(app, second.id))


# -- command line --------------------------------------------------------------------------------


def test_cli_shows_partitions_in_state_and_runs(tmp_path):
    app = connector_app(tmp_path / "app", SOURCE_CONNECTOR)
    set_source(app, {"a": ("a1", 2), "b": ("b1", 1)})
    result = cli("run", str(app))
    assert result.returncode == 0, result.stderr
    state = json.loads(cli("state", str(app), "load").stdout)
    assert [(p["name"], p["fingerprint"], p["rows"], p["status"]) for p in state["partitions"]] == [
        ("a", "a1", 2, "succeeded"), ("b", "b1", 1, "succeeded"),
    ]
    assert all(p["duration_seconds"] is not None for p in state["partitions"])
    runs = json.loads(cli("runs", str(app), "--json").stdout)
    assert runs[0]["partitions"]["listed"] == 2 and runs[0]["partitions"]["succeeded"] == 2
    table = cli("runs", str(app)).stdout
    assert "2 listed, 2 read" in table
    # a reset forgets the partitions: the next refresh reads (and replaces) them all
    reset = json.loads(cli("state", str(app), "load", "--reset").stdout)
    assert "partitions" not in reset
    assert cli("run", str(app)).returncode == 0
    runs = json.loads(cli("runs", str(app), "--json").stdout)
    assert runs[0]["partitions"]["succeeded"] == 2
    assert sorted(r["_partition"] for r in json.loads(cli("table", str(app), "out", "--json").stdout)) == [
        "a", "a", "b"]


# -- Spark -----------------------------------------------------------------------------------------------

SPARK_CONNECTOR = """
    from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

    SCHEMA = StructType([StructField("id", LongType()), StructField("name", StringType()),
                         StructField("score", DoubleType())])


    def context(credentials):
        return {"rows": {"p1": [(1, "ann", 1.5), (2, "bob", 2.0)], "p2": [(3, "cy", 0.5)]}}


    def list_objects(context, metadata):
        for name in context["rows"]:
            yield {"name": name, "fingerprint": name, "is_prefix": False}


    def read_spark_dataframe(spark, context, metadata):
        return spark.createDataFrame(context["rows"][metadata["name"]], schema=SCHEMA)


    def infer_schema():
        return SCHEMA
"""


def test_read_spark_dataframe_with_a_local_session(tmp_path):
    if os.environ.get("STEPWELL_SKIP_SPARK") == "1":
        pytest.skip("Spark tests skipped because STEPWELL_SKIP_SPARK=1")
    try:
        import pyspark  # noqa: F401
    except ImportError:
        pytest.fail("pyspark is not installed: `uv sync --extra spark` (or set "
                    "STEPWELL_SKIP_SPARK=1 to skip)", pytrace=False)
    if shutil.which("java") is None:
        pytest.fail("Spark needs a Java runtime: install openjdk-17-jre-headless (or set "
                    "STEPWELL_SKIP_SPARK=1 to skip)", pytrace=False)
    app = connector_app(tmp_path / "app", SPARK_CONNECTOR, step="parallelism: 1\ntimeout: 240s")
    (run,) = run_app(app)
    assert run.status == "succeeded", (run.error, run.traceback)
    out = rows(app, "out", order_by="id")
    assert [(r["id"], r["name"], r["score"], r["_partition"]) for r in out] == [
        (1, "ann", 1.5, "p1"), (2, "bob", 2.0, "p1"), (3, "cy", 0.5, "p2"),
    ]


def test_cancel_stops_every_worker_of_the_refresh(tmp_path):
    from stepwell.app import load_app
    from stepwell.engine.runner import Runner

    app = connector_app(tmp_path / "app", BEACON_CONNECTOR, step="parallelism: 2\nnetwork: true")
    set_source(app, {n: (f"{n}1", 1) for n in "abc"})
    assert run_app(app)[0].status == "succeeded"
    beacon = Beacon()
    set_source(app, {n: (f"{n}2", 2) for n in "abc"}, block="b", beacon=beacon.name)
    store = open_store(None, app)
    try:
        runner = Runner(load_app(app), store)
        result: list = []
        thread = threading.Thread(target=lambda: result.append(runner.run_step("load")))
        thread.start()
        try:
            conn, _pid = beacon.accept()  # partition b is being read (held until killed)
            (run_id,) = runner.active_runs()
            assert runner.cancel(run_id, "stopped by the test")
            thread.join(60)
            conn.close()
        finally:
            beacon.close()
        (run,) = result
        assert run.status == "cancelled" and run.error == "stopped by the test"
        assert store.get_partitions("load")[1].fingerprint == "b1"
    finally:
        store.close()
    assert by_partition(app)["b"] == [(0, "b1")]


# -- prefixes: unchanged subtrees are not listed again ------------------------------------

TREE = '''
import os

def context(credentials):
    return {}

def list_objects(context, metadata):
    # a prefix's fingerprint is its folder's .version file (like a folder etag)
    where = "data" if metadata is None else os.path.join("data", metadata["name"])
    print(f"listing {metadata['name'] if metadata else '/'}")
    for entry in sorted(os.scandir(where), key=lambda e: e.name):
        name = os.path.relpath(entry.path, "data")
        if entry.is_dir():
            with open(os.path.join(entry.path, ".version")) as version:
                yield {"name": name + "/", "fingerprint": version.read().strip(), "is_prefix": True}
        elif not entry.name.startswith("."):
            with open(entry.path) as data:
                yield {"name": name, "fingerprint": name + ":" + data.read(), "is_prefix": False}

def read_bytes(context, metadata):
    with open(os.path.join("data", metadata["name"]), "rb") as data:
        yield data.read()
'''


def test_unchanged_prefixes_are_not_listed_again(tmp_path, store_url):
    files = {
        "data/a/.version": "1", "data/a/x.csv": "v\n1\n",
        "data/b/.version": "1", "data/b/y.csv": "v\n2\n",
        "data/b/sub/.version": "1", "data/b/sub/z.csv": "v\n3\n",
    }  # fmt: skip
    app = connector_app(tmp_path / "app", TREE, step="parser: csv", files=files)

    summaries: list[str] = []

    def refresh(expect_status: str = "succeeded") -> tuple[dict[str, int], set[str]]:
        (run,) = run_app(app, store_url)
        assert run.status == expect_status, run.error
        lines = logs(app, run.id, store_url)
        listed = {m.split(" ", 1)[1] for m in lines if m.startswith("listing ")}
        summaries.extend(m for m in lines if " partitions: " in m)
        return run.info["partitions"], listed

    def values() -> list[int]:
        return sorted(r["v"] for r in rows(app, "out", store_url))

    counts, listed = refresh()
    assert listed == {"/", "a/", "b/", "b/sub/"} and counts["new"] == 3 and values() == [1, 2, 3]

    counts, listed = refresh("succeeded_no_data")  # nothing changed: only the root is listed
    assert listed == {"/"}
    assert (counts["unchanged"], counts["removed"], counts["under_unchanged_prefixes"]) == (3, 0, 3)
    assert summaries[-1].startswith("[stepwell] 3 partitions: 0 new, 0 changed, 3 unchanged (3 of "
                                    "the unchanged under 2 unchanged prefixes, not listed again), 0 removed")
    assert sorted(partitions(app, "load", store_url)) == ["a/x.csv", "b/sub/z.csv", "b/y.csv"]
    assert values() == [1, 2, 3]

    (app / "data/b/sub/w.csv").write_text("v\n4\n")  # a new file deep in b/
    (app / "data/b/.version").write_text("2")
    (app / "data/b/sub/.version").write_text("2")
    counts, listed = refresh()
    assert listed == {"/", "b/", "b/sub/"} and counts["new"] == 1 and counts["unchanged"] == 3
    assert values() == [1, 2, 3, 4]

    (app / "data/b/bad.csv").write_text('v\n"unterminated\n')  # its read fails
    (app / "data/b/.version").write_text("3")
    counts, listed = refresh("failed")
    assert "b/" in listed and counts["failed"] == 1
    # fixed, and the prefix's fingerprint back at the one its subtree was last read
    # in full at: b/ is listed again all the same, as a file below it failed
    (app / "data/b/bad.csv").write_text("v\n5\n")
    (app / "data/b/.version").write_text("2")
    counts, listed = refresh()
    assert listed == {"/", "b/"} and counts["succeeded"] == 1 and values() == [1, 2, 3, 4, 5]
    counts, listed = refresh("succeeded_no_data")
    assert listed == {"/"}

    (app / "data/a/x.csv").unlink()  # a removed prefix takes its partitions along
    shutil.rmtree(app / "data/a")
    counts, listed = refresh()
    assert counts["removed"] == 1 and values() == [2, 3, 4, 5]

    (app / "connector.py").write_text(TREE + "\n# changed\n")  # new code: everything again
    counts, listed = refresh()
    assert listed == {"/", "b/", "b/sub/"} and counts["changed"] == 4

    cli("state", str(app), "load", "--reset", *(["--store", store_url] if store_url else []))
    counts, listed = refresh()  # a reset forgets the prefixes too
    assert listed == {"/", "b/", "b/sub/"} and counts["new"] == 4 and values() == [2, 3, 4, 5]


def test_infer_schema_taking_spark_starts_it_only_when_used():
    from stepwell.runtimes.connector.contract import call_infer_schema

    started = []

    def make():
        started.append(1)
        return type("FakeSession", (), {"version": "3.5"})()

    def struct_only(spark, context, metadata):
        return {"zip": "str"}  # a StructType needs no session

    assert call_infer_schema(struct_only, {}, make) == {"zip": "str"} and started == []

    def uses_it(spark, context, metadata):
        return {"v": spark.version}

    assert call_infer_schema(uses_it, {}, make) == {"v": "3.5"} and started == [1]
