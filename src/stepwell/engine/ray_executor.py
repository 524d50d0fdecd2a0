"""The Ray executor (``stepwell run --executor ray``): each run is a Ray task.

A task hosts one run exactly like the local executor: it loads the app, opens
the shared PostgreSQL store and runs the step through a :class:`Runner`, whose
sandboxed worker is forked from the fork-server of the node Ray placed the task
on (a Ray worker process keeps its fork-server warm between tasks). A step is
submitted as soon as every step it depends on has ended, so independent steps
run in parallel across the cluster; a run that asks for another one
(``State.request_new_run``) gets it before its dependents start. User code is
the same as with the local executor.

Needs ``pip install 'stepwell[ray]'``, a PostgreSQL store every node can reach
(``--store postgresql://...``), and the app folder at the same path on every
node (a shared filesystem or the same checkout). Only the ``STEPWELL_SECRET_*``
variables of the driver travel with the tasks (as task arguments).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stepwell.engine.app_run import MAX_FOLLOW_UPS, follow_up_delay
from stepwell.store import ids
from stepwell.store.base import RunRecord, Store

_SECRET_PREFIX = "STEPWELL_SECRET_"
#: Seconds the driver waits for a task at a time (then looks at follow-ups and Ctrl-C).
_POLL_SECONDS = 0.2
#: What an HTTP/2 (so gRPC, so Ray) client sends first.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class RayExecutorError(RuntimeError):
    """The Ray executor cannot run here; the message says what to change."""


def _ray() -> Any:
    # Ray's `uv run` integration would re-package the working directory for every
    # worker; the app is read from its own folder instead.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
    except ImportError:
        raise RayExecutorError(
            "the Ray executor needs Ray: pip install 'stepwell[ray]' (or uv sync --extra ray)"
        ) from None
    return ray


def run_step_task(app_root: str, store_url: str, step: str, trigger: str, run_id: str,
                  secrets: dict[str, str], sandbox: str | None) -> dict[str, Any]:  # fmt: skip
    """Run ``run_id`` of ``step``, in a Ray worker: the run record as a dict."""
    from stepwell.app import load_app
    from stepwell.engine.runner import Runner
    from stepwell.store import open_store

    spec = load_app(Path(app_root))
    store = open_store(store_url, spec.root)
    try:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(_SECRET_PREFIX)}
        environ.update(secrets)
        # it closes the runs left `running` by dead processes of this node (a Ray
        # worker or driver killed mid-run); other nodes' runs it leaves alone
        runner = Runner(spec, store, environ=environ, sandbox=sandbox)
        return dataclasses.asdict(runner.run_step(step, trigger, run_id=run_id))
    finally:
        store.close()


def run_steps_on_ray(
    spec: Any,
    store_url: str,
    names: Sequence[str],
    *,
    address: str | None = None,
    listener: Any = None,
    sandbox: str | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> list[RunRecord]:
    """Run ``names`` (in dependency order, as ``select_steps`` gives them) as Ray
    tasks; returns their run records in the order they ended. Once ``stop()`` is
    true (a Ctrl-C), the runs in progress are cancelled (their tasks' workers
    killed, nothing after their last commit point kept) and no other starts."""
    if not store_url.startswith(("postgresql://", "postgres://")):
        raise RayExecutorError(
            "the Ray executor needs a PostgreSQL store that every node can reach: "
            "--store postgresql://... (an embedded DuckDB file belongs to one process)"
        )
    from stepwell.store import open_store

    # opened here first: a wrong URL is one clear error before any Ray work, and a
    # task that dies without closing its run leaves the closing to this process
    store = open_store(store_url, spec.root)
    try:
        return _run_steps(spec, store, store_url, names, address, listener, sandbox, stop)
    finally:
        store.close()


def _run_steps(spec: Any, store: Store, store_url: str, names: Sequence[str], address: str | None,
               listener: Any, sandbox: str | None, stop: Callable[[], bool]) -> list[RunRecord]:  # fmt: skip
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            _check_address(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        except Exception as exc:  # no cluster at that address, or Ray cannot start here
            where = f"at {address}" if address else "locally"
            raise RayExecutorError(f"cannot start or join a Ray cluster {where}: {exc}") from None
    try:
        task = ray.remote(run_step_task).options(num_cpus=1, max_retries=0)
        secrets = {k: v for k, v in os.environ.items() if k.startswith(_SECRET_PREFIX)}
        wanted = set(names)
        waits_for = {
            name: {b for b in before if b in wanted}
            for name, before in spec.upstream_edges().items() if name in wanted
        }  # fmt: skip
        follow_ups = dict.fromkeys(names, 0)
        queued = list(names)  # not submitted yet, in dependency order
        running: dict[Any, RunRecord] = {}
        #: follow-up runs waiting for their time: (when, step)
        due: list[tuple[float, str]] = []
        done: set[str] = set()
        runs: list[RunRecord] = []

        def submit(name: str, trigger: str) -> None:
            # the id is made here, so that the run can be closed if its task dies
            run = RunRecord(id=ids.new_id(), step=name, status="running", trigger=trigger,
                            started_at=dt.datetime.now(dt.UTC))  # fmt: skip
            ref = task.remote(str(spec.root), store_url, name, trigger, run.id, secrets, sandbox)
            running[ref] = run
            if listener is not None:
                listener.run_started(run)

        while (queued or running or due) and not stop():
            for name in [n for n in queued if waits_for[n] <= done]:
                queued.remove(name)
                submit(name, "manual")
            now = time.monotonic()
            for when, name in [d for d in due if d[0] <= now]:
                due.remove((when, name))
                submit(name, "request_new_run")
            # (a short wait: a follow-up's time, or a Ctrl-C, may come first)
            wait = max(0.0, min([_POLL_SECONDS, *(when - now for when, _ in due)]))
            if not running:
                time.sleep(wait)
                continue
            ended, _ = ray.wait(list(running), num_returns=1, timeout=wait)
            if not ended:
                continue
            run = _record(ray, ended[0], running.pop(ended[0]), store)
            runs.append(run)
            if listener is not None:
                listener.run_finished(run)
            delay = follow_up_delay(run)
            if delay is not None and follow_ups[run.step] < MAX_FOLLOW_UPS:
                follow_ups[run.step] += 1
                due.append((time.monotonic() + delay, run.step))
            else:
                done.add(run.step)
        for ref, run in running.items():  # stopped: cancel what still runs
            ray.cancel(ref, force=True)
            runs.append(_record(ray, ref, run, store, cancelled=True))
        return runs
    finally:
        if started_here:
            ray.shutdown()


def _check_address(address: str) -> None:
    """Fail at once when nothing answering like a Ray cluster is at ``address``:
    ``ray.init`` would retry for many minutes, printing warnings."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    advice = ("start one there with `ray start --head`, or give the address it prints "
              "(--ray-address HOST:PORT)")  # fmt: skip
    if not host or not port.isdigit():
        raise RayExecutorError(f"Ray address {address!r} is not HOST:PORT: {advice}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as sock:
            # Ray speaks gRPC: an HTTP/2 server answers the client preface with
            # its SETTINGS frame (frame type 4, the frame header's fourth byte)
            sock.sendall(_HTTP2_PREFACE)
            reply = sock.recv(9)
    except OSError as exc:
        raise RayExecutorError(f"cannot reach a Ray cluster at {address} ({exc}): {advice}") from None
    if len(reply) < 4 or reply[3] != 4:
        raise RayExecutorError(f"{address} does not answer like a Ray cluster: {advice}")


def _record(ray: Any, ref: Any, run: RunRecord, store: Store, cancelled: bool = False) -> RunRecord:
    """The record of the run that task ``ref`` hosted. A task that died before it
    closed its run (its Ray worker or node was killed, say) leaves it to this
    process: the run ends ``killed`` (``failed`` if the task raised, ``cancelled``
    if this process cancelled it), nothing after its last commit point kept, and
    the other steps still run."""
    try:
        return RunRecord(**ray.get(ref))
    except Exception as exc:  # noqa: BLE001 - reported as the run's error
        problem = exc
    recorded = store.get_run(run.id)
    if recorded is not None and recorded.status not in ("queued", "running"):
        return recorded  # it ended before its task did
    if cancelled:
        status, error = "cancelled", "interrupted (Ctrl-C)"
    elif isinstance(problem, ray.exceptions.RayTaskError):
        status, error = "failed", f"its Ray task failed: {problem.cause!r}"
    else:
        status, error = "killed", f"the Ray worker running it died ({problem})"
    closed = dataclasses.replace(
        recorded or run, status=status, ended_at=dt.datetime.now(dt.UTC),
        error=f"{error}; nothing after its last commit point was kept",
    )
    if recorded is None:  # (short runs are recorded when they end)
        store.create_run(closed)
    else:
        store.update_run(run.id, status=closed.status, ended_at=closed.ended_at, error=closed.error)
    return closed
