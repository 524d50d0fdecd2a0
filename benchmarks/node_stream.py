"""Streaming node: N rows through consume_records() -> append() in one node.

Reports rows/s and the peak memory (max RSS) of the host and the worker, next
to the same per-row loop run in-process over a DuckDB cursor. Memory must stay
flat whatever N is: both sides work in bounded batches.

    uv run python benchmarks/node_stream.py [--rows 10000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from _common import Timer, save, seed, write_app

NODE = """
import resource
from patterns import Table

src = Table("src")
dst = Table("dst", "w")
for record in src.as_stream().consume_records():
    record["doubled"] = record["value"] * 2
    dst.append(record)
print("worker_maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

HOST = """
import json, resource, sys, time
from stepwell.app import load_app
from stepwell.engine.runner import Runner
from stepwell.store import open_store
app = load_app(sys.argv[1])
store = open_store(None, app.root)
start = time.perf_counter()
run = Runner(app, store).run_step("stream")
seconds = time.perf_counter() - start
logs = [line.message for line in store.get_logs(run.id)]
print(json.dumps({"status": run.status, "error": run.error, "seconds": seconds,
                  "rows_out": run.rows_out, "logs": logs,
                  "host_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def source(rows: int, chunk: int = 1_000_000):
    rng = np.random.default_rng(3)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        yield pa.table({
            "n": np.arange(start, start + n, dtype=np.int64),
            "value": rng.integers(0, 1000, n),
            "label": pa.array(np.array(["alpha", "beta", "gamma", "delta"])[rng.integers(0, 4, n)]),
        })


def direct(path: Path) -> tuple[float, int]:
    """The same per-row loop in one process over a DuckDB cursor."""
    con = duckdb.connect(str(path))
    con.execute("drop table if exists dst")
    out_con = con.cursor()
    buffer: list[dict] = []
    written = 0

    def flush() -> None:
        nonlocal written, buffer
        if buffer:
            rows_table = pa.Table.from_pylist(buffer)  # noqa: F841 - read by DuckDB
            out_con.execute("create table if not exists dst as select * from rows_table limit 0")
            out_con.execute("insert into dst select * from rows_table")
            written += len(buffer)
            buffer = []

    with Timer() as t:
        reader = con.sql("select * from src order by patterns_id").to_arrow_reader(50_000)
        for batch in reader:
            for record in batch.to_pylist():
                record["doubled"] = record["value"] * 2
                buffer.append(record)
                if len(buffer) >= 20_000:
                    flush()
        flush()
    return t.seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    from stepwell.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        root = write_app(Path(tmp) / "app", {
            "stepwell.yml": "steps:\n  - name: stream\n    node: stream.py\n    timeout: 1h\n",
            "stream.py": NODE,
        })
        store = open_store(None, root)
        direct_db = Path(tmp) / "direct.duckdb"
        con = duckdb.connect(str(direct_db))
        for chunk in source(args.rows):
            seed(store, "src", chunk)
        store.close()
        con.execute(f"attach '{root / '.stepwell' / 'store.duckdb'}' as sw (read_only)")
        con.execute("create table src as select * from sw.main.src")
        con.execute("detach sw")
        con.close()

        proc = subprocess.run([sys.executable, "-c", HOST, str(root)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        sw = json.loads(proc.stdout.strip().splitlines()[-1])
        assert sw["status"] == "succeeded", sw["error"]
        worker_kb = int(next(x for x in sw["logs"] if x.startswith("worker_maxrss_kb")).split()[1])
        direct_seconds, direct_kb = direct(direct_db)

    rate, direct_rate = args.rows / sw["seconds"], args.rows / direct_seconds
    print(f"rows: {args.rows:,}")
    print(f"stepwell: {sw['seconds']:.1f}s = {rate:,.0f} rows/s "
          f"(host peak {sw['host_maxrss_kb'] / 1024:.0f} MiB, worker peak {worker_kb / 1024:.0f} MiB)")
    print(f"in-process loop over a DuckDB cursor: {direct_seconds:.1f}s = {direct_rate:,.0f} rows/s "
          f"(peak {direct_kb / 1024:.0f} MiB)")
    print(f"ratio stepwell / in-process rows/s: {rate / direct_rate:.2f} (goal: >= 500k rows/s, memory < 1 GiB)")
    path = save("node_stream", {
        "rows": args.rows,
        "stepwell_seconds": round(sw["seconds"], 2),
        "stepwell_rows_per_s": round(rate),
        "host_peak_mib": round(sw["host_maxrss_kb"] / 1024),
        "worker_peak_mib": round(worker_kb / 1024),
        "inprocess_seconds": round(direct_seconds, 2),
        "inprocess_rows_per_s": round(direct_rate),
        "inprocess_peak_mib": round(direct_kb / 1024),
        "ratio": round(rate / direct_rate, 3),
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
