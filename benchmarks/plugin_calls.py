"""Plugin function calls/s through a rule vs the same function in-process; events/s end to end.

Measured side by side in one run (the ratios hold on a noisy machine):

1. ``direct``: the test plugin's ``revstr`` body called in a plain Python loop.
2. ``pool``: the same function in the plugin process(es), called through the
   eKuiper protocol (one nng round trip per call) from a function pool of 1..N
   processes, every call pipelined (each process gets its next call the moment
   it answers).
3. ``rule``: ``SELECT revstr(s) FROM stream`` over a table stream, results
   written to a table (exactly once), calls/s against the number of processes.
4. ``events``: events/s from a plugin source through a rule into a plugin sink,
   without and with ``requireAck``.

Run: ``uv run python benchmarks/plugin_calls.py [--calls 20000] [--events 20000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, save, seed  # noqa: E402

PLUGIN = Path(__file__).parents[1] / "tests" / "plugins" / "swtest"
CTX = json.dumps({"ruleId": "bench", "opId": "op", "instanceId": 0, "funcId": 0})


def _revstr(value: str) -> str:
    return str(value)[::-1] if value is not None else None


def bench_direct(calls: int) -> float:
    values = [f"value-{i}" for i in range(calls)]
    with Timer() as t:
        for v in values:
            _revstr(v)
    return calls / t.seconds


def bench_pool(app: Path, calls: int, processes: int) -> float:
    from stepwell.runtimes.plugin import PluginManager

    manager = PluginManager(app, processes=processes)
    try:
        pool = manager.function_pool("revstr")
        pool.exec_many([["warm"]] * 200, CTX)
        rows = [[f"value-{i}"] for i in range(calls)]
        with Timer() as t:
            for start in range(0, calls, 2048):  # DuckDB hands UDFs 2048-row chunks
                pool.exec_many(rows[start:start + 2048], CTX)
        return calls / t.seconds
    finally:
        manager.stop_all()


def bench_rule(app: Path, calls: int, processes: int) -> float:
    from stepwell.runtimes.plugin import PluginManager
    from stepwell.store import open_store
    from stepwell.streams import RuleEngine
    from stepwell.streams.parser import parse_stream

    store = open_store(f"duckdb:///{app}/bench-{processes}.duckdb", app)
    manager = PluginManager(app, processes=processes)
    engine = RuleEngine(app, store, manager=manager)
    try:
        seed(store, "words", pa.table({"s": [f"value-{i}" for i in range(calls)]}))
        engine.add_stream(parse_stream('CREATE STREAM words () WITH (TYPE="table", DATASOURCE="words")'))
        engine.create({"id": "bench", "sql": "SELECT revstr(s) AS r FROM words",
                       "actions": [{"table": {"name": "reversed"}}],
                       "options": {"batchSize": 8192}})
        manager.function_pool("revstr").exec_many([["warm"]] * 200, CTX)
        with Timer() as t:
            engine.start("bench")
            while engine.status("bench")["records_out"] < calls:
                time.sleep(0.005)
        return calls / t.seconds
    finally:
        engine.stop_all()
        store.close()


def bench_events(app: Path, events: int, require_ack: bool) -> float:
    from stepwell.runtimes.plugin import PluginManager
    from stepwell.store import open_store
    from stepwell.streams import RuleEngine
    from stepwell.streams.parser import parse_stream

    yaml = app / ".stepwell" / "plugins" / "swtest" / "sources" / "counter.yaml"
    if "bench:" not in yaml.read_text():
        yaml.write_text(yaml.read_text() + f"bench:\n  count: {events}\n  interval: 0\n")
    store = open_store(f"duckdb:///{app}/events-{require_ack}.duckdb", app)
    engine = RuleEngine(app, store, manager=PluginManager(app, processes=1))
    out = app / "sinks" / f"sink-{require_ack}.txt"
    try:
        engine.add_stream(parse_stream(
            'CREATE STREAM ev () WITH (TYPE="counter", DATASOURCE="b", CONF_KEY="bench")'))
        # the source sends as fast as it can: a buffer for all of them measures the
        # rule's pace end to end (a full buffer drops events, as in eKuiper)
        rule = f"ev{int(require_ack)}"
        engine.create({"id": rule, "sql": "SELECT id, value * 2 AS v FROM ev",
                       "actions": [{"collect": {"requireAck": require_ack, "path": str(out)}}],
                       "options": {"bufferLength": events}})  # fmt: skip
        engine.manager.process("swtest")  # plugin started before timing
        with Timer() as t:
            engine.start(rule)
            deadline = time.monotonic() + 600
            while (status := engine.status(rule))["records_out"] + status["dropped"] < events:
                if time.monotonic() > deadline:
                    raise SystemExit(f"rule {rule}: {status['records_out']} of {events} events "
                                     "out after 600 s")  # fmt: skip
                time.sleep(0.005)
        if status["dropped"]:
            raise SystemExit(f"rule {rule} dropped {status['dropped']} of {events} events")
        return events / t.seconds
    finally:
        engine.stop_all()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--max-processes", type=int, default=4)
    args = parser.parse_args()

    from stepwell.runtimes.plugin import install_plugin

    with tempfile.TemporaryDirectory(prefix="swbench-", dir="/tmp") as tmp:
        app = Path(tmp)
        (app / "stepwell.yml").write_text("title: bench\n")
        # the sink writes its file from the plugin's sandbox (as its user): a folder
        # it may write to
        (app / "sinks").mkdir()
        for folder in (app, app / "sinks"):
            folder.chmod(0o777 if folder.name == "sinks" else 0o755)
        os.environ["STEPWELL_PLUGIN_WRITE_PATHS"] = str(app / "sinks")
        install_plugin(app, PLUGIN)
        direct = bench_direct(args.calls)
        print(f"direct in-process call: {direct:,.0f} calls/s")
        pool, rule = {}, {}
        for n in range(1, args.max_processes + 1):
            pool[n] = bench_pool(app, args.calls, n)
            rule[n] = bench_rule(app, args.calls, n)
            print(f"{n} process(es): pool {pool[n]:,.0f} calls/s, through a rule {rule[n]:,.0f} calls/s "
                  f"(direct/rule = {direct / rule[n]:,.0f}x)")
        events = {"no_ack": bench_events(app, args.events, False),
                  "require_ack": bench_events(app, args.events, True)}
        print(f"source -> rule -> sink: {events['no_ack']:,.0f} events/s, "
              f"with requireAck {events['require_ack']:,.0f} events/s")
    path = save("plugin_calls", {
        "calls": args.calls,
        "events": args.events,
        "direct_calls_per_s": round(direct),
        "pool_calls_per_s_by_processes": {str(k): round(v) for k, v in pool.items()},
        "rule_calls_per_s_by_processes": {str(k): round(v) for k, v in rule.items()},
        "single_round_trip_baseline_us": 200,
        "events_per_s": {k: round(v) for k, v in events.items()},
    })
    print(f"results: {path}")


if __name__ == "__main__":
    main()
