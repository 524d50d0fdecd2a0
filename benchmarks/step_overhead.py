"""Per-step overhead: 40 sequential light steps (``fib(10)``), end to end.

Measured side by side in one run, on this machine:

- a bare Python loop calling ``fib(10)`` 40 times (the work itself);
- stepwell in-process (``Runner``): 40 node steps, each a fresh sandboxed
  fork of the fork-server, with run records, logs and commits in DuckDB;
- ``stepwell run`` through the CLI (a new host process: Python start-up, app
  load, fork-server cold start, 40 steps), and its marginal cost per step
  (40-step run minus 1-step run, divided by 39);
- the sandbox alone: fork + isolation + a no-op worker round trip, and the
  fork-server's cold start; and the same steps with ``STEPWELL_SANDBOX=none``
  (a fresh ``python`` per step) for scale;
- Prefect 3 running the same 40 tasks in a flow (``pip install 'stepwell[bench]'``;
  if it is missing or fails, the reason is printed instead).

Prints per-step overhead in ms and the ratios; writes
``benchmarks/results/step_overhead.json``.

    uv run --extra bench python benchmarks/step_overhead.py [--steps 40] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import save, write_app

FIB = """
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
"""

NODE = FIB + "\nresult = fib(10)\n"

PREFECT_SCRIPT = FIB + """
import json, statistics, sys, time
from pathlib import Path
from prefect import flow, task

steps, repeat = int(sys.argv[1]), int(sys.argv[2])
calls = []

@task
def fib_task(n):
    return fib(n)

@flow
def light_steps(count):
    for _ in range(count):
        began = time.perf_counter()
        fib_task(10)
        calls.append(time.perf_counter() - began)

def timed(count):
    began = time.perf_counter()
    light_steps(count)
    return time.perf_counter() - began

def process_age():
    # seconds since this process started (interpreter start and imports included)
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - ticks / 100

cold = timed(steps)  # with no PREFECT_API_URL, the first flow also starts Prefect's own server
cold_process = process_age()
calls.clear()
warm = [timed(steps) for _ in range(repeat)]
task_call_ms = statistics.median(calls) * 1000 if calls else None
one_task = [timed(1) for _ in range(repeat)]
import prefect
print("RESULT " + json.dumps({
    "cold_s": cold, "cold_process_s": cold_process, "warm_s": warm, "one_task_flow_s": one_task,
    "task_call_ms": task_call_ms, "version": prefect.__version__,
}))
"""


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def bare_loop(steps: int, repeat: int = 50) -> float:
    """Seconds for ``steps`` calls of fib(10) (best of ``repeat``)."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        for _ in range(steps):
            fib(10)
        best = min(best, time.perf_counter() - began)
    return best


def make_app(root: Path, steps: int) -> Path:
    lines = ["title: light steps", "steps:"]
    for i in range(steps):
        lines += [f"  - name: s{i:02d}", "    node: fib.py"]
    return write_app(root, {"stepwell.yml": "\n".join(lines) + "\n", "fib.py": NODE})


def _process_cpu_ms(pid: int) -> tuple[float, float]:
    """(CPU time of ``pid`` itself, CPU time of its reaped children) in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) * tick, (int(fields[13]) + int(fields[14])) * tick


def runner_seconds(
    app: Path, steps: int, sandbox: str, repeat: int, cpu: dict[str, float] | None = None
) -> list[float]:
    """Seconds to run all steps in-process through ``Runner`` (warm host, warm fork-server).

    ``cpu`` gets the CPU time per step spent by the host, the fork-server and the
    workers (the fork-server's reaped children), over all repeats."""
    from stepwell.app import load_app
    from stepwell.engine.app_run import run_steps, select_steps
    from stepwell.engine.runner import Runner
    from stepwell.sandbox.launcher import forkserver
    from stepwell.store import open_store

    spec = load_app(app)
    store = open_store(None, spec.root)
    try:
        runner = Runner(spec, store, sandbox=sandbox)
        names = select_steps(spec, None)[:steps]
        runner.run_step(names[0])  # warm-up: fork-server start, first imports
        server = forkserver(pandas=False).pid if sandbox != "none" else None
        host_before = sum(os.times()[:2])
        server_before = _process_cpu_ms(server) if server else (0.0, 0.0)
        times = []
        for _ in range(repeat):
            began = time.perf_counter()
            runs = run_steps(runner, names)
            # timed until every run's record is in the store: the records of runs that
            # changed nothing are written in batches (store/late_runs.py), and reading
            # one back writes what is waiting
            if store.get_run(runs[-1].id) is None:
                raise SystemExit(f"run {runs[-1].id} has no record")
            times.append(time.perf_counter() - began)
            bad = [r for r in runs if not r.status.startswith("succeeded")]
            if bad:
                raise SystemExit(f"step failed: {bad[0].error}")
        if cpu is not None and server:
            time.sleep(0.2)  # the last workers are reaped
            server_after = _process_cpu_ms(server)
            n = steps * repeat
            cpu["host"] = (sum(os.times()[:2]) - host_before) * 1000 / n
            cpu["forkserver"] = (server_after[0] - server_before[0]) / n
            cpu["workers"] = (server_after[1] - server_before[1]) / n
            cpu["total"] = cpu["host"] + cpu["forkserver"] + cpu["workers"]
        return times
    finally:
        store.close()


def cli_seconds(app: Path, steps: list[str] | None, env: dict[str, str]) -> float:
    began = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "stepwell.cli", "run", str(app), *(steps or [])],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"stepwell run failed: {result.stderr}")
    return seconds


def sandbox_cycle(samples: int) -> dict[str, float]:
    """The sandbox alone: fork + isolation + a no-op worker from the lean fork-server
    (the one these steps use), and the cold start of both fork-servers."""
    from stepwell.sandbox.launcher import ForkServerClient, WorkerLimits, forkserver, start_worker

    summary: dict[str, float] = {}
    for pandas, suffix in ((False, ""), (True, "_pandas")):
        fresh = ForkServerClient(pandas=pandas)
        began = time.perf_counter()
        fresh.ensure()
        summary["forkserver_cold_start_ms" + suffix] = (time.perf_counter() - began) * 1000
        summary["forkserver_internal_startup_ms" + suffix] = float(fresh.info.get("startup_ms", 0.0))
        fresh.shutdown()
    forkserver(pandas=False).ensure()
    for network in (True, False):
        results: dict[str, list[float]] = {"fork_ms": [], "isolate_and_run_ms": [], "total_ms": []}
        for i in range(samples + 3):
            time.sleep(0.01)  # a host does its bookkeeping between runs; the next spare forks meanwhile
            began = time.perf_counter()
            worker = start_worker(Path("/"), limits=WorkerLimits(network=network), pandas=False)
            forked = time.perf_counter()
            worker.channel.send({"op": "start", "entry": "stepwell.sandbox.worker:ping"})
            while worker.channel.recv()[0].get("op") != "done":
                pass
            done = time.perf_counter()
            worker.close()
            if i >= 3:
                results["fork_ms"].append((forked - began) * 1000)
                results["isolate_and_run_ms"].append((done - forked) * 1000)
                results["total_ms"].append((done - began) * 1000)
        suffix = "" if network else "_network_off"
        for key, values in results.items():
            summary[key + suffix] = statistics.median(values)
        summary["total_ms_min" + suffix] = min(results["total_ms"])
    return summary


def _prefect_script(command: list[str], script: Path, env: dict[str, str], steps: int, repeat: int) -> dict:
    try:
        result = subprocess.run(
            [*command, str(script), str(steps), str(repeat)],
            capture_output=True, text=True, env=env, timeout=900,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": "Prefect did not finish within 900 s"}
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    return {"error": f"Prefect run failed (exit {result.returncode}): " + " | ".join(tail)}


def _prefect_with_server(command: list[str], script: Path, env: dict[str, str], steps: int, repeat: int) -> dict:
    """Fresh processes each running one flow against an already running Prefect
    server (``prefect server start``), as a team with a Prefect server would."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [*command, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    return {"error": "the Prefect server did not start"}
                time.sleep(0.5)
        client_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        runs = [_prefect_script(command, script, client_env, steps, 0) for _ in range(repeat)]
        failed = [r for r in runs if "error" in r]
        if failed:
            return failed[0]
        return {"process_s": [r["cold_process_s"] for r in runs], "flow_s": [r["cold_s"] for r in runs]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _run_prefect(command: list[str], steps: int, repeat: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="stepwell-prefect-") as home:
        env = {
            **os.environ,
            "PREFECT_HOME": home,
            "PREFECT_LOGGING_LEVEL": "CRITICAL",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
        env.pop("PREFECT_API_URL", None)
        env.pop("VIRTUAL_ENV", None)
        script = Path(home) / "bench_prefect.py"
        script.write_text(textwrap.dedent(PREFECT_SCRIPT))
        result = _prefect_script(command, script, env, steps, repeat)
        if "error" not in result:
            result["with_server"] = _prefect_with_server(command, script, env, steps, repeat)
        return result


def prefect_seconds(steps: int, repeat: int) -> dict[str, object]:
    """Prefect in this environment (the ``bench`` extra); if it is missing or
    broken here (its server pins other FastAPI versions than stepwell's), in an
    isolated environment made by ``uv run --isolated --with prefect``."""
    attempts = []
    if importlib.util.find_spec("prefect") is not None:
        result = _run_prefect([sys.executable], steps, repeat)
        if "error" not in result:
            return {**result, "environment": "project (bench extra)"}
        attempts.append(f"in this environment: {result['error']}")
    else:
        attempts.append("not installed here (uv run --extra bench ...)")
    uv = shutil.which("uv")
    if uv is None:
        return {"error": "; ".join([*attempts, "and no `uv` to make an isolated environment"])}
    result = _run_prefect([uv, "run", "--isolated", "--no-project", "--with", "prefect>=3", "python"],
                          steps, repeat)  # fmt: skip
    if "error" in result:
        return {"error": "; ".join([*attempts, f"isolated: {result['error']}"])}
    return {**result, "environment": "isolated (uv run --with prefect>=3)", "notes": attempts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-prefect", action="store_true")
    args = parser.parse_args()
    steps = args.steps

    bare = bare_loop(steps)
    with tempfile.TemporaryDirectory(prefix="stepwell-bench-") as tmp:
        app = make_app(Path(tmp) / "app", steps)
        cpu: dict[str, float] = {}
        in_process = runner_seconds(app, steps, "default", args.repeat, cpu)
        unsandboxed = runner_seconds(app, min(steps, 10), "none", 1)[0] / min(steps, 10) * steps
        env = {**os.environ}
        env.pop("STEPWELL_SANDBOX", None)
        # a normal install reuses compiled .pyc files; some shells disable writing them
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        cli_seconds(app, ["s00"], env)  # writes the .pyc files once
        # the marginal cost per step is a difference of two process timings: more
        # samples (a process is ~0.5 s), taken in turn, keep a neighbour's burst out
        full, one = [], []
        for _ in range(max(args.repeat, 6)):
            full.append(cli_seconds(app, None, env))
            one.append(cli_seconds(app, ["s00"], env))
        cli_full, cli_one = min(full), min(one)
    cycle = sandbox_cycle(30)
    prefect = {"skipped": True} if args.no_prefect else prefect_seconds(steps, args.repeat)

    def per_step_ms(total: float) -> float:
        return (total - bare) / steps * 1000

    runner_ms = per_step_ms(min(in_process))
    result: dict[str, object] = {
        "steps": steps,
        "bare_loop_total_ms": bare * 1000,
        "bare_per_step_ms": bare / steps * 1000,
        "runner_total_ms": min(in_process) * 1000,
        "runner_overhead_per_step_ms": runner_ms,
        "runner_median_overhead_per_step_ms": per_step_ms(statistics.median(in_process)),
        "cpu_per_step_ms": cpu,
        "cpus": os.cpu_count(),
        "cli_total_ms": cli_full * 1000,
        "cli_overhead_per_step_ms": per_step_ms(cli_full),
        "cli_one_step_ms": cli_one * 1000,
        "cli_marginal_per_step_ms": (cli_full - cli_one) / (steps - 1) * 1000 if steps > 1 else None,
        "unsandboxed_subprocess_per_step_ms": per_step_ms(unsandboxed),
        "sandbox_cycle": cycle,
        "prefect": prefect,
    }
    warm = prefect.get("warm_s") if isinstance(prefect, dict) else None
    if warm:
        # Prefect's cost is mostly per flow, not per task: report both, and compare like with like
        result["prefect_flow_ms"] = min(warm) * 1000
        result["prefect_flow_per_step_ms"] = per_step_ms(min(warm))
        result["prefect_one_task_flow_ms"] = min(prefect["one_task_flow_s"]) * 1000
        result["prefect_task_call_ms"] = prefect["task_call_ms"]
        result["prefect_process_own_server_s"] = prefect["cold_process_s"]
        result["ratio_warm_flow"] = min(warm) / min(in_process)
        result["ratio_warm_flow_median"] = statistics.median(warm) / statistics.median(in_process)
        result["ratio_task_call"] = prefect["task_call_ms"] / runner_ms
        result["ratio_fresh_process_own_server"] = prefect["cold_process_s"] / cli_full
        with_server = prefect.get("with_server") or {}
        if "process_s" in with_server:
            result["prefect_process_running_server_s"] = min(with_server["process_s"])
            result["ratio_fresh_process_running_server"] = min(with_server["process_s"]) / cli_full
    path = save("step_overhead", result)

    print(f"{steps} sequential steps of fib(10)")
    print(f"  bare Python loop           {bare * 1000:9.3f} ms total  ({bare / steps * 1e6:.1f} us per call)")
    print(f"  stepwell Runner in-process {min(in_process) * 1000:9.1f} ms total  "
          f"{runner_ms:6.2f} ms overhead per step (median of runs "
          f"{result['runner_median_overhead_per_step_ms']:.2f})")
    if cpu:
        print(f"    CPU time per step: host {cpu['host']:.1f} ms, fork-server {cpu['forkserver']:.1f} ms, "
              f"workers {cpu['workers']:.1f} ms = {cpu['total']:.1f} ms on {os.cpu_count()} cores")
    print(f"  stepwell run (CLI)         {cli_full * 1000:9.1f} ms total  "
          f"{per_step_ms(cli_full):6.2f} ms per step end to end, "
          f"{result['cli_marginal_per_step_ms']:.2f} ms marginal per step "
          f"(1-step run: {cli_one * 1000:.0f} ms)")
    print(f"  sandbox alone              {cycle['total_ms']:.2f} ms per run (median; min "
          f"{cycle['total_ms_min']:.2f}), {cycle['total_ms_network_off']:.2f} ms with network off: "
          f"fork request {cycle['fork_ms']:.2f} ms + isolation and a no-op run "
          f"{cycle['isolate_and_run_ms']:.2f} ms")
    print(f"  fork-server cold start     {cycle['forkserver_cold_start_ms']:.0f} ms, once per host "
          f"process ({cycle['forkserver_internal_startup_ms']:.0f} ms of it importing and warming up; "
          f"{cycle['forkserver_cold_start_ms_pandas']:.0f} ms for the one with pandas)")
    print(f"  without sandbox (python per step) {per_step_ms(unsandboxed):6.1f} ms overhead per step")
    if warm:
        print(f"  Prefect {prefect.get('version', 3)}, {steps} tasks in a flow, warm "
              f"{result['prefect_flow_ms']:9.1f} ms total  ({result['prefect_flow_per_step_ms']:.2f} ms per task; "
              f"a 1-task flow {result['prefect_one_task_flow_ms']:.0f} ms, a task call inside a flow "
              f"{result['prefect_task_call_ms']:.2f} ms median)")
        print(f"  fresh process, {steps}-step flow: {prefect['cold_process_s']:.1f} s with Prefect starting "
              f"its own server" + (f", {result['prefect_process_running_server_s']:.2f} s against a running "
              "server" if "prefect_process_running_server_s" in result else
              f" (with a running server: {with_server.get('error', 'not measured')})"))
        print(f"  ratio Prefect / stepwell   {result['ratio_warm_flow']:.1f}x warm {steps}-step flow vs run "
              f"({result['ratio_warm_flow_median']:.1f}x median of each); fresh process: "
              f"{result['ratio_fresh_process_own_server']:.1f}x (own server)"
              + (f", {result['ratio_fresh_process_running_server']:.1f}x (running server)"
                 if "ratio_fresh_process_running_server" in result else "")
              + f"; per task call vs per sandboxed step {result['ratio_task_call']:.2f}x")
    elif isinstance(prefect, dict) and prefect.get("error"):
        print(f"  Prefect: {prefect['error']}")
    print(f"  ratio stepwell / bare loop {min(in_process) / bare:.0f}x")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
