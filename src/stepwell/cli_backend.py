"""Where the CLI's commands get their data: the store itself, or a running server.

An embedded DuckDB file can be open by one process only, so while `stepwell
serve` runs for an app the other commands talk to its API (found through
``APP/.stepwell/server.json``) instead of opening the store. :func:`open_backend`
makes that choice once; commands then call the same methods either way and
print the same output.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from stepwell.store.base import LogLine, RunRecord, Store, TableInfo
from stepwell.store.schema import to_pylist


class Backend(Protocol):
    """What CLI commands need, answered locally or by the server's API."""

    def list_tables(self) -> list[TableInfo]: ...
    def table_info(self, name: str) -> TableInfo | None: ...
    def preview(self, name: str, limit: int) -> list[dict[str, Any]]: ...
    def list_runs(self, step: str | None = None, limit: int = 100) -> list[RunRecord]: ...
    def get_run(self, run_id: str) -> RunRecord | None: ...
    def get_logs(self, run_id: str) -> list[LogLine]: ...
    def describe_state(self, step: str) -> dict[str, Any]: ...
    def change_state(self, step: str, *, reset: bool, values: dict[str, Any]) -> Any: ...
    def load(self, table: str, path: Path) -> int: ...
    def run_steps(self, names: Sequence[str], listener: Any = None) -> list[RunRecord]: ...


class LocalBackend:
    """The app's store, opened by this process."""

    def __init__(self, spec: Any, store: Store):
        self.spec = spec
        self.store = store

    def list_tables(self) -> list[TableInfo]:
        return self.store.list_tables()

    def table_info(self, name: str) -> TableInfo | None:
        return self.store.table_info(name)

    def preview(self, name: str, limit: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for batch in self.store.scan(name, batch_rows=max(limit, 1)):
            rows.extend(to_pylist(batch))  # (JSON columns as their values, not as text)
            if len(rows) >= limit:
                break
        return rows[:limit]

    def list_runs(self, step: str | None = None, limit: int = 100) -> list[RunRecord]:
        return self.store.list_runs(step=step, limit=limit)

    def get_run(self, run_id: str) -> RunRecord | None:
        return self.store.get_run(run_id)

    def get_logs(self, run_id: str) -> list[LogLine]:
        return self.store.get_logs(run_id)

    def describe_state(self, step: str) -> dict[str, Any]:
        from stepwell.engine.state_admin import describe_state

        return describe_state(self.store, step)

    def change_state(self, step: str, *, reset: bool, values: dict[str, Any]) -> None:
        from stepwell.engine.state_admin import change_state

        change_state(self.store, step, reset=reset, assignments=[], values=values)

    def load(self, table: str, path: Path) -> int:
        from stepwell.engine.loading import load_file

        return load_file(self.store, table, path)

    def run_steps(self, names: Sequence[str], listener: Any = None) -> list[RunRecord]:
        """Raises :class:`RunInterrupted` after a Ctrl-C (see ``_interrupt_cancels``)."""
        from stepwell.engine.app_run import run_steps
        from stepwell.engine.runner import Runner

        runner = Runner(self.spec, self.store, listener=listener)
        with _interrupt_cancels(runner) as interrupted:
            runs = run_steps(runner, names, stop=interrupted.is_set)
        if interrupted.is_set():
            raise RunInterrupted(runs)
        return runs


class RunInterrupted(Exception):
    """Ctrl-C stopped ``stepwell run``: ``runs`` are the runs made (the one in progress cancelled)."""

    def __init__(self, runs: list[RunRecord], note: str = ""):
        super().__init__("interrupted")
        self.runs = runs
        #: what happened to the run in progress, when it was not cancelled
        self.note = note


@contextmanager
def on_ctrl_c(handler: Any) -> Iterator[None]:
    """Handle SIGINT with ``handler`` while the block runs (in the main thread: only
    it gets signals), also in a process started with SIGINT ignored, as a shell's
    background jobs are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def interrupt_event(on_first: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """While the block runs, the first Ctrl-C sets the event it gives (and calls
    ``on_first``); a second raises KeyboardInterrupt at once."""
    interrupted = threading.Event()

    def on_interrupt(_signum: int, _frame: Any) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        if on_first is not None:
            on_first()

    with on_ctrl_c(on_interrupt):
        yield interrupted


def _interrupt_cancels(runner: Any) -> AbstractContextManager[threading.Event]:
    """``interrupt_event`` whose Ctrl-C cancels the run in progress (its worker is
    killed, its work since the last commit point rolled back and the run recorded
    ``cancelled``), and whose event says no later step may start."""

    def cancel_active() -> None:
        for run_id in runner.active_runs():
            runner.cancel(run_id, "interrupted (Ctrl-C)")

    return interrupt_event(cancel_active)


class RemoteBackend:
    """A running server's API (see :class:`stepwell.server.client.ServerClient`)."""

    def __init__(self, client: Any):
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def load(self, table: str, path: Path) -> int:
        from stepwell.engine.loading import read_file

        return self.client.load(table, read_file(Path(path)))

    def run_steps(self, names: Sequence[str], listener: Any = None) -> list[RunRecord]:
        """Trigger each step on the server and follow its run. A Ctrl-C cancels the
        run in progress there (as without a server) and raises :class:`RunInterrupted`
        once it has ended; a second Ctrl-C leaves at once."""
        with on_ctrl_c(signal.default_int_handler):  # Ctrl-C raises KeyboardInterrupt
            return self._run_steps(names, listener)

    def _run_steps(self, names: Sequence[str], listener: Any) -> list[RunRecord]:
        from stepwell.engine.app_run import MAX_FOLLOW_UPS, follow_up_delay

        runs: list[RunRecord] = []
        for name in names:
            ticket = self.client.trigger(name)
            self._follow(ticket.run_id, name, ticket.coalesced, runs, listener)
            # the follow-up runs it asks for (the server makes them), as without a server
            for _ in range(MAX_FOLLOW_UPS):
                follow_up = self._follow_up(runs[-1]) if follow_up_delay(runs[-1]) is not None else None
                if follow_up is None:
                    break
                self._follow(follow_up, name, False, runs, listener)
        return runs

    def _follow(self, run_id: str, name: str, coalesced: bool, runs: list[RunRecord],
                listener: Any) -> None:  # fmt: skip
        """Wait for run ``run_id`` to end and add it to ``runs``; on Ctrl-C, cancel it
        (unless another trigger queued it too) and raise :class:`RunInterrupted`."""
        from stepwell.server.client import ApiError

        try:
            runs.append(self.client.wait(run_id, listener))
        except KeyboardInterrupt:
            if coalesced:  # someone else's queued run, merged with ours: theirs too
                raise RunInterrupted(runs, f"run {run_id} of step {name!r} was "
                                           "queued by another trigger too, so it goes on; ") from None  # fmt: skip
            try:
                self.client.cancel(run_id)
            except ApiError:
                pass  # it ended meanwhile: its record says how
            runs.append(self.client.wait(run_id, listener))
            raise RunInterrupted(runs) from None

    def _follow_up(self, run: RunRecord, patience: float = 10.0) -> str | None:
        """The follow-up run the server queues for ``run`` (just after it ends)."""
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            queued = self.client.get_json(f"/api/steps/{run.step}").get("queued_run")
            if queued and queued != run.id:
                return str(queued)
            time.sleep(0.05)
        return None


def find_server(app_root: Path, store_url: str | None) -> Any | None:
    """A client for the server running for this app on this store, if there is one."""
    from stepwell.server.info import read_server_info, store_key

    info = read_server_info(app_root)
    if info is None or info.store_key != store_key(store_url):
        return None
    from stepwell.server.client import ApiError, ServerClient

    client = ServerClient(info.url, info.token())
    try:
        client.health()
    except ApiError as exc:
        if exc.status is not None:  # it answers: let the command see what it says
            return client
        # not answering: stopping, or a stale file whose pid was reused. Go to the
        # store; if a stopping server still holds it, opening it says so.
        client.close()
        return None
    return client


@contextmanager
def open_backend(spec: Any, store_url: str | None) -> Iterator[Backend]:
    """The running server's API when one serves this app and store, else the store."""
    url = store_url or spec.store
    client = find_server(spec.root, url)
    if client is not None:
        try:
            yield RemoteBackend(client)
        finally:
            client.close()
        return
    from stepwell.store import open_store

    store = open_store(url, spec.root)
    try:
        yield LocalBackend(spec, store)
    finally:
        store.close()
