"""Load: 2,000 webhook posts from a concurrent client against a real `stepwell serve`;
every row is stored exactly once and copied exactly once by an upstream step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from webhook_load import stepwell_run  # noqa: E402


def _check(result: dict, posts: int) -> None:
    assert result["statuses"] == {202: posts}
    assert result["accepted"] == posts
    assert result["rows_stored"] == posts
    assert result["rows_lost"] == 0 and result["rows_duplicated"] == 0
    assert result["ids_match"] is True
    assert result["copied_rows"] == posts
    assert result["copied_lost"] == 0 and result["copied_duplicated"] == 0


def test_2000_concurrent_webhook_posts_lose_no_row_duckdb():
    result = stepwell_run(posts=2000, concurrency=32)
    print(f"\nwebhook load (DuckDB): {result['requests_per_second']:.0f} requests/s, "
          f"{result['copy_runs']} upstream runs")
    _check(result, 2000)


@pytest.mark.postgres
def test_concurrent_webhook_posts_lose_no_row_postgres(make_pg_database):
    result = stepwell_run(posts=1000, concurrency=32, store=make_pg_database())
    print(f"\nwebhook load (PostgreSQL): {result['requests_per_second']:.0f} requests/s")
    _check(result, 1000)
