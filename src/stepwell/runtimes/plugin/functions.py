"""Plugin functions as SQL functions, spread over a pool of plugin processes.

The protocol allows one call in flight per function channel, and each call is
one IPC round trip (~200 us). A :class:`FunctionPool` therefore owns one
:class:`FunctionChannel` per plugin process (each process has its own private
``/tmp``, hence its own ``func_<symbol>.ipc``) and one host thread per channel;
a batch of calls is shared out by work stealing, so every process always has
its next call waiting the moment it answers.

For DuckDB (:func:`register_udfs`) a call site ``f(a, b)`` becomes
``CAST(CAST(sw_fn_<n>(CAST(to_json(a) AS VARCHAR), ...) AS JSON) AS VARIANT)``:
the UDF is vectorised (Arrow arrays of JSON text, up to 2048 rows per call),
and results come back as VARIANT so a function may return any JSON value.
Aggregate functions (``IsAggregate`` true) receive, per group, one list of
values per argument: the call site becomes ``sw_fn_<n>(to_json(list(a)), ...)``.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stepwell.runtimes.plugin.channels import FunctionChannel, decode_reply
from stepwell.runtimes.plugin.process import PluginError

__all__ = ["CallReplay", "FunctionPool", "UdfSite", "context_json", "json_default", "make_udf", "register_udfs"]


def json_default(value: Any) -> Any:
    """JSON for values DuckDB/Arrow hand out (Decimal, datetime, bytes...)."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return value.decode(errors="replace")
    if hasattr(value, "as_tuple"):  # Decimal
        return float(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


class _Batch:
    """Requests shared out between the pool's channel threads."""

    def __init__(self, requests: Sequence[bytes], deadline: float | None,
                 timeout: float | None = None) -> None:
        self.requests = requests
        self.deadline = deadline
        self.timeout = timeout
        self.replies: list[bytes | BaseException | None] = [None] * len(requests)
        self.next = itertools.count()
        self.remaining = len(requests)
        self.lock = threading.Lock()
        self.done = threading.Event()
        if not requests:
            self.done.set()

    def finished(self, count: int) -> None:
        """``count`` more replies are in."""
        if count:
            with self.lock:
                self.remaining -= count
                if self.remaining == 0:
                    self.done.set()

    def fail_rest(self, error: BaseException) -> None:
        """Answer every request no channel has taken yet with ``error``."""
        count = 0
        for i in self.next:
            if i >= len(self.requests):
                break
            self.replies[i] = error
            count += 1
        self.finished(count)


class FunctionPool:
    """One function symbol served by several plugin processes."""

    def __init__(self, symbol: str, channels: list[FunctionChannel]) -> None:
        if not channels:
            raise ValueError("a function pool needs at least one channel")
        self.symbol = symbol
        self.channels = channels
        self.calls = 0
        self._turns = itertools.count()
        self._is_aggregate: bool | None = None
        self._queues: list[list[_Batch]] = [[] for _ in channels]
        self._cond = threading.Condition()
        self._closed = False
        #: called with the new channels when the pool grows (rules watch their processes)
        self.on_grow: list[Callable[[list[FunctionChannel]], None]] = []
        self._start_threads(0)

    def _start_threads(self, first: int) -> None:
        for i in range(first, len(self.channels)):
            threading.Thread(target=self._serve, args=(i,), name=f"fn-{self.symbol}-{i}",
                             daemon=True).start()  # fmt: skip

    def grow(self, channels: list[FunctionChannel]) -> None:
        """Serve on ``channels`` too (more processes of the plugin). In place: every
        rule holding this pool then spreads its calls over them."""
        with self._cond:
            first = len(self.channels)
            self.channels = [*self.channels, *channels]  # (new lists: readers never see them half-made)
            self._queues = [*self._queues, *([] for _ in channels)]
            self._start_threads(first)
            listeners = list(self.on_grow)
        for listener in listeners:
            listener(channels)

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def closed(self) -> bool:
        """Whether it stopped serving (:meth:`close`): every call fails."""
        return self._closed

    def _serve(self, index: int) -> None:
        channel = self.channels[index]
        queue = self._queues[index]
        while True:
            with self._cond:
                while not queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = queue.pop(0)
            requests, replies = batch.requests, batch.replies
            total = len(requests)
            finished = 0
            for i in batch.next:
                if i >= total:
                    break
                if self._closed:  # (the rest: ``close`` answers them)
                    replies[i] = self.not_served()
                else:
                    try:
                        replies[i] = channel.call(requests[i], batch.deadline, batch.timeout)
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        replies[i] = exc
                finished += 1
            batch.finished(finished)

    def not_served(self) -> PluginError:
        """The error of a call to this pool once it is closed."""
        return PluginError(f"function {self.symbol!r} is no longer served: its plugin was "
                           f"stopped (removed, or the host is shutting down)")  # fmt: skip

    def call_raw(self, requests: Sequence[bytes], deadline: float | None = None,
                 timeout: float | None = None, *, errors: bool = False) -> list[Any]:
        """Send every request, spread over all channels; replies in request order.
        Each call ends by ``deadline`` (``time.monotonic()``), if given, and takes
        at most ``timeout`` seconds (see ``FunctionChannel.call``). A failed call
        raises, after all were made; with ``errors`` its exception is in its place."""
        if self._closed:
            raise self.not_served()
        if len(requests) == 1 and not errors:  # no hand-off for a lone call; the channels
            channels = self.channels  # take turns (lone calls of several rules all went to one)
            channel = channels[next(self._turns) % len(channels)]
            return [channel.call(requests[0], deadline, timeout)]
        batch = _Batch(requests, deadline, timeout)
        with self._cond:
            if self._closed:
                raise self.not_served()
            for queue in self._queues:
                queue.append(batch)
            self._cond.notify_all()
        batch.done.wait()
        if errors:
            return list(batch.replies)
        out: list[bytes] = []
        for reply in batch.replies:
            if isinstance(reply, BaseException):
                raise reply
            assert reply is not None
            out.append(reply)
        return out

    def exec_many(
        self, rows: Sequence[Sequence[Any]], context: str, replay: CallReplay | None = None,
        deadline: float | None = None, timeout: float | None = None,
    ) -> list[Any]:
        """``Exec`` for each argument list in ``rows``; raises on the first failed call
        (every call is made first). ``replay`` keeps or reuses the replies; calls end
        by ``deadline`` (see ``call_raw``)."""
        tail = json.dumps(context)
        requests = [
            b'{"func": "Exec", "arg": '
            + (json.dumps(list(args), default=json_default)[:-1]
               + (", " if args else "") + tail + "]").encode()
            + b"}"
            for args in rows
        ]
        replies = (replay.call(self, requests, timeout) if replay is not None
                   else self._counted(requests, deadline, timeout))
        plugin = self.channels[0].process.plugin.name
        return [decode_reply(reply, self.symbol, plugin) for reply in replies]

    def _counted(self, requests: Sequence[bytes], deadline: float | None = None,
                 timeout: float | None = None, *, errors: bool = False) -> list[Any]:
        replies = self.call_raw(requests, deadline, timeout, errors=errors)
        self.calls += len(replies)
        return replies

    def exec(self, args: Sequence[Any], context: str) -> Any:
        return self.exec_many([args], context)[0]

    def validate(self, arg_nodes: list[Any]) -> str | None:
        """Run the plugin's ``validate``; returns the error text, or None when valid."""
        reply = json.loads(self.channels[0].call(
            json.dumps({"func": "Validate", "arg": arg_nodes}).encode()))
        if reply.get("state"):
            return None
        result = reply.get("result")
        if result is None:  # (the SDK accepts only "": a validate() that is just `pass`)
            return ("validation failed: its validate() returned None; return '' to accept the "
                    "arguments, or the reason to refuse them")  # fmt: skip
        return str(result)

    def is_aggregate(self) -> bool:
        if self._is_aggregate is None:
            result = self.channels[0].request("IsAggregate", None)
            self._is_aggregate = bool(result)
        return self._is_aggregate

    def close(self) -> None:
        """Stop serving: calls waiting or in flight end with an error at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            waiting = {id(b): b for queue in self._queues for b in queue}.values()
            for queue in self._queues:
                queue.clear()
        for batch in waiting:
            batch.fail_rest(self.not_served())
        for channel in self.channels:
            channel.close()


class CallReplay:
    """The plugin's replies to a query that may fail, for running it again on parts
    of its events: their calls are then answered from what the plugin already said,
    so a function runs once per event even though the query ran several times (a
    function with side effects, a counter say, sees each event once). Between
    ``record`` and ``clear`` replies are kept; after ``replay`` calls are answered
    from them, and the answers are kept again for the next ``replay``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: list[tuple[str, Sequence[bytes], list[bytes]]] | None = None
        self._kept: dict[tuple[str, bytes], collections.deque[bytes]] | None = None

    def call(self, pool: FunctionPool, requests: Sequence[bytes],
             timeout: float | None = None) -> list[bytes]:
        """The replies to ``requests``: kept ones while replaying, else the plugin's.
        A call that failed (timed out, say) is kept as its exception, raised again
        when replayed, so a hung call is not made again."""
        if self._kept is None:
            replies = pool._counted(requests, None, timeout, errors=True)
        else:
            with self._lock:
                out: list[bytes | None] = []
                for request in requests:
                    kept = self._kept.get((pool.symbol, request))
                    out.append(kept.popleft() if kept else None)
            missing = [request for request, reply in zip(requests, out, strict=True) if reply is None]
            fresh = iter(pool._counted(missing, None, timeout, errors=True) if missing else [])
            replies = [reply if reply is not None else next(fresh) for reply in out]
        with self._lock:
            if self._made is not None:
                self._made.append((pool.symbol, requests, replies))
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    def record(self) -> None:
        """Keep the replies from now on."""
        with self._lock:
            self._made, self._kept = [], None

    def replay(self) -> None:
        """Answer calls from the replies kept since ``record`` or the last ``replay``
        (each used once), keeping these answers for the next ``replay``."""
        with self._lock:
            self._kept = collections.defaultdict(collections.deque)
            for symbol, requests, replies in self._made or []:
                for request, reply in zip(requests, replies, strict=True):
                    self._kept[(symbol, request)].append(reply)
            self._made = []

    def clear(self) -> None:
        """Forget every reply; calls go to the plugin again, nothing is kept."""
        with self._lock:
            self._made = self._kept = None


@dataclass
class UdfSite:
    """One call site of a plugin function in a query."""

    udf_name: str
    symbol: str
    arity: int
    aggregate: bool
    context: str  # JSON string of {"ruleId", "opId", "instanceId", "funcId"}
    #: seconds a call may take (None: the channel's CALL_TIMEOUT)
    timeout: float | None = None


def make_udf(
    pool: FunctionPool, site: UdfSite, replay: CallReplay | None = None,
    deadline: float | None = None,
) -> Any:
    """A DuckDB Arrow UDF for ``site``: JSON text in, JSON text out, per 2048-row chunk.
    Its calls end by ``deadline`` (DuckDB may run it on any of its threads, so the
    deadline goes with the function, not with the thread that ran the query)."""
    import pyarrow as pa

    loads = json.loads

    def udf(*columns: Any) -> Any:
        values = [column.to_pylist() for column in columns]
        if site.arity == 0:  # called with one dummy column that only gives the row count
            args: list[list[Any]] = [[] for _ in values[0]]
        else:
            args = [[None if v is None else loads(v) for v in row] for row in zip(*values, strict=True)]
        results = pool.exec_many(args, site.context, replay, deadline, site.timeout)
        return pa.array(
            [None if r is None else json.dumps(r, default=json_default) for r in results],
            pa.string(),
        )

    # DuckDB reads the arity from the signature, so build one with named parameters
    names = ", ".join(f"a{i}" for i in range(max(site.arity, 1)))
    return eval(f"lambda {names}: udf({names})", {"udf": udf})  # noqa: S307 - fixed template


def register_udfs(
    con: Any, sites: Sequence[UdfSite], pools: dict[str, FunctionPool],
    replay: CallReplay | None = None, deadline: float | None = None,
) -> None:
    """Register one DuckDB function per call site on connection ``con`` (see ``make_udf``)."""
    for site in sites:
        params = ["VARCHAR"] * max(site.arity, 1)
        con.create_function(
            site.udf_name,
            make_udf(pools[site.symbol], site, replay, deadline),
            params,
            "VARCHAR",
            type="arrow",
            null_handling="special",
            side_effects=True,
        )


def context_json(rule_id: str, op_id: str, func_id: int) -> str:
    return json.dumps({"ruleId": rule_id, "opId": op_id, "instanceId": 0, "funcId": func_id})

