"""Host <-> worker wire protocol.

A worker and its host exchange *frames* over a connected stream socket (a
``socketpair`` made by the host). Each frame is::

    !II header   msgpack-encoded control message (a dict)   body bytes

where the 8-byte prefix holds the lengths of the two parts. The control
message is small (an ``op`` plus arguments); bulk data travels in the body as
an Arrow IPC stream, so rows never cross the boundary one JSON object at a time.

The worker drives the conversation: it sends a request and, for request ops,
waits for exactly one reply (``{"ok": True, ...}`` or ``{"ok": False, "error":
"..."}``). Notification ops (``log``) get no reply. The host starts a run with
one ``start`` frame and ends it when it answers the worker's ``done``.

Datetimes, dates and Decimals inside control messages survive the trip via
msgpack extension types.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import socket
import struct
from typing import Any

import msgpack

_PREFIX = struct.Struct("!II")
#: Largest header we accept: control messages are small by design.
MAX_HEADER = 64 * 1024 * 1024
#: Largest body we accept in one frame (one Arrow batch or a log chunk).
MAX_BODY = 1024 * 1024 * 1024

_EXT_DATETIME, _EXT_DATE, _EXT_DECIMAL = 1, 2, 3
#: Frame parts up to this size are read into one buffer allocated up front.
_EAGER_READ = 64 * 1024 * 1024

#: Ops a worker may send that expect no reply. ``write`` is one so the worker can
#: go on producing rows while the host stores the previous batch; a failed write
#: is reported in the reply to the worker's next request. ``done`` is a worker's
#: last word: it exits at once, so its exit overlaps the host's final commit (a
#: commit that fails is the run's error, reported by the host).
NOTIFY_OPS = frozenset({"log", "write", "done"})


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


class PeerGone(ProtocolError):
    """The other side closed the connection (exited, crashed or was killed)."""


def _default(obj: Any) -> Any:
    if isinstance(obj, _dt.datetime):
        if obj != obj:  # pandas' NaT: a datetime subclass meaning "no time"
            return None
        return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, _dt.date):
        return msgpack.ExtType(_EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        return item()
    raise TypeError(f"cannot send a value of type {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    text = data.decode()
    if code == _EXT_DATETIME:
        return _dt.datetime.fromisoformat(text)
    if code == _EXT_DATE:
        return _dt.date.fromisoformat(text)
    if code == _EXT_DECIMAL:
        return decimal.Decimal(text)
    return msgpack.ExtType(code, data)


def pack(message: dict[str, Any]) -> bytes:
    """Encode a control message (raises TypeError for values it cannot carry)."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed control message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"control message must be a map, got {type(message).__name__}")
    return message


class Channel:
    """Frames over one connected socket. Not thread-safe: one reader, one writer."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, message: dict[str, Any], body: Any = b"") -> None:
        """Send one frame. ``body`` is bytes, or an Arrow table/batch, which is
        written as an IPC stream straight into the socket (no intermediate copy)."""
        header = pack(message)
        if isinstance(body, (bytes, bytearray, memoryview)):
            self.sock.sendall(_PREFIX.pack(len(header), len(body)) + header)
            if body:
                self.sock.sendall(body)
            return
        import pyarrow as pa

        sizer = pa.MockOutputStream()
        _write_ipc(sizer, body)
        self.sock.sendall(_PREFIX.pack(len(header), sizer.size()) + header)
        with self.sock.makefile("wb", buffering=1 << 20) as raw:
            _write_ipc(pa.PythonFile(raw, mode="w"), body)

    def recv(self) -> tuple[dict[str, Any], bytes | bytearray]:
        header_len, body_len = _PREFIX.unpack(self._read_exact(_PREFIX.size))
        if header_len > MAX_HEADER or body_len > MAX_BODY:
            raise ProtocolError(
                f"frame too large (header {header_len} bytes, body {body_len} bytes; "
                f"limits {MAX_HEADER} and {MAX_BODY})"
            )
        message = unpack(self._read_exact(header_len))
        body = self._read_exact(body_len) if body_len else b""
        return message, body

    def request(self, message: dict[str, Any], body: Any = b"") -> tuple[dict, bytes]:
        """Send a request and wait for its reply."""
        self.send(message, body)
        return self.recv()

    def _read_exact(self, n: int) -> bytearray:
        """Read exactly ``n`` bytes into one buffer (returned without a copy).

        The buffer grows (doubling) only as data actually arrives, so a peer that
        announces a huge frame and sends nothing costs (almost) nothing."""
        buf = bytearray(min(n, _EAGER_READ))
        got = 0
        while got < n:
            if got == len(buf):
                buf.extend(bytes(min(len(buf), n - len(buf))))
            with memoryview(buf) as view:
                chunk = self.sock.recv_into(view[got:], len(buf) - got)
            if chunk == 0:
                raise PeerGone("connection closed by peer")
            got += chunk
        return buf

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _write_ipc(sink: Any, table: Any) -> None:
    import pyarrow as pa

    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)


def encode_table(table: Any) -> bytes:
    """Arrow table or record batch -> IPC stream bytes."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return sink.getvalue().to_pybytes()


def decode_table(body: bytes) -> Any:
    """IPC stream bytes -> Arrow table."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    except pa.ArrowInvalid as exc:
        raise ProtocolError(f"malformed Arrow data: {exc}") from None
