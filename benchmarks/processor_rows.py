"""Processor row mode: N rows through a trivial statement, end to end, next to
the same compiled statement called in a bare in-process loop.

stepwell's figure is one ``Runner.run_step`` in a host process whose
fork-server is already running (as in ``stepwell serve``; its start-up is
reported separately): start a worker, stream the input table to it in Arrow
batches, run the statement once per row inside the worker, check the results
against the output schema, write them back in Arrow batches, commit.

The bare loop calls the very same compiled statement (``compile_statement``)
once per row over the same rows, already in memory as dicts, keeping the
results, with no I/O at all. It is timed under three garbage-collector
settings: CPython's defaults (a plain script), the settings the processor
worker runs statements with (``GC_THRESHOLDS`` after ``gc.freeze()``, the
like-for-like baseline and the headline ratio), and cyclic GC switched off
(the raw cost of the calls). Each side runs ``--repeat`` times, interleaved;
the best time of each counts. Goal: stepwell >= 50 % of the bare loop.

    uv run python benchmarks/processor_rows.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
warm_start = time.perf_counter()
try:  # a running host keeps its fork-server warm; start it before timing
    from stepwell.sandbox.launcher import forkserver
    forkserver().ensure()
except Exception:
    pass
warmup = time.perf_counter() - warm_start
for root in sys.argv[1:]:
    app = load_app(root)
    store = open_store(None, app.root)
    runner = Runner(app, store)
    start = time.perf_counter()
    run = runner.run_step("double")
    seconds = time.perf_counter() - start
    check = store.query('select count(*) as n, cast(sum(y) as bigint) as total from "dst"').to_pylist()[0]
    store.close()
    print(json.dumps({"status": run.status, "error": run.error, "seconds": seconds,
                      "warmup": warmup, **check}), flush=True)
"""


def _gc_default() -> None:
    gc.enable()


def _gc_worker() -> None:
    from stepwell.runtimes.processor.worker import GC_THRESHOLDS

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _gc_off() -> None:
    gc.disable()


GC_SETTINGS: dict[str, Callable[[], None]] = {
    "default GC": _gc_default,
    "worker GC settings": _gc_worker,
    "GC off": _gc_off,
}


def bare_loop(rows: list[dict[str, Any]], path: str, setting: Callable[[], None]) -> float:
    """Seconds for the compiled statement called once per row, awaited inside one
    event loop (the fastest way to drive it; stepping each coroutine by hand with
    ``send(None)`` measured slower), results kept."""
    from stepwell.runtimes.processor.guard import compile_statement
    from stepwell.runtimes.processor.worker import sleep

    function = compile_statement(STATEMENT, path).function

    class Log:
        def info(self, message: Any) -> None:
            pass

    log = Log()

    async def loop() -> list[Any]:
        out = []
        append = out.append
        for row in rows:
            append(await function([row], None, log, sleep))
        return out

    gc.collect()
    setting()
    try:
        start = time.perf_counter()
        result = asyncio.run(loop())
        seconds = time.perf_counter() - start
        assert len(result) == len(rows) and result[-1] == [{"y": 2 * rows[-1]["x"]}]
        del result
    finally:
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
        gc.collect()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from stepwell.store import open_store

    data = pa.table({"x": np.arange(args.rows, dtype=np.int64)})
    rows = data.to_pylist()
    stepwell_runs: list[dict[str, Any]] = []
    bare: dict[str, list[float]] = {name: [] for name in GC_SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(args.repeat):
            root = write_app(Path(tmp) / f"app{attempt}", {"stepwell.yml": APP, "double.py": STATEMENT})
            store = open_store(None, root)
            seed(store, "src", data)
            store.close()
            proc = subprocess.run([sys.executable, "-c", HOST, str(root)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            assert result["status"] == "succeeded", result["error"]
            assert result["n"] == args.rows and result["total"] == args.rows * (args.rows - 1), result
            stepwell_runs.append(result)
            for name, setting in GC_SETTINGS.items():
                bare[name].append(bare_loop(rows, str(root / "double.py"), setting))

    best = min(run["seconds"] for run in stepwell_runs)
    rate = args.rows / best
    print(f"rows: {args.rows:,}, best of {args.repeat}")
    print(f"stepwell (run_step end to end: worker, Arrow batches, schema check, writes, commit): "
          f"{best:.2f}s = {rate:,.0f} rows/s "
          f"(fork-server start-up before timing: {stepwell_runs[0]['warmup']:.2f}s)")
    figures: dict[str, Any] = {}
    for name, times in bare.items():
        seconds = min(times)
        bare_rate = args.rows / seconds
        print(f"bare in-process loop, {name}: {seconds:.2f}s = {bare_rate:,.0f} rows/s; "
              f"stepwell / bare = {rate / bare_rate:.2f}")
        figures[name] = {"seconds": round(seconds, 3), "rows_per_s": round(bare_rate),
                         "ratio": round(rate / bare_rate, 3)}
    headline = figures["worker GC settings"]["ratio"]
    print(f"ratio vs the like-for-like bare loop (worker GC settings): {headline:.2f} (goal: >= 0.50)")
    path = save("processor_rows", {
        "rows": args.rows,
        "repeat": args.repeat,
        "statement": STATEMENT.strip(),
        "stepwell_seconds": round(best, 3),
        "stepwell_seconds_all": [round(run["seconds"], 3) for run in stepwell_runs],
        "stepwell_rows_per_s": round(rate),
        "forkserver_warmup_seconds": round(stepwell_runs[0]["warmup"], 3),
        "bare_loop": figures,
        "ratio": headline,
        "goal": 0.5,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
