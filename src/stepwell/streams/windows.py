"""Cutting a stream of events into window panes (eKuiper's five window kinds).

Time windows are aligned to natural time (multiples of their size or hop
since the epoch, in ms) and contain events with ``start <= ts < end``. A
pane is emitted once the watermark passes its end: the wall clock in
processing time, ``max event time - lateTolerance`` in event time. Sliding
windows fire on each event (after ``delay`` ms) and hold the events of
``(t - size, t + delay]``; session windows close after ``timeout`` ms without
events or when they reach their maximum duration; count windows emit every
``count`` events, or the last ``count`` events every ``interval`` events.

Windowers only buffer and cut; the rule engine runs the SQL on each pane.
``emitted_until`` survives restarts (it is committed with the rule's output),
so replayed events never produce a pane twice.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from stepwell.streams.parser import WindowSpec

__all__ = ["Event", "Pane", "Windower", "make_windower"]


@dataclass
class Event:
    ts: int
    """Event time or arrival time in ms since the epoch."""
    row: dict[str, Any]
    seq: int = 0
    """Arrival order inside the rule (used to know which events are still buffered)."""
    position: Any = None
    """Source position (table streams): committed once no pane needs the event any more."""
    arrived: float = 0.0
    """time.monotonic() at arrival, for latency metrics."""
    meta: dict[str, Any] | None = None
    """The source's metadata for this event (``meta()`` in rule SQL)."""


@dataclass
class Pane:
    start: int | None
    end: int | None
    events: list[Event] = field(default_factory=list)


class Windower:
    """Base class: buffer events, return closed panes."""

    def __init__(self, spec: WindowSpec, emitted_until: int | None = None) -> None:
        self.spec = spec
        self.emitted_until = emitted_until
        self.buffer: list[Event] = []
        self.late = 0

    def add(self, event: Event) -> list[Pane]:
        raise NotImplementedError

    def advance(self, watermark: int) -> list[Pane]:
        return []

    def oldest_seq(self) -> int | None:
        return min((e.seq for e in self.buffer), default=None)

    def state(self) -> dict[str, Any]:
        return {"emitted_until": self.emitted_until}


class _TimeWindower(Windower):
    """Tumbling (hop = size) and hopping windows."""

    def __init__(self, spec: WindowSpec, emitted_until: int | None = None) -> None:
        super().__init__(spec, emitted_until)
        self.size = spec.size
        self.hop = spec.hop or spec.size
        self._keys: list[int] = []  # buffer timestamps, sorted

    def add(self, event: Event) -> list[Pane]:
        if self.emitted_until is not None and event.ts < self.emitted_until - self.size + self.hop:
            self.late += 1  # every window it belongs to was already emitted
            return []
        index = bisect.bisect_right(self._keys, event.ts)
        self._keys.insert(index, event.ts)
        self.buffer.insert(index, event)
        return []

    def advance(self, watermark: int) -> list[Pane]:
        panes = []
        while self.buffer:
            after = self._keys[0]
            if self.emitted_until is not None:
                after = max(after, self.emitted_until)
            end = self._next_end_after(after)
            if end > watermark:
                break
            start = end - self.size
            lo = bisect.bisect_left(self._keys, start)
            hi = bisect.bisect_left(self._keys, end)
            if hi > lo:
                panes.append(Pane(start, end, self.buffer[lo:hi]))
            self.emitted_until = end
            keep_from = bisect.bisect_left(self._keys, end - self.size + self.hop)
            del self._keys[:keep_from], self.buffer[:keep_from]
        return panes

    def _next_end_after(self, t: int) -> int:
        """The smallest window end strictly after ``t`` (windows start at multiples of hop)."""
        k = (t - self.size) // self.hop + 1
        return k * self.hop + self.size


class _SlidingWindower(Windower):
    def __init__(self, spec: WindowSpec, emitted_until: int | None = None) -> None:
        super().__init__(spec, emitted_until)
        self.pending: list[int] = []  # trigger times waiting for their delay

    def add(self, event: Event) -> list[Pane]:
        if self.emitted_until is not None and event.ts <= self.emitted_until - self.spec.size:
            self.late += 1
            return []
        index = bisect.bisect_right([e.ts for e in self.buffer], event.ts)
        self.buffer.insert(index, event)
        if self.emitted_until is not None and event.ts <= self.emitted_until:
            return []  # replayed: its pane was emitted already
        if self.spec.delay:
            self.pending.append(event.ts)
            return []
        return [self._pane(event.ts, event.ts)]

    def _pane(self, trigger: int, upto: int) -> Pane:
        lo = trigger - self.spec.size
        events = [e for e in self.buffer if lo < e.ts <= upto]
        self.emitted_until = trigger
        oldest_needed = min([*self.pending, trigger]) - self.spec.size
        self.buffer = [e for e in self.buffer if e.ts > oldest_needed]
        return Pane(lo, upto, events)

    def advance(self, watermark: int) -> list[Pane]:
        panes = []
        while self.pending and self.pending[0] + self.spec.delay <= watermark:
            trigger = self.pending.pop(0)
            panes.append(self._pane(trigger, trigger + self.spec.delay))
        return panes


class _SessionWindower(Windower):
    def add(self, event: Event) -> list[Pane]:
        panes = []
        if self.emitted_until is not None and event.ts <= self.emitted_until:
            self.late += 1
            return []
        if self.buffer:
            first, last = self.buffer[0].ts, self.buffer[-1].ts
            if event.ts - last >= self.spec.size or event.ts - first >= (self.spec.hop or 0):
                panes.append(self._close())
        self.buffer.append(event)
        return panes

    def _close(self) -> Pane:
        pane = Pane(self.buffer[0].ts, self.buffer[-1].ts + self.spec.size, self.buffer)
        self.emitted_until = self.buffer[-1].ts
        self.buffer = []
        return pane

    def advance(self, watermark: int) -> list[Pane]:
        if self.buffer and watermark - self.buffer[-1].ts >= self.spec.size:
            return [self._close()]
        return []


class _CountWindower(Windower):
    def __init__(self, spec: WindowSpec, emitted_until: int | None = None) -> None:
        super().__init__(spec, emitted_until)
        self.since_trigger = 0

    def add(self, event: Event) -> list[Pane]:
        self.buffer.append(event)
        if len(self.buffer) > self.spec.size:
            del self.buffer[0]
        if self.spec.hop is None:
            if len(self.buffer) == self.spec.size:
                pane = Pane(None, None, self.buffer)
                self.buffer = []
                return [pane]
            return []
        self.since_trigger += 1
        if self.since_trigger >= self.spec.hop and len(self.buffer) == self.spec.size:
            self.since_trigger = 0
            return [Pane(None, None, list(self.buffer))]
        return []

    def state(self) -> dict[str, Any]:
        return {"emitted_until": None}


def make_windower(spec: WindowSpec, state: dict[str, Any] | None = None) -> Windower:
    """A windower for ``spec``, resuming from a committed ``state``."""
    emitted = (state or {}).get("emitted_until")
    if spec.kind in ("tumbling", "hopping"):
        return _TimeWindower(spec, emitted)
    if spec.kind == "sliding":
        return _SlidingWindower(spec, emitted)
    if spec.kind == "session":
        return _SessionWindower(spec, emitted)
    return _CountWindower(spec, emitted)
