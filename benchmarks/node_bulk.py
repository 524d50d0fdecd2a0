"""Bulk node: read 1M rows -> pandas -> append to a new table.

Through stepwell (a node in a worker process, data over the wire protocol as
Arrow, committed by the host) vs the same work done directly with DuckDB in one
process. Both run side by side in this script; the ratio is what counts.

    uv run python benchmarks/node_bulk.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from _common import Timer, save, seed, write_app

NODE = """
from patterns import Table
df = Table("src").read_dataframe()
Table("dst", "w").append(df)
"""


def source_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(7)
    return pa.table(
        {
            "id": np.arange(rows, dtype=np.int64),
            "amount": rng.random(rows) * 100,
            "customer": pa.array([f"c{i % 1000}" for i in range(rows)]),
            "flag": rng.random(rows) > 0.5,
        }
    )


def run_stepwell(root: Path) -> float:
    from stepwell.app import load_app
    from stepwell.engine.runner import Runner
    from stepwell.store import open_store

    app = load_app(root)
    store = open_store(None, app.root)
    try:
        with store.transaction() as tx:
            if store.table_info("dst") is not None:
                tx.reset("dst")
            tx.commit()
        runner = Runner(app, store)
        with Timer() as t:
            run = runner.run_step("bulk")
        assert run.status == "succeeded", run.error
        return t.seconds
    finally:
        store.close()


def run_direct(path: Path) -> float:
    con = duckdb.connect(str(path))
    con.execute("drop table if exists dst")
    with Timer() as t:
        df = con.execute("select * from src").df()  # noqa: F841 - read by DuckDB below
        con.execute("create table dst as select * from df")
    con.close()
    return t.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from stepwell.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        root = write_app(Path(tmp) / "app", {
            "stepwell.yml": "steps:\n  - name: bulk\n    node: bulk.py\n",
            "bulk.py": NODE,
        })
        data = source_table(args.rows)
        store = open_store(None, root)
        seed(store, "src", data)
        store.close()
        direct_db = Path(tmp) / "direct.duckdb"
        con = duckdb.connect(str(direct_db))
        con.execute("create table src as select * from data")
        con.close()

        stepwell_times, direct_times = [], []
        for _ in range(args.repeat):  # interleaved, so drift hits both alike
            stepwell_times.append(run_stepwell(root))
            direct_times.append(run_direct(direct_db))
    sw, direct = statistics.median(stepwell_times), statistics.median(direct_times)
    ratio = sw / direct
    print(f"rows: {args.rows:,}")
    print(f"stepwell node (worker process, Arrow IPC, committed): {sw:.3f}s median of {args.repeat}")
    print(f"direct DuckDB in one process:                        {direct:.3f}s median of {args.repeat}")
    print(f"ratio stepwell / direct: {ratio:.2f}x (goal <= 1.5x)")
    path = save("node_bulk", {
        "rows": args.rows,
        "stepwell_seconds": stepwell_times,
        "direct_seconds": direct_times,
        "ratio_median": round(ratio, 3),
        "goal": "<= 1.5x",
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
