"""Which rows a stream may read yet: none at or above an id still in flight.

Ids are handed out when rows are written but become visible only at commit, so
a transaction that commits late could make rows appear *behind* a stream's
position, and the stream would never read them. Every open transaction of this
process registers the first id it handed out; a stream reads only rows below
the smallest such id (the rest on a later read, once everything before them has
committed or rolled back). A store that several hosts write at once adds the
same bound across hosts (``Transaction.lease_ids``).
"""

from __future__ import annotations

import threading

import pyarrow as pa

from stepwell.store import ids

_in_flight: dict[int, str] = {}
_lock = threading.Lock()


def new_ids_in_flight(owner: object, n: int) -> pa.Array:
    """``n`` new ids for ``owner``'s open transaction, its first one registered."""
    with _lock:  # ids and registration together, or a scan could slip between
        new = ids.new_ids(n)
        if n:
            _in_flight.setdefault(id(owner), new[0].as_py())
    return new


def in_flight_done(owner: object) -> None:
    """``owner``'s transaction committed or rolled back."""
    with _lock:
        _in_flight.pop(id(owner), None)


def watermark() -> str | None:
    """Streams may read rows whose patterns_id is below this (None: no limit)."""
    with _lock:
        return min(_in_flight.values(), default=None)
