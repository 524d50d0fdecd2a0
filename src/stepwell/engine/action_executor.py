"""Running actions: the host's executor.

An invocation of an action is one run (step ``action:<name>``) with its log.
Its steps run in order; each sees the previous step's ``data``/``error``, the
action's ``params`` and the caller (``user``), plus its own ``variables:``
evaluated just before it (see ``templating``):

- ``python`` / ``code`` steps run in a warm sandboxed worker from the pool;
- ``sql`` steps run one checked SELECT over the app's tables in the host
  (variables are bound as ``:name`` parameters, never pasted into the text);
- ``action`` steps call another action in the same run; ``loop`` steps call
  one per item, ``chunk_size`` items at a time in parallel (threads), at most
  ``max_iterations`` items. Nesting deeper than ``max_depth`` is an error.

A failing step ends the action with its error unless it has
``allow_failure: true``; then the next step runs with ``data=None`` and the
error. Steps have a time limit (``timeout``, default 30 s) and so does the
action (default 90 s). Secret values used by the action are redacted from
its log and errors. Run records and log lines are written by a
:class:`~stepwell.runtimes.action.journal.RunJournal`, off the request path.

Example::

    executor = ActionExecutor(app, store)
    result = executor.invoke("enrich_user", {"user_id": 7}, {"id": "ann", "roles": []})
    result.to_json()   # {"run_id", "action", "status", "data", "error", "steps": [...]}
    executor.close()
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepwell.app.pyparse import parse_python
from stepwell.engine.hosts import this_host
from stepwell.engine.logs import Redactor, RunLog, secret_strings
from stepwell.runtimes.action import templating
from stepwell.runtimes.action.code import template_problem
from stepwell.runtimes.action.journal import RunJournal
from stepwell.runtimes.action.pool import (
    ENTRY,
    StepTimedOut,
    WarmWorker,
    WorkerFailed,
    WorkerGone,
    WorkerPool,
)
from stepwell.store import ids
from stepwell.store.base import LogLine, RunRecord, Store
from stepwell.store.schema import jsonable

if TYPE_CHECKING:
    from stepwell.engine.envs import EnvInfo
    from stepwell.sandbox.launcher import WorkerLimits

#: Time limit of a step without ``timeout:`` (seconds).
DEFAULT_STEP_TIMEOUT = 30.0
#: Time limit of a whole action without ``timeout:`` (seconds).
DEFAULT_ACTION_TIMEOUT = 90.0
#: How deep actions may call actions (``action`` and ``loop`` steps).
MAX_DEPTH = 10
_TOO_DEEP = "actions nested more than"
#: The caller when nobody is identified (local CLI, loopback server without a token).
LOCAL_USER: dict[str, Any] = {"id": "local", "roles": []}
#: Run record step names of actions are this prefix plus the action's name.
RUN_PREFIX = "action:"


class ActionNotFound(LookupError):
    """No action of that name; the message lists the known ones."""


class InvalidInput(ValueError):
    """Params or user that are not JSON objects of the expected shape."""


class ShuttingDown(RuntimeError):
    """The executor is draining (the server is stopping) and takes no new calls."""


@dataclass
class StepResult:
    """How one step of an action went."""

    name: str
    kind: str
    data: Any
    error: Any
    started_at: dt.datetime
    duration_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "data": json_safe(self.data),
            "error": json_safe(self.error),
            "started_at": self.started_at.isoformat(),
            "duration_ms": round(self.duration_ms, 3),
        }


@dataclass
class ActionResult:
    """The outcome of one invocation: ``{data, error, steps}`` plus the run's id and status."""

    run_id: str
    action: str
    status: str  # succeeded | failed | timed_out
    data: Any
    error: Any
    steps: list[StepResult]
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "action": self.action,
            "status": self.status,
            "data": json_safe(self.data),
            "error": json_safe(self.error),
            "steps": [step.to_json() for step in self.steps],
            "duration_ms": round(self.duration_ms, 3),
        }


def json_safe(value: Any) -> Any:
    """``value`` with JSON types only (see ``jsonable``), bytes as base64."""
    return jsonable(value, binary=lambda data: base64.b64encode(data).decode())


def normalize_user(user: Any) -> dict[str, Any]:
    """A caller as code sees it: a dict with ``id`` (text) and ``roles`` (list of text),
    plus any other keys given. Raises :class:`InvalidInput` for other shapes."""
    if user is None:
        return dict(LOCAL_USER)
    if not isinstance(user, Mapping):
        raise InvalidInput(f"the user must be a JSON object such as "
                           f'{{"id": "ann", "roles": ["admin"]}}, got {type(user).__name__}')  # fmt: skip
    result = dict(user)
    result["id"] = str(result.get("id") or "local")
    roles = result.get("roles") or []
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise InvalidInput('the user\'s "roles" must be a list of strings')
    result["roles"] = list(roles)
    return result


class _StepFailed(Exception):
    """A step ended with an error (``error`` is what the next step sees)."""

    def __init__(self, error: Any, *, data: Any = None, timed_out: bool = False,
                 traceback: str | None = None):  # fmt: skip
        super().__init__(str(error))
        self.error = error
        self.data = data
        self.timed_out = timed_out
        self.traceback = traceback


@dataclass
class _Outcome:
    data: Any
    error: Any
    steps: list[StepResult]
    timed_out: bool = False
    traceback: str | None = None


class _CallLog:
    """The run's log, shared by the threads of one invocation (loops run in parallel)."""

    def __init__(self, log: RunLog):
        self._log = log
        self._lock = threading.Lock()
        self.notes_seen: set[str] = set()

    def add(self, level: str, lines: Iterable[str], prefix: str = "") -> None:
        with self._lock:
            self._log.add(level, lines, prefix)

    def note(self, lines: Iterable[str]) -> None:
        with self._lock:
            fresh = [line for line in lines if line not in self.notes_seen]
            self.notes_seen.update(fresh)
        if fresh:
            self.add("warn", fresh)

    def flush(self) -> None:
        with self._lock:
            self._log.flush()


@dataclass
class _Call:
    """One invocation in progress (shared by nested actions and loop threads)."""

    run: RunRecord
    log: _CallLog
    redact: Redactor
    user: dict[str, Any]
    deadline: float
    timeout: float
    action: str
    #: set by ``ActionExecutor.cancel``: no further step starts
    cancelled: bool = False
    #: the workers running its code steps now (a cancel kills them)
    workers: set[Any] = field(default_factory=set)
    #: its log has said which requirements environment its code runs in
    env_logged: bool = False


@dataclass
class _Source:
    """The code of a step, ready to send to a worker."""

    source: str
    filename: str
    where: str
    package: str
    file: str | None
    first_line: int = 1


class ActionExecutor:
    """Runs the actions of one app against its store.

    ``pool``/``journal`` are made here unless given; ``warm`` and
    ``max_workers`` size the pool (``STEPWELL_ACTION_WARM`` /
    ``STEPWELL_ACTION_WORKERS`` in ``environ`` override the defaults).
    ``listener`` gets ``run_started``/``log_line``/``run_finished`` calls (the
    server's live event hub)."""

    def __init__(
        self,
        app: Any,
        store: Store,
        *,
        environ: Mapping[str, str] | None = None,
        sandbox: str | None = None,
        pool: WorkerPool | None = None,
        journal: RunJournal | None = None,
        listener: Any = None,
        warm: int | None = None,
        max_workers: int | None = None,
        max_depth: int = MAX_DEPTH,
    ):
        self.app = app
        self.store = store
        self.environ = dict(os.environ if environ is None else environ)
        self.sandbox = sandbox
        self.listener = listener
        self.max_depth = max_depth
        self._actions = {action.name: action for action in app.actions}
        self._files: dict[tuple[str, bool], tuple[Any, str, str | None]] = {}
        self._files_lock = threading.Lock()
        self._secret_cache: dict[str, Any] = {}
        self._secret_stamp: Any = None
        self._secret_lock = threading.Lock()
        self._sys_path: list[str] | None = None
        #: the requirements environment code runs in, and whether a call's log has
        #: said so yet (the first one says how it was had; see ``_log_environment``)
        self._env: EnvInfo | None = None
        self._env_said = False
        self._env_lock = threading.Lock()
        #: invocations in progress, by run id (for ``cancel``)
        self._calls: dict[str, _Call] = {}
        self._calls_changed = threading.Condition()
        self._accepting = True
        self._owns_journal = journal is None
        self.journal = journal or RunJournal(store)
        self._owns_pool = pool is None
        if pool is None:
            warm = _env_int(self.environ, "STEPWELL_ACTION_WARM", 2 if warm is None else warm)
            cpus = os.cpu_count() or 2
            default_max = max(4, 2 * cpus) if max_workers is None else max_workers
            pool = WorkerPool(self._start_worker, warm=warm if self._has_code() else 0,
                              max_workers=_env_int(self.environ, "STEPWELL_ACTION_WORKERS",
                                                   default_max))  # fmt: skip
        self.pool = pool

    # -- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Stop the pool's workers and write what the journal holds."""
        if self._owns_pool:
            self.pool.close()
        if self._owns_journal:
            self.journal.close()
        else:
            self.journal.flush()

    def names(self) -> list[str]:
        return list(self._actions)

    def action(self, name: str) -> Any:
        try:
            return self._actions[name]
        except KeyError:
            known = ", ".join(self._actions) or "none declared"
            raise ActionNotFound(f"no action named {name!r} (actions of this app: {known})") from None

    def _has_code(self) -> bool:
        return any(s.kind in ("python", "code") for a in self._actions.values() for s in a.steps)

    # -- workers --------------------------------------------------------------------
    def _environment(self) -> list[str]:
        """``site-packages`` of the app's requirements environment (built once)."""
        with self._env_lock:
            if self._sys_path is None:
                requirements = getattr(self.app, "requirements_file", None)
                if requirements:
                    from stepwell.engine.envs import env_for_app

                    self._env = env_for_app(self.app.root, requirements)
                    self._sys_path = [str(self._env.site_packages)]
                else:
                    self._sys_path = []
            return self._sys_path

    def _log_environment(self, call: _Call) -> None:
        """Say in the call's log, once, which requirements environment its code runs
        in (as step runs do): built for the first call, reused after."""
        if self._env is None or call.env_logged:
            return
        call.env_logged = True
        with self._env_lock:
            first_use, self._env_said = not self._env_said, True
        call.log.add("info", [self._env.log_line(self.app.requirements_file, first_use)])

    def _worker_limits(self) -> WorkerLimits:
        """The limits of the app's action workers: its ``defaults`` (no network
        unless they say so under ``--sandbox strict``)."""
        from stepwell.sandbox.launcher import WorkerLimits
        from stepwell.sandbox.policy import sandbox_mode

        defaults = getattr(self.app, "defaults", None)
        network = getattr(defaults, "network", None)
        return WorkerLimits(
            memory=getattr(defaults, "memory", None),
            processes=getattr(defaults, "processes", None),
            tmp=getattr(defaults, "tmp", None),
            network=network if network is not None else sandbox_mode(self.sandbox) != "strict",
        )

    def _start_worker(self) -> WarmWorker:
        from stepwell.sandbox.launcher import start_worker

        limits = self._worker_limits()
        sys_path = self._environment()
        # the lean fork-server (no pandas): each invocation forks the worker, and a
        # smaller process forks faster; what the app's actions import is imported
        # by the worker itself (``warm_imports``), pandas included
        process = start_worker(self.app.root, limits=limits, read_paths=sys_path,
                               hide_paths=_store_paths(self.store, self.app.root),
                               mode=self.sandbox, pandas=False)  # fmt: skip
        start = {
            "op": "start",
            "entry": ENTRY,
            "app_root": str(self.app.root),
            "sys_path": sys_path,
            "warm_imports": warm_imports(self.app),
        }
        return WarmWorker(process, start)

    # -- secrets ------------------------------------------------------------------
    def _secret(self, name: str) -> Any:
        """A secret's value (cached until ``.stepwell/secrets.toml`` changes)."""
        from stepwell.app import secrets

        path = Path(self.app.root) / secrets.SECRETS_FILE
        try:
            stat = path.stat()
            stamp: Any = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = None
        with self._secret_lock:
            if stamp != self._secret_stamp:
                self._secret_cache.clear()
                self._secret_stamp = stamp
            if name not in self._secret_cache:
                self._secret_cache[name] = secrets.lookup(name, self.app.root, self.environ)
            return self._secret_cache[name]

    def _secret_refs(self, name: str, seen: set[str] | None = None) -> set[str]:
        """Secrets used by action ``name`` and the actions it calls."""
        seen = set() if seen is None else seen
        if name in seen or name not in self._actions:
            return set()
        seen.add(name)
        action = self._actions[name]
        refs = set(action.secrets)
        for step in action.steps:
            if step.kind in ("action", "loop"):
                refs |= self._secret_refs(step.source, seen)
        return refs

    # -- invoking -----------------------------------------------------------------
    def invoke(self, name: str, params: Any = None, user: Any = None,
               trigger: str = "api") -> ActionResult:  # fmt: skip
        """Run action ``name`` once as a new run; never raises for failures of the
        action itself (they are in the result), only :class:`ActionNotFound` and
        :class:`InvalidInput` for a bad request."""
        action = self.action(name)
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise InvalidInput(f"params must be a JSON object, got {_json_kind(params)}")
        user = normalize_user(user)
        began = time.monotonic()
        timeout = action.timeout or DEFAULT_ACTION_TIMEOUT
        run = RunRecord(id=ids.new_id(), step=RUN_PREFIX + name, status="running",
                        trigger=trigger, started_at=_now(), host_pid=os.getpid(),
                        info={"action": name, "user": user["id"], "host": this_host()})  # fmt: skip
        redact = Redactor([])
        on_line = self._on_line(run)
        call = _Call(run=run, log=_CallLog(RunLog(self.journal, run.id, redact, on_line)),  # type: ignore[arg-type]
                     redact=redact, user=user, deadline=began + timeout, timeout=timeout,
                     action=name)  # fmt: skip
        with self._calls_changed:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and takes no new action calls; "
                                   "call again once it is back")  # fmt: skip
            self._calls[run.id] = call
        self.journal.started(run)
        if self.listener is not None:
            self.listener.run_started(run)
        try:
            return self._finish(run, call, action, params, began)
        finally:  # (after its record is with the journal: a drain waits for that)
            with self._calls_changed:
                del self._calls[run.id]
                self._calls_changed.notify_all()

    def _finish(self, run: RunRecord, call: _Call, action: Any, params: Mapping[str, Any],
                began: float) -> ActionResult:  # fmt: skip
        """Run the registered call ``call`` and record how it ended."""
        name, redact = call.action, call.redact
        try:
            secret_values: list[str] = []
            for ref in sorted(self._secret_refs(name)):
                secret_values.extend(secret_strings(self._secret(ref)))
            redact.values = secret_values
            defaults = templating.evaluate_value(action.params, {}, self._secret)
            outcome = self._run_action(action, {**defaults, **params}, call, (name,), call.deadline)
        except Exception as exc:  # configuration problems (a missing secret...)
            outcome = _Outcome(None, f"action {name!r}: {exc}", [])
        error = redact(outcome.error) if isinstance(outcome.error, str) else outcome.error
        status = "succeeded" if error is None else ("timed_out" if outcome.timed_out else "failed")
        if call.cancelled:
            status, error = "cancelled", f"action {name!r} was cancelled"
        duration = (time.monotonic() - began) * 1000
        if error is not None:
            call.log.add("error", [f"[stepwell] action {name!r} {status}: {_text(error)}"])
        call.log.flush()
        final = {
            "status": status,
            "ended_at": _now(),
            "error": None if error is None else _text(error),
            "traceback": redact(outcome.traceback),
            "info": {**run.info, "duration_ms": round(duration, 3),
                     "steps": [{"name": s.name, "kind": s.kind, "duration_ms": round(s.duration_ms, 3),
                                "failed": s.error is not None} for s in outcome.steps]},
        }  # fmt: skip
        self.journal.finished(run.id, **final)
        if self.listener is not None:
            record = RunRecord(**{**run.__dict__, **final})
            self.listener.run_finished(record)
        return ActionResult(run.id, name, status, outcome.data, error, outcome.steps, duration)

    def cancel(self, run_id: str) -> bool:
        """Cancel invocation ``run_id`` if it is in progress here: no further step
        starts and the workers running its code are killed. False if it is not."""
        with self._calls_changed:
            call = self._calls.get(run_id)
        if call is None:
            return False
        call.cancelled = True
        for worker in list(call.workers):
            worker.process.kill()
        return True

    def drain(self, timeout: float, grace: float = 10.0) -> list[str]:
        """Take no new calls; let those in progress end within ``timeout`` seconds,
        then cancel the rest and give them ``grace`` seconds to answer their
        callers. Returns the ids of the runs it cancelled."""
        with self._calls_changed:
            self._accepting = False
            self._calls_changed.wait_for(lambda: not self._calls, timeout)
        late = self.cancel_all()
        with self._calls_changed:
            self._calls_changed.wait_for(lambda: not self._calls, grace)
        return late

    def cancel_all(self) -> list[str]:
        """Cancel every call in progress; returns their run ids."""
        with self._calls_changed:
            running = list(self._calls)
        return [run_id for run_id in running if self.cancel(run_id)]

    def _on_line(self, run: RunRecord) -> Callable[[LogLine], None] | None:
        listener = self.listener
        if listener is None:
            return None
        return lambda line: listener.log_line(run, line)

    # -- one action (top level or nested) ------------------------------------------
    def _run_action(self, action: Any, params: dict[str, Any], call: _Call,
                    chain: tuple[str, ...], deadline: float, label: str = "") -> _Outcome:  # fmt: skip
        data: Any = None
        error: Any = None
        steps: list[StepResult] = []
        known: dict[str, dict[str, Any]] = {}
        for step in action.steps:
            started, began = _now(), time.monotonic()
            prefix = f"{label}{step.name}"
            context = {"params": params, "user": call.user, "data": data, "error": error,
                       "steps": known}  # fmt: skip
            failure: _StepFailed | None = None
            value: Any = None
            try:
                if call.cancelled:
                    break
                if time.monotonic() >= deadline:
                    raise _StepFailed(self._action_timeout(call), timed_out=True)
                value = self._run_step(action, step, context, call, chain, deadline, prefix)
            except _StepFailed as exc:
                failure = exc
                value = exc.data
            except Exception as exc:  # a bug or an unexpected store error: still a step error
                failure = _StepFailed(f"{type(exc).__name__}: {exc}")
            elapsed = (time.monotonic() - began) * 1000
            step_error = None
            if failure is not None:
                step_error = call.redact(failure.error) if isinstance(failure.error, str) else failure.error
                call.log.add("error", [f"[{prefix}] step failed: {_text(step_error)}"])
            steps.append(StepResult(step.name, step.kind, value, step_error, started, elapsed))
            known[step.name] = {"data": value, "error": step_error}
            if failure is None:
                data, error = value, None
                continue
            if call.cancelled:
                return _Outcome(None, step_error, steps)
            if time.monotonic() >= call.deadline and not failure.timed_out:
                return _Outcome(None, self._action_timeout(call), steps, True,
                                failure.traceback)  # fmt: skip
            if time.monotonic() >= call.deadline or not step.allow_failure:
                return _Outcome(None, _about(step.name, step_error), steps, failure.timed_out,
                                failure.traceback)  # fmt: skip
            data, error = None, step_error
        if error is not None:  # the last step failed and was allowed to
            return _Outcome(None, _about(steps[-1].name, error), steps)
        return _Outcome(data, None, steps)

    def _action_timeout(self, call: _Call) -> str:
        return f"action {call.action!r} exceeded its time limit ({call.timeout:g}s)"

    def _run_step(self, action: Any, step: Any, context: dict[str, Any], call: _Call,
                  chain: tuple[str, ...], deadline: float, prefix: str) -> Any:  # fmt: skip
        kind = step.kind
        if kind in ("python", "code"):
            return self._run_code(action, step, context, call, deadline, prefix)
        if kind == "sql":
            return self._run_sql(action, step, context, deadline)
        if kind == "action":
            return self._run_call(step, context, call, chain, deadline, prefix)
        if kind == "loop":
            return self._run_loop(step, context, call, chain, deadline, prefix)
        raise _StepFailed(f"unknown step kind {kind!r}")

    def _variables(self, step: Any, context: dict[str, Any]) -> dict[str, Any]:
        values = {}
        for name, raw in (step.variables or {}).items():
            try:
                values[name] = templating.evaluate_value(raw, context, self._secret)
            except templating.TemplateProblem as exc:
                raise _StepFailed(f"variables.{name}: {exc}") from None
            except Exception as exc:  # a missing secret
                raise _StepFailed(f"variables.{name}: {exc}") from None
        return values

    # -- code steps -----------------------------------------------------------------
    def _source(self, action: Any, step: Any) -> _Source:
        """The step's code (a file is re-read when it changes)."""
        root = Path(self.app.root)
        package = "stepwell_app"
        if step.kind == "code":
            line = step.code_line
            if line is not None:
                display = Path(str(self.app.file)).name
                return _Source(step.source, str(self.app.file), display, package, None, line)
            where = f"actions.{action.name}.steps.{step.name}.code"
            return _Source(step.source, f"<{where}>", where, package, None)
        path = (root / step.source).resolve()
        text, problem = self._read(path, step.source, python=True)
        if problem is not None:
            raise _StepFailed(problem)
        parts = Path(step.source).with_suffix("").parts
        package = ".".join(["stepwell_app", *parts[:-1]])
        return _Source(text, str(path), step.source, package, str(path))

    def _read(self, path: Path, shown: str, *, python: bool) -> tuple[str, str | None]:
        """A file's text (cached until it changes) and, for Python, the problem of
        a ``{{ }}`` template inside it."""
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            raise _StepFailed(f"cannot read {shown}: {exc.strerror or exc}") from None
        key = (str(path), python)
        with self._files_lock:
            cached = self._files.get(key)
            if cached and cached[0] == stamp:
                return cached[1], cached[2]
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _StepFailed(f"cannot read {shown}: {exc}") from None
        problem = None
        if python:
            found = template_problem(text)
            problem = f"{shown}, {found}" if found else None
        with self._files_lock:
            self._files[key] = (stamp, text, problem)
        return text, problem

    def _run_code(self, action: Any, step: Any, context: dict[str, Any], call: _Call,
                  deadline: float, prefix: str) -> Any:  # fmt: skip
        source = self._source(action, step)
        variables = self._variables(step, context)
        limit = step.timeout or DEFAULT_STEP_TIMEOUT
        job = {
            "source": source.source, "filename": source.filename, "where": source.where,
            "first_line": source.first_line, "package": source.package, "file": source.file,
            "data": context["data"], "error": context["error"], "params": context["params"],
            "user": context["user"], "variables": variables,
        }  # fmt: skip
        for tries_left in (1, 0):  # (once more on a worker gone before the call began)
            try:
                result = self._invoke(job, step, call, deadline, limit, prefix)
                break
            except WorkerGone as exc:
                if not tries_left:
                    raise _StepFailed(call.redact(str(exc))) from None
        if result.get("status") == "ok":
            return result.get("data")
        from stepwell.sandbox.policy import format_bytes, with_network_note, with_tmp_limit

        error = str(result.get("error") or "the step failed")
        limits = self._worker_limits()
        if result.get("memory_error") and limits.memory:
            error = f"memory limit {format_bytes(limits.memory)} exceeded ({error})"
        where = "in the app's `defaults`"
        error = with_network_note(with_tmp_limit(error, limits.tmp, where), limits.network, where)
        raise _StepFailed(error, traceback=result.get("traceback"))

    def _invoke(self, job: dict[str, Any], step: Any, call: _Call, deadline: float,
                limit: float, prefix: str) -> dict[str, Any]:  # fmt: skip
        """The step's job run by a worker of the pool: its result frame. Raises
        ``WorkerGone`` when the worker had ended before the job reached it."""
        waiting_since = time.monotonic()
        try:  # waiting for a free worker is not the step's time: only the action's
            worker = self.pool.acquire(deadline)
        except TimeoutError:
            waited = time.monotonic() - waiting_since
            raise _StepFailed(self._waited_out(call, step, waited), timed_out=True) from None
        except WorkerFailed as exc:
            raise _StepFailed(str(exc)) from None
        waited = time.monotonic() - waiting_since
        step_deadline = min(deadline, time.monotonic() + limit)
        if worker.notes:
            call.log.note(worker.notes)
        self._log_environment(call)
        tag = f"[{prefix}] "
        call.workers.add(worker)
        try:
            if call.cancelled:  # (cancelled while it waited for the worker)
                raise _StepFailed(f"step {step.name!r} was cancelled before it started")
            return worker.invoke(
                job, step_deadline, lambda level, lines: call.log.add(level, lines, tag)
            )
        except StepTimedOut as exc:
            error = self._step_timeout(step, limit, step_deadline, call, waited)
            if exc.where:
                error += f"; it was stopped at {call.redact(exc.where)}"
            raise _StepFailed(error, timed_out=True) from None
        except WorkerGone:
            raise
        except WorkerFailed as exc:
            raise _StepFailed(call.redact(str(exc))) from None
        except (TypeError, ValueError, OverflowError) as exc:  # inputs msgpack cannot carry
            raise _StepFailed(f"cannot pass the step its inputs: {exc}") from None
        finally:
            call.workers.discard(worker)
            self.pool.release(worker)

    def _waited_out(self, call: _Call, step: Any, waited: float) -> str:
        """The action's time ran out, much of it spent waiting for a worker."""
        return (f"{self._action_timeout(call)}: step {step.name!r} waited {waited:.1f}s for a "
                f"free worker (all {self.pool.max_workers} were busy; STEPWELL_ACTION_WORKERS "
                f"allows more)")  # fmt: skip

    def _step_timeout(self, step: Any, limit: float, step_deadline: float, call: _Call,
                      waited: float = 0.0) -> str:  # fmt: skip
        """Whose time ran out: the action's (after a wait for a worker, if it waited
        long enough to matter) or the step's."""
        if step_deadline >= call.deadline - 1e-6 and call.deadline - time.monotonic() < limit:
            return self._waited_out(call, step, waited) if waited >= 0.1 else self._action_timeout(call)
        return f"step {step.name!r} exceeded its time limit ({limit:g}s)"

    # -- sql steps ------------------------------------------------------------------
    def _run_sql(self, action: Any, step: Any, context: dict[str, Any], deadline: float) -> Any:
        from stepwell.runtimes.sqlcheck import SqlNotAllowed, expand_templates, restrict_select

        if step.sql_file is not None:
            path = (Path(self.app.root) / step.sql_file).resolve()
            text, _ = self._read(path, step.sql_file, python=False)
            if "{{" in expand_templates(text):
                raise _StepFailed(sql_template_problem(step.sql_file))
            where = step.sql_file
        else:
            text, where = step.source, f"actions.{action.name}.steps.{step.name}.sql"
        variables = self._variables(step, context)
        dialect = self.store.dialect.name
        try:
            bound = bind_sql(text, variables, dialect, where)
            allowed = {name: name for name in self._table_names()}
            checked = restrict_select(
                bound, allowed, dialect, where=where,
                advice="an action's SQL reads the app's tables only (declared under `tables:` "
                       "or written by its steps), not files or other databases",
            )  # fmt: skip
        except SqlNotAllowed as exc:
            raise _StepFailed(str(exc)) from None
        limit = step.timeout or DEFAULT_STEP_TIMEOUT
        remaining = min(deadline - time.monotonic(), limit)
        if remaining <= 0:
            raise _StepFailed(f"step {step.name!r} exceeded its time limit ({limit:g}s)", timed_out=True)
        box: dict[str, Any] = {}

        def query() -> None:
            try:
                box["rows"] = self.store.query(checked).to_pylist()
            except Exception as exc:  # noqa: BLE001 - reported as the step's error
                box["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=query, name="stepwell-action-sql", daemon=True)
        thread.start()
        thread.join(remaining)
        if thread.is_alive():  # the query goes on in the background; its result is dropped
            raise _StepFailed(f"step {step.name!r} exceeded its time limit ({limit:g}s)", timed_out=True)
        if "error" in box:
            raise _StepFailed(f"{where}: {box['error']}")
        return box["rows"]

    def _table_names(self) -> list[str]:
        names = list(self.app.table_names())
        names.extend(t.name for t in self.store.list_tables())
        return list(dict.fromkeys(names))

    # -- action and loop steps -------------------------------------------------------
    def _child(self, step: Any, chain: tuple[str, ...]) -> Any:
        child = self.action(step.source)
        if len(chain) >= self.max_depth:
            path = " > ".join([*chain, child.name])
            raise _StepFailed(
                f"{_TOO_DEEP} {self.max_depth} levels deep ({path}); an action "
                f"that calls itself needs a way to stop"
            )
        return child

    def _run_call(self, step: Any, context: dict[str, Any], call: _Call, chain: tuple[str, ...],
                  deadline: float, prefix: str) -> Any:  # fmt: skip
        child = self._child(step, chain)
        params = self._params(step, context, None)
        return self._call_child(child, params, call, chain, deadline, step, f"{prefix}/")

    def _params(self, step: Any, context: dict[str, Any], item: tuple[int, Any] | None) -> dict[str, Any]:
        if step.params is None:
            if item is None:
                return {}
            value = item[1]
            return dict(value) if isinstance(value, Mapping) else {"item": value}
        scope = context if item is None else {**context, "item": item[1], "index": item[0]}
        try:
            params = templating.evaluate_value(step.params, scope, self._secret)
        except templating.TemplateProblem as exc:
            raise _StepFailed(f"params: {exc}") from None
        return params if isinstance(params, dict) else {"value": params}

    def _call_child(self, child: Any, params: dict[str, Any], call: _Call, chain: tuple[str, ...],
                    deadline: float, step: Any, label: str) -> Any:  # fmt: skip
        limit = min(deadline, time.monotonic() + (step.timeout or child.timeout or call.timeout))
        try:
            defaults = templating.evaluate_value(child.params, {}, self._secret)
        except Exception as exc:  # noqa: BLE001 - a missing secret
            raise _StepFailed(f"action {child.name!r}: {exc}") from None
        outcome = self._run_action(child, {**defaults, **params}, call, (*chain, child.name),
                                   limit, label)  # fmt: skip
        if outcome.error is not None:
            text = _text(outcome.error)
            if (at := text.find(_TOO_DEEP)) != -1:  # it names the chain: no prefix per level
                raise _StepFailed(text[at:])
            raise _StepFailed(f"action {child.name!r}: {text}", data=outcome.data,
                              timed_out=outcome.timed_out, traceback=outcome.traceback)  # fmt: skip
        return outcome.data

    def _run_loop(self, step: Any, context: dict[str, Any], call: _Call, chain: tuple[str, ...],
                  deadline: float, prefix: str) -> Any:  # fmt: skip
        child = self._child(step, chain)
        if step.items is None:
            items = context["data"]
        else:
            try:
                items = templating.evaluate_value(step.items, context, self._secret)
            except templating.TemplateProblem as exc:
                raise _StepFailed(f"items: {exc}") from None
        if items is None:
            items = []
        if isinstance(items, Mapping) or not isinstance(items, (list, tuple)):
            raise _StepFailed(
                f"a loop needs a list of items, got {_json_kind(items)}"
                + (" (the previous step's data)" if step.items is None else " (from `items:`)")
            )
        items = list(items)
        if step.max_iterations and len(items) > step.max_iterations:
            call.log.add("warn", [f"[{prefix}] {len(items)} items, looping over the first "
                                  f"{step.max_iterations} (max_iterations)"])  # fmt: skip
            items = items[: step.max_iterations]
        limit = min(deadline, time.monotonic() + step.timeout) if step.timeout else deadline
        results: list[Any] = [None] * len(items)
        errors: list[Any] = [None] * len(items)
        timed_out = False

        def one(index: int) -> None:
            nonlocal timed_out
            try:
                params = self._params(step, context, (index, items[index]))
                results[index] = self._call_child(child, params, call, chain, limit, step,
                                                  f"{prefix}[{index}]/")  # fmt: skip
            except _StepFailed as exc:
                errors[index] = exc.error
                results[index] = exc.data
                timed_out = timed_out or exc.timed_out
            except Exception as exc:  # noqa: BLE001 - an iteration's failure is its error
                errors[index] = f"{type(exc).__name__}: {exc}"

        size = max(1, step.chunk_size)
        if size == 1:
            for index in range(len(items)):
                one(index)
        else:
            with ThreadPoolExecutor(max_workers=min(size, len(items) or 1),
                                    thread_name_prefix="stepwell-loop") as threads:  # fmt: skip
                for start in range(0, len(items), size):
                    futures = [threads.submit(one, i) for i in range(start, min(start + size, len(items)))]
                    for future in futures:
                        try:
                            future.result(timeout=max(0.0, limit - time.monotonic()) + 5)
                        except FutureTimeout:
                            timed_out = True
        failed = [e for e in errors if e is not None]
        if failed:
            raise _StepFailed(errors, data=results, timed_out=timed_out)
        return results


def bind_sql(sql: str, values: Mapping[str, Any], dialect: str, where: str) -> str:
    """``sql`` with every ``:name`` (or ``$name``) parameter replaced by the literal of
    ``values[name]``, built by sqlglot (quoted, never pasted as text). Lists become
    ``(a, b, ...)`` for ``IN``. Raises SqlNotAllowed for unknown names or values."""
    import sqlglot
    from sqlglot import exp

    from stepwell.runtimes.sqlcheck import SqlNotAllowed, expand_templates, sqlglot_dialect

    if not values and ":" not in sql and "$" not in sql:
        return sql
    read = sqlglot_dialect(dialect)
    try:
        tree = sqlglot.parse_one(expand_templates(sql).strip().rstrip(";"), read=read)
    except sqlglot.errors.ParseError as exc:
        raise SqlNotAllowed(f"{where}: cannot parse SQL: {str(exc).splitlines()[0]}") from None
    for node in list(tree.find_all(exp.Placeholder, exp.Parameter)):
        name = node.name if isinstance(node, exp.Placeholder) else node.this.name
        if not name:
            raise SqlNotAllowed(f"{where}: use named parameters (:name) bound to `variables:`")
        if name not in values:
            known = ", ".join(values) or "none declared"
            raise SqlNotAllowed(f"{where}: no variable {name!r} for parameter :{name} "
                                f"(variables of this step: {known})")  # fmt: skip
        node.replace(_literal(values[name], where, name))
    return tree.sql(dialect=read)


def _literal(value: Any, where: str, name: str) -> Any:
    from sqlglot import exp

    from stepwell.runtimes.sqlcheck import SqlNotAllowed

    if isinstance(value, (list, tuple)):
        return exp.Tuple(expressions=[_literal(v, where, name) for v in value])
    if value is None or isinstance(value, (bool, int, float, str, decimal.Decimal, dt.date)):
        if isinstance(value, decimal.Decimal):
            return exp.Literal.number(str(value))
        if isinstance(value, float) and not math.isfinite(value):
            raise SqlNotAllowed(f"{where}: variable {name!r} is {value}, which SQL cannot hold")
        return exp.convert(value)
    raise SqlNotAllowed(f"{where}: variable {name!r} is a {_json_kind(value)}; SQL parameters "
                        f"take strings, numbers, booleans, dates, null or lists of them")  # fmt: skip


def sql_template_problem(where: str) -> str:
    return (f"{where}: {{{{ }}}} templates cannot be used inside SQL; declare the value under "
            f"the step's `variables:` and refer to it as :name")  # fmt: skip


def warm_imports(app: Any) -> list[str]:
    """Modules the app's action code imports that do not come from the app folder
    (imported by warm workers up front, so the first invocation does not pay)."""
    import ast

    root = Path(app.root)
    found: list[str] = []
    for action in app.actions:
        for step in action.steps:
            if step.kind == "code":
                source = step.source
            elif step.kind == "python":
                try:
                    source = (root / step.source).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
            else:
                continue
            try:
                tree = parse_python(source)
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found.extend(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.append(node.module)
    local = []
    for name in dict.fromkeys(found):
        top = name.split(".")[0]
        if (root / f"{top}.py").exists() or (root / top).is_dir():
            continue
        local.append(name)
    return local


def _store_paths(store: Store, app_root: Path) -> list[str]:
    """The embedded store's folder when it lies outside the app (hidden from workers)."""
    path = getattr(store, "path", None)
    if not path:
        return []
    folder = os.path.dirname(os.path.realpath(str(path)))
    root = os.path.realpath(str(app_root))
    if folder == root or root.startswith(folder.rstrip("/") + "/"):
        return []
    return [folder]


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _about(step: str, error: Any) -> str:
    """The action's error for a failed step: the step's error, naming the step."""
    text = _text(error)
    named = f"step {step!r}"
    return text if text.startswith(named) else f"{named}: {text}"


def _text(error: Any) -> str:
    if isinstance(error, list):
        failed = [e for e in error if e is not None]
        first = _text(failed[0]) if failed else ""
        return f"{len(failed)} of {len(error)} iterations failed; first: {first}"
    return str(error)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


