"""The worker's side of the wire protocol: requests to the host and log capture."""

from __future__ import annotations

import io
import sys
import threading
import time
from typing import Any

from stepwell.sandbox.protocol import Channel


class HostError(Exception):
    """The host refused or failed a request; the message says why."""


class HostLink:
    """Typed request/notify calls from a worker to its host."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self._lock = threading.Lock()

    def call(self, op: str, body: Any = b"", **args: Any) -> tuple[dict[str, Any], bytes]:
        with self._lock:
            reply, reply_body = self.channel.request({"op": op, **args}, body)
        if not reply.get("ok", False):
            raise HostError(reply.get("error") or f"host refused {op!r}")
        return reply, reply_body

    def notify(self, op: str, body: Any = b"", **args: Any) -> None:
        with self._lock:
            self.channel.send({"op": op, **args}, body)


class LogStream(io.TextIOBase):
    """A text stream that forwards complete lines to the host's run log.

    Lines are batched briefly so a chatty ``print`` loop does not pay one
    frame per line; whatever is pending goes out on ``flush`` and at exit.
    """

    def __init__(self, link: HostLink, level: str, max_pending: int = 256):
        self.link = link
        self.level = level
        self.max_pending = max_pending
        self._partial = ""
        self._pending: list[str] = []
        self._last_send = time.monotonic()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        data = self._partial + text
        *lines, self._partial = data.split("\n")
        if lines:
            self._pending.extend(lines)
            if len(self._pending) >= self.max_pending or time.monotonic() - self._last_send > 0.2:
                self.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            self.link.notify("log", level=self.level, lines=lines)
            self._last_send = time.monotonic()

    def close_out(self) -> None:
        if self._partial:
            self._pending.append(self._partial)
            self._partial = ""
        self.flush()


def capture_output(link: HostLink) -> tuple[LogStream, LogStream]:
    """Route print() and stderr output of user code into the run log."""
    out, err = LogStream(link, "info"), LogStream(link, "error")
    sys.stdout, sys.stderr = out, err
    return out, err
