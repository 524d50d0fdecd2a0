"""Host-side half of the processor runtime: what a processor worker is told at start."""

from __future__ import annotations

from typing import Any

from stepwell.runtimes.processor.guard import DEFAULT_ALLOWED_IMPORTS
from stepwell.store.base import Store, active_positions

#: Worker entry point of processor runs.
ENTRY = "stepwell.runtimes.processor.worker:run"
#: The order of a processor's input: new committed rows by their monotonic id.
ORDER_BY = ("patterns_id",)
#: Key of the step's state holding DATA_CHECKPOINT (also shown by `stepwell state`).
CHECKPOINT_KEY = "DATA_CHECKPOINT"


class ProcessorConfigError(ValueError):
    """The processor step cannot run as configured; the message says why and what to do."""


def input_table(app: Any, step: Any) -> str | None:
    """The table a processor reads: ``input:``, or the output table of its ``after:`` step."""
    if step.input:
        table = step.input
    elif step.after:
        previous = app.step(step.after)
        outputs = previous.output_tables()
        if len(outputs) != 1:
            found = ", ".join(outputs) if outputs else "no table"
            raise ProcessorConfigError(
                f"step {step.name!r} runs `after: {step.after}`, which writes {found}; `after:` "
                f"needs a step with exactly one output table (use `input: <table>` instead)"
            )
        table = outputs[0]
    else:
        return None
    if table == step.output:
        raise ProcessorConfigError(
            f"step {step.name!r} reads and writes table {table!r}; a processor's output must be "
            f"another table"
        )
    return table


def start_message(
    *,
    store: Store,
    app: Any,
    run_id: str,
    step: Any,
    app_root: str,
    time_limit: float | None,
    sys_path: list[str],
) -> dict[str, Any]:
    """The ``start`` frame of a processor run: statement file, mode, output schema,
    committed DATA_CHECKPOINT and input position, and the import allow-list."""
    table = input_table(app, step)
    source: dict[str, Any] | None = None
    if table is not None:
        position = None
        for committed in active_positions(store, step.name):
            if committed.table == table and tuple(committed.order_by) == ORDER_BY:
                position = {"table_version": committed.table_version, "value": committed.value}
        source = {"table": table, "position": position}
    state = store.get_state(step.name)
    extra = [name for name in (step.allowed_imports or []) if name not in DEFAULT_ALLOWED_IMPORTS]
    return {
        "op": "start",
        "entry": ENTRY,
        "run_id": run_id,
        "step": step.name,
        "app_root": app_root,
        "file": step.file,
        "sys_path": sys_path,
        "mode": step.mode or "row",
        "input": source,
        "after": step.after,
        "output": step.output,
        "read_tables": [table] if table is not None else [],
        "write_tables": [step.output],
        "output_schema": dict(step.output_schema or {}),
        "checkpoint_column": step.checkpoint_column,
        "data_checkpoint": state.get(CHECKPOINT_KEY),
        "state": state,
        "allowed_imports": [*DEFAULT_ALLOWED_IMPORTS, *extra],
        "extra_imports": extra,
        "time_limit": time_limit,
    }
