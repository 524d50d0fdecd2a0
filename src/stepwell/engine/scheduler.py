"""The scheduler behind `stepwell serve`: triggers in, runs out, one at a time per step.

Every trigger (manual, cron, upstream, webhook-fed upstream,
``State.request_new_run``) goes through :meth:`Scheduler.trigger`. Each step has
one *slot*: at most one run in progress and at most one pending run. A trigger
arriving while a run is pending joins it (coalescing: ten webhook posts during
a run mean one more run, not ten); a trigger arriving while the step runs
becomes the pending run, started as soon as the current one ends. So a step
never runs twice at once, and no trigger is lost.

Pending runs have a run record with status ``queued`` from the moment they are
created; its id is returned to whoever triggered, and the run keeps that id when
it starts. Runs execute on a thread pool (each in its own worker process, see
:class:`~stepwell.engine.runner.Runner`).

Dispatch is pushed, never polled:

- **upstream**: when a run ends, the tables it committed new rows to (at any
  commit point) are looked up in the app graph and every ``upstream`` step
  reading one of them (or declared ``after:`` the step) is triggered. A run that
  ends with ``request_new_run(trigger_downstream=False)`` holds that back until a
  later run of the step ends without it. Webhook posts and ``stepwell load``
  through the API trigger readers right after their commit.
- **cron**: one timer thread sleeps until the next due time (a cron tick or a
  delayed pending run) and is woken when that changes. Cron expressions are
  evaluated in UTC; a sixth field gives seconds.
- **request_new_run**: the step's next run is queued when the run ends, to start
  no earlier than ``wait_atleast_seconds`` later.

Restarts. The last cron tick acted on is kept per step in the store (state of
the reserved key :data:`BOOKKEEPING_KEY`), written when the run for that tick
starts, in a transaction holding a lock every host shares: of servers sharing a
store, the first to start a tick's run serves it and the others close theirs as
cancelled (a run that finds the step running on another server gives its tick
back: that server has it queued). On start, a step whose schedule had ticks while the server was down
runs **once** (not once per missed tick), then follows its schedule. Runs that
were queued when the server stopped are taken over and run; a run that was
in progress when the host died is closed as ``killed`` (nothing after its last
commit point was kept). A pending ``request_new_run`` of the last run survives
a restart too.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from croniter import croniter

from stepwell.engine.hosts import owned_elsewhere, this_host
from stepwell.engine.runner import SUCCESS, NullListener, RunListener, Runner
from stepwell.store import ids
from stepwell.store.base import RUN_LOCK_BUSY, LogLine, RunRecord, Store, active_positions

log = logging.getLogger("stepwell.scheduler")

#: State key holding the scheduler's bookkeeping (not a valid step name, so it
#: never collides with a step's own state).
BOOKKEEPING_KEY = "stepwell:scheduler"
#: Run statuses after which a run will not change any more.
FINISHED = frozenset(SUCCESS | {"failed", "timed_out", "cancelled", "killed"})
#: Default number of steps that may run at the same time.
DEFAULT_WORKERS = 4


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and accepts no new triggers."""


@dataclass
class Ticket:
    """What a trigger produced: the id of the run that will serve it."""

    run_id: str
    step: str
    #: True when the trigger joined a run that was already pending
    coalesced: bool


@dataclass
class StepStatus:
    """A step's slot as the API shows it."""

    running_run: str | None
    queued_run: str | None
    queued_not_before: dt.datetime | None
    next_tick: dt.datetime | None


@dataclass
class _Pending:
    run_id: str
    trigger: str
    not_before: float  # epoch seconds
    #: the latest cron tick (epoch seconds) this run serves, if any
    cron_tick: float | None = None
    triggers: int = 1


@dataclass
class _Slot:
    #: the run handed to the pool (it may still wait there for a free worker)
    running: str | None = None
    #: True once a pool thread has started ``running`` (until then the API shows it queued)
    started: bool = False
    pending: _Pending | None = None
    #: tables the running run committed rows to, not yet dispatched downstream
    committed: set[str] = field(default_factory=set)
    #: held back by request_new_run(trigger_downstream=False)
    deferred: set[str] = field(default_factory=set)
    cron: str | None = None
    next_tick: float | None = None


class _Fanout:
    """The runner's listener: the scheduler's own bookkeeping plus an outside listener."""

    def __init__(self, scheduler: Scheduler, outside: RunListener):
        self.scheduler = scheduler
        self.outside = outside

    def run_started(self, run: RunRecord) -> None:
        self.outside.run_started(run)

    def progress(self, run: RunRecord, rows_in: int, rows_out: int) -> None:
        self.outside.progress(run, rows_in, rows_out)

    def log_line(self, run: RunRecord, line: LogLine) -> None:
        self.outside.log_line(run, line)

    def run_finished(self, run: RunRecord) -> None:
        self.outside.run_finished(run)

    def respond(self, run: RunRecord, request_key: str, payload: Any) -> bool:
        respond = getattr(self.outside, "respond", None)
        return bool(respond is not None and respond(run, request_key, payload))

    def tables_committed(self, run: RunRecord, tables: set[str]) -> None:
        self.scheduler._run_committed(run.step, tables)
        notify = getattr(self.outside, "tables_committed", None)
        if notify is not None:
            notify(run, tables)


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _epoch(value: dt.datetime) -> float:
    return value.timestamp()


def next_tick(expr: str, after: float) -> float:
    """The first tick of cron ``expr`` strictly after ``after`` (epoch seconds, UTC)."""
    return float(croniter(expr, _utc(after)).get_next(float))


def last_tick(expr: str, at_or_before: float) -> float:
    """The latest tick of cron ``expr`` at or before ``at_or_before``."""
    it = croniter(expr, _utc(at_or_before + 1e-6))
    return float(it.get_prev(float))


class Scheduler:
    """Dispatches the runs of one app's steps (see the module docstring)."""

    def __init__(
        self,
        app: Any,
        store: Store,
        *,
        max_workers: int = DEFAULT_WORKERS,
        listener: RunListener | None = None,
        environ: dict[str, str] | None = None,
        runner_factory: Callable[..., Runner] = Runner,
        clock: Callable[[], float] | None = None,
    ):
        self.app = app
        self.store = store
        self.clock = clock or time.time
        self._cv = threading.Condition()
        self._book_lock = threading.Lock()
        self._slots: dict[str, _Slot] = {step.name: _Slot() for step in app.steps}
        self._timers: list[tuple[float, int, str, str]] = []  # (due, seq, kind, step)
        self._seq = itertools.count()
        self._accepting = True
        self._stopping = False
        #: set by ``hurry``: ``shutdown`` cancels running runs without waiting longer
        self._hurried = False
        self._started = False
        #: runs cancelled while they waited for a free worker (``_execute`` skips them)
        self._unstarted_cancels: set[str] = set()
        self._timer_thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="stepwell-run")
        self._commit_observers: list[Callable[[set[str]], None]] = []
        adopted = self._adopt_queued_runs()
        self.runner = runner_factory(
            app, store, listener=_Fanout(self, listener or NullListener()), environ=environ
        )
        self._adopted = adopted

    # -- start / stop --------------------------------------------------------------
    def start(self) -> None:
        """Start cron schedules, resume what the last server left, and dispatch."""
        with self._cv:
            if self._started:
                return
            self._started = True
        now = self.clock()
        with self._cv:
            for run in self._adopted:
                info = run.info or {}
                wait = float(info.get("not_before") or 0.0) - now
                self._enqueue(run.step, run.trigger, run_id=run.id, delay=wait)
                self._slots[run.step].deferred |= set(info.get("deferred_tables") or [])
        cron_steps = [step for step in self.app.steps if step.trigger not in ("manual", "upstream")]
        missed = self._start_schedules(cron_steps, now) if cron_steps else set()
        for step in cron_steps:
            self._slots[step.name].cron = step.trigger
            if step.name in missed:  # ticks were missed while no server ran: run once
                with self._cv:
                    self._enqueue(step.name, "cron", cron_tick=last_tick(step.trigger, now))
            self._schedule_tick(step.name, next_tick(step.trigger, now))
        self._resume_requested_runs(now)
        self._resume_readers_of_killed_runs()
        self._resume_unread_rows()
        self._timer_thread = threading.Thread(target=self._timer_loop, name="stepwell-timer", daemon=True)
        self._timer_thread.start()
        with self._cv:
            for name in self._slots:
                self._maybe_start(name)

    def shutdown(self, timeout: float = 30.0, kill_grace: float = 15.0) -> list[str]:
        """Stop accepting triggers, let running steps finish for up to ``timeout``
        seconds, then cancel the rest (their uncommitted work is rolled back).
        Pending runs stay ``queued`` in the store and run after the next start.
        Returns the ids of the runs it cancelled."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            for slot in self._slots.values():
                slot.pending = None
            self._cv.notify_all()
        if self._timer_thread is not None:
            self._timer_thread.join(timeout=5)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cv:
            while self._running_ids() and time.monotonic() < deadline and not self._hurried:
                self._cv.wait(timeout=max(0.01, deadline - time.monotonic()))
            cancelled = self._running_ids()
            reason = (
                "the server was told to stop again before the run ended"
                if self._hurried
                else f"the server shut down and the run did not end within {timeout:g}s"
            )
        for run_id in cancelled:
            self.runner.cancel(run_id, reason)
        deadline = time.monotonic() + kill_grace
        with self._cv:
            while self._running_ids() and time.monotonic() < deadline:
                self._cv.wait(timeout=max(0.01, deadline - time.monotonic()))
        self._pool.shutdown(wait=not self._running_ids(), cancel_futures=True)
        return cancelled

    def hurry(self) -> None:
        """Cut ``shutdown``'s wait for running steps short: they are cancelled now
        (a second SIGTERM or Ctrl-C)."""
        with self._cv:
            self._hurried = True
            self._cv.notify_all()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """Refuse new triggers from now on (the first step of a graceful shutdown)."""
        with self._cv:
            self._accepting = False

    def add_commit_observer(self, observer: Callable[[set[str]], None]) -> None:
        """Call ``observer(tables)`` after every commit that added rows to ``tables``
        (a step's commit point, a webhook batch, a load), e.g. to wake stream rules."""
        self._commit_observers.append(observer)

    def _observe(self, tables: set[str]) -> None:
        for observer in list(self._commit_observers):
            try:
                observer(tables)
            except Exception:
                log.exception("a commit observer failed for tables %s", sorted(tables))

    # -- triggers ------------------------------------------------------------------
    def trigger(self, step: str, trigger: str = "manual", *, delay: float = 0.0) -> Ticket:
        """Ask for a run of ``step``; returns the run (new or pending) that will serve it.

        Raises :class:`~stepwell.app.AppError` for an unknown step and
        :class:`SchedulerClosed` while shutting down."""
        self.app.step(step)
        with self._cv:
            if not self._accepting:
                raise SchedulerClosed("the server is shutting down and accepts no new runs")
            ticket = self._enqueue(step, trigger, delay=delay)
            self._maybe_start(step)
            return ticket

    def notify_commit(self, tables: Iterable[str], *, writer: str | None = None) -> list[Ticket]:
        """New rows of ``tables`` were committed (by step ``writer``, or by a webhook
        or a load when None): trigger the ``upstream`` steps that read them."""
        tables = set(tables)
        self._observe(tables)
        tickets = []
        with self._cv:
            if not self._accepting:
                return []
            for name in self.readers(tables, writer=writer):
                tickets.append(self._enqueue(name, "upstream"))
                self._maybe_start(name)
        return tickets

    def readers(self, tables: Iterable[str], *, writer: str | None = None) -> list[str]:
        """``upstream`` steps to run after new rows of ``tables`` (by ``writer``)."""
        wanted = set(tables)
        names = []
        for step in self.app.steps:
            if step.trigger != "upstream" or step.name == writer:
                continue
            if wanted & set(step.input_tables()) or (writer is not None and step.after == writer):
                names.append(step.name)
        return names

    def cancel(self, run_id: str) -> str | None:
        """Cancel a queued or running run. Returns ``"cancelled"`` (a queued run,
        removed), ``"cancelling"`` (a running run, being stopped) or None (this
        scheduler has no such active run)."""
        with self._cv:
            for slot in self._slots.values():
                if slot.pending is not None and slot.pending.run_id == run_id:
                    slot.pending = None
                    self._take_off_queue(run_id)
                    return "cancelled"
                if slot.running == run_id:
                    break
            else:
                return None
        if self.runner.cancel(run_id):
            return "cancelling"
        with self._cv:  # handed to the pool, waiting for a free worker: it never starts
            if any(self._waiting(slot) == run_id for slot in self._slots.values()):
                self._unstarted_cancels.add(run_id)
                self._take_off_queue(run_id)
                return "cancelled"
        return None

    def _take_off_queue(self, run_id: str) -> None:
        self.store.update_run(
            run_id, status="cancelled", ended_at=_utc(self.clock()),
            error="taken off the queue on request before it started",
        )

    # -- status --------------------------------------------------------------------
    def status(self, step: str) -> StepStatus:
        with self._cv:
            slot = self._slots[step]
            pending = slot.pending
            waiting = self._waiting(slot)
            return StepStatus(
                running_run=slot.running if slot.started else None,
                queued_run=waiting or (pending.run_id if pending else None),
                queued_not_before=_utc(pending.not_before) if pending and not waiting else None,
                next_tick=_utc(slot.next_tick) if slot.next_tick is not None else None,
            )

    def is_running(self, step: str) -> bool:
        with self._cv:
            return self._slots[step].running is not None

    def running_run(self, step: str) -> str | None:
        """Id of ``step``'s run in progress here, if any."""
        with self._cv:
            return self._slots[step].running

    def wait_not_running(self, step: str, timeout: float) -> bool:
        """Wait until ``step`` has no run in progress here; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._slots[step].running is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(remaining)
        return True

    def counts(self) -> tuple[int, int]:
        """(running, queued) runs."""
        with self._cv:
            running = sum(1 for s in self._slots.values() if s.running and s.started)
            queued = sum(1 for s in self._slots.values() if s.pending)
            queued += sum(1 for s in self._slots.values() if self._waiting(s))
            return running, queued

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs or is pending (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while any(s.running or s.pending for s in self._slots.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(timeout=left)
            return True

    # -- internals (called with self._cv held unless said otherwise) ---------------------
    def _running_ids(self) -> list[str]:
        """Runs started by a pool thread and not finished (not those still waiting)."""
        return [s.running for s in self._slots.values() if s.running and s.started]

    def _waiting(self, slot: _Slot) -> str | None:
        """The run handed to the pool that waits there for a free worker (not cancelled)."""
        if slot.running and not slot.started and slot.running not in self._unstarted_cancels:
            return slot.running
        return None

    def _enqueue(
        self,
        step: str,
        trigger: str,
        *,
        delay: float = 0.0,
        cron_tick: float | None = None,
        run_id: str | None = None,
        deferred: set[str] | None = None,
    ) -> Ticket:
        """Queue a run of ``step`` (or add to the one queued). Its record keeps what a
        server taking it over needs: when it may start and, for a follow-up run, the
        tables whose downstream dispatch waits for it (``deferred``)."""
        slot = self._slots[step]
        not_before = self.clock() + max(0.0, delay)
        pending = slot.pending
        if pending is not None:
            pending.triggers += 1
            if trigger == "manual":  # an explicit request does not wait for a delayed run
                pending.not_before = min(pending.not_before, not_before)
            else:
                pending.not_before = max(pending.not_before, not_before)
            if cron_tick is not None:
                pending.cron_tick = max(pending.cron_tick or 0.0, cron_tick)
            if run_id is not None and run_id != pending.run_id:  # an adopted duplicate
                self.store.update_run(
                    run_id, status="cancelled", ended_at=_utc(self.clock()),
                    error=f"merged into queued run {pending.run_id}",
                )
            self._arm(step, pending)
            return Ticket(pending.run_id, step, coalesced=True)
        if run_id is None:
            run_id = ids.new_id()
            info: dict[str, Any] = {"host": this_host()}
            if delay > 0:
                info["not_before"] = not_before
            if deferred:
                info["deferred_tables"] = sorted(deferred)
            self.store.create_run(RunRecord(
                id=run_id, step=step, status="queued", trigger=trigger, host_pid=os.getpid(),
                info=info,
            ))  # fmt: skip
        slot.pending = _Pending(run_id, trigger, not_before, cron_tick)
        self._arm(step, slot.pending)
        return Ticket(run_id, step, coalesced=False)

    def _arm(self, step: str, pending: _Pending) -> None:
        if pending.not_before > self.clock():
            self._push_timer(pending.not_before, "pending", step)

    def _schedule_tick(self, step: str, due: float) -> None:
        with self._cv:
            self._slots[step].next_tick = due
            self._push_timer(due, "cron", step)

    def _push_timer(self, due: float, kind: str, step: str) -> None:
        heapq.heappush(self._timers, (due, next(self._seq), kind, step))
        self._cv.notify_all()

    def _maybe_start(self, step: str) -> None:
        slot = self._slots[step]
        pending = slot.pending
        # (draining: what is queued now stays queued, for the next server)
        if self._stopping or not self._accepting or slot.running is not None or pending is None:
            return
        if pending.not_before > self.clock():
            return  # a timer is armed for it
        slot.pending = None
        slot.running = pending.run_id
        slot.committed = set()
        self._pool.submit(self._execute, step, pending)

    def _timer_loop(self) -> None:
        with self._cv:
            while not self._stopping:
                now = self.clock()
                while self._timers and self._timers[0][0] <= now:
                    due, _, kind, step = heapq.heappop(self._timers)
                    slot = self._slots[step]
                    if kind == "cron":
                        if slot.next_tick != due:
                            continue  # superseded
                        following = next_tick(slot.cron or "", due)
                        slot.next_tick = following
                        heapq.heappush(self._timers, (following, next(self._seq), "cron", step))
                        try:
                            self._enqueue(step, "cron", cron_tick=due)
                        except Exception:  # the store refused: try again at the next tick
                            log.exception("could not queue the cron run of step %r", step)
                    self._maybe_start(step)
                timeout = self._timers[0][0] - self.clock() if self._timers else None
                self._cv.wait(timeout=None if timeout is None else max(timeout, 0.001))

    def _execute(self, step: str, pending: _Pending) -> None:
        """Run one pending run (on a pool thread)."""
        record: RunRecord | None = None
        try:
            with self._cv:
                if self._stopping:
                    return  # stays queued for the next start
                if pending.run_id in self._unstarted_cancels:  # cancelled while it waited
                    self._unstarted_cancels.discard(pending.run_id)
                    return
                self._slots[step].started = True  # (shutdown waits for it from now on)
            claimed: dict[str, Any] | None = None
            if pending.cron_tick is not None:
                served_by, claimed = self._claim_tick(step, pending.cron_tick, pending.run_id)
                if served_by is not None and pending.trigger == "cron" and pending.triggers == 1:
                    self._skip_served_tick(step, pending, served_by)
                    return
            record = self.runner.run_step(step, pending.trigger, run_id=pending.run_id)
            if claimed is not None and RUN_LOCK_BUSY in (record.error or ""):
                # the step runs on another server, which has this tick queued behind
                # that run: the tick is its to serve, not lost with this run
                self._give_back_tick(step, pending.run_id, claimed)
        except Exception:
            log.exception("run %s of step %r failed to run", pending.run_id, step)
            try:
                self.store.update_run(
                    pending.run_id, status="failed", ended_at=_utc(self.clock()),
                    error="the scheduler could not run this step; see the server's log",
                )
            except Exception:
                log.exception("could not close run %s", pending.run_id)
        finally:
            self._finished(step, record)

    def _finished(self, step: str, record: RunRecord | None) -> None:
        with self._cv:
            slot = self._slots[step]
            slot.running = None
            slot.started = False
            request = (record.info or {}).get("request_new_run") if record else None
            ok = record is not None and record.status in SUCCESS
            tables = slot.committed | slot.deferred
            slot.committed = set()
            if ok and request and not request.get("trigger_downstream", True):
                slot.deferred = tables
            else:
                slot.deferred = set()
                # queued even while draining: a queued run is kept in the store, and
                # the next server takes it over (the new rows are not left unread)
                for name in self.readers(tables, writer=step) if tables else []:
                    self._enqueue(name, "upstream")
                    self._maybe_start(name)
            if ok and request:
                wait = float(request.get("wait_atleast_seconds") or 0.0)
                self._enqueue(step, "request_new_run", delay=wait, deferred=slot.deferred)
            self._maybe_start(step)
            self._cv.notify_all()

    def _run_committed(self, step: str, tables: set[str]) -> None:
        with self._cv:
            self._slots[step].committed |= tables
        self._observe(tables)

    def _resume_requested_runs(self, now: float) -> None:
        """Queue the follow-up run the last run of a step asked for, if it never ran."""
        for step in self.app.steps:
            slot = self._slots[step.name]
            if slot.pending is not None:
                continue
            last = next(
                (r for r in self.store.list_runs(step=step.name, limit=20) if r.started_at),
                None,
            )
            request = (last.info or {}).get("request_new_run") if last else None
            if last is None or last.status not in SUCCESS or not request:
                continue
            wait = float(request.get("wait_atleast_seconds") or 0.0)
            ended = _epoch(last.ended_at) if last.ended_at else now
            with self._cv:
                self._enqueue(step.name, "request_new_run", delay=max(0.0, ended + wait - now))

    def _resume_readers_of_killed_runs(self) -> None:
        """A run whose host died had its readers' runs still to come: queue them if
        it committed rows before it died (they would wait for the next commit)."""
        steps = {step.name: step for step in self.app.steps}
        for run_id in getattr(self.runner, "recovered", []):
            run = self.store.get_run(run_id)
            if run is None or run.status != "killed" or not run.rows_out or run.step not in steps:
                continue
            with self._cv:
                for name in self.readers(steps[run.step].output_tables(), writer=run.step):
                    self._enqueue(name, "upstream")

    def _resume_unread_rows(self) -> None:
        """Queue the ``upstream`` steps with committed rows left to read.
        A host killed during such a step's run (with nothing queued behind it), or
        between a commit (a webhook batch, a run's last commit point) and queuing its
        readers, leaves those rows with no run to read them, and nothing new may come
        to trigger one. (Tables whose writer holds its readers back for a queued
        follow-up run, ``trigger_downstream=False``, stay held.)"""
        held: set[str] = set().union(*(slot.deferred for slot in self._slots.values()))
        for step in self.app.steps:
            if step.trigger != "upstream" or self._slots[step.name].pending is not None:
                continue
            if held & set(step.input_tables()):
                continue
            if any(owned_elsewhere(run) for run in self.store.list_runs(
                    step=step.name, limit=5, statuses=("running", "queued"))):  # fmt: skip
                continue  # another server sharing the store runs it (it reads those rows)
            try:
                unread = self._has_unread_rows(step)
            except Exception:  # a table being changed, say: its next commit triggers
                log.exception("could not check the unread rows of step %r", step.name)
                continue
            if unread:
                with self._cv:
                    self._enqueue(step.name, "upstream")

    def _has_unread_rows(self, step: Any) -> bool:
        """Whether a stream of ``step`` over one of its input tables has rows after its
        committed position; for a table it reads without a stream (a SQL step, say),
        whether it has rows and the step never succeeded, or a step wrote rows to it
        after the step's last successful run began (rows a webhook or a load added
        since then are not seen this way: their tables' next commit triggers it)."""
        inputs = set(step.input_tables())
        positions = [p for p in active_positions(self.store, step.name) if p.table in inputs]
        for position in positions:
            first_column = position.order_by[0] if position.order_by else None
            batches = self.store.scan(
                position.table, order_by=list(position.order_by),
                after=(position.value, position.last_id), batch_rows=1,
                stream=first_column == "patterns_id",
            )  # fmt: skip
            try:
                if any(batch.num_rows for batch in batches):
                    return True
            finally:
                batches.close()
        unpositioned = inputs - {p.table for p in positions}
        if not unpositioned:
            return False
        done = [r for r in self.store.list_runs(step=step.name, limit=20) if r.status in SUCCESS]
        if done:  # it reads those tables whole: has a step written to them since?
            since = done[0].started_at
            writers = [s.name for s in self.app.steps if unpositioned & set(s.output_tables())]
            return since is not None and any(
                run.rows_out and run.ended_at is not None and run.ended_at > since
                for writer in writers for run in self.store.list_runs(step=writer, limit=5)
            )  # fmt: skip
        for table in unpositioned:
            info = self.store.table_info(table)
            if info is not None and info.row_count:
                return True
        return False

    def _adopt_queued_runs(self) -> list[RunRecord]:
        """Take over runs left ``queued`` by a server that is gone (before the
        runner's orphan recovery would close them)."""
        known = {step.name for step in self.app.steps}
        adopted = []
        for run in reversed(self.store.list_runs(limit=None, statuses=("queued",))):
            if run.started_at is not None:
                continue
            if owned_elsewhere(run):
                continue  # a live server here, or one of another machine (once it is back)
            if run.step not in known:
                self.store.update_run(
                    run.id, status="cancelled", ended_at=_utc(self.clock()),
                    error=f"step {run.step!r} is no longer in the app",
                )
                continue
            self.store.update_run(run.id, host_pid=os.getpid())
            adopted.append(run)
        return adopted

    # -- bookkeeping in the store ------------------------------------------------------
    def _update_bookkeeping(self, change: Callable[[dict[str, Any]], bool]) -> None:
        """Apply ``change`` to the bookkeeping in one transaction holding its lock, so
        that servers sharing the store see and keep each other's entries (``change``
        returns whether it changed anything)."""
        with self._book_lock, self.store.transaction() as tx:
            tx.lock(BOOKKEEPING_KEY)
            book = tx.get_state(BOOKKEEPING_KEY)
            if change(book):
                tx.set_state(BOOKKEEPING_KEY, book)
                tx.commit()

    def _start_schedules(self, steps: list[Any], now: float) -> set[str]:
        """Record the cron schedules that are new (or changed) as starting now; returns
        the steps whose schedules had ticks after the last tick acted on."""
        missed: set[str] = set()

        def change(book: dict[str, Any]) -> bool:
            cron = book.setdefault("cron", {})
            changed = False
            for step in steps:
                entry = cron.get(step.name)
                if entry and entry.get("expr") == step.trigger and entry.get("last_tick") is not None:
                    if next_tick(step.trigger, float(entry["last_tick"])) <= now:
                        missed.add(step.name)
                else:  # a new schedule starts now; nothing before it was missed
                    cron[step.name] = {"expr": step.trigger, "last_tick": now}
                    changed = True
            return changed

        self._update_bookkeeping(change)
        return missed

    def _claim_tick(
        self, step: str, tick: float, run_id: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Record that run ``run_id`` serves cron tick ``tick`` of ``step``. Returns
        (the entry saying that this tick, or a later one, was acted on already, by a
        server sharing this store, or None; the entry this claim replaced, if made)."""
        expr = self._slots[step].cron
        served: list[dict[str, Any]] = []
        replaced: list[dict[str, Any]] = []

        def change(book: dict[str, Any]) -> bool:
            cron = book.setdefault("cron", {})
            entry = cron.get(step) or {}
            if entry.get("expr") == expr and float(entry.get("last_tick") or 0) >= tick:
                served.append(entry)
                return False
            replaced.append(entry)
            cron[step] = {"expr": expr, "last_tick": tick, "run_id": run_id, "host": this_host()}
            return True

        self._update_bookkeeping(change)
        return (served[0] if served else None), (replaced[0] if replaced else None)

    def _give_back_tick(self, step: str, run_id: str, replaced: dict[str, Any]) -> None:
        """Undo ``_claim_tick`` of run ``run_id`` (which did nothing), unless a later
        claim came since."""

        def change(book: dict[str, Any]) -> bool:
            cron = book.setdefault("cron", {})
            if (cron.get(step) or {}).get("run_id") != run_id:
                return False
            if replaced:
                cron[step] = replaced
            else:
                cron.pop(step, None)
            return True

        self._update_bookkeeping(change)

    def _skip_served_tick(self, step: str, pending: _Pending, served_by: dict[str, Any]) -> None:
        """Close the queued run of a cron tick that another server ran already."""
        tick = _utc(pending.cron_tick or 0.0).strftime("%Y-%m-%d %H:%M:%S UTC")
        by = f"run {served_by['run_id']}" if served_by.get("run_id") else "an earlier run"
        if served_by.get("host"):
            by += f" on host {served_by['host']}"
        self.store.update_run(
            pending.run_id, status="cancelled", ended_at=_utc(self.clock()),
            error=f"cron tick {tick} of step {step!r} was already run by {by} (servers "
                  "sharing a store run each tick once)",
        )  # fmt: skip
