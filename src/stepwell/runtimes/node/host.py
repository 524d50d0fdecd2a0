"""Host-side half of the node runtime: what a node worker is told at start."""

from __future__ import annotations

from typing import Any

from stepwell.store.base import Store, active_positions

#: Worker entry point of node runs.
ENTRY = "stepwell.runtimes.node.worker:run"


def start_message(
    *,
    store: Store,
    run_id: str,
    step: Any,
    app_root: str,
    parameters: dict[str, Any],
    time_limit: float | None,
    sys_path: list[str],
) -> dict[str, Any]:
    """The ``start`` frame of a node run: ports, parameters, committed state and
    the stream positions still valid for each table's active version."""
    positions = [
        {
            "table": position.table,
            "order_by": list(position.order_by),
            "table_version": position.table_version,
            "value": position.value,
            "last_id": position.last_id,
        }
        for position in active_positions(store, step.name)
    ]
    return {
        "op": "start",
        "entry": ENTRY,
        "run_id": run_id,
        "step": step.name,
        "app_root": app_root,
        "file": step.file,
        "sys_path": sys_path,
        "ports": {"inputs": dict(step.inputs or {}), "outputs": dict(step.outputs or {})},
        "parameters": parameters,
        "state": store.get_state(step.name),
        "positions": positions,
        "time_limit": time_limit,
    }
