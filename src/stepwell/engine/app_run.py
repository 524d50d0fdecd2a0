"""Running several steps of an app in dependency order."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from stepwell.engine.runner import SUCCESS, Runner
from stepwell.store.base import RunRecord

#: A step asking for another run (``State.request_new_run``) gets at most this many
#: follow-up runs within one `stepwell run`.
MAX_FOLLOW_UPS = 100
#: Longest pause honoured for ``wait_atleast_seconds`` in the foreground runner.
MAX_FOREGROUND_WAIT = 300.0


def select_steps(app: Any, names: Sequence[str] | None) -> list[str]:
    """The steps to run, in dependency order (all of them when ``names`` is empty)."""
    order = [step.name for step in app.upstream_order()]
    if not names:
        return order
    for name in names:
        app.step(name)  # raises a clear error for unknown names
    wanted = set(names)
    return [name for name in order if name in wanted]


def follow_up_delay(run: RunRecord) -> float | None:
    """Seconds to wait before the follow-up run that ``run`` asked for with
    ``State.request_new_run()``, or None when it asked for none (or failed)."""
    request = run.info.get("request_new_run") if run.status in SUCCESS else None
    if not request:
        return None
    return min(float(request.get("wait_atleast_seconds") or 0), MAX_FOREGROUND_WAIT)


def still_asking(runs: Sequence[RunRecord]) -> list[str]:
    """Steps whose last run in ``runs`` asked for another run that was not made
    (``MAX_FOLLOW_UPS`` reached, or the run was stopped)."""
    last = {run.step: run for run in runs}
    return [step for step, run in last.items() if follow_up_delay(run) is not None]


def run_steps(
    runner: Runner, names: Sequence[str], stop: Callable[[], bool] | None = None
) -> list[RunRecord]:
    """Run each step once (plus the follow-up runs it requests), in order, until
    ``stop()`` says to start no more.

    A failed step does not stop independent later steps, but steps reading
    what a failed step writes still run on the data committed so far."""
    runs: list[RunRecord] = []
    try:
        for i, name in enumerate(names):
            if stop is not None and stop():
                break
            then = names[i + 1] if i + 1 < len(names) else None  # its worker is made meanwhile
            run = runner.run_step(name, then=then)
            runs.append(run)
            follow_ups = 0
            while (delay := follow_up_delay(run)) is not None and follow_ups < MAX_FOLLOW_UPS:
                if stop is not None and stop():
                    break
                time.sleep(delay)
                run = runner.run_step(name, trigger="request_new_run", then=then)
                runs.append(run)
                follow_ups += 1
    finally:
        runner.discard_prepared()
    return runs
