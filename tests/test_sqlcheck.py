"""The SQL guard in front of read_sql and SQL steps."""

import pytest

from stepwell.runtimes.sqlcheck import SqlNotAllowed, expand_templates, restrict_select


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


def test_patterns_templates():
    assert expand_templates('select * from {{ Table("orders") }}') == "select * from orders"
    assert expand_templates("select * from {{Table('a', 'w')}}") == "select * from a"
