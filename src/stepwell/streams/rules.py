"""The rule engine: eKuiper rules run on DuckDB over micro-batches of events.

``RuleEngine(app_root, store)`` keeps rule definitions in the app store and
runs them. Each running rule (:class:`RuleRuntime`) has:

* one input: a plugin source (a :class:`SourceChannel` started for this rule,
  as eKuiper does) or a stepwell table whose newly committed rows are read in
  ``patterns_id`` order from the rule's committed offset;
* a private in-memory DuckDB connection (never the store's) holding the
  compiled query and one UDF per plugin-function call site;
* micro-batching: events are processed once ``batchSize`` have arrived or
  ``lingerMs`` after the first one (default 10 ms, so latency at low rates
  stays far below 100 ms); windowed rules cut events into panes first;
* actions: plugin sinks (``requireAck`` honoured), ``log``, and ``table``.
  Table writes, the rule's input offset and its window state are committed
  in one store transaction (:class:`StagedRun`), so after a crash the rule
  resumes exactly where its last committed output ends: nothing lost, nothing
  written twice.

Store keys (state of reserved step names): ``rules:index`` (ids),
``rule-def:<id>`` (definition and desired status), ``rule:<id>`` (window
state, committed with output, plus the input offset as a stream position) and
``rule-status:<id>`` (last metrics snapshot).
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from stepwell.runtimes.plugin.functions import (
    CallReplay,
    UdfSite,
    context_json,
    json_default,
    register_udfs,
)
from stepwell.runtimes.plugin.manager import PluginManager, shared_manager
from stepwell.store.base import Store
from stepwell.store.sql import quote
from stepwell.streams.parser import (
    EVENTS_TABLE,
    WINDOW_TABLE,
    CompiledRule,
    RuleDef,
    StreamDef,
    StreamError,
    compile_rule,
    load_rule_file,
    load_stream_file,
    meta_column,
    parse_rule,
)
from stepwell.streams.windows import Event, Pane, Windower, make_windower

__all__ = ["RuleEngine", "RuleError", "RuleMetrics", "RuleRuntime", "result_rows", "rows_to_arrow"]

log = logging.getLogger("stepwell.rules")

INDEX_KEY = "rules:index"
#: eKuiper's default bufferLength: events of a plugin source a rule holds at most
DEFAULT_BUFFER_LENGTH = 1024
_ARROW_TYPES = {
    "bigint": pa.int64(), "float": pa.float64(), "string": pa.string(), "boolean": pa.bool_(),
    "datetime": pa.timestamp("ms"), "bytea": pa.binary(),
}


class RuleError(RuntimeError):
    """A rule cannot be created, started or found; the message says what to do."""


class RuleNotFound(RuleError):
    """No rule has the id asked for."""


class _Undelivered(Exception):
    """The rule stopped before a batch's results reached a sink: nothing of the
    batch is committed."""


class _DeliveryFailed(_Undelivered):
    """A sink failed on a batch's results after its retries: the rule fails and
    nothing of the batch is committed."""


def _shown(payload: Any, limit: int = 120) -> str:
    """A payload or event for an error message, cut to ``limit`` characters."""
    text = payload.decode(errors="replace") if isinstance(payload, bytes) else json.dumps(
        payload, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def def_key(rule_id: str) -> str:
    return f"rule-def:{rule_id}"


def state_key(rule_id: str) -> str:
    return f"rule:{rule_id}"


def status_key(rule_id: str) -> str:
    return f"rule-status:{rule_id}"


# -- data conversion -------------------------------------------------------------------


def _column(values: list[Any], type_: pa.DataType | None = None) -> pa.Array:
    if type_ is not None:
        try:
            return pa.array(values, type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            pass
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array(
            [None if v is None else v if isinstance(v, str) else json.dumps(v, default=json_default)
             for v in values],
            pa.string(),
        )


def rows_to_arrow(rows: list[dict[str, Any]], declared: dict[str, pa.DataType] | None = None,
                  extra: Iterable[str] = ()) -> pa.Table:
    """An Arrow table from row dicts (union of keys; mixed-type columns become JSON text)."""
    names: dict[str, None] = {}
    for name in declared or {}:
        names[name] = None
    for row in rows:
        for key in row:
            names.setdefault(key, None)
    for name in extra:
        names.setdefault(name, None)
    arrays, fields = [], []
    for name in names:
        array = _column([row.get(name) for row in rows], (declared or {}).get(name))
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    if not fields:
        return pa.table({"__sw_empty": pa.nulls(len(rows))})
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _meta_values(meta: dict[str, Any] | None, keys: Iterable[str]) -> dict[str, Any]:
    """The events table's ``meta()`` columns for one event's source metadata."""
    meta = meta or {}
    return {meta_column(k): (meta or None) if k == "*" else meta.get(k) for k in keys}


def result_rows(relation: Any) -> list[dict[str, Any]]:
    """Rows of a DuckDB relation as dicts (VARIANT values become plain Python values)."""
    if relation is None:
        return []
    names = relation.columns
    return [dict(zip(names, row, strict=True)) for row in relation.fetchall()]


def _to_ms(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return int(value.timestamp() * 1000)
    if isinstance(value, str):
        try:
            return _to_ms(dt.datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def _what_failed(exc: Exception) -> str:
    """What a failed query says (DuckDB wraps what a function raised: keep that)."""
    text = str(exc)
    _, found, inner = text.partition("exception occurred while executing the UDF: ")
    return inner if found else f"{type(exc).__name__}: {text}"


@functools.cache
def _sql_functions() -> frozenset[str]:
    """The names of DuckDB's functions and macros (read once)."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        rows = con.sql("SELECT DISTINCT function_name FROM duckdb_functions()").fetchall()
    finally:
        con.close()
    return frozenset(str(name).lower() for (name,) in rows)


# -- metrics -------------------------------------------------------------------------------


@dataclass
class RuleMetrics:
    records_in: int = 0
    records_out: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: str | None = None
    latency_ms_last: float = 0.0
    latency_ms_avg: float = 0.0
    latency_ms_max: float = 0.0
    batches: int = 0
    late_events: int = 0
    acks_ok: int = 0
    acks_error: int = 0
    started_at: str | None = None
    last_output_at: str | None = None
    #: exits of plugin processes the rule uses that the host did not ask for
    plugin_crashes: int = 0
    #: times those processes were started again (after a crash or a kill by the host)
    plugin_restarts: int = 0
    #: plugin-source events never processed: they came while the rule's buffer was
    #: full (bufferLength), or were still waiting when the rule stopped
    dropped: int = 0

    def error(self, text: str) -> None:
        self.errors += 1
        self.last_error = text
        self.last_error_at = _now_iso()

    def latency(self, seconds: float) -> None:
        ms = seconds * 1000
        self.latency_ms_last = round(ms, 3)
        self.latency_ms_max = round(max(self.latency_ms_max, ms), 3)
        self.latency_ms_avg = round(ms if not self.batches else 0.9 * self.latency_ms_avg + 0.1 * ms, 3)


def checked_buffer_length(value: Any, where: str) -> int:
    """``value`` as a bufferLength (a whole number of events, at least 1), or a RuleError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RuleError(f"{where}: option bufferLength must be a whole number of events, at "
                        f"least 1 (default {DEFAULT_BUFFER_LENGTH}), not {value!r}")
    return value


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# -- actions -------------------------------------------------------------------------------


class _Action:
    name = "action"

    def start(self) -> None:
        pass

    def emit(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        """The rule is stopping: stop waiting on anything outside (before ``stop``)."""

    def stop(self) -> None:
        pass


class _SinkAction(_Action):
    def __init__(self, runtime: RuleRuntime, index: int, symbol: str, props: dict[str, Any]) -> None:
        self.runtime, self.symbol, self.props = runtime, symbol, props
        self.name = symbol
        self.op_id = f"{symbol}_{index}"
        self.send_single = bool(props.get("sendSingle", False))
        #: eKuiper's sink properties for failed deliveries
        self.retry_count = max(int(props.get("retryCount", 3)), 0)
        self.retry_interval = max(float(props.get("retryInterval", 1000)), 0) / 1000
        self.channel: Any = None

    def start(self) -> None:
        from stepwell.runtimes.plugin.channels import meta

        self.channel = self.runtime.manager.sink(
            self.symbol, meta(self.runtime.rule.id, self.op_id), dict(self.props)
        )

    def emit(self, rows: list[dict[str, Any]]) -> None:
        payloads = rows if self.send_single else [rows]
        for payload in payloads:
            self._deliver(json.dumps(payload, default=json_default, separators=(",", ":")).encode())

    def _deliver(self, data: bytes) -> None:
        """Send one payload; a failed delivery is retried ``retryCount`` times,
        ``retryInterval`` ms apart (a sink its plugin closed is started again first).
        Raises :class:`_DeliveryFailed` when it still fails, :class:`_Undelivered`
        when the rule stops meanwhile."""
        from stepwell.runtimes.plugin.channels import SinkFailed, SinkInterrupted, SinkRefused

        metrics, what = self.runtime.metrics, self.channel.what
        for attempt in range(1, self.retry_count + 2):
            try:
                self.channel.send(data)
            except SinkInterrupted as exc:
                raise _Undelivered(f"{what}: {exc}") from None
            except SinkFailed as exc:
                if self.channel.require_ack or isinstance(exc, SinkRefused):
                    metrics.acks_error += 1
                if attempt > self.retry_count:
                    raise _DeliveryFailed(f"{what} failed {attempt} times on a payload "
                                          f"({_shown(data)}), last: {exc}") from None
                metrics.error(f"{what}: {exc}; retry {attempt} of {self.retry_count} in "
                              f"{self.retry_interval:g}s ({_shown(data)})")
                self._recover(exc)
                continue
            if self.channel.require_ack:
                metrics.acks_ok += 1
            return

    def _recover(self, exc: Exception) -> None:
        """Wait ``retryInterval`` and make the sink take payloads again."""
        from stepwell.runtimes.plugin.channels import SinkFailed, SinkInterrupted, SinkRefused

        if self.runtime._stopping.wait(self.retry_interval):
            raise _Undelivered(f"{self.channel.what}: the rule stopped while retrying: {exc}")
        if isinstance(exc, SinkRefused):
            return  # (the sink runs: it refused this payload)
        try:
            done = self.channel.recover()
        except SinkInterrupted as again:
            raise _Undelivered(f"{self.channel.what}: {again}") from None
        except SinkFailed as again:
            raise _DeliveryFailed(f"{self.channel.what}: {again} after: {exc}") from None
        log.info("rule %s: %s %s", self.runtime.rule.id, self.channel.what, done)

    def interrupt(self) -> None:
        if self.channel is not None:
            self.channel.interrupt()

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.stop()


class _LogAction(_Action):
    name = "log"

    def __init__(self, runtime: RuleRuntime) -> None:
        self.runtime = runtime
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.logger = logging.getLogger(f"stepwell.rule.{runtime.rule.id}")

    def emit(self, rows: list[dict[str, Any]]) -> None:
        text = json.dumps(rows, default=json_default)
        self.lines.append(text)
        self.logger.info("sink result for rule %s: %s", self.runtime.rule.id, text)


class _TableAction(_Action):
    name = "table"

    def __init__(self, table: str) -> None:
        self.table = table
        self.pending: list[dict[str, Any]] = []

    def emit(self, rows: list[dict[str, Any]]) -> None:
        self.pending.extend(rows)


# -- one running rule ----------------------------------------------------------------------


@dataclass
class _Lookup:
    """A lookup table a rule JOINs, and its rows as last read (None: read them)."""

    name: str
    #: the stepwell table it reads
    table: str
    rows: pa.Table | None = None
    read_at: float = 0.0


class RuleRuntime:
    """A started rule: input, micro-batch loop, DuckDB query, actions."""

    def __init__(self, engine: RuleEngine, rule: RuleDef, stream: StreamDef) -> None:
        self.engine, self.rule, self.stream = engine, rule, stream
        self.store = engine.store
        self.manager = engine.manager
        options = rule.options
        self.batch_size = int(options.get("batchSize", 1000))
        self.linger = float(options.get("lingerMs", 10)) / 1000
        self.event_time = bool(options.get("isEventTime", False))
        self.late_tolerance = int(options.get("lateTolerance", 0))
        self.processes = options.get("functionProcesses")
        #: a plugin function call unanswered this long is dropped and its process
        #: killed (eKuiper's function timeout is 5 s)
        self.function_timeout = float(options.get("functionTimeoutMs", 5000)) / 1000
        self.poll_interval = float(options.get("pollIntervalMs", 200)) / 1000
        #: a lookup table is read again after this long even without a commit notice
        #: (commits by other processes), and at once after one
        self.lookup_refresh = float(options.get("lookupRefreshMs", 1000)) / 1000
        #: the lookup tables the rule JOINs, by DuckDB relation name
        self._lookups: dict[str, _Lookup] = {}
        self.metrics = RuleMetrics()
        self.status = "stopped"
        self.compiled: CompiledRule | None = None
        self.actions: list[_Action] = []
        self._queue: collections.deque[Event] = collections.deque()
        #: most events of a plugin source waiting to be processed (eKuiper's
        #: bufferLength); set from the rule's options or the source's config at start
        self.buffer_length = DEFAULT_BUFFER_LENGTH
        #: events dropped in the current burst of a full buffer (0: none going on),
        #: and when the last one was
        self._burst = 0
        self._last_drop = 0.0
        #: when a stop gives up processing the events still waiting
        self._stop_deadline = float("inf")
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._source: Any = None
        self._seq = 0
        self._con: Any = None
        #: replies of a failed batch, reused when its events are queried one by one
        self._replay = CallReplay()
        self._windower: Windower | None = None
        self._declared = {name: _ARROW_TYPES[t] for name, t in stream.fields if t in _ARROW_TYPES}
        self._positions: collections.deque[tuple[int, Any]] = collections.deque()
        self._committed_position: Any = None
        self._table_version: int | None = None
        self._read_after: str | None = None
        self._last_status_save = 0.0
        self._wake = threading.Event()
        #: how long a stop waits for the batch in flight to reach the sinks
        self.stop_timeout = float(options.get("stopTimeoutMs", 5000)) / 1000
        self._stopped = False
        #: set by a stop that gave up waiting for the loop (stuck in a call, say): the
        #: batch it still holds must not be committed, as a restarted rule reads it again
        self._given_up = False
        self._commit_lock = threading.Lock()
        #: (plugin process, callback) pairs telling this rule of its plugins' crashes
        self._watching: list[tuple[Any, Callable[[Any], None]]] = []
        #: the function pools its query calls, by symbol
        self._pools: dict[str, Any] = {}

    # -- lifecycle
    def start(self) -> None:
        import duckdb

        self.compiled = self.engine.compile(self.rule)
        self._lookups = {relation: _Lookup(name, self.engine.streams[name].datasource)
                         for relation, name in self.compiled.lookups.items()}  # fmt: skip
        self._con = duckdb.connect(":memory:")
        self._con.execute("SET TimeZone = 'UTC'")
        pools = {s.symbol: self.manager.function_pool(s.symbol, self.processes)
                 for s in self.compiled.functions}
        self._pools = pools
        sites = [UdfSite(s.udf_name, s.symbol, s.arity, s.aggregate,
                         context_json(self.rule.id, "project", s.func_id), self.function_timeout)
                 for s in self.compiled.functions]
        register_udfs(self._con, sites, pools, self._replay)
        state = self.store.get_state(state_key(self.rule.id))
        if self.compiled.window is not None:
            self._windower = make_windower(self.compiled.window, state.get("window"))
        self.actions = []
        for index, (kind, props) in enumerate(self.rule.actions):
            if kind == "log":
                self.actions.append(_LogAction(self))
            elif kind == "table":
                self.actions.append(_TableAction(str(props["name"])))
            else:
                self.actions.append(_SinkAction(self, index, kind, props))
        started: list[_Action] = []
        try:
            for action in self.actions:
                action.start()
                started.append(action)
            self.metrics.started_at = _now_iso()
            self._stopping.clear()
            loop = threading.Thread(target=self._loop, name=f"rule-{self.rule.id}", daemon=True)
            self._threads = [loop]
            self._start_input()
        except BaseException:
            for action in started:
                action.stop()
            self._stop_input()
            raise
        self._watch_plugins()
        self.status = "running"
        loop.start()

    # -- the plugin processes it uses
    def _plugin_uses(self) -> dict[Any, dict[str, str]]:
        """Each plugin process the rule uses -> {key of a symbol it started there:
        what it is to the rule, e.g. "source 'counter'"}."""
        uses: dict[Any, dict[str, str]] = collections.defaultdict(dict)
        if self._source is not None:
            uses[self._source.process][self._source.key] = f"source {self._source.symbol!r}"
        for action in self.actions:
            if isinstance(action, _SinkAction) and action.channel is not None:
                uses[action.channel.process][action.channel.key] = f"sink {action.symbol!r}"
        for symbol, pool in sorted(self._pools.items()):
            for channel in pool.channels:
                uses[channel.process][channel.key] = f"function {symbol!r}"
        return uses

    def _watch_plugins(self) -> None:
        for process, uses in self._plugin_uses().items():
            callback = functools.partial(self._on_plugin_event, uses)
            process.watch(callback)
            self._watching.append((process, callback))
        for pool in self._pools.values():  # (another rule may add processes to them)
            pool.on_grow.append(self._on_pool_grown)

    def _unwatch_plugins(self) -> None:
        watching, self._watching = self._watching, []
        for process, callback in watching:
            process.unwatch(callback)
        for pool in self._pools.values():
            if self._on_pool_grown in pool.on_grow:
                pool.on_grow.remove(self._on_pool_grown)

    def _on_pool_grown(self, _channels: list[Any]) -> None:
        """A function pool the rule calls has more processes now: watch them too."""
        self._unwatch_plugins()
        if not self._stopped:
            self._watch_plugins()

    def _on_plugin_event(self, uses: dict[str, str], event: Any) -> None:
        """A plugin process the rule uses crashed, was restarted, or could not be:
        count it in the rule's status (an operator sees a crash loop there)."""
        used = ", ".join(sorted(set(uses.values())))
        if event.kind == "exited" and not event.requested:
            self.metrics.plugin_crashes += 1
            self.metrics.error(f"{event.text} [it runs this rule's {used}; "
                               f"{self.metrics.plugin_crashes} plugin crashes since the rule started]")
        elif event.kind == "restarted":
            self.metrics.plugin_restarts += 1
            for key, why in event.failed.items():
                if key in uses:
                    self.metrics.error(
                        f"plugin {event.plugin!r} restarted (pid {event.pid}) but refused to start "
                        f"this rule's {uses[key]} again: {why}; it stays stopped until the rule is "
                        f"started again (`stepwell rule stop APP {self.rule.id}`, then `start`)")
        elif event.kind == "restart_failed":
            self.metrics.error(f"{event.text} [it runs this rule's {used}; it is tried again "
                               "with backoff]")

    def _start_input(self) -> None:
        if self.stream.is_table:
            positions = [p for p in self.store.get_positions(state_key(self.rule.id))
                         if p.table == self.stream.datasource]
            info = self.store.table_info(self.stream.datasource, count_rows=False)
            if positions and info is not None and positions[0].table_version == info.version:
                self._read_after = positions[0].value
                self._committed_position = positions[0].value
            thread = threading.Thread(target=self._poll_table, name=f"rule-{self.rule.id}-table",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
            return
        from stepwell.runtimes.plugin.channels import meta

        plugin = self.manager.plugin_for("source", self.stream.type)
        config = plugin.source_config(self.stream.type, self.stream.conf_key)
        self.buffer_length = self._buffer_length(config)
        for key, option in (("format", "FORMAT"), ("key", "KEY"), ("timestamp", "TIMESTAMP"),
                            ("timestampFormat", "TIMESTAMP_FORMAT")):
            if option in self.stream.options:
                config[key] = self.stream.options[option]
        self._source = self.manager.source(
            self.stream.type, meta(self.rule.id, self.stream.name), config,
            self.stream.datasource, self._on_message, self._on_source_error,
        )

    def _buffer_length(self, source_config: dict[str, Any]) -> int:
        """The rule option ``bufferLength``, else the source profile's, else 1024."""
        value = self.rule.options.get("bufferLength", source_config.get("bufferLength",
                                                                        DEFAULT_BUFFER_LENGTH))
        return checked_buffer_length(value, f"rule {self.rule.id!r}")

    def _stop_input(self) -> None:
        source, self._source = self._source, None  # (the loop may stop it too, on failure)
        if source is not None:
            source.stop()

    def stop(self) -> None:
        """Stop the input, let the loop deliver and commit the batch it holds (a
        plugin source's queued events too), then stop the sinks.

        A sink that does not take or acknowledge the batch within ``stopTimeoutMs``
        is interrupted: that batch is then not committed (a table stream reads
        it again at the next start) and the rule's errors say so."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_deadline = time.monotonic() + self.stop_timeout
        self._unwatch_plugins()  # (what the plugins do now is not this rule's doing)
        self._stop_input()
        self._stopping.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        loop = self._threads[0] if self._threads else None
        if loop is not None:
            loop.join(self.stop_timeout)
            if loop.is_alive():  # a sink that never acknowledges must not hold the stop
                for action in self.actions:
                    action.interrupt()
        for thread in self._threads:
            thread.join(10)
        if loop is not None and loop.is_alive():
            self._give_up()
        self._discard_waiting()  # (a loop still running ends without them)
        for action in self.actions:
            try:
                action.stop()
            except Exception as exc:  # noqa: BLE001 - stopping goes on
                log.warning("rule %s: stopping %s: %s", self.rule.id, action.name, exc)
        if self._con is not None and not any(t.is_alive() for t in self._threads):
            self._con.close()  # (a loop still running keeps it: it ends with the process)
        if self.status == "running":
            self.status = "stopped"
        self._write_status()

    def _give_up(self) -> None:
        """The loop did not end in time: the batch it is processing is never committed
        (a commit under way ends first), and the status says so."""
        with self._commit_lock:
            self._given_up = True
        self.metrics.error(
            f"rule {self.rule.id!r}: the stop gave up waiting for the batch being processed "
            f"(stopTimeoutMs {self.stop_timeout * 1000:g} ms, then 10 s more); it is not "
            f"committed: {self._fate()}")

    # -- input
    def _push(self, rows: list[tuple[dict[str, Any], Any]], meta: Any = None, *,
              bounded: bool = False) -> None:
        """Queue ``rows`` as events; ``bounded`` (a plugin source): only as many as
        the buffer has room for."""
        now = time.monotonic()
        wall = int(time.time() * 1000)
        meta = meta if isinstance(meta, dict) else None
        events = []
        for row, position in rows:
            ts = wall
            if self.event_time and self.stream.timestamp:
                ts = _to_ms(row.get(self.stream.timestamp)) or wall
            self._seq += 1
            events.append(Event(ts, row, self._seq, position, now, meta))
        with self._cond:
            self._queue.extend(self._within_buffer(events) if bounded else events)
            self._cond.notify_all()

    def _within_buffer(self, events: list[Event]) -> list[Event]:
        """The events the buffer has room for (called holding ``_cond``). The others
        are dropped and counted: blocking the plugin is no option (the SDK gives up a
        send after 1 s and then stops its source for good). A burst of drops is
        logged once, when it starts and when it is over: the buffer is half empty
        and nothing was dropped for a second (not each time a batch makes room)."""
        room = max(self.buffer_length - len(self._queue), 0)
        if len(events) <= room:
            if (self._burst and len(self._queue) <= self.buffer_length // 2
                    and time.monotonic() - self._last_drop >= 1.0):
                self._end_burst()
            return events
        dropped = len(events) - room
        self._last_drop = time.monotonic()
        self.metrics.dropped += dropped
        if not self._burst:
            log.warning(
                "rule %s: its buffer of %d events from source %r (stream %s) is full: new events "
                "are dropped (counted in the rule's status as dropped) until it has room; raise "
                "the rule option bufferLength, or make the rule keep up (batchSize, "
                "functionProcesses)", self.rule.id, self.buffer_length, self.stream.type,
                self.stream.name)
        self._burst += dropped
        return events[:room]

    def _end_burst(self) -> None:
        log.warning("rule %s: its buffer has room again; %d events from source %r were dropped "
                    "while it was full", self.rule.id, self._burst, self.stream.type)
        self._burst = 0

    def _discard_waiting(self, why: str = "") -> None:
        """The rule stopped (or failed: ``why``) with plugin-source events still
        waiting: drop them, saying how many (a plugin source cannot send them again)."""
        if self.stream.is_table:
            return  # (read again from the committed position at the next start)
        with self._cond:
            count = len(self._queue)
            self._queue.clear()
        if not count:
            return
        self.metrics.dropped += count
        why = why or f"not processed within stopTimeoutMs ({self.stop_timeout * 1000:g} ms)"
        text = (f"rule {self.rule.id!r} stopped with {count} events from source "
                f"{self.stream.type!r} (stream {self.stream.name}) {why}: they were discarded "
                "(a plugin source cannot send them again; counted in dropped)")
        log.warning("%s", text)
        self.metrics.error(text)

    def _on_message(self, message: Any, meta: Any) -> None:
        items = message if isinstance(message, list) else [message]
        rows = [(m, None) for m in items if isinstance(m, dict)]
        if len(rows) != len(items):
            self.metrics.error(f"source {self.stream.type!r} sent a message that is not an object")
        self._push(rows, meta, bounded=True)

    def _on_source_error(self, text: str) -> None:
        self.metrics.error(f"source {self.stream.type!r}: {text}")

    def notify(self) -> None:
        self._wake.set()

    def _poll_table(self) -> None:
        table = self.stream.datasource
        while not self._stopping.is_set():
            try:
                self._read_table(table)
            except Exception as exc:  # noqa: BLE001 - reported in the rule's status
                self.metrics.error(f"reading table {table!r}: {exc}")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def _read_table(self, table: str) -> None:
        info = self.store.table_info(table, count_rows=False)
        if info is None:
            return
        if self._table_version is not None and info.version != self._table_version:
            self._read_after = None  # table was reset: start over on the new version
        self._table_version = info.version
        if "patterns_id" not in {c.name for c in info.columns}:
            raise RuleError(f"table {table!r} has no patterns_id column to stream by")
        after = (self._read_after, None) if self._read_after is not None else None
        for batch in self.store.scan(table, order_by=["patterns_id"], after=after,
                                     batch_rows=self.batch_size, stream=True):
            rows = batch.to_pylist()
            if not rows:
                continue
            pushed = []
            for row in rows:
                pid = row.pop("patterns_id")
                pushed.append((row, pid))
            self._read_after = pushed[-1][1]
            self._push(pushed)
            while len(self._queue) > 4 * self.batch_size and not self._stopping.is_set():
                time.sleep(0.01)  # back-pressure
            if self._stopping.is_set():
                return

    # -- processing loop
    def _take(self) -> list[Event]:
        with self._cond:
            if not self._queue:
                self._cond.wait(0.05)
            if not self._queue:
                return []
            deadline = self._queue[0].arrived + self.linger
            while len(self._queue) < self.batch_size and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            count = min(len(self._queue), self.batch_size)
            return [self._queue.popleft() for _ in range(count)]

    def _loop(self) -> None:
        while True:
            if self._stopping.is_set() and (self.stream.is_table or not self._queue
                                            or time.monotonic() > self._stop_deadline):
                # (a table's rows not taken yet are read again from the committed position)
                self._discard_waiting()
                return
            events = self._take()
            try:
                self._process(events)
            except _DeliveryFailed as exc:
                self._fail(events, str(exc))
                return
            except _Undelivered as exc:
                self._abandon(events, str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - reported in the rule's status
                log.exception("rule %s: processing failed", self.rule.id)
                self._fail(events, f"{type(exc).__name__}: {exc}")
                return
            self._save_status()

    def _fate(self) -> str:
        """What becomes of results that were not committed."""
        if self.stream.is_table:
            return ("nothing of them was committed: the rule reads them again when it "
                    "starts (a sink may get some results twice)")  # fmt: skip
        return f"they are lost (plugin source {self.stream.type!r} cannot send them again)"

    def _abandon(self, events: list[Event], reason: str) -> None:
        """The rule is stopping and the batch's results did not all reach the sinks:
        commit none of it."""
        self._discard_pending()
        self._discard_waiting()  # (first: last_error is then why the batch was not delivered)
        self.metrics.error(f"rule {self.rule.id!r} stopped before the results of {len(events)} "
                           f"events were delivered ({reason}); {self._fate()}")
        self._save_status(force=True)  # (a stop that gave up on the loop saved before this)

    def _fail(self, events: list[Event], reason: str) -> None:
        """Processing a batch failed: commit none of it, stop the input and show the
        rule as failed (rather than going on past events it did not deliver)."""
        self._discard_pending()
        self.status = "failed"
        self._stopping.set()
        self._stop_input()
        self._discard_waiting("not processed, as it failed")  # (first: last_error says why)
        self.metrics.error(
            f"rule {self.rule.id!r} failed on a batch of {len(events)} events and stopped: "
            f"{reason}; {self._fate()}. Fix the cause, then start the rule again "
            f"(`stepwell rule start APP {self.rule.id}`)")
        self._save_status(force=True)

    def fail_now(self, reason: str) -> None:
        """Stop the rule and show it as failed, saying why (a plugin it uses was
        removed under it: its source would send nothing more, its sink would be
        retried for a minute, all for nothing)."""
        self.stop()
        self.status = "failed"
        self.metrics.error(f"rule {self.rule.id!r} stopped: {reason}; start it again once "
                           f"that is fixed (`stepwell rule start APP {self.rule.id}`)")
        self._write_status()

    def _discard_pending(self) -> None:
        for action in self.actions:
            if isinstance(action, _TableAction):
                action.pending.clear()

    def _process(self, events: list[Event]) -> None:
        """Query ``events`` (cut into window panes first), deliver the results to
        every action, and commit; results count as out once committed."""
        if events:
            self.metrics.records_in += len(events)
            self.metrics.batches += 1
            for event in events:
                self._positions.append((event.seq, event.position))
        emissions = self._emissions(events)
        for rows, _arrived in emissions:
            for action in self.actions:
                try:
                    action.emit(rows)
                except _Undelivered:
                    raise
                except Exception as exc:  # noqa: BLE001 - one failing sink does not stop the rule
                    self.metrics.error(f"action {action.name!r}: {exc}")
        self._commit(bool(emissions))
        for rows, arrived in emissions:
            self.metrics.records_out += len(rows)
            self.metrics.latency(time.monotonic() - arrived)
            self.metrics.last_output_at = _now_iso()

    def _emissions(self, events: list[Event]) -> list[tuple[list[dict[str, Any]], float]]:
        """The result rows to emit for ``events``, each with when its oldest event arrived."""
        assert self.compiled is not None
        emissions: list[tuple[list[dict[str, Any]], float]] = []
        # (outside the event-by-event fallback: a missing lookup table fails the
        # batch, it does not drop each event)
        for relation, lookup in self._lookups.items():
            self._con.register(relation, self._lookup_rows(lookup))
        if self._windower is None:
            if events:
                rows = self._rows_of(events)
                oldest = min(e.arrived for e in events)
                emissions.extend(([row], oldest) for row in rows)
            return emissions
        panes: list[Pane] = []
        for event in events:
            panes.extend(self._windower.add(event))
        if self.compiled.window and self.compiled.window.kind != "count":
            if self.event_time:
                if events:
                    watermark = max(e.ts for e in events) - self.late_tolerance
                    self._watermark = max(getattr(self, "_watermark", watermark), watermark)
                if hasattr(self, "_watermark"):
                    panes.extend(self._windower.advance(self._watermark))
            else:
                panes.extend(self._windower.advance(int(time.time() * 1000)))
        self.metrics.late_events = self._windower.late
        for pane in panes:
            if not pane.events:
                continue
            rows = self._rows_of(pane.events, pane)
            if rows:
                emissions.append((rows, max(e.arrived for e in pane.events)))
        return emissions

    def _rows_of(self, events: list[Event], pane: Pane | None = None) -> list[dict[str, Any]]:
        """The rule's rows for ``events`` (of window ``pane``, if any). When the query
        fails (a function raising on one event, say), each event is queried alone to
        find the ones that fail; only those are dropped, each counted as an error
        naming it, and a window is then queried again without them. Functions are
        not called twice for an event: the calls of the failed query are answered
        again from the replies kept (``CallReplay``)."""
        self._replay.record()
        try:
            return self._query(events, pane)
        except Exception as exc:  # noqa: BLE001 - told apart event by event below
            self._check_not_given_up(exc)
            self._check_functions_served()
            if len(events) == 1:
                self._drop(events[0], exc)
                return []
            self._replay.replay()
            kept, rows = self._query_one_by_one(events, pane)
            if pane is None or not kept:
                return rows
            self._replay.replay()
            try:
                return self._query(kept, pane)
            except Exception as exc:  # noqa: BLE001 - fails on the group as a whole
                self._drop_window(pane, kept, exc)
                return []
        finally:
            self._replay.clear()

    def _query_one_by_one(self, events: list[Event], pane: Pane | None
                          ) -> tuple[list[Event], list[dict[str, Any]]]:
        """Query each event alone: the events that succeed and their rows (the ones
        that fail are dropped)."""
        kept: list[Event] = []
        rows: list[dict[str, Any]] = []
        for event in events:
            try:
                rows.extend(self._query([event], pane))
            except Exception as exc:  # noqa: BLE001 - this event only
                self._check_not_given_up(exc)
                self._check_functions_served()
                self._drop(event, exc)
                continue
            kept.append(event)
        return kept, rows

    def _check_not_given_up(self, exc: Exception) -> None:
        """A query failed after a stop gave up waiting for the batch (its plugin
        processes are being stopped, say): abandon the batch as a whole rather than
        drop each event as failed."""
        if self._stopping.is_set() and time.monotonic() > self._stop_deadline:
            raise _Undelivered(f"the batch was still being queried when stopTimeoutMs "
                               f"({self.stop_timeout * 1000:g} ms) passed: {_what_failed(exc)}")

    def _check_functions_served(self) -> None:
        """A query failed while a function pool it calls is closed (its plugin was
        removed with --force, or the host is stopping): every event would fail, so
        fail the batch as a whole rather than drop each event past the position."""
        for pool in self._pools.values():
            if pool.closed:
                raise RuleError(str(pool.not_served()))

    def _drop_window(self, pane: Pane, events: list[Event], exc: Exception) -> None:
        bounds = (f"window [{pane.start}, {pane.end})" if pane.start is not None
                  else "count window")  # fmt: skip
        self.metrics.error(f"{_what_failed(exc)} ({bounds} of {len(events)} events dropped: "
                           "the query failed on the window as a whole)")

    def _drop(self, event: Event, exc: Exception) -> None:
        self.metrics.error(f"{_what_failed(exc)} (event {_shown(event.row, 200)} dropped)")

    def _query(self, events: list[Event], pane: Pane | None) -> list[dict[str, Any]]:
        assert self.compiled is not None
        keys = self.compiled.meta_keys
        rows = [{**e.row, **_meta_values(e.meta, keys)} if keys else e.row for e in events]
        table = rows_to_arrow(rows, self._declared, self.compiled.columns)
        con = self._con
        con.register(EVENTS_TABLE, table)
        try:
            if pane is not None and self.compiled.uses_window_bounds:
                con.register(WINDOW_TABLE, pa.table({"ws": [pane.start], "we": [pane.end]}))
            return result_rows(con.sql(self.compiled.sql))
        finally:
            con.unregister(EVENTS_TABLE)

    # -- lookup tables
    def _lookup_rows(self, lookup: _Lookup) -> pa.Table:
        """The lookup table's committed rows, read again when they may have changed."""
        rows = lookup.rows
        if rows is None or time.monotonic() - lookup.read_at >= self.lookup_refresh:
            if self.store.table_info(lookup.table, count_rows=False) is None:
                raise RuleError(f"lookup table {lookup.name!r}: table {lookup.table!r} "
                                "does not exist yet")  # fmt: skip
            rows = lookup.rows = self.store.query(f"SELECT * FROM {quote(lookup.table)}")
            lookup.read_at = time.monotonic()
        return rows

    def lookup_changed(self, table: str) -> None:
        """``table`` got a commit: lookups of it are read again before the next query."""
        for lookup in self._lookups.values():
            if lookup.table == table:
                lookup.rows = None

    # -- commits (exactly once for table outputs)
    def _commit(self, emitted: bool) -> None:
        position = self._safe_position()
        tables = [a for a in self.actions if isinstance(a, _TableAction) and a.pending]
        moved = self.stream.is_table and position is not None and position != self._committed_position
        if not tables and not moved and not (emitted and self._windower is not None):
            return
        with self._commit_lock:
            if self._given_up:  # (the rule may run again already, from the old position)
                raise _Undelivered("its stop had given up waiting for it")
            self._commit_staged(tables, position)

    def _commit_staged(self, tables: list[_TableAction], position: Any) -> None:
        from stepwell.engine.staging import StagedRun

        staged = StagedRun(self.store, f"rule-{self.rule.id}", state_key(self.rule.id))
        try:
            for action in tables:
                staged.write(action.table, rows_to_arrow(action.pending))
            positions = None
            if self.stream.is_table and position is not None:
                positions = [{"table": self.stream.datasource, "order_by": ["patterns_id"],
                              "table_version": self._table_version or 1, "value": position,
                              "last_id": None}]
            state = {"window": self._windower.state() if self._windower else None,
                     "rule": self.rule.id}
            staged.commit(positions, state)
        except BaseException:
            staged.rollback()
            raise
        finally:
            for action in tables:
                action.pending.clear()
        if position is not None:
            self._committed_position = position

    def _safe_position(self) -> Any:
        """The last input position no buffered window pane still needs."""
        oldest = self._windower.oldest_seq() if self._windower is not None else None
        position = self._committed_position
        while self._positions and (oldest is None or self._positions[0][0] < oldest):
            _, pos = self._positions.popleft()
            if pos is not None:
                position = pos
        return position

    # -- status
    def snapshot(self) -> dict[str, Any]:
        data = {"id": self.rule.id, "status": self.status, **asdict(self.metrics)}
        data["queued"] = len(self._queue)
        if self._pools:  # (the pools it holds: asking the manager would start them again)
            data["function_processes"] = {symbol: pool.size for symbol, pool in self._pools.items()}
        return data

    def log_lines(self) -> list[str]:
        return [line for a in self.actions if isinstance(a, _LogAction) for line in a.lines]

    def _save_status(self, force: bool = False) -> None:
        if self._given_up:  # (the stop saved its last status; the rule may run again)
            return
        now = time.monotonic()
        if not force and now - self._last_status_save < 2.0:
            return
        self._write_status()

    def _write_status(self) -> None:
        self._last_status_save = time.monotonic()
        try:
            with self.store.transaction() as tx:
                tx.set_state(status_key(self.rule.id), self.snapshot())
                tx.commit()
        except Exception as exc:  # noqa: BLE001 - status is best effort
            log.debug("rule %s: saving status: %s", self.rule.id, exc)


# -- the engine --------------------------------------------------------------------------


@dataclass
class _Known:
    rule: RuleDef
    desired: str = "running"
    created_at: str = field(default_factory=_now_iso)


class RuleEngine:
    """Rule definitions in the app store, and the rules running in this process.

    Used by the CLI (create/list/start/stop/delete/status, optionally running
    rules in the foreground) and by ``stepwell serve``, which calls
    :meth:`start_all` at start-up and :meth:`stop_all` at shutdown.
    """

    def __init__(self, app_root: Path, store: Store, *, manager: PluginManager | None = None,
                 stream_files: Iterable[str] = ()) -> None:
        self.app_root = Path(app_root).resolve()
        self.store = store
        self.manager = manager or shared_manager(self.app_root)
        self.streams: dict[str, StreamDef] = {}
        self.running: dict[str, RuleRuntime] = {}
        self._lock = threading.RLock()
        for relative in stream_files:
            self.add_stream(load_stream_file(self.app_root / relative))

    @classmethod
    def for_app(cls, app: Any, store: Store, *, manager: PluginManager | None = None) -> RuleEngine:
        """An engine for a loaded app spec (its ``streams:`` files are read)."""
        return cls(app.root, store, manager=manager, stream_files=list(app.streams or []))

    def add_stream(self, stream: StreamDef) -> None:
        self.streams[stream.name] = stream

    # -- definitions
    def _ids(self) -> list[str]:
        return list(self.store.get_state(INDEX_KEY).get("ids", []))

    def _set(self, updates: dict[str, dict[str, Any]]) -> None:
        with self.store.transaction() as tx:
            for key, value in updates.items():
                tx.set_state(key, value)
            tx.commit()

    def _known(self, rule_id: str) -> _Known:
        data = self.store.get_state(def_key(rule_id))
        if not data.get("definition"):
            raise RuleNotFound(f"no rule {rule_id!r} (rules: {', '.join(self._ids()) or 'none'}); "
                            "create it with `stepwell rule create APP FILE.json`")
        return _Known(parse_rule(data["definition"], f"rule {rule_id}"), data.get("desired", "stopped"),
                      data.get("created_at", ""))

    def compile(self, rule: RuleDef) -> CompiledRule:
        """Compile a rule's SQL, checking its stream, functions, actions and options."""
        where = f"rule {rule.id!r}"
        if "bufferLength" in rule.options:
            checked_buffer_length(rule.options["bufferLength"], where)
        compiled = compile_rule(
            rule.sql,
            rule_id=rule.id,
            is_plugin_function=lambda name: name in self._function_symbols(),
            is_aggregate_function=lambda name: self.manager.function_pool(
                name, rule.options.get("functionProcesses")).is_aggregate(),
            where=where,
            lookup_tables={name for name, s in self.streams.items() if s.lookup},
        )
        stream = self.streams.get(compiled.stream)
        if stream is None:
            raise RuleError(f"{where}: stream {compiled.stream!r} is not defined (streams: "
                            f"{', '.join(sorted(self.streams)) or 'none'}); list its file under "
                            "`streams:` in stepwell.yml")
        if stream.lookup:
            raise RuleError(f"{where}: {compiled.stream!r} is a lookup table: read a stream "
                            f"and JOIN the table (FROM <stream> JOIN {compiled.stream} ON ...)")
        self._check_functions_exist(compiled, where)
        if not stream.is_table:
            self.manager.plugin_for("source", stream.type)
        for kind, _props in rule.actions:
            if kind not in ("log", "table"):
                self.manager.plugin_for("sink", kind)
        for site in compiled.functions:
            problem = self.manager.function_pool(
                site.symbol, rule.options.get("functionProcesses")).validate(site.arg_nodes)
            if problem is not None:
                raise RuleError(f"{where}: function {site.symbol}(): {problem}")
        return compiled

    def _check_functions_exist(self, compiled: CompiledRule, where: str) -> None:
        """Refuse a call of a function that is neither DuckDB's nor a plugin's (it
        would fail on every event)."""
        import sqlglot
        from sqlglot import exp

        tree = sqlglot.parse_one(compiled.sql, read="duckdb")
        for node in tree.find_all(exp.Anonymous):
            name = str(node.name).lower()
            if name.startswith("sw_fn_") or name in _sql_functions():
                continue
            known = ", ".join(sorted(self._function_symbols())) or "none"
            raise RuleError(
                f"{where}: function {name}() is not a SQL function and no installed plugin "
                f"provides it (plugin functions: {known}); install the plugin that does "
                f"(`stepwell plugin install {self.app_root} PATH`) or correct the name")

    def rules_using(self, plugin: Any) -> dict[str, list[str]]:
        """The rules that use a symbol of ``plugin`` (an installed plugin): rule id ->
        what they use, e.g. ``["function revert", "sink print"]``."""
        import sqlglot
        from sqlglot import exp

        from stepwell.streams.parser import _func_name

        users: dict[str, list[str]] = {}
        for rule_id in self._ids():
            try:
                rule = self._known(rule_id).rule
                tree = sqlglot.parse_one(rule.sql.strip().rstrip(";"), read="mysql")
            except (RuleError, StreamError, sqlglot.errors.SqlglotError):
                continue
            functions = {_func_name(n) for n in tree.find_all(exp.Func)}
            sources = {self.streams[t.name].type for t in tree.find_all(exp.Table)
                       if t.name in self.streams}  # fmt: skip
            used = [f"function {f}" for f in sorted(functions & set(plugin.functions))]
            used += [f"source {s}" for s in sorted(sources & set(plugin.sources))]
            used += [f"sink {k}" for k in sorted({k for k, _ in rule.actions} & set(plugin.sinks))]
            if used:
                users[rule_id] = used
        return users

    def plugin_removed(self, plugin: Any, users: dict[str, list[str]]) -> None:
        """Plugin ``plugin`` is being removed although rules use it (``users``, from
        :meth:`rules_using`; `plugin remove --force`): the running ones stop, failed."""
        with self._lock:
            for rule_id, used in users.items():
                runtime = self.running.get(rule_id)
                if runtime is not None and runtime.status == "running":
                    runtime.fail_now(f"plugin {plugin.name!r}, which provides its "
                                     f"{', '.join(used)}, was removed (--force)")

    def _function_symbols(self) -> set[str]:
        if not hasattr(self, "_fn_cache"):
            self._fn_cache = set(self.manager.function_symbols())
        return self._fn_cache

    def create(self, definition: RuleDef | dict[str, Any], *, replace: bool = False,
               start: bool | None = None) -> RuleDef:
        """Validate and store a rule; it is marked running unless ``"triggered": false``."""
        triggered = True
        if isinstance(definition, dict):
            triggered = definition.get("triggered", True) is not False
            definition = parse_rule(definition)
        rule = definition
        with self._lock:
            ids = self._ids()
            if rule.id in ids and not replace:
                raise RuleError(f"rule {rule.id!r} already exists; delete it first, or replace it (`stepwell rule create --replace`, or `?replace=true` in the API)")
            self.compile(rule)
            desired = "running" if (start if start is not None else triggered) else "stopped"
            if rule.id in self.running:
                self.running.pop(rule.id).stop()
            self._set({
                INDEX_KEY: {"ids": sorted({*ids, rule.id})},
                def_key(rule.id): {"definition": rule.to_json(), "desired": desired,
                                   "created_at": _now_iso()},
            })
        return rule

    def create_from_file(self, path: Path, *, replace: bool = False) -> RuleDef:
        data = json.loads(Path(path).read_text()) if Path(path).is_file() else None
        if data is None:
            raise RuleError(f"{path}: no such rule file")
        load_rule_file(path)  # precise errors with the file name
        return self.create(data, replace=replace)

    def list(self) -> list[dict[str, Any]]:
        out = []
        for rule_id in self._ids():
            try:
                known = self._known(rule_id)
            except RuleError:
                continue
            out.append({"id": rule_id, "status": self._status_word(rule_id, known),
                        "sql": known.rule.sql})
        return out

    def describe(self, rule_id: str) -> dict[str, Any]:
        """The rule's definition as created, whether it is to run, and since when."""
        known = self._known(rule_id)
        return {**known.rule.to_json(), "desired": known.desired, "created_at": known.created_at}

    def _status_word(self, rule_id: str, known: _Known) -> str:
        runtime = self.running.get(rule_id)
        if runtime is not None:
            return runtime.status
        return known.desired

    def start(self, rule_id: str, *, run_here: bool = True) -> None:
        """Mark the rule running and (``run_here``) start it in this process."""
        with self._lock:
            known = self._known(rule_id)
            self._set({def_key(rule_id): {"definition": known.rule.to_json(), "desired": "running",
                                          "created_at": known.created_at}})
            failed = self.running.get(rule_id)
            if failed is not None and failed.status == "failed":  # start it afresh
                self.running.pop(rule_id).stop()
            if run_here and rule_id not in self.running:
                self._launch(known.rule)

    def _launch(self, rule: RuleDef) -> RuleRuntime:
        compiled = self.compile(rule)
        runtime = RuleRuntime(self, rule, self.streams[compiled.stream])
        runtime.start()
        self.running[rule.id] = runtime
        return runtime

    def stop(self, rule_id: str) -> None:
        with self._lock:
            known = self._known(rule_id)
            runtime = self.running.pop(rule_id, None)
            if runtime is not None:
                runtime.stop()
            self._set({def_key(rule_id): {"definition": known.rule.to_json(), "desired": "stopped",
                                          "created_at": known.created_at}})

    def delete(self, rule_id: str) -> None:
        with self._lock:
            self._known(rule_id)
            runtime = self.running.pop(rule_id, None)
            if runtime is not None:
                runtime.stop()
            self._set({
                INDEX_KEY: {"ids": [i for i in self._ids() if i != rule_id]},
                def_key(rule_id): {},
                status_key(rule_id): {},
            })

    def status(self, rule_id: str) -> dict[str, Any]:
        known = self._known(rule_id)
        runtime = self.running.get(rule_id)
        if runtime is not None:
            data = runtime.snapshot()
        else:
            data = dict(self.store.get_state(status_key(rule_id)) or {})
            data["id"] = rule_id
            data["status"] = "stopped" if known.desired == "stopped" else "not running"
        data["desired"] = known.desired
        data["sql"] = known.rule.sql
        data["actions"] = [kind for kind, _ in known.rule.actions]
        return data

    def runtime(self, rule_id: str) -> RuleRuntime:
        runtime = self.running.get(rule_id)
        if runtime is None:
            raise RuleError(f"rule {rule_id!r} is not running in this process")
        return runtime

    def notify(self, table: str) -> None:
        """New rows were committed to ``table``: wake the rules that stream it, and
        have the rules that JOIN it as a lookup table read it again."""
        for runtime in list(self.running.values()):
            if runtime.stream.is_table and runtime.stream.datasource == table:
                runtime.notify()
            runtime.lookup_changed(table)

    # -- whole app
    def register_listed(self, app: Any) -> None:
        """Install the plugins ``app``'s file lists and (re)create the rules it lists
        (marked running, as `stepwell serve` starts them); unchanged ones are left be."""
        self.manager.install_listed(list(app.plugins or []))
        for relative in app.rules or []:
            rule = load_rule_file(self.app_root / relative)
            try:
                existing = self._known(rule.id)
                if existing.rule.to_json() == rule.to_json():
                    continue
            except RuleError:
                pass
            self.create(rule, replace=True, start=True)

    def start_all(self, app: Any = None, *, on_error: Callable[[str, Exception], None] | None = None) -> list[str]:
        """Install listed plugins, (re)create listed rules, start every rule marked running.

        Returns the ids started. A rule that fails to start is reported through
        ``on_error`` (default: logged) and the others still start.
        """
        if app is not None:
            self.register_listed(app)
        started = []
        for rule_id in self._ids():
            try:
                known = self._known(rule_id)
                if known.desired == "running" and rule_id not in self.running:
                    self._launch(known.rule)
                    started.append(rule_id)
            except (RuleError, StreamError, Exception) as exc:  # noqa: BLE001
                if on_error is not None:
                    on_error(rule_id, exc)
                else:
                    log.error("rule %s could not start: %s", rule_id, exc)
        return started

    def stop_all(self, *, stop_plugins: bool = True) -> None:
        """Stop every running rule (their desired state is kept) and the plugin processes.

        The engine's lock is held until every rule stopped: a rule started meanwhile
        would otherwise run beside its runtime still being stopped (both writing)."""
        with self._lock:
            runtimes, self.running = list(self.running.values()), {}
            for runtime in runtimes:
                try:
                    runtime.stop()
                except Exception as exc:  # noqa: BLE001
                    log.warning("rule %s: stop: %s", runtime.rule.id, exc)
        if stop_plugins:
            self.manager.stop_all()
            for runtime in runtimes:  # a loop still in a plugin call ends now that it failed
                for thread in runtime._threads:  # (a thread left inside DuckDB aborts the exit)
                    thread.join(5)


def plugin_in_use(name: str, users: dict[str, list[str]]) -> str:
    """Why plugin ``name``, which rules still use (see :meth:`RuleEngine.rules_using`),
    is not removed, and what to do."""
    listed = "; ".join(f"rule {rule_id} ({', '.join(used)})" for rule_id, used in users.items())
    return (f"plugin {name!r} is used by {listed}: delete or change those rules first "
            "(`stepwell rule delete APP RULE`), or remove it anyway with --force "
            "(`?force=true` in the API; the rules then fail to start)")


def start_rules(app: Any, store: Store, say: Callable[[str], None] | None = None) -> RuleEngine | None:
    """``stepwell serve``'s hook: install the app's listed plugins and start its rules.

    Returns the engine (call ``stop_all()`` at shutdown), or None when the app
    lists no plugins, streams or rules and has no stored rules.
    """
    if not (app.plugins or app.streams or app.rules or store.get_state(INDEX_KEY).get("ids")):
        return None
    engine = RuleEngine.for_app(app, store)

    def report(rule_id: str, exc: Exception) -> None:
        message = f"rule {rule_id} could not start: {exc}"
        log.error(message)
        if say is not None:
            say(message)

    started = engine.start_all(app, on_error=report)
    if say is not None and started:
        say(f"rules running: {', '.join(started)}")
    return engine
