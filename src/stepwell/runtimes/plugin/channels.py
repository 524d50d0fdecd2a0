"""Per-symbol data channels between the host and a plugin process.

Socket roles follow ``ekuiper-host.md`` section 3 exactly:

* source: host PULL listens on ``<rule>_<op>_<inst>.ipc`` before ``start``;
  the plugin PUSHes ``{"message": ..., "meta": ...}`` or ``{"error": ...}``.
* sink: host PULL listens on ``<rule>_<op>_<inst>_ack.ipc`` before ``start``;
  after ``start`` answers ``ok`` the host dials PUSH to ``<rule>_<op>_<inst>.ipc``
  (the plugin listens) and pushes raw JSON bytes. Acks (``{}`` or
  ``{"error": ...}``) are awaited after each push with ``requireAck`` and
  drained otherwise, so an acking sink never blocks.
* function: host REP listens on ``func_<symbol>.ipc``; calls use the same
  inverted REQ/REP exchange as the control channel.

On stop the host closes its sockets first, then sends ``stop``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pynng

from stepwell.runtimes.plugin.process import (
    PluginCrashed,
    PluginError,
    PluginProcess,
    control_arg,
    nng_socket,
    request_reply,
)

__all__ = [
    "FunctionCallError",
    "FunctionChannel",
    "SinkChannel",
    "SinkFailed",
    "SinkInterrupted",
    "SinkRefused",
    "SourceChannel",
    "meta",
]

log = logging.getLogger("stepwell.plugin")


class DeadlinePassed(PluginError):
    """A function call did not end before the deadline of the step making it."""


class FunctionCallError(PluginError):
    """A plugin function answered ``state: false`` with an error text."""


class FunctionTimeout(PluginError):
    """A plugin function call got no answer in time (its process was killed)."""


def meta(rule_id: str, op_id: str, instance_id: int = 0) -> dict[str, Any]:
    return {"ruleId": rule_id, "opId": op_id, "instanceId": instance_id}


def _stem(m: dict[str, Any]) -> str:
    return f"{m['ruleId']}_{m['opId']}_{m['instanceId']}"


class SourceChannel:
    """A running source symbol: messages arrive on a reader thread."""

    def __init__(
        self,
        process: PluginProcess,
        symbol: str,
        m: dict[str, Any],
        config: dict[str, Any],
        datasource: str,
        on_message: Callable[[Any, Any], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.process, self.symbol, self.meta = process, symbol, m
        self.config, self.datasource = config, datasource
        self._on_message, self._on_error = on_message, on_error
        #: the key its start command is remembered by (replayed after a crash)
        self.key = f"{_stem(m)}_{symbol}"
        self._sock: pynng.Socket | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._sock = nng_socket(pynng.Pull0, 500)
        self.process.listen(self._sock, f"{_stem(self.meta)}.ipc")
        self._thread = threading.Thread(target=self._read, name=f"source-{self.key}", daemon=True)
        self._thread.start()
        config = {**self.config, "datasource": self.datasource}
        ctrl = control_arg(self.symbol, "source", self.meta, config, datasource=self.datasource)
        try:
            self.process.command("start", ctrl, remember=self.key)
        except BaseException:
            self._close_socket()
            raise

    def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closing:
            try:
                raw = sock.recv()
            except pynng.Timeout:
                continue
            except pynng.Closed:
                return
            except pynng.NNGException as exc:
                if self._closing:
                    return
                log.warning("source %s: receive failed: %s", self.key, exc)
                time.sleep(0.05)
                continue
            try:
                data = json.loads(raw)
            except ValueError as exc:
                self._on_error(f"source {self.symbol!r} sent invalid JSON: {exc}")
                continue
            if isinstance(data, dict) and "error" in data and "message" not in data:
                self._on_error(str(data["error"]))
            elif isinstance(data, dict):
                self._on_message(data.get("message"), data.get("meta"))
            else:
                self._on_error(f"source {self.symbol!r} sent {type(data).__name__}, not an object")

    def _close_socket(self) -> None:
        self._closing = True
        if self._sock is not None:
            self._sock.close()

    def stop(self) -> None:
        # forgotten first (once is enough: only a start remembers it again): a restart
        # under way must not start it again on a closed socket
        self.process.forget(self.key)
        self._close_socket()
        ctrl = control_arg(self.symbol, "source", self.meta)
        try:
            self.process.command("stop", ctrl)
        except PluginError as exc:
            log.warning("source %s: stop: %s", self.key, exc)


class SinkFailed(PluginError):
    """A payload did not reach a sink, or the sink did not acknowledge it."""


class SinkRefused(SinkFailed):
    """The sink acknowledged a payload with an error (``ctx.ack_error``)."""


class SinkInterrupted(SinkFailed):
    """The rule is stopping (:meth:`SinkChannel.interrupt`): the payload was not
    sent, or its ack was not awaited."""


class SinkChannel:
    """A running sink symbol: :meth:`send` pushes one payload (and awaits its ack)."""

    ACK_TIMEOUT = 30.0
    PUSH_TIMEOUT = 10.0

    def __init__(self, process: PluginProcess, symbol: str, m: dict[str, Any],
                 config: dict[str, Any]) -> None:
        self.process, self.symbol, self.meta, self.config = process, symbol, m, config
        self.require_ack = bool(config.get("requireAck", False))
        #: the key its start command is remembered by (replayed after a crash)
        self.key = f"{_stem(m)}_{symbol}"
        self._ack: pynng.Socket | None = None
        self._push: pynng.Socket | None = None
        self._closing = False
        self._lock = threading.Lock()
        #: connections to the sink's socket lost so far (a payload pushed before a loss
        #: will not be acknowledged, even when a restarted sink is connected again)
        self._pipes_lost = 0

    @property
    def what(self) -> str:
        return f"sink {self.symbol!r} (plugin {self.process.plugin.name!r})"

    def start(self) -> None:
        self._ack = nng_socket(pynng.Pull0, 500)
        self.process.listen(self._ack, f"{_stem(self.meta)}_ack.ipc")
        ctrl = control_arg(self.symbol, "sink", self.meta, self.config)
        try:
            self.process.command("start", ctrl, remember=self.key)
            self._push = nng_socket(pynng.Push0, 500)
            self._push.send_timeout = 500  # (polls for interrupt() while the sink is full)
            self._push.reconnect_time_min, self._push.reconnect_time_max = 20, 200
            self._push.add_post_pipe_remove_cb(self._on_pipe_lost)
            self._push.dial(self.process.url(f"{_stem(self.meta)}.ipc"), block=True)
        except BaseException:
            self._close_sockets()
            raise
        if not self.require_ack:
            threading.Thread(target=self._drain, name=f"sink-ack-{self.key}", daemon=True).start()

    def _on_pipe_lost(self, _pipe: Any) -> None:
        self._pipes_lost += 1

    def _drain(self) -> None:
        while not self._closing:
            try:
                self._ack.recv()  # type: ignore[union-attr]
            except pynng.Timeout:
                continue
            except pynng.NNGException:
                return

    def send(self, payload: bytes) -> None:
        """Push ``payload`` and, with requireAck, wait for its ack.

        Raises :class:`SinkRefused` (an error ack), :class:`SinkInterrupted` (the
        rule is stopping) or :class:`SinkFailed` (not taken or not acknowledged;
        :meth:`recover` then makes the sink take payloads again)."""
        with self._lock:
            self._check_interrupted("not sent")
            try:
                lost, generation = self._pipes_lost, self.process.generation
                self._push_payload(payload)
                if self.require_ack:
                    self._await_ack(lost, generation)
            except pynng.NNGException as exc:
                self._check_interrupted("not sent")
                raise SinkFailed(f"sending failed: {exc}") from None

    def _check_interrupted(self, what: str) -> None:
        if self._closing:
            raise SinkInterrupted(f"the rule is stopping; {what}")

    def connected(self) -> bool:
        """Whether the sink's socket in the plugin is there (the SDK closes it when
        the sink's collect raises, and it goes with a dead process)."""
        return self._push is not None and bool(self._push.pipes)

    def _push_payload(self, payload: bytes) -> None:
        assert self._push is not None
        deadline = time.monotonic() + self.PUSH_TIMEOUT
        generation = self.process.generation
        gone_since: float | None = None
        while True:
            try:
                self._push.send(payload)
                return
            except pynng.Timeout:
                self._check_interrupted("not sent")
                now = time.monotonic()
                if self.connected():
                    gone_since = None
                elif gone_since is None:
                    gone_since = now
                elif now - gone_since > 1.0:  # rather than waiting out PUSH_TIMEOUT
                    raise SinkFailed(self._gone("is not running", generation)) from None
                if now > deadline:
                    raise SinkFailed(f"did not take the payload in {self.PUSH_TIMEOUT:g}s") from None

    def _gone(self, what: str, generation: int) -> str:
        if not self.process.alive() or self.process.generation != generation:
            return f"{what}: its plugin process exited (it is restarted)"
        return f"{what}: the plugin closed it (the SDK does when the sink's collect raises)"

    def _await_ack(self, lost: int, generation: int) -> None:
        assert self._ack is not None
        deadline = time.monotonic() + self.ACK_TIMEOUT
        while True:
            try:
                raw = self._ack.recv()
                break
            except pynng.Timeout:
                self._check_interrupted("the ack was not awaited")
                if not self.connected() or self._pipes_lost != lost:
                    raise SinkFailed(self._gone("closed before acknowledging", generation)) from None
                if time.monotonic() > deadline:
                    raise SinkFailed(f"no ack in {self.ACK_TIMEOUT:g}s") from None
        try:
            ack = json.loads(raw)
        except ValueError:
            raise SinkFailed(f"invalid ack {raw[:80]!r}") from None
        if isinstance(ack, dict) and ack.get("error"):
            raise SinkRefused(f"refused: {ack['error']}")

    def recover(self, timeout: float = 15.0) -> str:
        """After a :class:`SinkFailed`: make the sink take payloads again. A crashed
        plugin process is restarted by its watchdog, which starts the sink again;
        a sink the SDK closed (or that stopped answering) is stopped and started
        again here. Acks of earlier payloads still on the way are discarded.
        Returns what was done; raises :class:`SinkFailed` when it does not come back."""
        deadline = time.monotonic() + timeout
        action = "reconnected"
        while True:
            self._check_interrupted("not restarted")
            if self.process.ready() and self._wait_connected(1.0):
                break
            if time.monotonic() > deadline:
                raise SinkFailed(f"did not come back in {timeout:g}s")
            if self.process.ready():  # the process runs, the sink does not: start it again
                self._restart_symbol()
                action = "started again"
            else:  # (its watchdog restarts the process, which starts the sink again)
                time.sleep(0.05)
        self._discard_acks()
        return action

    def _wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.connected():
            if time.monotonic() > deadline or self._closing:
                return False
            time.sleep(0.02)
        return True

    def _restart_symbol(self) -> None:
        ctrl = control_arg(self.symbol, "sink", self.meta, self.config)
        try:
            self.process.command("stop", control_arg(self.symbol, "sink", self.meta),
                                 forget=self.key)
        except PluginError as exc:
            log.info("%s: stop before restart: %s", self.what, exc)
        self.process.command("start", ctrl, remember=self.key)
        log.warning("%s was closed by its plugin; started it again", self.what)

    def _discard_acks(self) -> None:
        if not self.require_ack or self._ack is None:
            return
        while True:
            try:
                self._ack.recv(block=False)
            except pynng.NNGException:
                return

    def interrupt(self) -> None:
        """Stop waiting (the rule is stopping): a send in progress raises
        :class:`SinkInterrupted` at its next poll, and later ones at once."""
        self._closing = True

    def _close_sockets(self) -> None:
        self._closing = True
        for sock in (self._push, self._ack):
            if sock is not None:
                sock.close()

    def stop(self) -> None:
        self._closing = True
        self.process.forget(self.key)  # (not started again by a restart under way)
        with self._lock:
            self._close_sockets()
        ctrl = control_arg(self.symbol, "sink", self.meta)
        try:
            self.process.command("stop", ctrl)
        except PluginError as exc:
            log.warning("sink %s: stop: %s", self.key, exc)


class FunctionChannel:
    """The ``func_<symbol>`` channel of one plugin process (one call at a time)."""

    CALL_TIMEOUT = 60.0

    def __init__(self, process: PluginProcess, symbol: str) -> None:
        self.process, self.symbol = process, symbol
        #: the key its start command is remembered by (replayed after a crash)
        self.key = f"func_{symbol}"
        self._sock = nng_socket(pynng.Rep0, 500)
        process.listen(self._sock, f"func_{symbol}.ipc")
        self._lock = threading.Lock()
        ctrl = control_arg(symbol, "func", meta("", "", 0))
        process.command("start", ctrl, remember=self.key)

    def call(self, payload: bytes, deadline: float | None = None,
             timeout: float | None = None) -> bytes:
        """One raw request/reply; retried once on a restarted process after a crash.
        Ends by ``deadline`` (a ``time.monotonic()`` value: a step's time limit), or
        raises :class:`DeadlinePassed`. A call unanswered after ``timeout`` seconds
        (default ``CALL_TIMEOUT``) raises :class:`FunctionTimeout`, and the plugin
        process, stuck in it, is killed (its watchdog starts it again)."""
        what = f"function {self.symbol!r} (plugin {self.process.plugin.name!r})"
        with self._lock:
            for attempt in range(2):
                generation = self.process.generation
                alive = lambda g=generation: self.process.alive() and self.process.generation == g  # noqa: E731
                limit = timeout or self.CALL_TIMEOUT
                if deadline is not None:
                    limit = min(limit, deadline - time.monotonic())
                    if limit <= 0:
                        raise DeadlinePassed(f"{what}: the step's time limit passed")
                try:
                    return request_reply(self._sock, payload, alive, limit, what)
                except PluginCrashed:
                    if attempt:
                        raise
                    self._await_restart(generation)
                except PluginError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise DeadlinePassed(f"{what}: still running when the step's time "
                                             "limit passed") from None  # fmt: skip
                    raise self._hung(what, limit) from None
            raise AssertionError("unreachable")

    def _hung(self, what: str, limit: float) -> FunctionTimeout:
        """The call got no answer in time: kill the process stuck in it (a late
        answer would otherwise hold this channel), its watchdog starts it again."""
        pid = self.process.pid
        self.process.kill(reason=f"{what} did not answer in {limit:g}s")
        return FunctionTimeout(f"{what} did not answer in {limit:g}s; its process (pid {pid}) "
                               "was killed and is restarted")

    def _await_restart(self, generation: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.process.stopping:
            if self.process.generation != generation and self.process._ready.is_set():
                return
            time.sleep(0.02)
        raise PluginCrashed(f"function {self.symbol!r}: the plugin did not come back after a crash")

    def request(self, func: str, arg: Any) -> Any:
        """A ``Validate``/``IsAggregate``/``Exec`` call, decoded; raises on ``state: false``."""
        reply = self.call(json.dumps({"func": func, "arg": arg}).encode())
        return decode_reply(reply, self.symbol, self.process.plugin.name)

    def close(self) -> None:
        self._sock.close()


def decode_reply(reply: bytes, symbol: str, plugin: str | None = None) -> Any:
    """The result of a function call's ``reply``; raises :class:`FunctionCallError`
    (naming the function and, if given, its plugin) when it failed or is garbled."""
    what = f"function {symbol!r}" + (f" (plugin {plugin!r})" if plugin else "")
    try:
        data = json.loads(reply)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise FunctionCallError(f"{what} sent an invalid reply {reply[:80]!r} "
                                '(not {"state": ..., "result": ...})') from None
    if data.get("state"):
        return data.get("result")
    result = data.get("result")
    if result is None:
        return None
    lines = [line for line in str(result).strip().splitlines() if line.strip()]
    raise FunctionCallError(f"{what} failed: {lines[-1] if lines else result}")
