"""Processor row mode: N rows through a trivial statement, end to end, next to
the same compiled statement called in a bare in-process loop.

stepwell's figure is one ``Runner.run_step`` in a fresh host process whose
fork-server is already running (as in ``stepwell serve``; its start-up time is
reported separately): start a worker, stream the input table to it in Arrow batches, run the statement once
per row inside the worker, check the results against the output schema, write
them back in Arrow batches and commit. The bare loop calls the very same
compiled statement (``compile_statement``) once per row over the same rows,
already in memory as dicts, and keeps the results; nothing else. Goal:
stepwell >= 50 % of the bare loop's rows/s.

    uv run python benchmarks/processor_rows.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from _common import save, seed, write_app

STATEMENT = 'return [{"y": INPUT_DATA[0]["x"] * 2}]\n'

APP = """
tables:
  - name: src
  - name: dst
steps:
  - name: double
    processor: double.py
    input: src
    output: dst
    output_schema: {y: int}
    timeout: 1h
"""

HOST = """
import json, sys, time
from stepwell.app import load_app
from stepwell.engine.runner import Runner
from stepwell.store import open_store
app = load_app(sys.argv[1])
store = open_store(None, app.root)
runner = Runner(app, store)
warm_start = time.perf_counter()
try:  # a running host keeps its fork-server warm; start it before timing
    from stepwell.sandbox.launcher import forkserver
    forkserver().ensure()
except Exception:
    pass
warmup = time.perf_counter() - warm_start
start = time.perf_counter()
run = runner.run_step("double")
seconds = time.perf_counter() - start
check = store.query('select count(*) as n, cast(sum(y) as bigint) as total from "dst"').to_pylist()[0]
print(json.dumps({"status": run.status, "error": run.error, "seconds": seconds, "warmup": warmup,
                  "rows_in": run.rows_in, "rows_out": run.rows_out, **check}))
"""


def bare_loop(rows: list[dict[str, Any]], path: str) -> tuple[float, str]:
    """The same compiled statement called once per row in this process; the
    faster of two ways of driving it (awaiting inside one event loop, or
    stepping the coroutine by hand) is the baseline."""
    from stepwell.runtimes.processor.guard import compile_statement
    from stepwell.runtimes.processor.worker import sleep

    function = compile_statement(STATEMENT, path).function

    class Log:
        def info(self, message: Any) -> None:
            pass

    log = Log()

    async def awaited() -> list[Any]:
        out = []
        append = out.append
        for row in rows:
            append(await function([row], None, log, sleep))
        return out

    def stepped() -> list[Any]:
        out = []
        append = out.append
        for row in rows:
            coroutine = function([row], None, log, sleep)
            try:
                coroutine.send(None)
            except StopIteration as stop:
                append(stop.value)
        return out

    timings = {}
    start = time.perf_counter()
    assert len(asyncio.run(awaited())) == len(rows)
    timings["await in one event loop"] = time.perf_counter() - start
    start = time.perf_counter()
    assert len(stepped()) == len(rows)
    timings["coroutine.send per row"] = time.perf_counter() - start
    how = min(timings, key=timings.__getitem__)
    return timings[how], how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    from stepwell.store import open_store

    data = pa.table({"x": np.arange(args.rows, dtype=np.int64)})
    with tempfile.TemporaryDirectory() as tmp:
        root = write_app(Path(tmp) / "app", {"stepwell.yml": APP, "double.py": STATEMENT})
        store = open_store(None, root)
        seed(store, "src", data)
        store.close()
        proc = subprocess.run([sys.executable, "-c", HOST, str(root)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        sw = json.loads(proc.stdout.strip().splitlines()[-1])
        assert sw["status"] == "succeeded", sw["error"]
        assert sw["n"] == args.rows and sw["total"] == args.rows * (args.rows - 1), sw
        rows = data.to_pylist()
        bare_seconds, how = bare_loop(rows, str(root / "double.py"))

    rate, bare_rate = args.rows / sw["seconds"], args.rows / bare_seconds
    ratio = rate / bare_rate
    print(f"rows: {args.rows:,}")
    print(f"stepwell (run_step end to end, worker, Arrow batches, schema check, writes, commit): "
          f"{sw['seconds']:.2f}s = {rate:,.0f} rows/s")
    print(f"(fork-server start-up before timing: {sw['warmup']:.2f}s)")
    print(f"bare in-process loop ({how}): {bare_seconds:.2f}s = {bare_rate:,.0f} rows/s")
    print(f"ratio stepwell / bare loop: {ratio:.2f} (goal: >= 0.50)")
    path = save("processor_rows", {
        "rows": args.rows,
        "statement": STATEMENT.strip(),
        "stepwell_seconds": round(sw["seconds"], 3),
        "stepwell_rows_per_s": round(rate),
        "forkserver_warmup_seconds": round(sw["warmup"], 3),
        "bare_loop": how,
        "bare_seconds": round(bare_seconds, 3),
        "bare_rows_per_s": round(bare_rate),
        "ratio": round(ratio, 3),
        "goal": 0.5,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
