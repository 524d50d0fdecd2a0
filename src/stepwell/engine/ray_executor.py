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
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepwell.engine.app_run import MAX_FOLLOW_UPS, follow_up_delay
from stepwell.store.base import RunRecord

_SECRET_PREFIX = "STEPWELL_SECRET_"


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


def run_step_task(app_root: str, store_url: str, step: str, trigger: str,
                  secrets: dict[str, str], sandbox: str | None) -> dict[str, Any]:  # fmt: skip
    """One run, in a Ray worker: the run record as a dict."""
    from stepwell.app import load_app
    from stepwell.engine.runner import Runner
    from stepwell.store import open_store

    spec = load_app(Path(app_root))
    store = open_store(store_url, spec.root)
    try:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(_SECRET_PREFIX)}
        environ.update(secrets)
        # runs of other hosts are not this task's to close: their pids mean nothing here
        runner = Runner(spec, store, environ=environ, sandbox=sandbox, recover=False)
        return dataclasses.asdict(runner.run_step(step, trigger))
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
) -> list[RunRecord]:
    """Run ``names`` (in dependency order, as ``select_steps`` gives them) as Ray
    tasks; returns their run records in the order they ended."""
    if not store_url.startswith(("postgresql://", "postgres://")):
        raise RayExecutorError(
            "the Ray executor needs a PostgreSQL store that every node can reach: "
            "--store postgresql://... (an embedded DuckDB file belongs to one process)"
        )
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
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
        running: dict[Any, str] = {}
        done: set[str] = set()
        runs: list[RunRecord] = []

        def submit(name: str, trigger: str) -> None:
            ref = task.remote(str(spec.root), store_url, name, trigger, secrets, sandbox)
            running[ref] = name

        while queued or running:
            for name in [n for n in queued if waits_for[n] <= done]:
                queued.remove(name)
                submit(name, "manual")
            (ref,), _ = ray.wait(list(running), num_returns=1)
            name = running.pop(ref)
            run = _record(ray, ref, name)
            runs.append(run)
            if listener is not None:
                listener.run_started(run)
                listener.run_finished(run)
            delay = follow_up_delay(run)
            if delay is not None and follow_ups[name] < MAX_FOLLOW_UPS:
                follow_ups[name] += 1
                time.sleep(delay)
                submit(name, "request_new_run")
            else:
                done.add(name)
        return runs
    finally:
        if started_here:
            ray.shutdown()


def _record(ray: Any, ref: Any, step: str) -> RunRecord:
    """The task's run record; a task that itself failed (its node died, say) becomes
    a failed run so the other steps still run and the command reports it."""
    try:
        return RunRecord(**ray.get(ref))
    except Exception as exc:  # noqa: BLE001 - reported as the run's error
        return RunRecord(id="", step=step, status="failed",
                         error=f"the Ray task running step {step!r} failed: {exc}")  # fmt: skip
