"""Connector refresh: many small partitions, and read_bytes CSV throughput.

1. A folder of N small CSV files (default 10,000), one partition each, read by
   a ``read_bytes`` connector: the first read (partitions/s, end to end: listing,
   parallel workers, one commit per partition) and a refresh where nothing
   changed (goal: under 2 s for 10,000 partitions).
2. A few large CSV files read through the same connector (parsed in workers,
   streamed to the host, committed) vs the same files read directly with
   pyarrow in this process, and vs pyarrow + a direct DuckDB insert.

    uv run python benchmarks/connector_refresh.py [--partitions 10000] [--big-rows 2000000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from _common import Timer, save, write_app

CONNECTOR = """
from pathlib import Path

DATA = Path(__file__).parent / "data"


def context(credentials):
    return {}


def list_objects(context, metadata):
    for entry in sorted(DATA.iterdir()):
        stat = entry.stat()
        yield {"name": entry.name, "fingerprint": f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}"}


def read_bytes(context, metadata):
    with open(DATA / metadata["name"], "rb") as file:
        while chunk := file.read(1 << 20):
            yield chunk
"""

APP = """
steps:
  - name: files
    connector: connector.py
    parser: csv
    output: files
    timeout: 1h
"""


def run_once(root: Path) -> tuple[float, object]:
    from stepwell.app import load_app
    from stepwell.engine.runner import Runner
    from stepwell.store import open_store

    app = load_app(root)
    store = open_store(None, app.root)
    try:
        runner = Runner(app, store)
        with Timer() as t:
            run = runner.run_step("files")
        assert run.status.startswith("succeeded"), run.error
        return t.seconds, run
    finally:
        store.close()


def small_partitions(base: Path, count: int) -> dict[str, float]:
    root = write_app(base / "small", {"stepwell.yml": APP, "connector.py": CONNECTOR})
    data = root / "data"
    data.mkdir()
    for i in range(count):
        (data / f"part{i:05d}.csv").write_text(
            "id,name,value\n" + "".join(f"{i * 10 + j},n{j},{j * 0.5}\n" for j in range(10))
        )
    first, run = run_once(root)
    refresh, again = run_once(root)
    assert again.info["partitions"]["read"] == 0
    refresh2, _ = run_once(root)
    no_change = min(refresh, refresh2)
    print(f"{count:,} partitions: first read {first:.2f}s ({count / first:,.0f} partitions/s, "
          f"{run.info['partitions']['parallelism']} workers); no-change refresh {no_change:.2f}s")
    return {
        "partitions": count,
        "first_read_seconds": round(first, 3),
        "partitions_per_second": round(count / first, 1),
        "no_change_refresh_seconds": round(no_change, 3),
        "no_change_goal_met": no_change < 2.0,
        "workers": run.info["partitions"]["parallelism"],
    }


def big_files(base: Path, total_rows: int, files: int = 4) -> dict[str, float]:
    root = write_app(base / "big", {"stepwell.yml": APP, "connector.py": CONNECTOR})
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    per_file = total_rows // files
    paths = []
    for f in range(files):
        table = pa.table({
            "id": np.arange(f * per_file, (f + 1) * per_file, dtype=np.int64),
            "amount": rng.random(per_file) * 100,
            "customer": pa.array([f"c{i % 5000}" for i in range(per_file)]),
            "flag": rng.random(per_file) > 0.5,
        })
        path = data / f"big{f}.csv"
        pacsv.write_csv(table, path)
        paths.append(path)
    rows = per_file * files
    size = sum(p.stat().st_size for p in paths)

    seconds, run = run_once(root)
    assert run.rows_out == rows, (run.rows_out, rows)
    with Timer() as direct:
        read = sum(pacsv.read_csv(p).num_rows for p in paths)
    assert read == rows
    con = duckdb.connect(str(base / "direct.duckdb"))
    with Timer() as direct_db:
        for i, p in enumerate(paths):
            con.register("incoming", pacsv.read_csv(p))
            if i == 0:
                con.execute("CREATE TABLE t AS SELECT * FROM incoming")
            else:
                con.execute("INSERT INTO t SELECT * FROM incoming")
            con.unregister("incoming")
    con.close()
    result = {
        "rows": rows,
        "csv_megabytes": round(size / 1e6, 1),
        "stepwell_read_bytes_rows_per_second": round(rows / seconds),
        "pyarrow_read_csv_rows_per_second": round(rows / direct.seconds),
        "pyarrow_plus_duckdb_rows_per_second": round(rows / direct_db.seconds),
        "stepwell_vs_pyarrow": round(direct.seconds / seconds, 3),
        "stepwell_vs_pyarrow_plus_duckdb": round(direct_db.seconds / seconds, 3),
    }
    print(f"read_bytes CSV, {rows:,} rows ({size / 1e6:.0f} MB): stepwell "
          f"{rows / seconds:,.0f} rows/s end to end; pyarrow read_csv {rows / direct.seconds:,.0f} "
          f"rows/s; pyarrow + DuckDB insert {rows / direct_db.seconds:,.0f} rows/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--big-rows", type=int, default=2_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stepwell-bench-") as tmp:
        base = Path(tmp)
        result = {
            "cpus": os.cpu_count(),
            "small_partitions": small_partitions(base, args.partitions),
            "read_bytes_csv": big_files(base, args.big_rows),
        }
    print(f"results: {save('connector_refresh', result)}")


if __name__ == "__main__":
    main()
