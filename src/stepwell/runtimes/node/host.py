"""Host-side half of the node runtime: what a node worker is told at start.

A node's committed State and stream positions are not part of it: the worker
asks for them when the node first uses them (``WorkerSession.op_step_memory``).
"""

from __future__ import annotations

from typing import Any

#: Worker entry point of node runs.
ENTRY = "stepwell.runtimes.node.worker:run"


def prepare_message(*, step: Any, app_root: str, code: dict[str, Any] | None) -> dict[str, Any]:
    """The ``prepare`` frame a node's worker may get before its run's ``start``: its
    file and code, to load while the run is not ready to begin."""
    return {"op": "prepare", "entry": ENTRY, "app_root": app_root, "file": step.file, "code": code}


def start_message(
    *,
    run_id: str,
    step: Any,
    app_root: str,
    parameters: dict[str, Any],
    time_limit: float | None,
    sys_path: list[str],
) -> dict[str, Any]:
    """The ``start`` frame of a node run: its file, ports and parameters."""
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
        "time_limit": time_limit,
    }
