"""The Ray executor (``stepwell run|serve --executor ray``): each run is a Ray task.

A task hosts one run exactly like the local executor: it loads the app, opens
the shared PostgreSQL store and runs the step through a :class:`Runner`, whose
sandboxed worker is forked from the fork-server of the node Ray placed the task
on (a Ray worker process keeps its fork-server warm between tasks). A step is
submitted as soon as every step it depends on has ended, so independent steps
run in parallel across the cluster; a run that asks for another one
(``State.request_new_run``) gets it before its dependents start. User code is
the same as with the local executor. Under ``stepwell serve``, :class:`RayRunner`
takes the local runner's place: the server's scheduler decides when a step runs,
Ray where.

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
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwell.engine.app_run import MAX_FOLLOW_UPS, follow_up_delay
from stepwell.sandbox.policy import MODE_ENV
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
    """Run ``run_id`` of ``step``, in a Ray worker: ``{"run": the run record as a
    dict, "tables": the tables its commit points added rows to}``."""
    from stepwell.app import load_app
    from stepwell.engine.runner import NullListener, Runner
    from stepwell.store import open_store

    class Committed(NullListener):
        def __init__(self) -> None:
            self.tables: set[str] = set()

        def tables_committed(self, run: RunRecord, tables: set[str]) -> None:
            self.tables |= tables

    spec = load_app(Path(app_root))
    store = open_store(store_url, spec.root)
    try:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(_SECRET_PREFIX)}
        environ.update(secrets)
        # it closes the runs left `running` by dead processes of this node (a Ray
        # worker or driver killed mid-run); other nodes' runs it leaves alone
        committed = Committed()
        # (prompt_logs: a line a step prints reaches the server, which reads the store,
        # while the step goes on, and is kept if the task is killed)
        runner = Runner(spec, store, environ=environ, sandbox=sandbox, listener=committed,
                        prompt_logs=True)
        run = runner.run_step(step, trigger, run_id=run_id)
        return {"run": dataclasses.asdict(run), "tables": sorted(committed.tables)}
    finally:
        store.close()


def needs_shared_store(store_url: str) -> None:
    """Refuse a store the nodes of a Ray cluster cannot share."""
    if not store_url.startswith(("postgresql://", "postgres://")):
        raise RayExecutorError(
            "the Ray executor needs a PostgreSQL store that every node can reach: "
            "--store postgresql://... (an embedded DuckDB file belongs to one process)"
        )


def join_cluster(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``; none: start a
    local one) unless this process has already; True when it joined here (and
    should ``ray.shutdown()`` when done)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_address(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)  # fmt: skip
    except Exception as exc:  # no cluster at that address, or Ray cannot start here
        where = f"at {address}" if address else "locally"
        raise RayExecutorError(f"cannot start or join a Ray cluster {where}: {exc}") from None
    return True


def _step_task(ray: Any) -> Any:
    return ray.remote(run_step_task).options(num_cpus=1, max_retries=0)


def _submit(task: Any, app_root: Path, store_url: str, step: str, trigger: str,
            secrets: dict[str, str], sandbox: str | None,
            run_id: str | None = None) -> tuple[RunRecord, Any]:  # fmt: skip
    """Start a run of ``step`` as Ray task ``task``: the run as it stands, and the
    task. The id is made here, so that the run can be closed if its task dies."""
    run = RunRecord(id=run_id or ids.new_id(), step=step, status="running", trigger=trigger,
                    started_at=dt.datetime.now(dt.UTC))  # fmt: skip
    return run, task.remote(str(app_root), store_url, step, trigger, run.id, secrets, sandbox)


def _secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """What of an environment travels with the tasks: the secrets."""
    return {k: v for k, v in environ.items() if k.startswith(_SECRET_PREFIX)}


class RayRunner:
    """What ``stepwell serve --executor ray`` runs steps with: each run a Ray task,
    in place of the local :class:`Runner` (the scheduler calls the same methods).

    ``run_step`` waits for its task (on a scheduler thread) and meanwhile passes
    what the task writes to the store on to the listener as the local runner
    would: the run's start, its log lines and row counts (read every
    ``_POLL_SECONDS``); the tables its commit points added rows to come when it
    ends. A step cannot answer a webhook request from a Ray task (the request
    waits in this process): its webhook gets no answer."""

    def __init__(self, app: Any, store: Store, *, store_url: str, listener: Any = None,
                 environ: Mapping[str, str] | None = None, sandbox: str | None = None,
                 on_cluster_lost: Callable[[str], None] | None = None) -> None:  # fmt: skip
        from stepwell.engine.runner import NullListener, recover_orphans

        self.app = app
        self.store = store
        self.store_url = store_url
        self.listener = listener or NullListener()
        environ = os.environ if environ is None else environ
        self.secrets = _secrets(environ)
        #: the sandbox mode (``--sandbox``): the tasks' Ray workers may not share our environment
        self.sandbox = sandbox if sandbox is not None else environ.get(MODE_ENV)
        #: runs left running by dead processes of this machine, closed (as the local
        #: runner does; each task does it on its own node)
        self.recovered: list[str] = recover_orphans(store)
        self._ray = _ray()
        self._task = _step_task(self._ray)
        #: runs in progress: their task, and why they were cancelled (if they were)
        self._active: dict[str, tuple[Any, list[str]]] = {}
        self._lock = threading.Lock()
        #: called (with why) when this node's raylet is gone: no task can run any more
        self.on_cluster_lost = on_cluster_lost

    def run_step(self, name: str, trigger: str = "manual", *, run_id: str | None = None,
                 then: str | None = None) -> RunRecord:  # fmt: skip
        run, ref = _submit(self._task, self.app.root, self.store_url, name, trigger, self.secrets,
                           self.sandbox, run_id)  # fmt: skip
        cancelled: list[str] = []
        with self._lock:
            self._active[run.id] = (ref, cancelled)
        try:
            seen = _Seen()
            while not self._ray.wait([ref], timeout=_POLL_SECONDS)[0]:
                self._pass_on(run, seen)
            lost = self._cluster_lost(ref, run)
            if lost is not None:
                return lost
            final, tables = _result(self._ray, ref, run, self.store, next(iter(cancelled), None))
            if not tables and final.rows_out:  # (its task died after a commit point)
                tables = set(self.app.step(name).output_tables())
            self._pass_on(final, seen)
            if tables:
                self.listener.tables_committed(final, tables)
            self.listener.run_finished(final)
            return final
        finally:
            with self._lock:
                self._active.pop(run.id, None)

    def _cluster_lost(self, ref: Any, run: RunRecord) -> RunRecord | None:
        """When task ``ref`` failed because this node's raylet is gone and its run
        never started: the run, left ``queued`` for the next server (every later run
        would fail the same way), after telling ``on_cluster_lost``; else None."""
        try:
            self._ray.get(ref, timeout=0)
            return None
        except self._ray.exceptions.LocalRayletDiedError as exc:
            problem = str(exc)
        except Exception:  # noqa: BLE001 - _result reports it
            return None
        recorded = self.store.get_run(run.id)
        if recorded is None or recorded.status != "queued" or self.on_cluster_lost is None:
            return None  # it started: it ends killed, as when its worker dies
        self.on_cluster_lost(f"the Ray cluster's raylet on this machine died ({problem})")
        return recorded

    def _pass_on(self, run: RunRecord, seen: _Seen) -> None:
        """Tell the listener what the task wrote to the store since ``seen``."""
        recorded = self.store.get_run(run.id) if run.status == "running" else run
        if recorded is None or recorded.status == "queued":
            return
        if not seen.started:
            seen.started = True
            self.listener.run_started(recorded)
        for line in self.store.get_logs(run.id, after_seq=seen.seq):
            seen.seq = line.seq
            self.listener.log_line(recorded, line)
        if (recorded.rows_in, recorded.rows_out) != seen.rows:
            seen.rows = (recorded.rows_in, recorded.rows_out)
            self.listener.progress(recorded, *seen.rows)

    def cancel(self, run_id: str, reason: str = "stopped on request") -> bool:
        """Stop run ``run_id`` if it is in progress here: its task's worker is killed
        (so is the sandboxed worker with it) and the run ends ``cancelled``."""
        with self._lock:
            if run_id not in self._active:
                return False
            ref, cancelled = self._active[run_id]
            cancelled.append(reason)
        self._ray.cancel(ref, force=True)
        return True

    def active_runs(self) -> list[str]:
        with self._lock:
            return list(self._active)


@dataclass
class _Seen:
    """What ``RayRunner`` has passed on of a run so far."""

    started: bool = False
    seq: int = -1
    rows: tuple[int, int] = (0, 0)


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
    needs_shared_store(store_url)
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
    started_here = join_cluster(address)
    try:
        task = _step_task(ray)
        secrets = _secrets(os.environ)
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
            run, ref = _submit(task, spec.root, store_url, name, trigger, secrets, sandbox)
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
            run, _tables = _result(ray, ended[0], running.pop(ended[0]), store)
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
            runs.append(_result(ray, ref, run, store, cancelled="interrupted (Ctrl-C)")[0])
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


def _result(ray: Any, ref: Any, run: RunRecord, store: Store,
            cancelled: str | None = None) -> tuple[RunRecord, set[str]]:  # fmt: skip
    """The record of the run that task ``ref`` hosted, and the tables its commit
    points added rows to. A task that died before it closed its run (its Ray
    worker or node was killed, say) leaves it to this process: the run ends
    ``killed`` (``failed`` if the task raised, ``cancelled`` for the reason
    ``cancelled`` if this process cancelled it), nothing after its last commit
    point kept, and the other steps still run (which tables it added rows to is
    not known then)."""
    try:
        result = ray.get(ref)
        return RunRecord(**result["run"]), set(result["tables"])
    except Exception as exc:  # noqa: BLE001 - reported as the run's error
        problem = exc
    recorded = store.get_run(run.id)
    if recorded is not None and recorded.status not in ("queued", "running"):
        return recorded, set()  # it ended before its task did
    if cancelled:
        status, error = "cancelled", cancelled
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
    return closed, set()
