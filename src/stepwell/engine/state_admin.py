"""Viewing and changing a step's state and stream positions (`stepwell state`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from stepwell.store.base import Store


def describe_state(store: Store, step: str) -> dict[str, Any]:
    return {
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


def _parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def change_state(store: Store, step: str, *, reset: bool, assignments: Sequence[str]) -> None:
    """Reset and/or set values, in one transaction."""
    state = {} if reset else store.get_state(step)
    state.update(dict(_parse_assignment(a) for a in assignments))
    with store.transaction() as tx:
        if reset:
            tx.clear_positions(step)
        tx.set_state(step, state)
        tx.commit()
