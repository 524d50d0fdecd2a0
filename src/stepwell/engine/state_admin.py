"""Viewing and changing a step's state and stream positions (`stepwell state`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from stepwell.store.base import Store, StoreError, StreamPosition


class StateChangeError(ValueError):
    """A state value or stream position that a step could not use (the message says why)."""


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
    try:
        json.dumps(state, allow_nan=False, default=str)
    except ValueError:
        raise StateChangeError("state values must be JSON: NaN and Infinity cannot be stored") from None
    partitions = store.get_partitions(step, prefixes=True) if reset else []
    with store.transaction() as tx:
        if reset:
            tx.replace_positions(step, [])
            for partition in partitions:
                tx.delete_partition(step, partition.name)
        tx.set_state(step, state)
        tx.commit()


def set_position(store: Store, position: StreamPosition) -> None:
    """Set one stream position of a step, after checking that a run could use it: the
    table and its ``order_by`` columns exist, the version does, and the value compares
    with the first column (tried with the same query a run's stream makes)."""
    where = f"stream position of step {position.step!r} on table {position.table!r}"
    info = store.table_info(position.table, count_rows=False)
    if info is None:
        raise StateChangeError(f"{where}: the table does not exist")
    columns = {c.name for c in info.columns}
    missing = [c for c in position.order_by if c not in columns]
    if not position.order_by or missing:
        raise StateChangeError(
            f"{where}: order_by needs columns of the table, not {missing or 'none'} "
            f"(columns: {', '.join(sorted(columns))})"
        )
    if not 1 <= position.table_version <= info.version:
        raise StateChangeError(
            f"{where}: table_version {position.table_version} does not exist "
            f"(the table is at version {info.version})"
        )
    if position.value is not None or position.last_id is not None:
        after = (position.value, position.last_id)
        try:
            with contextlib.closing(store.scan(position.table, order_by=position.order_by,
                                               after=after, batch_rows=1)) as batches:  # fmt: skip
                next(batches, None)
        except StoreError as exc:
            raise StateChangeError(
                f"{where}: value {position.value!r} does not compare with column "
                f"{position.order_by[0]!r} ({exc})"
            ) from None
    with store.transaction() as tx:
        tx.set_position(position)
        tx.commit()
