"""Processor runs on small batches: what one run costs, next to a node step's run.

A stream-fed processor step runs once per batch of new rows, so on small
batches its cost per run matters more than its rows per second
(``processor_rows.py``). Both steps here run in one warm host (``Runner``, its
fork-servers already started, as in ``stepwell serve``):

- ``proc``: a row-mode processor reading 3 new rows of ``numbers`` (a node
  appends them before each run, untimed), returning one field per row:
  worker start, statement compile, input scan, output check, write, commit;
- ``light``: a node step with no input and no output (``step_overhead.py``'s
  warm step), for scale.

Each is run ``--runs`` times, interleaved; medians count. Prints both and
their ratio; writes ``benchmarks/results/processor_runs.json``.

    uv run python benchmarks/processor_runs.py [--runs 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import save, write_app

APP = """
tables:
  - name: numbers
  - name: out
steps:
  - name: produce
    node: produce.py
  - name: proc
    processor: proc.py
    mode: row
    input: numbers
    output: out
    output_schema: {y: int}
  - name: light
    node: light.py
"""
PRODUCE = """
from patterns import Table
Table("numbers", "w").append([{"n": i} for i in range(3)])
"""
STATEMENT = 'return [{"y": INPUT_DATA[0]["n"] * 2}]\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()

    from stepwell.app import load_app
    from stepwell.engine.runner import Runner
    from stepwell.store import open_store

    with tempfile.TemporaryDirectory(prefix="stepwell-bench-") as tmp:
        root = write_app(Path(tmp) / "app", {
            "stepwell.yml": APP, "produce.py": PRODUCE, "proc.py": STATEMENT,
            "light.py": "x = 1\n",
        })  # fmt: skip
        spec = load_app(root)
        store = open_store(None, spec.root)
        try:
            runner = Runner(spec, store)
            times: dict[str, list[float]] = {"proc": [], "light": []}
            for i in range(args.runs + 3):  # the first three warm up
                runner.run_step("produce")
                for name in times:
                    began = time.perf_counter()
                    run = runner.run_step(name)
                    # until its record can be read: a run that changed nothing has it
                    # written with others' (store/late_runs.py), here by this read
                    recorded = store.get_run(run.id)
                    seconds = time.perf_counter() - began
                    if recorded is None or recorded.status != run.status:
                        raise SystemExit(f"{name}: run {run.id} has no record")
                    if not run.status.startswith("succeeded"):
                        raise SystemExit(f"{name} failed: {run.error}")
                    if name == "proc" and run.rows_in != 3:
                        raise SystemExit(f"proc read {run.rows_in} rows, not 3")
                    if i >= 3:
                        times[name].append(seconds)
        finally:
            store.close()

    proc_ms = statistics.median(times["proc"]) * 1000
    light_ms = statistics.median(times["light"]) * 1000
    print(f"{args.runs} runs each, warm host")
    print(f"  processor run, 3 rows in and out   {proc_ms:7.2f} ms (median)")
    print(f"  node step run, no tables          {light_ms:7.2f} ms (median)")
    print(f"  ratio processor / node            {proc_ms / light_ms:7.2f}x")
    path = save("processor_runs", {
        "runs": args.runs,
        "processor_run_ms": proc_ms,
        "node_run_ms": light_ms,
        "processor_vs_node": proc_ms / light_ms,
    })  # fmt: skip
    print(f"results: {path}")


if __name__ == "__main__":
    main()
