"""Monotonic, lowercase ULIDs for ``patterns_id`` columns.

A ULID is 128 bits: a 48-bit Unix timestamp in milliseconds followed by 80
random bits, written as 26 characters of Crockford base32.  Here they are
spelled in lowercase (``0-9`` and ``a-z`` without ``i``, ``l``, ``o``, ``u``),
so that lexicographic order of the strings equals numeric order of the values.

Every id issued by this module is strictly greater than every id issued before
it in the same process:

* on a new millisecond the random part is drawn afresh;
* within the same millisecond, or when the clock goes backwards, the previous
  value is incremented by one.  The 128-bit value is treated as a single
  counter, so if the 80-bit random part would overflow the carry advances the
  timestamp part by one millisecond instead.

:func:`new_ids` reserves a whole block of ``n`` consecutive values under a lock
and encodes it with numpy into one Arrow string array, without a per-row Python
loop.  A forked child process jumps its inherited counter forward by a random
64-bit amount, so parent and child do not hand out the same ids.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

__all__ = [
    "ULID_LENGTH", "MAX_BATCH", "new_id", "new_ids", "ulid_timestamp", "advance_past", "high_water",
]  # fmt: skip

ULID_LENGTH = 26
"""Number of characters of an encoded ULID."""

MAX_BATCH = (2**31 - 1) // ULID_LENGTH
"""Largest ``n`` for :func:`new_ids` (the Arrow ``string`` type has int32 offsets)."""

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_ALPHABET_BYTES = np.frombuffer(_ALPHABET.encode("ascii"), dtype=np.uint8)
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}

_RANDOM_BITS = 80
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1
_MAX_VALUE = (1 << 128) - 1
_MASK64 = (1 << 64) - 1

_lock = threading.Lock()
_last = -1  # last value issued in this process (-1: none yet)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _random80() -> int:
    return int.from_bytes(os.urandom(_RANDOM_BITS // 8), "big")


def _reserve(n: int) -> int:
    """Reserve ``n`` (>= 1) consecutive values and return the first one."""
    global _last
    now = _now_ms()
    with _lock:
        if _last < 0 or now > (_last >> _RANDOM_BITS):
            start = (now << _RANDOM_BITS) | _random80()
        else:  # same millisecond, or the clock went backwards
            start = _last + 1
        end = start + n - 1
        if end > _MAX_VALUE:  # only after the year 10889
            raise OverflowError("ULID space exhausted")
        _last = end
    return start


def _after_fork_in_child() -> None:
    # The lock may have been held by another thread of the parent at fork time.
    global _lock, _last
    _lock = threading.Lock()
    if _last >= 0:
        # Parent and child would otherwise both continue from the same value.
        _last = min(_last + 1 + int.from_bytes(os.urandom(8), "big"), _MAX_VALUE)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _encode(value: int) -> str:
    chars = []
    for _ in range(ULID_LENGTH):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id() -> str:
    """Return one new id, greater than every id issued before in this process."""
    return _encode(_reserve(1))


# Character j holds bits [s, s + 5) with s = 5 * (25 - j); the first character
# only has the top 3 bits (125..127), so it is always one of 0-7.
_SHIFTS = [5 * (ULID_LENGTH - 1 - j) for j in range(ULID_LENGTH)]
# Columns entirely inside the high 64 bits (0..12), and the one column that
# straddles the two halves (13, bits 60..64).  The remaining twelve columns
# (14..25) come from the low 64 bits and are written two at a time.
_HI_COLS = [j for j, s in enumerate(_SHIFTS) if s >= 64]
_STRADDLE_COL = next(j for j, s in enumerate(_SHIFTS) if s < 64 < s + 5)
_STRADDLE_SHIFT = _SHIFTS[_STRADDLE_COL]
_LO_PAIRS = (ULID_LENGTH - _STRADDLE_COL - 1) // 2

# Two characters for each 10-bit value, as one native uint16, so the low half is
# encoded with 6 gathers instead of 12.
_pairs = np.empty((1024, 2), dtype=np.uint8)
_pairs[:, 0] = _ALPHABET_BYTES[np.arange(1024) >> 5]
_pairs[:, 1] = _ALPHABET_BYTES[np.arange(1024) & 31]
_PAIR_TABLE = _pairs.view(np.uint16).ravel()
del _pairs


def new_ids(n: int) -> pa.StringArray:
    """Return ``n`` new ids as an Arrow string array, in strictly increasing order.

    All of them are greater than every id issued before in this process.  The
    values are consecutive 128-bit integers, reserved in one step under a lock,
    and encoded with numpy straight into an Arrow buffer viewed as an
    ``(n, 26)`` byte matrix, which becomes the array's data without a copy.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > MAX_BATCH:
        raise ValueError(f"n must be <= {MAX_BATCH}, got {n}")
    if n == 0:
        return pa.array([], type=pa.string())

    start = _reserve(n)
    start_hi, start_lo = start >> 64, start & _MASK64

    # Buffers come from Arrow's memory pool, which recycles freed memory: much
    # cheaper than fresh pages from the OS for repeated large batches.
    data = pa.allocate_buffer(n * ULID_LENGTH)
    offsets = pa.allocate_buffer((n + 1) * 4)
    chars = np.frombuffer(data, dtype=np.uint8).reshape(n, ULID_LENGTH)
    offs = np.frombuffer(offsets, dtype=np.int32)

    # Low 64 bits of each value (wrapping modulo 2**64); rows from ``split`` on
    # carried one into the high half (at most once, as n < 2**64).
    lo = np.arange(n, dtype=np.uint64)
    np.multiply(lo, ULID_LENGTH, out=offs[:n], casting="unsafe")
    offs[n] = n * ULID_LENGTH
    lo += np.uint64(start_lo)
    split = min(n, (1 << 64) - start_lo)
    his = (start_hi, start_hi + 1)

    # The high half takes one of only two values: encode each once, then fill.
    for rows, hi in ((slice(0, split), his[0]), (slice(split, n), his[1])):
        chars[rows, _HI_COLS[0] : _HI_COLS[-1] + 1] = _ALPHABET_BYTES[
            [(hi >> (_SHIFTS[j] - 64)) & 31 for j in _HI_COLS]
        ]

    # The straddling character: low bit of ``hi`` above the top 4 bits of ``lo``.
    scratch = np.empty(n, dtype=np.uint64)
    np.right_shift(lo, np.uint64(_STRADDLE_SHIFT), out=scratch)
    up = 64 - _STRADDLE_SHIFT
    scratch[:split] |= np.uint64((his[0] << up) & 31)
    scratch[split:] |= np.uint64((his[1] << up) & 31)
    chars[:, _STRADDLE_COL] = _ALPHABET_BYTES[scratch]

    # The low half, ten bits (two characters) at a time, last pair first.
    pair_cols = chars.view(np.uint16)  # (n, 13); pair k is bytes 2k, 2k + 1
    ten_bits = np.uint64(1023)
    for k in range(_LO_PAIRS):
        np.right_shift(lo, np.uint64(10 * k), out=scratch)
        np.bitwise_and(scratch, ten_bits, out=scratch)
        pair_cols[:, ULID_LENGTH // 2 - 1 - k] = _PAIR_TABLE[scratch]

    return pa.StringArray.from_buffers(n, offsets, data)


def _decode(value: str) -> int:
    if len(value) != ULID_LENGTH:
        raise ValueError(f"not a ULID (expected {ULID_LENGTH} characters): {value!r}")
    result = 0
    try:
        for c in value.lower():
            result = (result << 5) | _DECODE[c]
    except KeyError:
        raise ValueError(f"not a ULID (invalid character {c!r}): {value!r}") from None
    if result > _MAX_VALUE:
        raise ValueError(f"not a ULID (value exceeds 128 bits): {value!r}")
    return result


def advance_past(floor: str) -> None:
    """Make every id issued from now on greater than ``floor`` (an id issued
    elsewhere: another host, whose clock may be ahead of ours)."""
    global _last
    value = _decode(floor)
    with _lock:
        _last = max(_last, value)


def high_water() -> str:
    """An id at least as great as every id issued so far in this process and
    every id it would issue in this millisecond's past (its clock's reading)."""
    with _lock:
        value = max(_last, _now_ms() << _RANDOM_BITS)
    return _encode(value)


def ulid_timestamp(id: str) -> datetime:
    """Return the creation time encoded in ``id`` as an aware UTC datetime.

    Uppercase ids are accepted too.  Raises :class:`ValueError` if ``id`` is not
    a valid ULID.
    """
    ms = _decode(id) >> _RANDOM_BITS
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
