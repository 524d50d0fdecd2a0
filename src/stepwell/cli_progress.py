"""Live progress of `stepwell run`: one line per step with rows in/out."""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stepwell.cli_common import printable
from stepwell.store.base import LogLine, PartitionRecord, RunRecord

#: Distinct stepwell warnings `stepwell run` shows under its progress lines at most.
MAX_WARNINGS_SHOWN = 20
_DONE_STYLE = {"succeeded": "green", "succeeded_no_data": "green", "succeeded_with_errors": "yellow"}


class _Progress(Progress):
    """A display redrawn by its own timer (ten times a second on a terminal, once at
    the end elsewhere) only. rich also redraws it on every ``add_task``, rendering
    every line again: 2 ms per step of a 40-step run, growing with the steps."""

    def refresh(self) -> None:
        pass


class RunProgress:
    """A RunListener drawing a rich progress display (plain lines when not a TTY)."""

    def __init__(self, console: Console, total_steps: int):
        self.console = console
        self._bar = _Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.overall = self._bar.add_task("[bold]steps", total=total_steps, detail="")
        self._tasks: dict[str, int] = {}
        #: steps with a finished run (a step's follow-up runs do not count again)
        self._steps_done: set[str] = set()
        self._last_draw = 0.0
        # connector runs: one transient line per partition being read
        self._parts: dict[tuple[str, str], int] = {}
        self._part_counts: dict[str, str] = {}
        self._parts_lock = threading.Lock()
        #: stepwell's own warnings already shown (the same one for every run: once)
        self._warned: set[str] = set()

    def __enter__(self) -> RunProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def run_started(self, run: RunRecord) -> None:
        self._tasks[run.id] = self._bar.add_task(
            f"  {run.step}", total=None, detail="[cyan]running[/]"
        )

    def progress(self, run: RunRecord, rows_in: int, rows_out: int) -> None:
        now = time.monotonic()
        if now - self._last_draw < 0.1:
            return
        self._last_draw = now
        task = self._tasks.get(run.id)
        if task is not None:
            parts = self._part_counts.get(run.id)
            self._bar.update(
                task,
                detail=(f"{parts}, " if parts else "") + f"{rows_in:,} rows in, {rows_out:,} out",
            )

    def partition_progress(
        self, run: RunRecord, partition: PartitionRecord, done: int, total: int
    ) -> None:
        """A line per partition while it is read; failures stay on screen."""
        with self._parts_lock:
            key = (run.id, partition.name)
            name = partition.name if len(partition.name) <= 48 else "..." + partition.name[-45:]
            if partition.status == "running":
                self._parts[key] = self._bar.add_task(
                    f"    {name}", total=None, detail="[cyan]reading[/]"
                )
            else:
                line = self._parts.pop(key, None)
                if line is not None:
                    self._bar.remove_task(line)
                if partition.status == "failed":
                    self._bar.console.print(
                        f"    [red]partition {escape(printable(name))} failed[/]: "
                        f"{escape(printable((partition.error or '')[:200]))}"
                    )
            self._part_counts[run.id] = f"partitions {done:,}/{total:,}"
            task = self._tasks.get(run.id)
            if task is not None:
                self._bar.update(
                    task, total=max(total, 1), completed=done,
                    detail=self._part_counts[run.id],
                )

    def log_line(self, run: RunRecord, line: LogLine) -> None:
        # stepwell's own warnings (rows a stream skips, isolation not available, ...)
        # are shown here too: in the run log alone, nobody would see them
        if line.level != "warn" or not line.message.startswith("[stepwell] "):
            return
        message = line.message.removeprefix("[stepwell] ")
        if message not in self._warned and len(self._warned) < MAX_WARNINGS_SHOWN:
            self._warned.add(message)
            self._bar.console.print(
                f"  [yellow]warning[/] ({escape(run.step)}): {escape(printable(message))}"
            )

    def run_finished(self, run: RunRecord) -> None:
        task = self._tasks.get(run.id)
        style = _DONE_STYLE.get(run.status, "red")
        if task is not None:
            self._bar.update(
                task,
                total=1,
                completed=1,
                detail=f"[{style}]{run.status}[/] {run.rows_in:,} in, {run.rows_out:,} out",
            )
        if run.step not in self._steps_done:
            self._steps_done.add(run.step)
            self._bar.advance(self.overall)
