"""The SQL guard in front of read_sql and SQL steps."""

import pytest

from stepwell.runtimes.sqlcheck import (
    SqlNotAllowed,
    expand_templates,
    restrict_select,
    table_statement,
)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("select * from read_csv('/etc/passwd')", "read_csv() is not allowed"),
        ("select * from query_table('stepwell.runs')", "query_table() is not allowed"),
        ("select getenv('HOME')", "getenv() is not allowed"),
        ("select pg_read_file('/etc/passwd')", "pg_read_file() is not allowed"),
        ("select current_setting('data_directory')", "current_setting() is not allowed"),
        ("select * from stepwell.runs", "stepwell.runs is not allowed"),
        ("select * from 'data.csv'", "'data.csv' is not one of this step's tables"),
        ("select * from other", "'other' is not one of this step's tables"),
        ("delete from orders", "only SELECT queries"),
        ("drop table orders", "only SELECT queries"),
        ("select 1; select 2", "expected one SELECT statement, got 2"),
        ("select from where", "cannot parse SQL"),
    ],
)
def test_refused(sql, message):
    with pytest.raises(SqlNotAllowed, match="step.sql") as info:
        restrict_select(sql, {"orders": "raw_orders"}, "DuckDB", "step.sql")
    assert message in str(info.value)


def test_ports_are_rewritten_to_tables_and_ctes_kept():
    sql = "with recent as (select * from orders) select c, count(*) from recent group by c"
    out = restrict_select(sql, {"orders": "raw_orders"}, "PostgreSQL", "q")
    assert '"raw_orders"' in out and "recent" in out
    # a column qualified by the port name still resolves (the table keeps it as alias)
    qualified = restrict_select("select orders.id from orders", {"orders": "raw_orders"}, "duckdb", "q")
    assert qualified == 'SELECT orders.id FROM "raw_orders" AS orders'


def test_patterns_templates():
    assert expand_templates('select * from {{ Table("orders") }}') == "select * from orders"
    assert expand_templates("select * from {{Table('a', 'w')}}") == "select * from a"


TABLES = {"orders": "raw_orders", "out": "out_table"}


@pytest.mark.parametrize(
    ("sql", "kind", "select", "columns"),
    [
        ("insert into out select * from orders", "insert", 'SELECT * FROM "raw_orders" AS orders', []),
        ('INSERT INTO "out_table" (a) SELECT id FROM orders', "insert",
         'SELECT id FROM "raw_orders" AS orders', ["a"]),
        ("insert into out (a, b) values (1, 'x')", "insert",
         "SELECT * FROM (VALUES (1, 'x')) AS v(\"a\", \"b\")", ["a", "b"]),
        ("create or replace table out as select 1 as n", "replace", "SELECT 1 AS n", []),
        ("create table out as (select * from orders)", "replace",
         'SELECT * FROM "raw_orders" AS orders', []),
        ("delete from out where id in (select id from orders)", "delete",
         'DELETE FROM "out_table" AS out WHERE id IN (SELECT id FROM "raw_orders" AS orders)', []),
        ("update out set n = n + 1 from orders where out.id = orders.id", "update",
         'UPDATE "out_table" AS out SET n = n + 1 FROM "raw_orders" AS orders '
         "WHERE out.id = orders.id", []),
    ],
)
def test_table_statement(sql, kind, select, columns):
    plan = table_statement(sql, "out_table", TABLES, "duckdb", "node.py")
    assert (plan.kind, plan.sql, plan.columns) == (kind, select, columns)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("insert into orders select * from out", "may only change table 'out_table' itself"),
        ("insert into stepwell.runs select 1", "may only change table 'out_table' itself"),
        ("insert into out select * from read_csv('/etc/passwd')", "read_csv() is not allowed"),
        ("insert into out select * from secrets", "'secrets' is not one of this step's tables"),
        ("insert into out values (1)", "name the columns of the VALUES"),
        ("update out set patterns_id = 'x'", "patterns_id is set by stepwell"),
        ("delete from orders", "may only change table 'out_table' itself"),
        ("delete from out where id in (select id from secrets)", "'secrets' is not one of"),
        ("drop table out", "DROP statements cannot run here"),
        ("create view out as select 1", "CREATE statements cannot run here"),
        ("insert into out select 1; select 2", "expected one statement (use INSERT INTO"),
    ],
)
def test_table_statement_refused(sql, message):
    with pytest.raises(SqlNotAllowed, match="node.py") as info:
        table_statement(sql, "out_table", TABLES, "duckdb", "node.py")
    assert message in str(info.value)
