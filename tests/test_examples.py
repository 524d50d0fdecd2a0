"""The apps in examples/ run as the README shows, on DuckDB and on PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from apputil import rows, run_app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(params=["duckdb", "postgres"])
def store_url(request):
    if request.param == "duckdb":
        return None
    return request.getfixturevalue("make_pg_database")()


def test_quickstart_twice_enriches_only_the_new_orders(tmp_path, store_url):
    app = shutil.copytree(
        EXAMPLES / "quickstart", tmp_path / "quickstart",
        ignore=shutil.ignore_patterns(".stepwell", "__pycache__"),
    )  # fmt: skip
    first = run_app(app, store_url)
    assert [(r.step, r.status, r.rows_in, r.rows_out) for r in first] == [
        ("generate_orders", "succeeded", 0, 250),
        ("enrich_orders", "succeeded", 250, 250),
        ("customer_totals", "succeeded", 0, 5),
    ], [r.error for r in first]
    second = run_app(app, store_url)
    assert [(r.step, r.status, r.rows_in) for r in second] == [
        ("generate_orders", "succeeded", 0),
        ("enrich_orders", "succeeded", 250),  # only the second batch
        ("customer_totals", "succeeded", 0),
    ], [r.error for r in second]
    totals = rows(app, "customer_totals", store_url=store_url)
    assert sum(t["orders"] for t in totals) == 500
    revenue = [t["revenue"] for t in totals]
    assert revenue == sorted(revenue, reverse=True) and all(round(v, 2) == v for v in revenue)
