"""One conformance suite for every store backend (see the ``store`` fixture)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from stepwell.store import (
    DuckDBStore,
    LogLine,
    RunRecord,
    SchemaConflict,
    Store,
    StoreError,
    StreamPosition,
    open_store,
)
from stepwell.store.schema import JSON_METADATA, is_json_field, to_pylist


def write(store: Store, table: str, data: pa.Table | dict[str, list[Any]], **kw: Any) -> int:
    """Append in a committed transaction of its own."""
    if isinstance(data, dict):
        data = pa.table(data)
    with store.transaction() as tx:
        written = tx.append(table, data, **kw)
        tx.commit()
    return written


def rows(store: Store, table: str, order_by: list[str] | None = None, **kw: Any) -> list[dict]:
    out: list[dict] = []
    for batch in store.scan(table, order_by=order_by, **kw):
        out.extend(to_pylist(batch))
    return out


def column_types(store: Store, table: str) -> dict[str, str]:
    info = store.table_info(table)
    assert info is not None
    return {c.name: c.type for c in info.columns}


# -- creating and widening ----------------------------------------------------------


def test_first_append_creates_table_with_inferred_schema(store: Store) -> None:
    assert store.table_info("orders") is None
    written = write(store, "orders", {"id": [1, 2], "name": ["a", "b"], "price": [1.5, 2.0]})
    assert written == 2
    info = store.table_info("orders")
    assert info is not None
    assert info.row_count == 2 and info.version == 1 and info.unique_on is None
    uncounted = store.table_info("orders", count_rows=False)
    assert uncounted is not None and uncounted.row_count is None
    assert (uncounted.columns, uncounted.version) == (info.columns, info.version)
    assert store.table_info("missing", count_rows=False) is None
    assert column_types(store, "orders") == {"id": "int", "name": "str", "price": "float"}
    assert [t.name for t in store.list_tables()] == ["orders"]
    assert rows(store, "orders", ["id"]) == [
        {"id": 1, "name": "a", "price": 1.5},
        {"id": 2, "name": "b", "price": 2.0},
    ]


def test_new_column_is_added_and_missing_columns_get_null(store: Store) -> None:
    write(store, "t", {"a": [1]})
    write(store, "t", {"b": ["x"]})
    assert column_types(store, "t") == {"a": "int", "b": "str"}
    assert rows(store, "t", ["a"]) == [{"a": None, "b": "x"}, {"a": 1, "b": None}]


def test_columns_in_any_order_land_in_their_own_columns(store: Store) -> None:
    write(store, "t", {"a": [1], "b": [10]})
    write(store, "t", {"b": [20], "a": [2]})  # another order
    write(store, "t", {"a": [3], "b": [30]})  # the table's order (may go in by position)
    write(store, "t", {"c": ["x"], "a": [4]})  # a new column, one missing
    write(store, "t", {"a": [5], "b": [50], "c": ["y"]})  # the table's order again
    with store.transaction() as tx:
        tx.upsert("t", pa.table({"a": [5], "b": [55], "c": ["z"]}), ["a"])
        tx.commit()
    assert rows(store, "t", ["a"]) == [
        {"a": 1, "b": 10, "c": None},
        {"a": 2, "b": 20, "c": None},
        {"a": 3, "b": 30, "c": None},
        {"a": 4, "b": None, "c": "x"},
        {"a": 5, "b": 55, "c": "z"},
    ]


def test_column_names_that_differ_only_in_case(store: Store) -> None:
    if not store.dialect.case_insensitive:  # PostgreSQL: quoted names keep their case
        write(store, "t", {"Name": ["a"], "name": ["b"]})
        assert rows(store, "t") == [{"Name": "a", "name": "b"}]
        return
    with pytest.raises(StoreError, match="columns 'Name' and 'name' differ only in case"):
        write(store, "t", {"Name": ["a"], "name": ["b"]})
    write(store, "t", {"Name": ["a"]})
    write(store, "t", {"name": ["b"]})  # DuckDB's names ignore case: the same column
    assert rows(store, "t") == [{"Name": "a"}, {"Name": "b"}]


def test_int_column_widens_to_float(store: Store) -> None:
    write(store, "t", {"v": [1, 2]})
    write(store, "t", {"v": [2.5]})
    assert column_types(store, "t") == {"v": "float"}
    assert [r["v"] for r in rows(store, "t", ["v"])] == [1.0, 2.0, 2.5]
    write(store, "t", {"v": [7]})  # ints into a float column are cast
    assert column_types(store, "t") == {"v": "float"}


def test_date_column_widens_to_datetime(store: Store) -> None:
    write(store, "t", {"d": [date(2024, 1, 2)]})
    write(store, "t", {"d": [datetime(2024, 1, 3, 4, 5, 6)]})
    assert column_types(store, "t") == {"d": "datetime"}
    assert [r["d"] for r in rows(store, "t", ["d"])] == [
        datetime(2024, 1, 2),
        datetime(2024, 1, 3, 4, 5, 6),
    ]


def test_anything_goes_into_an_existing_text_column(store: Store) -> None:
    write(store, "t", {"k": [0], "v": ["text"]})
    write(store, "t", {"k": [1], "v": [42]})
    write(store, "t", {"k": [2], "v": [True]})
    write(store, "t", {"k": [3], "v": [date(2024, 5, 6)]})
    write(store, "t", {"k": [4], "v": [1.5]})
    assert column_types(store, "t") == {"k": "int", "v": "str"}
    assert [r["v"] for r in rows(store, "t", ["k"])] == ["text", "42", "true", "2024-05-06", "1.5"]


def test_int_and_float_into_decimal_column(store: Store) -> None:
    write(store, "t", {"k": [0], "v": pa.array([Decimal("1.25")], pa.decimal128(10, 2))})
    write(store, "t", {"k": [1], "v": [3]})
    write(store, "t", {"k": [2], "v": [2.5]})
    assert column_types(store, "t") == {"k": "int", "v": "decimal(10,2)"}
    assert [r["v"] for r in rows(store, "t", ["k"])] == [
        Decimal("1.25"),
        Decimal("3.00"),
        Decimal("2.50"),
    ]


def test_schema_conflict_names_table_column_and_types(store: Store) -> None:
    write(store, "t", {"n": [1], "d": [date(2024, 1, 1)]})
    with store.transaction() as tx, pytest.raises(SchemaConflict) as info:
        tx.append("t", pa.table({"n": ["not a number"]}))
    err = info.value
    assert (err.table, err.column, err.existing, err.incoming) == ("t", "n", "int", "str")
    assert "table 't', column 'n'" in str(err) and "int" in str(err) and "str" in str(err)
    with store.transaction() as tx, pytest.raises(SchemaConflict, match="column 'd'"):
        tx.append("t", pa.table({"d": [True]}))
    assert isinstance(err, StoreError)
    assert rows(store, "t") == [{"n": 1, "d": date(2024, 1, 1)}]


def test_null_handling(store: Store) -> None:
    write(store, "t", {"a": [1, None], "s": ["", None]})
    # an all-null column: fine for an existing column, new ones are created as text
    write(store, "t", pa.table({"a": pa.nulls(2), "s": pa.nulls(2), "new": pa.nulls(2)}))
    assert column_types(store, "t") == {"a": "int", "s": "str", "new": "str"}
    got = rows(store, "t")
    assert sorted(got, key=lambda r: (r["a"] is not None, r["s"] is not None)) == [
        {"a": None, "s": None, "new": None},
        {"a": None, "s": None, "new": None},
        {"a": None, "s": None, "new": None},
        {"a": 1, "s": "", "new": None},
    ]
    assert store.query('SELECT count(*) AS n FROM "t" WHERE "s" = \'\'').to_pylist() == [{"n": 1}]


def test_all_types_round_trip(store: Store) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    data = pa.table(
        {
            "i": pa.array([1, -(2**62), None], pa.int64()),
            "small": pa.array([1, 2, None], pa.int8()),
            "f": [0.1, -1e300, None],
            "s": ["", 'ünïcødé ✓ 😀 "quoted", comma\nnewline \\ back', None],
            "b": [True, False, None],
            "d": [date(2024, 2, 29), date(1, 1, 1), None],
            "ts": [datetime(2024, 1, 2, 3, 4, 5, 678901), datetime(1900, 1, 1), None],
            "tz": pa.array(
                [
                    datetime(2024, 6, 1, 12, 0, tzinfo=berlin),
                    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                    None,
                ],
                pa.timestamp("us", tz="Europe/Berlin"),
            ),
            "dec": pa.array([Decimal("12345.67"), Decimal("-0.01"), None], pa.decimal128(12, 2)),
            "obj": [{"a": 1, "b": [1, 2]}, {"a": 2, "b": []}, None],
            "lst": [[1, 2], [], None],
            "raw": pa.array(['{"k": {"deep": [true, null]}}', "[]", None], pa.string()),
            "bin": [b"\x00\xff\x10", b"", None],
            "cat": pa.array(["x", "y", None]).dictionary_encode(),
            "big": pa.array(["l1", "l2", None], pa.large_string()),
            "pid": ["01", "02", "03"],
        }
    )
    data = data.set_column(
        data.schema.get_field_index("raw"),
        pa.field("raw", pa.string(), metadata=JSON_METADATA),
        data["raw"],
    )
    write(store, "everything", data)
    assert column_types(store, "everything") == {
        "i": "int",
        "small": "int",
        "f": "float",
        "s": "str",
        "b": "bool",
        "d": "date",
        "ts": "datetime",
        "tz": "datetime_tz",
        "dec": "decimal(12,2)",
        "obj": "json",
        "lst": "json",
        "raw": "json",
        "bin": "binary",
        "cat": "str",
        "big": "str",
        "pid": "str",
    }
    batches = list(store.scan("everything", order_by=["pid"]))
    schema = batches[0].schema
    assert schema.field("tz").type == pa.timestamp("us", tz="UTC")
    assert schema.field("ts").type == pa.timestamp("us")
    assert schema.field("dec").type == pa.decimal128(12, 2)
    assert all(is_json_field(schema.field(c)) for c in ("obj", "lst", "raw"))
    got = [r for b in batches for r in to_pylist(b)]
    expected = [
        {
            "i": 1,
            "small": 1,
            "f": 0.1,
            "s": "",
            "b": True,
            "d": date(2024, 2, 29),
            "ts": datetime(2024, 1, 2, 3, 4, 5, 678901),
            "tz": datetime(2024, 6, 1, 10, 0, tzinfo=UTC),
            "dec": Decimal("12345.67"),
            "obj": {"a": 1, "b": [1, 2]},
            "lst": [1, 2],
            "raw": {"k": {"deep": [True, None]}},
            "bin": b"\x00\xff\x10",
            "cat": "x",
            "big": "l1",
            "pid": "01",
        },
        {
            "i": -(2**62),
            "small": 2,
            "f": -1e300,
            "s": 'ünïcødé ✓ 😀 "quoted", comma\nnewline \\ back',
            "b": False,
            "d": date(1, 1, 1),
            "ts": datetime(1900, 1, 1),
            "tz": datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            "dec": Decimal("-0.01"),
            "obj": {"a": 2, "b": []},
            "lst": [],
            "raw": [],
            "bin": b"",
            "cat": "y",
            "big": "l2",
            "pid": "02",
        },
        {**dict.fromkeys(data.column_names), "pid": "03"},
    ]
    assert got == expected
    # query results carry the same types
    result = store.query('SELECT "tz", "obj", "dec" FROM "everything" ORDER BY "pid"')
    assert result.schema.field("tz").type == pa.timestamp("us", tz="UTC")
    assert is_json_field(result.schema.field("obj"))
    assert to_pylist(result)[0] == {
        "tz": datetime(2024, 6, 1, 10, 0, tzinfo=UTC),
        "obj": {"a": 1, "b": [1, 2]},
        "dec": Decimal("12345.67"),
    }


def test_empty_append_creates_table_and_writes_nothing(store: Store) -> None:
    empty = pa.table({"a": pa.array([], pa.int64()), "b": pa.array([], pa.string())})
    assert write(store, "t", empty) == 0
    assert column_types(store, "t") == {"a": "int", "b": "str"}
    assert rows(store, "t") == []


# -- upsert, truncate, reset, delete ----------------------------------------------------


def upsert(store: Store, table: str, data: dict[str, list[Any]], keys: list[str]) -> int:
    with store.transaction() as tx:
        written = tx.upsert(table, pa.table(data), keys)
        tx.commit()
    return written


def test_upsert_replaces_rows_with_equal_keys(store: Store) -> None:
    upsert(store, "t", {"id": [1, 2], "v": ["a", "b"]}, ["id"])
    upsert(store, "t", {"id": [2, 3], "v": ["B", "c"]}, ["id"])
    assert rows(store, "t", ["id"]) == [
        {"id": 1, "v": "a"},
        {"id": 2, "v": "B"},
        {"id": 3, "v": "c"},
    ]
    info = store.table_info("t")
    assert info is not None and info.unique_on == ["id"]


def test_upsert_duplicate_keys_in_one_batch_last_wins(store: Store) -> None:
    written = upsert(store, "t", {"id": [1, 2, 1, 1], "v": ["a", "b", "c", "d"]}, ["id"])
    assert written == 2
    assert rows(store, "t", ["id"]) == [{"id": 1, "v": "d"}, {"id": 2, "v": "b"}]
    upsert(store, "t", {"id": [2, 2], "v": ["x", "y"]}, ["id"])
    assert rows(store, "t", ["id"]) == [{"id": 1, "v": "d"}, {"id": 2, "v": "y"}]


def test_upsert_multi_column_keys(store: Store) -> None:
    upsert(store, "t", {"a": [1, 1, 2], "b": ["x", "y", "x"], "v": [1, 2, 3]}, ["a", "b"])
    upsert(store, "t", {"a": [1, 2, 2], "b": ["y", "x", "x"], "v": [20, 30, 31]}, ["a", "b"])
    assert rows(store, "t", ["a", "b"]) == [
        {"a": 1, "b": "x", "v": 1},
        {"a": 1, "b": "y", "v": 20},
        {"a": 2, "b": "x", "v": 31},
    ]


def test_upsert_needs_its_key_columns(store: Store) -> None:
    with store.transaction() as tx, pytest.raises(StoreError, match="unique_on columns \\['id'\\]"):
        tx.upsert("t", pa.table({"v": [1]}), ["id"])


def test_text_with_nul_is_kept_or_refused_naming_its_row(store: Store) -> None:
    data = {"id": [1, 2], "s": ["ok", "a\x00b"]}
    if store.dialect.name.lower() == "duckdb":
        write(store, "t", data)
        assert rows(store, "t", ["id"])[1]["s"] == "a\x00b"
        return
    with pytest.raises(StoreError) as refused:
        write(store, "t", data)
    assert str(refused.value).startswith(
        "table 't', column 's' (row 1 of this write): PostgreSQL text cannot hold the NUL "
        "character"
    ), str(refused.value)
    as_json = pa.table({"doc": pa.array(['{"a": 1}', '{"a": "x\\u0000y"}'])}).cast(
        pa.schema([pa.field("doc", pa.string(), metadata=JSON_METADATA)]))
    with pytest.raises(StoreError, match=r"column 'doc' \(row 1 of this write\): PostgreSQL"):
        with store.transaction() as tx:
            tx.append("j", as_json)


def test_append_records_unique_on(store: Store) -> None:
    write(store, "t", {"id": [1]}, unique_on=["id"])
    info = store.table_info("t")
    assert info is not None and info.unique_on == ["id"]


def test_truncate_keeps_table_schema_and_version(store: Store) -> None:
    write(store, "t", {"a": [1, 2], "b": ["x", "y"]})
    with store.transaction() as tx:
        tx.truncate("t")
        tx.commit()
    info = store.table_info("t")
    assert info is not None and info.row_count == 0 and info.version == 1
    assert column_types(store, "t") == {"a": "int", "b": "str"}


def test_reset_starts_a_new_version_and_keeps_old_rows(store: Store) -> None:
    write(store, "t", {"a": [1, 2]})
    with store.transaction() as tx:
        assert tx.reset("t") == 2
        tx.commit()
    info = store.table_info("t")
    assert info is not None and info.version == 2 and info.row_count == 0
    assert column_types(store, "t") == {"a": "int"}
    write(store, "t", {"a": [3]})
    with store.transaction() as tx:
        assert tx.reset("t") == 3
        tx.commit()
    versions = store.table_versions("t")
    assert [(v.version, v.physical_name, v.active, v.row_count) for v in versions] == [
        (1, "t__v1", False, 2),
        (2, "t__v2", False, 1),
        (3, "t", True, 0),
    ]
    assert all(v.created_at.tzinfo is not None for v in versions)
    assert store.query('SELECT "a" FROM "t__v1" ORDER BY "a"').to_pylist() == [{"a": 1}, {"a": 2}]
    assert rows(store, "t") == []


def test_an_earlier_version_can_be_made_active_again(store: Store) -> None:
    write(store, "t", {"a": [1, 2]})
    with store.transaction() as tx:
        tx.reset("t")
        tx.commit()
    write(store, "t", {"a": [3]})
    with store.transaction() as tx:
        tx.activate_version("t", 1)
        tx.commit()
    assert store.table_info("t").version == 1 and rows(store, "t", ["a"]) == [{"a": 1}, {"a": 2}]
    assert [(v.version, v.physical_name, v.active, v.row_count) for v in store.table_versions("t")] == [
        (1, "t", True, 2),
        (2, "t__v2", False, 1),
    ]
    with store.transaction() as tx:  # and back
        tx.activate_version("t", 2)
        tx.activate_version("t", 2)  # already active: nothing to do
        tx.commit()
    assert rows(store, "t", ["a"]) == [{"a": 3}]
    with store.transaction() as tx:
        with pytest.raises(StoreError, match=r"has no version 7 \(versions: \[1, 2\]\)"):
            tx.activate_version("t", 7)
        tx.rollback()
    assert store.table_info("t").version == 2
    with store.transaction() as tx:  # a reset after going back starts the newest version
        tx.activate_version("t", 1)
        assert tx.reset("t") == 3
        tx.commit()
    assert [(v.version, v.active) for v in store.table_versions("t")] == [
        (1, False), (2, False), (3, True),
    ]


def test_reset_of_a_missing_table_is_harmless(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.reset("nothing") == 1
        tx.commit()
    assert store.table_info("nothing") is None


def test_delete_where(store: Store) -> None:
    write(store, "t", {"id": [1, 2, 3, 4], "s": ["a", "b", "c", None]})
    with store.transaction() as tx:
        assert tx.delete_where("t", "id", [2, 4, 99]) == 2
        assert tx.delete_where("t", "s", ["c"]) == 1
        assert tx.delete_where("t", "s", []) == 0
        tx.commit()
    assert rows(store, "t") == [{"id": 1, "s": "a"}]


# -- transactions ----------------------------------------------------------------------------


def test_rollback_discards_everything(store: Store) -> None:
    write(store, "t", {"a": [1]})
    store.create_run(RunRecord(id="r1", step="s", status="running"))
    tx = store.transaction()
    tx.append("t", pa.table({"a": [2]}))
    tx.append("other", pa.table({"x": [1]}))
    tx.set_state("s", {"n": 1})
    tx.set_position(StreamPosition("s", "t", ("patterns_id",), 1, "x", None))
    tx.update_run("r1", status="succeeded", rows_out=1)
    tx.rollback()
    assert rows(store, "t") == [{"a": 1}]
    assert store.table_info("other") is None
    assert store.get_state("s") == {}
    assert store.get_positions("s") == []
    run = store.get_run("r1")
    assert run is not None and run.status == "running" and run.rows_out == 0
    with pytest.raises(StoreError, match="already committed or rolled back"):
        tx.append("t", pa.table({"a": [3]}))


def test_leaving_the_block_without_commit_discards(store: Store) -> None:
    with store.transaction() as tx:
        tx.append("t", pa.table({"a": [1]}))
        tx.set_state("s", {"n": 1})
    assert store.table_info("t") is None
    assert store.get_state("s") == {}
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.append("t", pa.table({"a": [1]}))
        raise RuntimeError("user code failed")
    assert store.table_info("t") is None


def test_commit_makes_everything_visible_together(store: Store) -> None:
    write(store, "t", {"a": [1]})
    store.create_run(RunRecord(id="r1", step="s", status="running"))
    position = StreamPosition("s", "t", ("a", "patterns_id"), 1, 5, "01abc")
    with store.transaction() as tx:
        tx.append("t", pa.table({"a": [2]}))
        tx.append("fresh", pa.table({"x": ["new"]}))
        tx.set_state("s", {"n": 2})
        tx.set_position(position)
        tx.update_run("r1", status="succeeded", rows_out=2)
        # inside: visible
        assert tx.query('SELECT count(*) AS n FROM "t"').to_pylist() == [{"n": 2}]
        assert tx.query('SELECT "x" FROM "fresh"').to_pylist() == [{"x": "new"}]
        # outside: nothing yet
        assert store.query('SELECT count(*) AS n FROM "t"').to_pylist() == [{"n": 1}]
        assert rows(store, "t") == [{"a": 1}]
        assert store.table_info("fresh") is None
        assert store.get_state("s") == {}
        assert store.get_positions("s") == []
        assert store.get_run("r1").status == "running"  # type: ignore[union-attr]
        tx.commit()
    assert rows(store, "t", ["a"]) == [{"a": 1}, {"a": 2}]
    assert rows(store, "fresh") == [{"x": "new"}]
    assert store.get_state("s") == {"n": 2}
    assert store.get_positions("s") == [position]
    run = store.get_run("r1")
    assert run is not None and run.status == "succeeded" and run.rows_out == 2
    with pytest.raises(StoreError):
        tx.commit()


def test_two_transactions_on_different_tables_at_once(store: Store) -> None:
    write(store, "shared", {"a": [0]})
    first, second = store.transaction(), store.transaction()
    first.append("left", pa.table({"a": [1]}))
    second.append("right", pa.table({"b": ["x"]}))
    first.append("shared", pa.table({"a": [1]}))
    second.append("shared", pa.table({"a": [2]}))
    second.set_state("other", {"k": 1})
    first.set_state("one", {"k": 2})
    second.commit()
    first.commit()
    assert rows(store, "left") == [{"a": 1}]
    assert rows(store, "right") == [{"b": "x"}]
    assert rows(store, "shared", ["a"]) == [{"a": 0}, {"a": 1}, {"a": 2}]
    assert store.get_state("other") == {"k": 1} and store.get_state("one") == {"k": 2}


def test_scan_sees_a_snapshot_while_another_thread_writes(store: Store) -> None:
    write(store, "t", {"n": list(range(5000))})
    scan = store.scan("t", order_by=["n"], batch_rows=1000)
    first = next(scan)

    def writer() -> None:
        with store.transaction() as tx:
            tx.append("t", pa.table({"n": [-1, 10_000]}))
            tx.delete_where("t", "n", list(range(4000, 5000)))
            tx.commit()

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    seen = first.column("n").to_pylist() + [v for b in scan for v in b.column("n").to_pylist()]
    assert seen == list(range(5000))
    assert store.table_info("t").row_count == 4002  # type: ignore[union-attr]


# -- the catalog cache (a store one process owns keeps table shapes between transactions) ------


def catalog_queries(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the table named by each catalog question (columns or registration)
    the store puts to its database from now on."""
    session_type = type(store._session())  # type: ignore[attr-defined]
    original = session_type.fetchall
    asked: list[str] = []

    def fetchall(self: Any, sql_text: str, params: Any = ()) -> Any:
        if sql_text == self.dialect.columns_query or "FROM stepwell.tables WHERE" in sql_text:
            asked.append(str(params[0]))
        return original(self, sql_text, params)

    monkeypatch.setattr(session_type, "fetchall", fetchall)
    return asked


def test_table_shapes_are_answered_from_memory_until_they_change(store: Store, monkeypatch) -> None:
    write(store, "t", {"a": [1]})
    asked = catalog_queries(store, monkeypatch)
    for n in range(3):
        assert column_types(store, "t") == {"a": "int"}
        assert len(rows(store, "t")) == n + 1
        write(store, "t", {"a": [1]})
    if store.dialect.shared:  # other hosts change tables too: always asked
        assert len(asked) >= 9
        return
    assert asked == ["t", "t"]  # once each: columns, registration
    asked.clear()
    write(store, "t", {"b": ["x"]})  # a new column: the cache stands aside, then refills
    assert column_types(store, "t") == {"a": "int", "b": "str"}
    assert column_types(store, "t") == {"a": "int", "b": "str"}
    assert asked.count("t") <= 4


def test_every_kind_of_shape_change_is_seen_next(store: Store) -> None:
    write(store, "t", {"a": [1]})
    assert column_types(store, "t") == {"a": "int"}
    write(store, "t", {"a": [1.5]})  # widened
    assert column_types(store, "t") == {"a": "float"}
    with store.transaction() as tx:  # unique_on recorded
        tx.upsert("t", pa.table({"a": [2.0]}), ["a"])
        tx.commit()
    assert store.table_info("t").unique_on == ["a"]  # type: ignore[union-attr]
    with store.transaction() as tx:
        assert tx.reset("t") == 2
        tx.commit()
    info = store.table_info("t")
    assert info is not None and info.version == 2 and info.row_count == 0
    with store.transaction() as tx:
        tx.activate_version("t", 1)
        tx.commit()
    assert store.table_info("t").version == 1  # type: ignore[union-attr]
    assert rows(store, "t", ["a"]) == [{"a": 1.0}, {"a": 1.5}, {"a": 2.0}]
    assert store.table_info("new") is None
    write(store, "new", {"x": [1]})  # created after being asked for (and found missing)
    assert column_types(store, "new") == {"x": "int"}


def test_a_rolled_back_shape_change_is_never_seen(store: Store) -> None:
    write(store, "t", {"a": [1]})
    tx = store.transaction()
    tx.append("t", pa.table({"b": ["x"]}))
    assert "b" in tx.query('SELECT * FROM "t"').column_names  # the transaction sees its own
    if not store.dialect.shared:  # (PostgreSQL makes other readers wait for it)
        assert column_types(store, "t") == {"a": "int"}  # others see the old shape meanwhile
    tx.rollback()
    assert column_types(store, "t") == {"a": "int"}
    write(store, "t", {"a": [2]})
    assert rows(store, "t", ["a"]) == [{"a": 1}, {"a": 2}]


def test_a_session_older_than_a_shape_change_keeps_its_own_view(tmp_path: Path) -> None:
    """A snapshot taken before a change commits must not get the changed shape from
    the cache (filled by a newer session): its queries would name columns it lacks.
    (DuckDB only: PostgreSQL makes the change wait for the older reader.)"""
    from stepwell.store.sql import table_columns

    store = DuckDBStore(tmp_path / "store.duckdb")
    write(store, "t", {"a": [1]})
    old = store._session(read_only=True, snapshot=True)  # type: ignore[attr-defined]
    try:
        assert old.fetchall('SELECT count(*) FROM "t"') == [(1,)]  # its snapshot begins
        write(store, "t", {"b": ["x"]})
        assert column_types(store, "t") == {"a": "int", "b": "str"}  # a new session fills the cache
        assert table_columns(old, "t") == {"a": "int"}
    finally:
        old.rollback()
        old.close()
        store.close()


def test_store_query_runs_sql_verbatim(store: Store) -> None:
    result = store.query("SELECT 7 % 3 AS m, '?' AS q, '%s' AS p")
    assert result.to_pylist() == [{"m": 1, "q": "?", "p": "%s"}]


def test_store_query_is_read_only(store: Store) -> None:
    with pytest.raises(StoreError):
        store.query('CREATE TABLE "sneaky" ("a" INTEGER)')
    assert store.table_info("sneaky") is None


# -- scans -----------------------------------------------------------------------------------------

ORDERED = {
    "patterns_id": ["01", "02", "03", "04", "05", "06"],
    "k": [None, 1, None, 1, 2, 0],
}


def ids(store: Store, **kw: Any) -> list[str]:
    return [r["patterns_id"] for r in rows(store, "t", **kw)]


def test_scan_orders_nulls_first_and_breaks_ties_by_id(store: Store) -> None:
    write(store, "t", ORDERED)
    assert ids(store, order_by=["k", "patterns_id"]) == ["01", "03", "06", "02", "04", "05"]


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ((None, "01"), ["03", "06", "02", "04", "05"]),  # inside the NULL group
        ((None, "03"), ["06", "02", "04", "05"]),
        ((1, "02"), ["04", "05"]),  # inside a tie
        ((1, "04"), ["05"]),
        ((0, "06"), ["02", "04", "05"]),
        ((1, None), ["05"]),  # no id: compare on the value only
        ((None, None), ["06", "02", "04", "05"]),
        ((2, "05"), []),
    ],
)
def test_scan_after_position(
    store: Store, after: tuple[Any, str | None], expected: list[str]
) -> None:
    write(store, "t", ORDERED)
    assert ids(store, order_by=["k", "patterns_id"], after=after) == expected


def test_scan_after_on_the_id_alone(store: Store) -> None:
    write(store, "t", ORDERED)
    assert ids(store, order_by=["patterns_id"], after=("03", None)) == ["04", "05", "06"]
    assert ids(store, order_by=["patterns_id"], after=("03", "03")) == ["04", "05", "06"]


def test_scan_text_order_is_byte_order(store: Store) -> None:
    write(store, "t", {"patterns_id": ["1", "2", "3", "4", "5"], "s": ["b", "B", "_", "a", "A"]})
    assert [r["s"] for r in rows(store, "t", order_by=["s", "patterns_id"])] == [
        "A",
        "B",
        "_",
        "a",
        "b",
    ]
    after = [r["s"] for r in rows(store, "t", order_by=["s", "patterns_id"], after=("B", "2"))]
    assert after == ["_", "a", "b"]


def test_scan_after_datetime_values(store: Store) -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    write(
        store,
        "t",
        {"patterns_id": ["a", "b", "c"], "at": [base, base, base + timedelta(seconds=1)]},
    )
    got = ids(store, order_by=["at", "patterns_id"], after=(base, "a"))
    assert got == ["b", "c"]
    berlin = base.astimezone(timezone(timedelta(hours=1)))
    assert ids(store, order_by=["at", "patterns_id"], after=(berlin, "b")) == ["c"]


def test_scan_columns_and_errors(store: Store) -> None:
    write(store, "t", ORDERED)
    assert rows(store, "t", order_by=["patterns_id"], columns=["k"])[:2] == [{"k": None}, {"k": 1}]
    with pytest.raises(StoreError, match="does not exist"):
        list(store.scan("missing"))
    with pytest.raises(StoreError, match="no column 'nope'"):
        list(store.scan("t", order_by=["nope"]))
    with pytest.raises(StoreError, match="'after' needs 'order_by'"):
        list(store.scan("t", after=(1, None)))


def test_abandoned_scans_release_their_resources(store: Store) -> None:
    write(store, "t", {"n": list(range(3000))})
    for _ in range(12):
        scan = store.scan("t", order_by=["n"], batch_rows=100)
        assert next(scan).num_rows == 100
        scan.close()
    write(store, "t", {"n": [-1]})
    assert sum(b.num_rows for b in store.scan("t", batch_rows=1000)) == 3001


def test_scan_streams_in_bounded_batches(store: Store) -> None:
    n = 200_000
    pids = pa.array([f"{i:026d}" for i in range(n)])
    data = pa.table({"patterns_id": pids, "v": pa.array(range(n), pa.int64())})
    with store.transaction() as tx:
        tx.append("big", data.slice(0, n // 2))
        tx.append("big", data.slice(n // 2))
        tx.commit()
    sizes, total, previous = [], 0, None
    for batch in store.scan("big", order_by=["patterns_id"], batch_rows=7000):
        sizes.append(batch.num_rows)
        values = batch.column("v").to_pylist()
        assert values == list(range(total, total + len(values)))
        total += len(values)
        previous = values[-1]
    assert total == n and previous == n - 1
    assert max(sizes) <= 7000 and len(sizes) >= n // 7000
    after = sum(
        b.num_rows
        for b in store.scan("big", order_by=["patterns_id"], after=(f"{n - 11:026d}", None))
    )
    assert after == 10


# -- bookkeeping --------------------------------------------------------------------------------


def test_runs(store: Store) -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    store.create_run(
        RunRecord(id="01a", step="load", status="running", started_at=t0, info={"p": 1})
    )
    store.create_run(
        RunRecord(id="01b", step="enrich", status="queued", started_at=t0 + timedelta(seconds=1))
    )
    store.create_run(
        RunRecord(id="01c", step="load", status="running", started_at=t0 + timedelta(seconds=2))
    )
    store.update_run(
        "01a",
        status="failed",
        ended_at=datetime(2024, 1, 1, 1, 0),  # naive: taken as UTC
        rows_in=5,
        error="boom",
        traceback="tb",
        host_pid=123,
        info={"p": 2, "at": date(2024, 1, 1)},
    )
    run = store.get_run("01a")
    assert run == RunRecord(
        id="01a",
        step="load",
        status="failed",
        trigger="manual",
        started_at=t0,
        ended_at=datetime(2024, 1, 1, 1, 0, tzinfo=UTC),
        rows_in=5,
        rows_out=0,
        error="boom",
        traceback="tb",
        host_pid=123,
        info={"p": 2, "at": date(2024, 1, 1)},
    )
    assert store.get_run("nope") is None
    assert [r.id for r in store.list_runs()] == ["01c", "01b", "01a"]
    assert [r.id for r in store.list_runs(step="load")] == ["01c", "01a"]
    assert [r.id for r in store.list_runs(limit=1)] == ["01c"]
    # filters and paging run in the store (not over a recent window)
    assert [r.id for r in store.list_runs(statuses=["running", "queued"])] == ["01c", "01b"]
    assert [r.id for r in store.list_runs(step="load", statuses=["failed"])] == ["01a"]
    assert store.list_runs(statuses=[]) == [] and store.list_runs(trigger="cron") == []
    assert [r.id for r in store.list_runs(trigger="manual", before="01c", limit=None)] == ["01b", "01a"]
    # newest created first, whether or not a run ever started (a run cancelled while
    # queued has no start and must not stay on top)
    store.create_run(RunRecord(id="01d", step="load", status="cancelled", started_at=None))
    store.create_run(
        RunRecord(id="01e", step="load", status="running", started_at=t0 + timedelta(seconds=3))
    )
    assert [r.id for r in store.list_runs(step="load")] == ["01e", "01d", "01c", "01a"]
    latest = store.latest_runs(["load", "enrich", "never"])
    assert {step: run.id for step, run in latest.items()} == {"load": "01e", "enrich": "01b"}
    assert latest["load"] == store.get_run("01e") and store.latest_runs([]) == {}
    with pytest.raises(StoreError, match="unknown run fields \\['colour'\\]"):
        store.update_run("01a", colour="red")
    with pytest.raises(StoreError, match="no run with id 'nope'"):
        store.update_run("nope", status="failed")


def test_records_written_later_are_seen_by_every_use_of_the_store(store: Store) -> None:
    """``create_run_later`` (runs that changed nothing) batches records, but no call
    of the store can miss one: each writes them first, and a timer writes them
    within ``late_runs.DELAY`` when nothing else uses the store."""
    store.create_run_later(RunRecord(id="01x", step="s", status="succeeded_no_data"))
    assert store.get_run("01x").status == "succeeded_no_data"
    store.create_run_later(RunRecord(id="01y", step="s", status="failed", error="boom"))
    store.update_run("01y", traceback="tb")  # (a write, too, sees it)
    assert [(r.id, r.error, r.traceback) for r in store.list_runs(step="s")] == [
        ("01y", "boom", "tb"), ("01x", None, None)]  # fmt: skip
    for n in range(3):
        store.create_run_later(RunRecord(id=f"01z{n}", step="t", status="succeeded_no_data"))
    other = open_store(store.url, Path(".")) if store.dialect.shared else None
    try:  # another host (a PostgreSQL store) sees them once the delay is over
        deadline = time.monotonic() + 5
        while store._late_runs and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not store._late_runs, "the timer never wrote them"
        seen = []
        while len(seen) < 3 and time.monotonic() < deadline:
            seen = [r.id for r in (other or store).list_runs(step="t")]
        assert seen == ["01z2", "01z1", "01z0"]
    finally:
        if other is not None:
            other.close()


def test_records_written_later_survive_close_and_exit(tmp_path: Path) -> None:
    """Closing the store writes the waiting records; so does the process's exit
    when the store was never closed."""
    url = f"duckdb://{tmp_path / 'store.duckdb'}"
    store = open_store(url, tmp_path)
    store.create_run_later(RunRecord(id="01c", step="s", status="succeeded_no_data"))
    store.close()
    program = (f"from stepwell.store import open_store, RunRecord\n"
               f"store = open_store({url!r}, '.')\n"
               "store.create_run_later(RunRecord(id='01e', step='s', status='failed'))\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)
    store = open_store(url, tmp_path)
    try:
        assert [(r.id, r.status) for r in store.list_runs()] == [
            ("01e", "failed"), ("01c", "succeeded_no_data")]  # fmt: skip
    finally:
        store.close()


def test_logs(store: Store) -> None:
    ts = datetime(2024, 1, 1, 12, tzinfo=UTC)
    store.append_logs(
        [LogLine("r1", 1, ts, "info", "first"), LogLine("r2", 1, ts, "info", "other")]
    )
    store.append_logs([LogLine("r1", 3, ts, "error", "third"), LogLine("r1", 2, ts, "warn", "")])
    store.append_logs([])
    assert [(line.seq, line.level, line.message) for line in store.get_logs("r1")] == [
        (1, "info", "first"),
        (2, "warn", ""),
        (3, "error", "third"),
    ]
    assert store.get_logs("r1")[0].ts == ts
    assert store.get_logs("none") == []


def test_a_nul_in_a_log_line_or_run_error_is_kept_as_shown(store: Store) -> None:
    """What user code printed or raised may hold NUL; PostgreSQL's text refused it,
    which lost the run's record and failed the whole `stepwell run`."""
    ts = datetime(2024, 1, 1, 12, tzinfo=UTC)
    store.append_logs([LogLine("r1", 1, ts, "info", "a\x00b")])
    assert [line.message for line in store.get_logs("r1")] == ["a\\x00b"]
    store.create_run(RunRecord(id="01n", step="s", status="failed", error="bad \x00 nul"))
    store.update_run("01n", traceback="ValueError: bad \x00 nul")
    run = store.get_run("01n")
    assert (run.error, run.traceback) == ("bad \\x00 nul", "ValueError: bad \\x00 nul")


def test_state(store: Store) -> None:
    assert store.get_state("s") == {}
    value = {"count": 3, "nested": {"l": [1, "x", None]}, "when": datetime(2024, 1, 1, tzinfo=UTC)}
    with store.transaction() as tx:
        tx.set_state("s", value)
        tx.set_state("s", {**value, "count": 4})
        tx.commit()
    assert store.get_state("s") == {**value, "count": 4}


@pytest.mark.parametrize(
    "value",
    [
        "01hx",
        42,
        1.5,
        None,
        True,
        Decimal("1.10"),
        date(2024, 1, 2),
        datetime(2024, 1, 2, 3, 4, 5, 6),
        datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    ],
)
def test_position_values_round_trip(store: Store, value: Any) -> None:
    position = StreamPosition("s", "t", ("c", "patterns_id"), 1, value, "01x")
    with store.transaction() as tx:
        tx.set_position(position)
        tx.commit()
    (got,) = store.get_positions("s")
    assert got == position and type(got.value) is type(value)


def test_positions_set_replace_and_clear(store: Store) -> None:
    with store.transaction() as tx:
        tx.set_position(StreamPosition("s", "a", ("patterns_id",), 1, "01", "01"))
        tx.set_position(StreamPosition("s", "a", ("at", "patterns_id"), 1, 5, "02"))
        tx.set_position(StreamPosition("s", "b", ("patterns_id",), 2, "07", None))
        tx.set_position(StreamPosition("other", "a", ("patterns_id",), 1, "09", None))
        tx.commit()
    with store.transaction() as tx:  # same (step, table, order_by): replaced
        tx.set_position(StreamPosition("s", "a", ("patterns_id",), 2, "05", "05"))
        tx.commit()
    assert store.get_positions("s") == [
        StreamPosition("s", "a", ("at", "patterns_id"), 1, 5, "02"),
        StreamPosition("s", "a", ("patterns_id",), 2, "05", "05"),
        StreamPosition("s", "b", ("patterns_id",), 2, "07", None),
    ]
    with store.transaction() as tx:
        tx.replace_positions("s", [StreamPosition("s", "b", ("patterns_id",), 3, "08", None)])
        tx.commit()
    assert store.get_positions("s") == [StreamPosition("s", "b", ("patterns_id",), 3, "08", None)]
    assert len(store.get_positions("other")) == 1


# -- names ---------------------------------------------------------------------------------------


def test_names_that_need_quoting(store: Store) -> None:
    odd = {
        "patterns_id": ["a", "b"],
        "first name": [1, 2],
        'say "hi"': ["x", "y"],
        "pct%": [1, 2],
        "q?": [1, 2],
    }
    for table in ("select", "order", "Mixed_Case"):
        write(store, table, odd)
        upsert(
            store,
            table,
            {"first name": [2], 'say "hi"': ["z"], "pct%": [3], "q?": [3]},
            ["first name"],
        )
        got = rows(store, table, order_by=["pct%", "patterns_id"], after=(1, "a"))
        assert got == [{"patterns_id": None, "first name": 2, 'say "hi"': "z", "pct%": 3, "q?": 3}]
        with store.transaction() as tx:
            assert tx.delete_where(table, "q?", [1]) == 1
            tx.commit()
    assert sorted(t.name for t in store.list_tables()) == ["Mixed_Case", "order", "select"]


@pytest.mark.parametrize("name", ["bad-name", "1abc", "a b", 'x"; DROP TABLE y; --', "", "ü"])
def test_invalid_table_names_are_rejected(store: Store, name: str) -> None:
    with store.transaction() as tx, pytest.raises(StoreError, match="invalid table name") as info:
        tx.append(name, pa.table({"a": [1]}))
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["", "a\x00b"])
def test_invalid_column_names_say_what_to_do(store: Store, name: str) -> None:
    with store.transaction() as tx, pytest.raises(StoreError) as info:
        tx.append("t", pa.table({name: [1]}))
    assert str(info.value) == (f"table 't': invalid column name {name!r}: a column's name "
                               "cannot be empty or hold NUL; rename the field")


# -- DuckDB specifics ----------------------------------------------------------------------------


def test_reopening_duckdb_keeps_committed_and_loses_uncommitted(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    first = DuckDBStore(path)
    write(first, "t", {"a": [1, 2]})
    with first.transaction() as tx:
        tx.set_state("s", {"done": True})
        tx.commit()
    pending = first.transaction()
    pending.append("t", pa.table({"a": [3]}))
    pending.set_state("s", {"done": False})
    first.close()  # like a crash: the open transaction is never committed
    with pytest.raises(StoreError):
        pending.commit()
    second = DuckDBStore(path)
    try:
        assert rows(second, "t", ["a"]) == [{"a": 1}, {"a": 2}]
        assert second.get_state("s") == {"done": True}
    finally:
        second.close()


def test_open_store_urls(tmp_path: Path) -> None:
    default = open_store(None, tmp_path)
    assert isinstance(default, DuckDBStore)
    assert Path(default.path) == tmp_path / ".stepwell" / "store.duckdb"
    default.close()
    for url, expected in [
        ("duckdb", tmp_path / ".stepwell" / "store.duckdb"),
        (f"duckdb://{tmp_path / 'a.duckdb'}", tmp_path / "a.duckdb"),
        (str(tmp_path / "sub" / "b.duckdb"), tmp_path / "sub" / "b.duckdb"),
        ("rel/c.duckdb", tmp_path / "rel" / "c.duckdb"),
    ]:
        opened = open_store(url, tmp_path)
        assert isinstance(opened, DuckDBStore) and Path(opened.path) == expected
        opened.close()
    with pytest.raises(StoreError, match="unknown store 'mysql://x'"):
        open_store("mysql://x", tmp_path)


# -- connector partitions ------------------------------------------------------------------


def test_partitions_set_replace_list_and_delete(store: Store) -> None:
    from stepwell.store import PartitionRecord

    assert store.get_partitions("conn") == []
    with store.transaction() as tx:
        tx.set_partition(PartitionRecord("conn", "b.csv", "fp-b", "code1", 3, 0.5, run_id="r1"))
        tx.set_partition(PartitionRecord("conn", "a.csv", "fp-a", "code1", 2, 0.25, run_id="r1"))
        tx.set_partition(PartitionRecord("other", "a.csv", "x", "y"))
        tx.commit()
    found = store.get_partitions("conn")
    assert [p.name for p in found] == ["a.csv", "b.csv"]
    first = found[0]
    assert (first.step, first.fingerprint, first.code_hash, first.rows) == ("conn", "fp-a", "code1", 2)
    assert first.duration_seconds == 0.25 and first.status == "succeeded" and first.error is None
    assert first.run_id == "r1"
    assert first.updated_at is not None and first.updated_at.tzinfo is not None
    with store.transaction() as tx:
        tx.set_partition(
            PartitionRecord("conn", "a.csv", "fp-a", "code1", 2, 1.0, "failed", "boom", "r2")
        )
        tx.delete_partition("conn", "b.csv")
        tx.delete_partition("conn", "never-there")
        tx.commit()
    (only,) = store.get_partitions("conn")
    assert (only.name, only.status, only.error, only.run_id) == ("a.csv", "failed", "boom", "r2")
    assert [p.name for p in store.get_partitions("other")] == ["a.csv"]


def test_partition_records_commit_and_roll_back_with_rows(store: Store) -> None:
    from stepwell.store import PartitionRecord

    tx = store.transaction()
    tx.append("t", pa.table({"_partition": ["p1"], "v": [1]}))
    tx.set_partition(PartitionRecord("conn", "p1", "f1", "c", 1))
    tx.rollback()
    assert store.get_partitions("conn") == []
    assert store.table_info("t") is None
    with store.transaction() as tx:
        tx.append("t", pa.table({"_partition": ["p1", "p2"], "v": [1, 2]}))
        tx.set_partition(PartitionRecord("conn", "p1", "f1", "c", 1))
        tx.set_partition(PartitionRecord("conn", "p2", "f2", "c", 1))
        tx.commit()
    with store.transaction() as tx:  # replace p1, drop p2, then change our mind
        tx.delete_where("t", "_partition", ["p1", "p2"])
        tx.delete_partition("conn", "p2")
        tx.set_partition(PartitionRecord("conn", "p1", "f1b", "c", 0))
    assert rows(store, "t", order_by=["v"]) == [{"_partition": "p1", "v": 1}, {"_partition": "p2", "v": 2}]
    assert [(p.name, p.fingerprint) for p in store.get_partitions("conn")] == [("p1", "f1"), ("p2", "f2")]


def test_partition_names_sort_in_byte_order(store: Store) -> None:
    from stepwell.store import PartitionRecord

    names = ["b", "B", "a/2.csv", "a/10.csv", "é", "_x"]
    with store.transaction() as tx:
        for name in names:
            tx.set_partition(PartitionRecord("conn", name, name, None))
        tx.commit()
    assert [p.name for p in store.get_partitions("conn")] == sorted(names, key=str.encode)


def test_duckdb_errors_say_what_to_do(tmp_path: Path) -> None:
    import subprocess
    import sys

    from stepwell.store.duckdb import DuckDBStore

    # over the memory budget: stepwell's setting is named, not DuckDB's SET advice
    small = DuckDBStore(tmp_path / "small.duckdb", memory_limit="16MB")
    try:
        with pytest.raises(StoreError) as raised, small.transaction() as tx:
            tx.append("big", pa.table({"blob": ["x" * (40 << 20)]}))
        message = str(raised.value)
        assert "Out of Memory Error" in message and "STEPWELL_DUCKDB_MEMORY" in message
        assert "SET threads" not in message and "\n" not in message
        # at commit, and when reading back a table written under a bigger budget
        with pytest.raises(StoreError, match="commit failed.*STEPWELL_DUCKDB_MEMORY=4GB"):
            with small.transaction() as tx:
                for _ in range(4):
                    tx.append("many", pa.table({"blob": ["x" * (5 << 20)]}))
                tx.commit()
    finally:
        small.close()
    roomy = DuckDBStore(tmp_path / "read.duckdb", memory_limit="256MB")
    with roomy.transaction() as tx:
        for _ in range(8):
            tx.append("big", pa.table({"blob": ["x" * (8 << 20)]}))
        tx.commit()
    roomy.close()
    small = DuckDBStore(tmp_path / "read.duckdb", memory_limit="24MB")
    try:
        with pytest.raises(StoreError, match="scan of table 'big'.*STEPWELL_DUCKDB_MEMORY"):
            list(small.scan("big"))
    finally:
        small.close()
    # another process holds the file: wait for it, or use PostgreSQL
    path = tmp_path / "held.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match=r"another one has it .* wait for it to end"):
            DuckDBStore(path)
    finally:
        holder.kill()
        holder.wait()
    # not a DuckDB file
    (tmp_path / "junk.duckdb").write_text("garbage " * 1000)
    with pytest.raises(StoreError, match="move it away to start a new store"):
        DuckDBStore(tmp_path / "junk.duckdb")


def test_missing_table_message_suggests_and_stays_short() -> None:
    from stepwell.store.base import missing_table_message

    assert missing_table_message("t", []) == "table 't' does not exist (there are no tables yet)"
    names = [f"orders_{i:03d}" for i in range(500)]
    message = missing_table_message("order_007", names)
    assert message.startswith("table 'order_007' does not exist (did you mean 'orders_007'")
    assert message.endswith(", ... (500 in all))") and "orders_020" not in message
