"""Viewing and changing a step's state and stream positions (`stepwell state`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from stepwell.store.base import Store


def describe_state(store: Store, step: str) -> dict[str, Any]:
    """A step's state and stream positions, and for connectors its partitions."""
    described = {
        "step": step,
        "state": store.get_state(step),
        "stream_positions": [
            {
                "table": p.table,
                "order_by": list(p.order_by),
                "table_version": p.table_version,
                "value": p.value,
                "last_id": p.last_id,
            }
            for p in store.get_positions(step)
        ],
    }
    partitions = store.get_partitions(step)
    if partitions:
        described["partitions"] = [
            {
                "name": p.name,
                "fingerprint": p.fingerprint,
                "rows": p.rows,
                "duration_seconds": p.duration_seconds,
                "status": p.status,
                "error": p.error,
                "run_id": p.run_id,
                "updated_at": p.updated_at,
                "code_hash": p.code_hash[:16] if p.code_hash else None,
            }
            for p in partitions
        ]
    return described


def _parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts (VALUE as JSON, else text) as a dict."""
    return dict(_parse_assignment(a) for a in assignments)


def change_state(
    store: Store,
    step: str,
    *,
    reset: bool,
    assignments: Sequence[str],
    values: Mapping[str, Any] | None = None,
) -> None:
    """Reset and/or set values (``KEY=VALUE`` texts and/or ``values``), in one transaction.

    A reset forgets state, stream positions and connector partition records, so
    the step starts over: streams from their first row, a connector re-reads
    (and replaces) every partition."""
    state = {} if reset else store.get_state(step)
    state.update(parse_assignments(assignments))
    state.update(values or {})
    partitions = store.get_partitions(step, prefixes=True) if reset else []
    with store.transaction() as tx:
        if reset:
            tx.replace_positions(step, [])
            for partition in partitions:
                tx.delete_partition(step, partition.name)
        tx.set_state(step, state)
        tx.commit()
