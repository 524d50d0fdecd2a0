"""The worker's side of the wire protocol: requests to the host and log capture."""

from __future__ import annotations

import codecs
import fcntl
import io
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from stepwell.sandbox.protocol import Channel


class HostError(Exception):
    """The host refused or failed a request; the message says why."""


class HostLink:
    """Typed request/notify calls from a worker to its host."""

    def __init__(self, channel: Channel):
        self.channel = channel
        # (reentrant only so that ``busy_here`` can ask whether this thread holds it)
        self._lock = threading.RLock()
        self._pid = os.getpid()
        #: the run's captured outputs: what they hold goes out before ``done``
        self.outputs: list[LogStream | DescriptorCapture] = []
        #: a ``last`` frame was sent: nothing more goes out
        self._finished = False
        #: called before a print is taken in: a runtime with log lines of its own
        #: waiting (a processor's ``log.info``) sends them first, keeping their order
        self.before_print: Callable[[], None] | None = None

    def forked(self) -> bool:
        """True in a process the step forked: it shares the channel but owns no run."""
        return os.getpid() != self._pid

    def adopt(self) -> None:
        """Make this process (a fork of the worker) the one that talks to the host."""
        self._pid = os.getpid()

    def call(self, op: str, body: Any = b"", **args: Any) -> tuple[dict[str, Any], bytes]:
        if self.forked():
            raise HostError(
                f"cannot {op!r} from a process forked by the step: only the step's own "
                "process talks to the host"
            )
        with self._lock:
            reply, reply_body = self.channel.request({"op": op, **args}, body)
        if not reply.get("ok", False):
            raise HostError(reply.get("error") or f"host refused {op!r}")
        return reply, reply_body

    def scan(
        self, table: str, order_by: list[str] | None, after: Any, batch_rows: int
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(table version, Arrow batch)`` pairs of a consistent snapshot of
        ``table`` (see ``Store.scan``), one request per batch, so memory stays flat.
        Each reply carries a batch and says whether it was the last one."""
        from stepwell.sandbox.protocol import decode_table

        reply, body = self.call(
            "scan_open", table=table, order_by=order_by, after=after, batch_rows=batch_rows
        )
        scan_id, version = reply.get("scan"), int(reply.get("version") or 0)
        try:
            while True:
                if reply.get("rows"):
                    for batch in decode_table(body).to_batches():
                        if batch.num_rows:
                            yield version, batch
                if scan_id is None:
                    return
                reply, body = self.call("scan_next", scan=scan_id)
                if reply.get("done"):
                    scan_id = None
        finally:
            if scan_id is not None:
                self.call("scan_close", scan=scan_id)

    def notify(self, op: str, body: Any = b"", *, last: bool = False, **args: Any) -> None:
        """Send a frame that gets no reply. ``last``: this process sends nothing after
        it (what other threads try to send is dropped)."""
        if self.forked():
            if op == "log":  # its frames would interleave with the step's own
                return
            raise HostError(f"cannot {op!r} from a process forked by the step")
        if op == "done":  # the host starts the step's next runs with numpy and pandas loaded
            args.setdefault("imported_numpy", "numpy" in sys.modules)
            for stream in self.outputs:  # (a last unfinished line, the log limit's note)
                stream.close_out()
        with self._lock:
            if self._finished:
                return
            self._finished = last
            self.channel.send({"op": op, **args}, body)

    def busy_here(self) -> bool:
        """True while this thread is in the middle of a request or frame: what a signal
        handler or a ``__del__`` prints then must wait (a frame inside a frame would
        garble both)."""
        return self._lock._is_owned()  # type: ignore[attr-defined]


#: What one run may send to its log; past that lines are counted, not sent.
MAX_LOG_LINES = 100_000
#: Seconds a written line may wait to go out with the next ones.
FLUSH_SECONDS = 0.2
MAX_LOG_CHARS = 20_000_000
MAX_LINE_CHARS = 10_000


class LogStream(io.TextIOBase):
    """A text stream that forwards complete lines to the host's run log.

    Lines are batched briefly so a chatty ``print`` loop does not pay one
    frame per line: a line goes out at once after a quiet moment, otherwise with
    the next ones, and at the latest ``FLUSH_SECONDS`` later (a thread sends it
    even when the step writes nothing more: the line before a hang or a long
    sleep is the one a user needs). ``flush`` and the run's end send the rest.
    Over-long lines are cut here, and once the run's log budget is spent the
    rest is only counted, so a flood of output costs the host nothing.
    """

    def __init__(self, link: HostLink, level: str, max_pending: int = 256,
                 budget: dict[str, int] | None = None):  # fmt: skip
        self.link = link
        self.level = level
        self.max_pending = max_pending
        #: shared by the stdout and stderr streams of one worker
        self.budget = budget if budget is not None else _new_budget()
        self._partial = ""
        self._pending: list[str] = []
        #: text written by a print that began inside one of ours (see ``write``)
        self._interrupted: list[str] = []
        self._last_send = 0.0  # the first line goes out at once
        # Two locks, so that no thread waits for the host link while holding what a
        # print needs: ``_lock`` guards the buffers only (reentrant: a signal handler
        # or a __del__ may print while a print is under way); ``_send_lock`` keeps
        # batches in order (a batch is taken and sent under it).
        self._lock = threading.RLock()
        self._send_lock = threading.RLock()
        #: the process whose thread sends pending lines late (threads do not survive a fork)
        self._flusher_pid: int | None = None
        self._buffer: _LogBytes | None = None
        _STREAMS.add(self)

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def buffer(self) -> _LogBytes:
        """``sys.stdout.buffer``: bytes written there join the log as UTF-8 text (code
        and libraries writing bytes failed with AttributeError)."""
        if self._buffer is None:
            self._buffer = _LogBytes(self)
        return self._buffer

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self._lock._is_owned():  # type: ignore[attr-defined]
            # a print inside one of ours (a signal handler's, a __del__'s): its text
            # follows what ours is writing (as on a terminal), taken in once ours is done
            self._interrupted.append(text)
            return len(text)
        if self.link.before_print is not None:
            self.link.before_print()
        with self._lock:  # (threads print at once; the flusher sends meanwhile)
            self._take(text)
            due = bool(self._pending) and (
                len(self._pending) >= self.max_pending
                or time.monotonic() - self._last_send > FLUSH_SECONDS
            )
        if due:
            self.flush()
        if self._pending or self._interrupted:  # (also when a frame under way held it back)
            self._flush_later()
        return len(text)

    def _take(self, text: str) -> None:
        """Add ``text`` to the line in progress and keep the lines it completes (under
        ``_lock``), then what prints interrupting this one wrote meanwhile."""
        while True:
            data = self._partial + text
            *lines, self._partial = data.split("\n")
            if len(self._partial) > MAX_LINE_CHARS * 2:  # a line without end: keep its head
                self._partial = self._partial[: MAX_LINE_CHARS + 1]
            if lines:
                self._keep(lines)
            if not self._interrupted:
                return
            text = self._interrupted.pop(0)

    def _flush_later(self) -> None:
        # a thread that looks every FLUSH_SECONDS (no event to set: a print may come
        # from a signal handler, where taking the lock of an Event could deadlock)
        if self._flusher_pid != os.getpid():
            self._flusher_pid = os.getpid()
            threading.Thread(target=self._flush_loop, name="stepwell-log", daemon=True).start()

    def _flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            if self._pending or self._interrupted:
                try:
                    self.flush()
                except Exception:  # the channel is gone: the run is over
                    return

    def _keep(self, lines: list[str]) -> None:
        budget = self.budget
        for line in lines:
            if budget["lines"] <= 0 or budget["chars"] <= 0:
                budget["dropped"] += 1
                continue
            if len(line) > MAX_LINE_CHARS:
                line = line[:MAX_LINE_CHARS] + f"... [{len(line) - MAX_LINE_CHARS} more characters]"
            budget["lines"] -= 1
            budget["chars"] -= len(line)
            self._pending.append(line)

    @property
    def has_pending(self) -> bool:
        """Whether lines wait to be sent."""
        return bool(self._pending or self._interrupted)

    def flush(self) -> None:
        """Send the pending lines, unless this thread is in the middle of a frame or of
        a print (a signal handler's or a ``__del__``'s print): then the flusher thread
        sends them in a moment."""
        if self.link.busy_here() or self._lock._is_owned() or self._send_lock._is_owned():  # type: ignore[attr-defined]
            return
        with self._send_lock:
            with self._lock:
                if self._interrupted:
                    self._take("")
                lines, self._pending = self._pending, []
            if lines:
                self.link.notify("log", level=self.level, lines=lines)
                self._last_send = time.monotonic()

    def close_out(self) -> None:
        with self._lock:
            self._take("")
            if self._partial:
                self._keep([self._partial])
                self._partial = ""
            budget = self.budget
            if budget["dropped"]:
                self._pending.append(
                    f"[stepwell] log limit reached ({MAX_LOG_LINES} lines or {MAX_LOG_CHARS} "
                    f"characters): {budget['dropped']} more lines were not kept"
                )
                budget["dropped"] = 0
        self.flush()

    def _after_fork(self) -> None:
        # (the fork may have caught another thread holding them)
        self._lock, self._send_lock = threading.RLock(), threading.RLock()


class _LogBytes(io.BufferedIOBase):
    """The binary side of a ``LogStream``: bytes are decoded as UTF-8 (a character
    split over writes is joined; bytes that are not UTF-8 become U+FFFD)."""

    def __init__(self, text: LogStream):
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if isinstance(data, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        size = memoryview(data).nbytes
        text = self._decoder.decode(bytes(data))
        if text:
            self._text.write(text)
        return size

    def flush(self) -> None:
        self._text.flush()


class DescriptorCapture:
    """What is written to file descriptor 1 under Python (``os.system``, a
    subprocess's output, C code), into the run log as ``print`` output is: fd 1
    becomes a pipe that this process empties when the kernel says data came
    (``SIGIO``, handled between two bytecodes of the main thread) and before the
    run's ``done``. (fd 2 stays the fork-server's pipe, so the last words of a
    process that crashes are kept for its exit report.) Install it with
    ``capture_descriptor_output`` in the main thread, before the step's code runs."""

    def __init__(self, stream: LogStream):
        self._bytes = stream.buffer
        self._draining = False
        read, write = os.pipe()
        self._read = read
        os.set_blocking(read, False)
        try:  # room for a burst written while the main thread is busy in C code
            fcntl.fcntl(read, fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        signal.signal(signal.SIGIO, self._on_signal)
        fcntl.fcntl(read, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(read, fcntl.F_SETFL, fcntl.fcntl(read, fcntl.F_GETFL) | os.O_ASYNC)
        os.dup2(write, 1)
        os.close(write)

    def _on_signal(self, _signum: int, _frame: Any) -> None:
        if not self._draining:  # (one that arrives while we drain: that drain reads on)
            self.drain()

    def drain(self) -> None:
        """Take what the pipe holds into the log."""
        self._draining = True
        try:
            while True:
                try:
                    chunk = os.read(self._read, 1 << 16)
                except OSError:  # (BlockingIOError: nothing more for now)
                    return
                if not chunk:
                    return
                self._bytes.write(chunk)
        finally:
            self._draining = False

    def close_out(self) -> None:
        self.drain()


def capture_descriptor_output(link: HostLink) -> None:
    """Route fd 1 into the run's stdout log stream (see ``DescriptorCapture``); the
    capture is emptied before the stream is closed at ``done``. Nothing to do for a
    link whose prints are not captured (a runtime called in-process, as by tests)."""
    streams = [s for s in getattr(link, "outputs", []) if isinstance(s, LogStream)]
    if streams:
        link.outputs.insert(0, DescriptorCapture(streams[0]))


_STREAMS: weakref.WeakSet[LogStream] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [stream._after_fork() for stream in list(_STREAMS)])


def _new_budget() -> dict[str, int]:
    # one line and a little room are kept for the closing "log limit reached" note
    return {"lines": MAX_LOG_LINES - 1, "chars": MAX_LOG_CHARS - 1000, "dropped": 0}


def capture_output(link: HostLink) -> tuple[LogStream, LogStream]:
    """Route print() and stderr output of user code into the run log."""
    budget = _new_budget()
    out, err = LogStream(link, "info", budget=budget), LogStream(link, "error", budget=budget)
    sys.stdout, sys.stderr = out, err
    link.outputs = [out, err]
    return out, err
