"""Action latency over HTTP: a 2-step action on `stepwell serve` vs a plain FastAPI endpoint.

A `stepwell serve` subprocess runs an action of two trivial code steps (each
in a warm sandboxed worker, with a run record and log per call). Side by side,
a plain FastAPI endpoint on uvicorn (same server settings) does the same work
in its own process: it calls the two step functions directly and answers the
same JSON shape. The same client (keep-alive connections, one per thread)
posts to both, with concurrency 1 and 8, in alternating rounds so machine
noise hits both alike. Reported: p50/p99 latency, requests/s, and the p50
difference (goal: stepwell p50 at most 5 ms above the plain endpoint).

    uv run python benchmarks/action_latency.py [--requests 2000] [--rounds 4]

Writes benchmarks/results/action_latency.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

APP = {
    "stepwell.yml": """
        title: action latency
        actions:
          - name: bench
            steps:
              - name: load
                code: "return {'n': params['n'], 'who': user['id']}"
              - name: shape
                code: "return {**data, 'double': data['n'] * 2}"
    """,
}

PLAIN_SERVER = """
import datetime as dt, sys, time
import uvicorn
from fastapi import FastAPI, Body

app = FastAPI()

def load(data, error, params, user):
    return {'n': params['n'], 'who': user['id']}

def shape(data, error, params, user):
    return {**data, 'double': data['n'] * 2}

@app.post("/api/actions/bench/run")
def run(params: dict = Body(None)):
    user = {"id": "local", "roles": []}
    data, steps = None, []
    for name, step in (("load", load), ("shape", shape)):
        started, began = dt.datetime.now(dt.UTC), time.perf_counter()
        data = step(data, None, params, user)
        steps.append({"name": name, "kind": "code", "data": data, "error": None,
                      "started_at": started.isoformat(),
                      "duration_ms": (time.perf_counter() - began) * 1000})
    return {"run_id": "x" * 26, "action": "bench", "status": "succeeded", "data": data,
            "error": None, "steps": steps, "duration_ms": 0.0}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, server_header=False)
"""

PATH = "/api/actions/bench/run"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/docs")
            connection.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not answer in {timeout}s")


def load(port: int, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` POSTs from ``concurrency`` threads (one keep-alive connection
    each); per-request latencies in ms and the overall rate."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = requests // concurrency
    failures = [0]

    def worker(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for k in range(per_thread):
            body = json.dumps({"n": index * per_thread + k}).encode()
            began = time.perf_counter()
            connection.request("POST", PATH, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            mine.append((time.perf_counter() - began) * 1000)
            if response.status != 200 or json.loads(payload)["error"] is not None:
                failures[0] += 1
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    return {"latencies": latencies, "seconds": seconds, "failures": failures[0]}


def summary(batches: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(x for batch in batches for x in batch["latencies"])
    count = len(latencies)
    seconds = sum(batch["seconds"] for batch in batches)
    return {
        "requests": count,
        "p50_ms": round(statistics.median(latencies), 3),
        "p90_ms": round(latencies[int(count * 0.90)], 3),
        "p99_ms": round(latencies[min(count - 1, int(count * 0.99))], 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        "requests_per_second": round(count / seconds, 1),
        "failures": sum(batch["failures"] for batch in batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per server and concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds to split them in")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import save
    from serverutil import ServerProcess

    os.environ.setdefault("STEPWELL_LOG_LEVEL", "warning")
    plain_port = _free_port()
    plain = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(plain_port)])
    results: dict[str, Any] = {}
    try:
        _wait_http(plain_port, plain)
        with tempfile.TemporaryDirectory(prefix="stepwell-action-bench-") as tmp:
            root = Path(tmp) / "app"
            root.mkdir()
            for name, text in APP.items():
                (root / name).write_text(textwrap.dedent(text).lstrip("\n"))
            with ServerProcess(root) as server:
                port = int(server.info["port"])
                time.sleep(2.0)  # let the pool's warm workers start
                for target in (port, plain_port):  # warm both up
                    load(target, 400, 4)
                for concurrency in (1, 8):
                    runs: dict[str, list[dict[str, Any]]] = {"stepwell": [], "plain": []}
                    size = max(concurrency, args.requests // args.rounds)
                    for _ in range(args.rounds):
                        runs["stepwell"].append(load(port, size, concurrency))
                        runs["plain"].append(load(plain_port, size, concurrency))
                    stepwell, baseline = summary(runs["stepwell"]), summary(runs["plain"])
                    results[f"concurrency_{concurrency}"] = {
                        "stepwell": stepwell,
                        "plain_fastapi": baseline,
                        "p50_overhead_ms": round(stepwell["p50_ms"] - baseline["p50_ms"], 3),
                        "p99_overhead_ms": round(stepwell["p99_ms"] - baseline["p99_ms"], 3),
                    }
                with server.client() as client:
                    recorded = client.get("/api/runs", params={"step": "action:bench",
                                                                "limit": 5}).json()["runs"]  # fmt: skip
                results["runs_recorded"] = bool(recorded) and recorded[0]["status"] == "succeeded"
    finally:
        plain.terminate()
        plain.wait(30)
    for concurrency in (1, 8):
        entry = results[f"concurrency_{concurrency}"]
        for who in ("stepwell", "plain_fastapi"):
            row = entry[who]
            print(f"concurrency {concurrency} {who:14} p50 {row['p50_ms']:6.2f} ms  p99 "
                  f"{row['p99_ms']:7.2f} ms  {row['requests_per_second']:7.0f} requests/s  "
                  f"({row['requests']} requests, {row['failures']} failed)")
        print(f"concurrency {concurrency} p50 overhead of stepwell: {entry['p50_overhead_ms']:.2f} ms "
              f"(goal <= 5 ms)")
    results["goal_p50_overhead_ms"] = 5.0
    results["goal_met"] = all(results[f"concurrency_{c}"]["p50_overhead_ms"] <= 5.0 for c in (1, 8))
    path = save("action_latency", {"requests_per_case": args.requests, "rounds": args.rounds,
                                   **results})  # fmt: skip
    print(f"written {path}")


if __name__ == "__main__":
    main()
