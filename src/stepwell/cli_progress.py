"""Live progress of `stepwell run`: one line per step with rows in/out."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stepwell.store.base import LogLine, RunRecord

_DONE_STYLE = {"succeeded": "green", "succeeded_no_data": "green", "succeeded_with_errors": "yellow"}


class RunProgress:
    """A RunListener drawing a rich progress display (plain lines when not a TTY)."""

    def __init__(self, console: Console, total_steps: int):
        self.console = console
        self._bar = Progress(
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
        self._last_draw = 0.0

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
            self._bar.update(task, detail=f"{rows_in:,} rows in, {rows_out:,} out")

    def log_line(self, run: RunRecord, line: LogLine) -> None:
        pass

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
        self._bar.advance(self.overall)
