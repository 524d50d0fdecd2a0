"""Running one step: create the run record, execute, commit or roll back.

The runner is where a run's staged effects become one store transaction. For
Python steps it starts a worker, serves it (``WorkerSession``) and maps how
the worker ended onto the run's final status; SQL steps run in the host.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from stepwell.engine.bytecode import AppBytecode
from stepwell.engine.hosts import on_this_host, owned_elsewhere, this_host
from stepwell.engine.logs import Redactor, RunLog, secret_strings
from stepwell.engine.preload import pandas_by_step, prestart_forkservers, step_wants_pandas
from stepwell.engine.staging import StagedRun
from stepwell.engine.worker_session import DeclaredSchema, Outcome, WorkerSession
from stepwell.runtimes.node import host as node_host
from stepwell.runtimes.processor import host as processor_host
from stepwell.runtimes.sql import run_sql_step
from stepwell.sandbox.launcher import WorkerLimits, start_worker
from stepwell.sandbox.policy import (
    DEFAULT_PROCESSES,
    format_bytes,
    sandbox_mode,
    with_network_note,
    with_tmp_limit,
)
from stepwell.store import ids
from stepwell.store.base import LogLine, PartitionRecord, RunRecord, Store

#: Time limit when neither the step nor the app's defaults set one.
DEFAULT_TIMEOUT = 600.0
SUCCESS = frozenset({"succeeded", "succeeded_no_data", "succeeded_with_errors"})
#: Styles whose run record is written with the run's first commit (or once the run
#: has gone on for ``worker_session.RECORD_AFTER``) rather than before it starts.
_RECORDED_LATE = frozenset({"node", "processor"})
#: What pyarrow says when a run from the lean fork-server (no numpy loaded) calls
#: something that needs numpy without importing it (see ``sandbox.lazy_numpy``).
_NUMPY_MISSING = ("NumPy is not present", "'NoneType' object has no attribute 'ndarray'")


class RunListener(Protocol):
    """Hooks for progress display (CLI) and live streaming (server)."""

    def run_started(self, run: RunRecord) -> None: ...
    def progress(self, run: RunRecord, rows_in: int, rows_out: int) -> None: ...
    def log_line(self, run: RunRecord, line: LogLine) -> None: ...
    def run_finished(self, run: RunRecord) -> None: ...
    def tables_committed(self, run: RunRecord, tables: set[str]) -> None:
        """A commit point of ``run`` made new rows of ``tables`` visible (optional hook)."""
    def respond(self, run: RunRecord, request_key: str, payload: Any) -> bool:
        """``run`` answers the waiting HTTP request ``request_key`` (optional hook;
        False when no request waits for that key)."""
    def partition_progress(
        self, run: RunRecord, partition: PartitionRecord, done: int, total: int
    ) -> None:
        """A connector partition started (status ``running``) or ended; ``done`` of
        ``total`` partitions to read have ended (optional hook)."""


class NullListener:
    def run_started(self, run: RunRecord) -> None:
        pass

    def progress(self, run: RunRecord, rows_in: int, rows_out: int) -> None:
        pass

    def log_line(self, run: RunRecord, line: LogLine) -> None:
        pass

    def run_finished(self, run: RunRecord) -> None:
        pass

    def tables_committed(self, run: RunRecord, tables: set[str]) -> None:
        pass

    def partition_progress(
        self, run: RunRecord, partition: PartitionRecord, done: int, total: int
    ) -> None:
        pass


@dataclass
class _RunHandle:
    """What ``Runner.cancel`` needs to stop a run in progress."""

    worker: Any = None
    cancel_reason: str | None = None


@dataclass
class StepContext:
    """What a run needs besides the store: resolved parameters and secrets."""

    parameters: dict[str, Any]
    secret_values: list[str]
    time_limit: float | None
    #: memory, CPU, processes and network of the step's worker
    worker_limits: WorkerLimits = field(default_factory=WorkerLimits)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def recover_orphans(store: Store) -> list[str]:
    """Close runs left ``running`` by a host process of this machine that no longer
    exists (another machine's runs are its business: see ``_close_abandoned``).

    Their uncommitted effects were never committed, so only the record needs
    fixing. Returns the ids it closed."""
    closed = []
    for run in store.list_runs(limit=None, statuses=("running", "queued")):
        if owned_elsewhere(run) or run.host_pid == os.getpid():
            continue
        if run.status == "queued":  # left by a stopped `stepwell serve`, never started
            store.update_run(
                run.id, status="cancelled", ended_at=_now(),
                error=f"the server (pid {run.host_pid}) stopped before this queued run started",
            )
            closed.append(run.id)
            continue
        store.update_run(
            run.id,
            status="killed",
            ended_at=_now(),
            error=(
                f"the host process (pid {run.host_pid}) stopped while this run was in "
                f"progress; nothing after its last commit point was kept"
            ),
        )
        closed.append(run.id)
    return closed


#: A run of another host whose step's run lock is free this long after it started
#: is taken for one whose host died (the lock is held for all of a run but its first
#: and last milliseconds).
ABANDONED_AFTER_SECONDS = 60.0


class Runner:
    def __init__(
        self,
        app: Any,
        store: Store,
        *,
        listener: RunListener | None = None,
        environ: Mapping[str, str] | None = None,
        sandbox: str | None = None,
        prompt_logs: bool = False,
    ):
        self.app = app
        self.store = store
        self.listener = listener or NullListener()
        #: write a run's log lines to the store within ``RunLog.flush_seconds`` even
        #: when the step prints nothing more (a Ray task: the server reads them there)
        self.prompt_logs = prompt_logs
        self.environ = dict(os.environ if environ is None else environ)
        #: ``default``, ``strict`` (no network unless a step asks) or ``none``
        self.sandbox = sandbox_mode(sandbox)
        #: per step: whether its workers come from the fork-server with pandas
        self._pandas: dict[str, bool] = pandas_by_step(app) if self.sandbox != "none" else {}
        if self.sandbox != "none":
            # they warm up while the first steps are prepared
            prestart_forkservers(app, self._pandas)
        #: node code compiled here once, so workers need not compile it every run
        self.bytecode = AppBytecode(app.root)
        self._env = None
        self._env_checked = False
        self._active: dict[str, _RunHandle] = {}
        self._active_lock = threading.Lock()
        #: workers made ahead for steps about to run (``run_step(..., then=...)``), by
        #: step name, with what they were made for
        self._prepared: dict[str, tuple[tuple, Any]] = {}
        #: ids of the runs of gone host processes this runner closed when it started
        self.recovered: list[str] = recover_orphans(store)

    def _close_abandoned(self, step: str, run_id: str) -> None:
        """On a store several hosts share: with the step's run lock held here, no other
        run of the step is executing anywhere, so one still ``running`` on another
        host (whose process this host cannot look at) has lost its host."""
        if not getattr(getattr(self.store, "dialect", None), "shared", False):
            return
        now = _now()
        for other in self.store.list_runs(step=step, limit=20, statuses=("running",)):
            started = other.started_at
            if other.id == run_id or on_this_host(other) or started is None:
                continue
            if (now - started).total_seconds() < ABANDONED_AFTER_SECONDS:
                continue
            self.store.update_run(
                other.id, status="killed", ended_at=now,
                error=(f"its host ({(other.info or {}).get('host')}, pid {other.host_pid}) "
                       f"stopped while this run was in progress (a later run of the step "
                       f"found its run lock free); nothing after its last commit point was kept"),
            )  # fmt: skip

    # -- preparation -----------------------------------------------------
    def _context(self, step: Any) -> StepContext:
        from stepwell.app import secrets

        parameters = dict(step.parameters or {})
        secret_values: list[str] = []
        for ref in sorted(secrets.find_secret_refs(parameters)):
            value = secrets.lookup(ref, self.app.root, self.environ, step=step.name)
            secret_values.extend(secret_strings(value))
        resolved = secrets.resolve(parameters, self.app.root, self.environ, step=step.name)
        limits = step.effective_limits(self.app.defaults)
        timeout = limits.timeout if limits.timeout else DEFAULT_TIMEOUT
        network = limits.network if limits.network is not None else self.sandbox != "strict"
        worker_limits = WorkerLimits(
            memory=limits.memory, cpu=limits.cpu, processes=limits.processes,
            network=network, tmp=limits.tmp,
        )
        return StepContext(resolved, secret_values, timeout, worker_limits)

    def _environment(self, log: RunLog) -> list[str]:
        """The app's requirements environment (built once per content hash)."""
        if not getattr(self.app, "requirements_file", None):
            return []
        from stepwell.engine.envs import env_for_app

        first_use = not self._env_checked
        if first_use:
            self._env = env_for_app(self.app.root, self.app.requirements_file)
            self._env_checked = True
        log.add("info", [self._env.log_line(self.app.requirements_file, first_use)])
        return self._env_paths()

    def _env_paths(self) -> list[str]:
        """The app environment's folders a worker reads (once it is built)."""
        return [str(self._env.site_packages)] if self._env is not None else []

    # -- cancelling ----------------------------------------------------------
    def cancel(self, run_id: str, reason: str = "stopped on request") -> bool:
        """Stop run ``run_id`` if it is in progress here: its worker is killed and the
        run ends ``cancelled`` with everything since its last commit point rolled
        back. Returns False when this runner has no such run in progress. A run
        that commits its end before the kill lands keeps its status."""
        with self._active_lock:
            handle = self._active.get(run_id)
            if handle is None:
                return False
            handle.cancel_reason = handle.cancel_reason or reason
            worker = handle.worker
        if worker is not None:
            worker.kill()
        return True

    def active_runs(self) -> list[str]:
        """Ids of the runs in progress in this runner."""
        with self._active_lock:
            return list(self._active)

    # -- running -----------------------------------------------------------
    def run_step(
        self, name: str, trigger: str = "manual", *, run_id: str | None = None,
        then: str | None = None,
    ) -> RunRecord:
        """Run step ``name`` once. ``run_id`` names a run record created beforehand
        with status ``queued`` (by the scheduler), or the id the new record gets (the
        Ray executor's driver makes it); without it a new record is made.

        ``then`` names the step expected to run next: its worker is forked and
        sandboxed while this run goes on (it starts no user code before its own run
        sends it one), so that run starts at once. ``discard_prepared`` ends such a
        worker if its run does not come."""
        step = self.app.step(name)
        run = RunRecord(
            id=run_id or ids.new_id(),
            step=step.name,
            status="running",
            trigger=trigger,
            started_at=_now(),
            host_pid=os.getpid(),
            info={"host": this_host()},
        )
        handle = _RunHandle()
        with self._active_lock:
            self._active[run.id] = handle
        try:
            return self._run(step, run, handle, then, existing=run_id is not None)
        finally:
            with self._active_lock:
                self._active.pop(run.id, None)

    def discard_prepared(self) -> None:
        """End the workers made ahead for runs that did not come (see ``run_step``)."""
        while self._prepared:
            _key, worker = self._prepared.popitem()[1]
            worker.close()

    def _run(
        self, step: Any, run: RunRecord, handle: _RunHandle, then: str | None, *, existing: bool
    ) -> RunRecord:
        try:
            context: StepContext | None = self._context(step)
            problem: Exception | None = None
        except Exception as exc:  # recorded as the run's failure below
            context, problem = None, exc
        # The worker is asked for first: the fork-server sets it up while the run
        # record is written and the start frame is read from the store.
        early_worker = self._early_worker(step, context) if context else None
        if then is not None:
            self._prepare(then)
        try:
            return self._run_with(step, run, handle, context, problem, early_worker, existing=existing)
        finally:
            if early_worker is not None:
                early_worker.close()  # a no-op when the run used it

    def _early_worker(self, step: Any, context: StepContext) -> Any:
        """A worker for a node or processor run, requested ahead of time (or made
        ahead by the run before, if it still fits), or None (other styles; an app
        environment not yet built; no fork-server)."""
        if step.kind not in ("node", "processor") or self.sandbox == "none":
            return None
        if getattr(self.app, "requirements_file", None) and not self._env_checked:
            return None  # the first run builds the environment (and logs it) first
        prepared = self._prepared.pop(step.name, None)
        if prepared is not None:
            key, worker = prepared
            if key == self._worker_key(step, context) and not worker.ended():
                return worker
            worker.close()  # made for other limits, or it died waiting
        try:
            worker = self._start_worker(step, context, self._env_paths())
        except Exception:
            return None  # the run starts its worker itself, and reports why it cannot
        if step.kind == "node":
            try:  # it loads the node's code while this host gets the run ready
                worker.channel.send(node_host.prepare_message(
                    step=step, app_root=str(self.app.root), code=self.bytecode.for_node(step.file)
                ))  # fmt: skip
            except OSError:
                pass  # a worker gone already: the run finds out and reports it
        return worker

    def _prepare(self, name: str) -> None:
        """Make the worker of step ``name``'s next run now (``run_step``'s ``then``)."""
        if name in self._prepared:
            return
        try:
            step = self.app.step(name)
            context = self._context(step)
        except Exception:
            return  # the run itself reports the problem
        worker = self._early_worker(step, context)
        if worker is not None:
            self._prepared[name] = (self._worker_key(step, context), worker)

    def _worker_key(self, step: Any, context: StepContext) -> tuple:
        """What a worker made for ``step`` depends on (a prepared one must match)."""
        return (context.worker_limits, tuple(self._env_paths()), self._wants_pandas(step))

    def _start_worker(self, step: Any, context: StepContext, sys_path: list[str]) -> Any:
        return start_worker(
            self.app.root,
            limits=context.worker_limits,
            read_paths=sys_path,
            hide_paths=self._store_paths,
            mode=self.sandbox,
            pandas=self._wants_pandas(step),
        )

    def _wants_pandas(self, step: Any) -> bool:
        if step.name not in self._pandas:
            self._pandas[step.name] = step_wants_pandas(step, self.app.root)
        return self._pandas[step.name]

    def _run_with(
        self,
        step: Any,
        run: RunRecord,
        handle: _RunHandle,
        context: StepContext | None,
        problem: Exception | None,
        early_worker: Any,
        *,
        existing: bool,
    ) -> RunRecord:
        unrecorded = None
        if existing and (queued := self.store.get_run(run.id)) is not None:
            self.store.update_run(
                run.id, status=run.status, trigger=run.trigger, started_at=run.started_at,
                host_pid=run.host_pid, info={**(queued.info or {}), "host": this_host()},
            )
        elif problem is None and step.kind in _RECORDED_LATE:
            unrecorded = run  # a short run's record is written once, when it ends
        else:
            self.store.create_run(run)
        self.listener.run_started(run)
        redact = Redactor([])
        log = RunLog(self.store, run.id, redact, lambda line: self.listener.log_line(run, line),
                     prompt=self.prompt_logs)
        staged = None
        try:
            if problem is not None:
                raise problem
            assert context is not None
            redact.values = Redactor(context.secret_values).values
            staged = StagedRun(
                self.store, run.id, step.name, unique_on=self._table_keys,
                column_types=self._table_types,
                on_commit=lambda tables: self._committed(run, tables),
                unrecorded=unrecorded,
            )
            execute = self._executors().get(step.kind)
            if handle.cancel_reason is not None:
                outcome = Outcome("cancelled", handle.cancel_reason)
            elif execute is None:
                outcome = Outcome("failed", f"step {step.name!r}: {step.kind} steps are not supported yet")
            else:
                with self.store.run_lock(step.name):
                    self._close_abandoned(step.name, run.id)
                    outcome = execute(ActiveRun(step, run, context, staged, log, redact, early_worker))
        except Exception as exc:  # configuration problems: secrets, environment, files
            if staged is not None:
                staged.rollback()
            outcome = Outcome("failed", redact(str(exc)))  # (the run is the step's: no prefix)
        if handle.cancel_reason is not None and outcome.status not in SUCCESS:
            outcome = Outcome("cancelled", handle.cancel_reason)
        log.flush()
        if outcome.status not in SUCCESS:
            failure = {
                "status": outcome.status,
                "ended_at": _now(),
                "error": _capped(redact(outcome.error)),
                "traceback": redact(outcome.traceback),
                "rows_in": staged.committed_rows_in if staged else 0,
                "rows_out": staged.committed_rows_out if staged else 0,
            }
            if staged is not None:
                staged.close_record(failure)
            else:
                self.store.update_run(run.id, **failure)
            # read back: an executor may have recorded details (e.g. partitions)
            final = self.store.get_run(run.id) or dataclasses.replace(run, **failure)
        elif outcome.fields:  # what the final commit wrote: no need to read it back
            final = dataclasses.replace(run, **outcome.fields)
        else:
            final = self.store.get_run(run.id) or run
        self.listener.run_finished(final)
        return final

    def _executors(self) -> dict[str, Callable[[ActiveRun], Outcome]]:
        """How each step style runs. Worker-based styles build a ``start`` frame
        and go through ``run_worker``; SQL runs in the host."""
        return {
            "sql": self._run_sql,
            "node": self._run_node,
            "connector": self._run_connector,
            "processor": self._run_processor,
        }

    def attach_worker(self, run_id: str, worker: Any) -> None:
        """Let ``cancel`` stop ``worker`` (anything with ``kill()``, e.g. a group of
        workers) for run ``run_id``; killed at once if the run is already cancelled."""
        with self._active_lock:
            handle = self._active.get(run_id)
            if handle is not None:
                handle.worker = worker
                if handle.cancel_reason is not None:
                    worker.kill()

    def _run_connector(self, active: ActiveRun) -> Outcome:
        from stepwell.engine.connector_executor import run_connector

        return _limit_outcome(run_connector(self, active), active.context.worker_limits)

    def _respond(self, run: RunRecord, request_key: str, payload: Any) -> bool:
        respond = getattr(self.listener, "respond", None)
        return bool(respond is not None and respond(run, request_key, payload))

    def _committed(self, run: RunRecord, tables: set[str]) -> None:
        notify = getattr(self.listener, "tables_committed", None)
        if notify is not None:
            notify(run, tables)

    # The app is fixed for a Runner, so what it declares is derived once.
    @functools.cached_property
    def _schemas(self) -> dict[str, DeclaredSchema]:
        """The app's Common Model schemas by name (``Table(..., schema="Name")``)."""
        from stepwell.store.schema import arrow_type

        result = {}
        for spec in self.app.schemas:
            definition = spec.definition
            result[definition.name] = DeclaredSchema(
                {name: arrow_type(logical) for name, logical in definition.logical_types.items()},
                list(definition.unique_on),
                definition.stream_order,
            )
        return result

    @functools.cached_property
    def _table_orders(self) -> dict[str, str]:
        """The default stream order of each declared table whose schema has one."""
        return {
            t.name: self._schemas[t.schema_name].order_by
            for t in self.app.tables
            if t.schema_name in self._schemas and self._schemas[t.schema_name].order_by
        }

    @functools.cached_property
    def _table_keys(self) -> dict[str, list[str]]:
        """``unique_on`` per declared table (its own, else its schema's)."""
        keys = {}
        for table in self.app.tables:
            declared = self._schemas.get(table.schema_name) if table.schema_name else None
            unique_on = table.unique_on or (declared.unique_on if declared else None)
            if unique_on:
                keys[table.name] = list(unique_on)
        return keys

    @functools.cached_property
    def _table_types(self) -> dict[str, dict]:
        """Column types fixed by the schema a declared table names."""
        return {
            t.name: self._schemas[t.schema_name].types
            for t in self.app.tables
            if t.schema_name in self._schemas
        }

    def _run_sql(self, active: ActiveRun) -> Outcome:
        from stepwell.runtimes.plugin.channels import DeadlinePassed

        limit = active.context.time_limit
        try:
            rows = run_sql_step(
                active.step, self.app.root, active.staged, self.store.dialect.name,
                self.app.table_names(), deadline=active.began + limit if limit else None,
            )  # fmt: skip
        except DeadlinePassed as exc:
            active.staged.rollback()
            return Outcome("timed_out", f"the step exceeded its time limit (timeout "
                                        f"{_seconds(limit)}): {exc}")  # fmt: skip
        status = "succeeded" if rows else "succeeded_no_data"
        active.staged.commit(None, None, run_fields={"status": status, "ended_at": _now(), "rows_out": rows})
        return Outcome(status)

    def _run_node(self, active: ActiveRun) -> Outcome:
        start = node_host.start_message(
            run_id=active.run.id,
            step=active.step,
            app_root=str(self.app.root),
            parameters=active.context.parameters,
            time_limit=active.context.time_limit,
            sys_path=self._environment(active.log),
        )
        start["table_keys"] = self._table_keys
        start["table_orders"] = self._table_orders
        start["code"] = self.bytecode.for_node(active.step.file)
        return self.run_worker(active, start)

    def _run_processor(self, active: ActiveRun) -> Outcome:
        start = processor_host.start_message(
            store=self.store,
            app=self.app,
            run_id=active.run.id,
            step=active.step,
            app_root=str(self.app.root),
            time_limit=active.context.time_limit,
            sys_path=self._environment(active.log),
        )
        return self.run_worker(active, start)

    def run_worker(self, active: ActiveRun, start: dict[str, Any]) -> Outcome:
        """Start a worker, send it ``start`` and serve it until it is done."""
        time_limit = active.context.time_limit
        worker = active.early_worker
        if worker is None or start.get("sys_path", []) != self._env_paths():
            worker = self._start_worker(active.step, active.context, start.get("sys_path") or [])
        if worker.notes:
            active.log.add("warn", worker.notes)
        self.attach_worker(active.run.id, worker)
        try:
            start["elapsed"] = time.monotonic() - active.began
            session = WorkerSession(
                self.store,
                active.staged,
                worker,
                active.log,
                active.redact,
                deadline=active.began + time_limit if time_limit else None,
                schemas=self._schemas,
                limit_note=f" (timeout {_seconds(time_limit)})" if time_limit else "",
                on_progress=lambda rows_in, rows_out: self.listener.progress(
                    active.run, rows_in, rows_out
                ),
                on_respond=lambda key, payload: self._respond(active.run, key, payload),
            )
            outcome = session.serve(start)
            # next runs start with numpy loaded (a no-op when it was already)
            if session.imported_numpy or any(m in (outcome.error or "") for m in _NUMPY_MISSING):
                self._pandas[active.step.name] = True
            return _limit_outcome(outcome, active.context.worker_limits)
        finally:
            worker.close()

    @functools.cached_property
    def _store_paths(self) -> list[str]:
        """Folders of an embedded store kept outside the app's ``.stepwell`` (hidden
        from workers like that one)."""
        path = getattr(self.store, "path", None)
        if not path:
            return []
        folder = os.path.dirname(os.path.realpath(str(path)))
        app_root = os.path.realpath(str(self.app.root))
        if folder == app_root or app_root.startswith(folder.rstrip("/") + "/"):
            return []  # hiding it would hide the app; file permissions must do
        return [folder]


@dataclass
class ActiveRun:
    """Everything an executor needs about the run in progress."""

    step: Any
    run: RunRecord
    context: StepContext
    staged: StagedRun
    log: RunLog
    redact: Redactor
    #: a worker the runner requested before the run record was written (or None)
    early_worker: Any = None
    began: float = field(default_factory=time.monotonic)


def _limit_outcome(outcome: Outcome, limits: WorkerLimits) -> Outcome:
    """Name the limit behind a failure the worker reported as an ordinary error."""
    error = outcome.error or ""
    if outcome.status == "failed" and outcome.info.get("memory_error") and limits.memory:
        return Outcome(
            "killed", f"memory limit {format_bytes(limits.memory)} exceeded ({error})",
            outcome.traceback, outcome.info,
        )
    if outcome.status == "failed" and "[Errno 11]" in error and "BlockingIOError" in error:
        processes = limits.processes or DEFAULT_PROCESSES
        return Outcome(
            "failed", f"{error} (process limit {processes} reached)", outcome.traceback,
            outcome.info,
        )
    if outcome.status == "failed" or (outcome.status == "killed" and error):
        where = "on the step or in the app's `defaults`"
        error = with_network_note(with_tmp_limit(error, limits.tmp, where), limits.network, where)
        return Outcome(outcome.status, error, outcome.traceback, outcome.info)
    return outcome


#: Characters of a run's error kept in its record (the traceback keeps the whole text).
MAX_ERROR_CHARS = 2000


def _capped(error: str | None) -> str | None:
    """An error message of at most ``MAX_ERROR_CHARS`` (a step may raise megabytes)."""
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    more = len(error) - MAX_ERROR_CHARS
    cut = error[:MAX_ERROR_CHARS]
    return (f"{cut}{_closing_bidi(cut)}... ({more:,} more characters; the whole text is "
            "in the run's traceback)")  # fmt: skip


def _closing_bidi(text: str) -> str:
    """The bidi closers for the embeddings, overrides and isolates ``text`` leaves
    open (a right-to-left override in a cut error would reverse what follows it)."""
    open_isolates, open_embeddings = 0, 0
    for char in text:
        if char in "\u2066\u2067\u2068":
            open_isolates += 1
        elif char == "\u2069" and open_isolates:
            open_isolates -= 1
        elif char in "\u202a\u202b\u202d\u202e":
            open_embeddings += 1
        elif char == "\u202c" and open_embeddings:
            open_embeddings -= 1
    return "\u202c" * open_embeddings + "\u2069" * open_isolates


def _seconds(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:g}s"


