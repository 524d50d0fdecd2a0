"""Tests for stepwell.store.ids: monotonic lowercase ULIDs."""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from stepwell.store import ids

ULID_RE = re.compile(r"^[0-7][0-9a-hjkmnp-tv-z]{25}$")


def _value(s: str) -> int:
    """Decode independently of the module under test."""
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    v = 0
    for c in s:
        v = v * 32 + alphabet.index(c)
    return v


def _assert_strictly_increasing(values: list[str]) -> None:
    for a, b in zip(values, values[1:], strict=False):
        assert a < b, (a, b)


def test_format_single_and_batch() -> None:
    one = ids.new_id()
    batch = ids.new_ids(1000)
    assert isinstance(batch, pa.StringArray)
    assert batch.type == pa.string()
    assert len(batch) == 1000
    assert batch.null_count == 0
    for value in [one, *batch.to_pylist()]:
        assert len(value) == 26
        assert ULID_RE.match(value), value
        assert not set(value) & set("ilouILOU")
        assert value == value.lower()


def test_new_ids_zero_and_one() -> None:
    empty = ids.new_ids(0)
    assert isinstance(empty, pa.StringArray)
    assert len(empty) == 0
    assert empty.to_pylist() == []
    single = ids.new_ids(1)
    assert len(single) == 1 and ULID_RE.match(single[0].as_py())


def test_new_ids_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        ids.new_ids(-1)
    with pytest.raises(ValueError):
        ids.new_ids(ids.MAX_BATCH + 1)


def test_batch_values_are_consecutive() -> None:
    values = [_value(s) for s in ids.new_ids(5000).to_pylist()]
    assert values == list(range(values[0], values[0] + 5000))


def test_monotonic_interleaved() -> None:
    issued: list[str] = []
    for i in range(300):
        issued.append(ids.new_id())
        issued.extend(ids.new_ids(i % 7).to_pylist())
        issued.extend(ids.new_ids(1000).to_pylist() if i % 50 == 0 else [])
    _assert_strictly_increasing(issued)
    assert len(set(issued)) == len(issued)


def test_monotonic_when_clock_goes_backwards(monkeypatch: pytest.MonkeyPatch) -> None:
    before = ids.new_id()
    real = ids._now_ms()
    monkeypatch.setattr(ids, "_now_ms", lambda: real - 60_000)
    after = [ids.new_id(), *ids.new_ids(10).to_pylist(), ids.new_id()]
    _assert_strictly_increasing([before, *after])
    # The timestamp does not go back with the clock.
    assert ids.ulid_timestamp(after[-1]) >= ids.ulid_timestamp(before)


def test_random_part_overflow_advances_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    ms = ids._now_ms() + 1000  # in the future, so the state is "same millisecond"
    monkeypatch.setattr(ids, "_now_ms", lambda: ms)
    monkeypatch.setattr(ids, "_last", (ms << 80) | ((1 << 80) - 3))
    batch = ids.new_ids(6).to_pylist()
    _assert_strictly_increasing(batch)
    values = [_value(s) for s in batch]
    assert values == list(range(values[0], values[0] + 6))
    stamps = [ids.ulid_timestamp(s) for s in batch]
    base = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert stamps[:2] == [base, base]
    assert stamps[2:] == [base + timedelta(milliseconds=1)] * 4
    assert batch[2].endswith("0" * 16)


def test_carry_from_low_64_bits_inside_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    ms = ids._now_ms() + 2000
    monkeypatch.setattr(ids, "_now_ms", lambda: ms)
    monkeypatch.setattr(ids, "_last", (ms << 80) | ((1 << 64) - 4))
    batch = ids.new_ids(8).to_pylist()
    values = [_value(s) for s in batch]
    assert values == list(range(values[0], values[0] + 8))
    assert ids.new_id() > batch[-1]


def test_monotonic_across_threads() -> None:
    per_thread: dict[int, list[str]] = {}
    barrier = threading.Barrier(8)

    def work(k: int) -> None:
        out: list[str] = []
        barrier.wait()
        for i in range(200):
            if i % 2:
                out.append(ids.new_id())
            else:
                out.extend(ids.new_ids(1 + (i * 37 + k) % 500).to_pylist())
        per_thread[k] = out

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything: list[str] = []
    for out in per_thread.values():
        _assert_strictly_increasing(out)
        everything.extend(out)
    assert len(set(everything)) == len(everything)
    assert ids.new_id() > max(everything)


def test_timestamp_close_to_now() -> None:
    before = datetime.now(UTC)
    single = ids.new_id()
    batch = ids.new_ids(10)
    after = datetime.now(UTC)
    slack = timedelta(seconds=1)  # ids issued earlier in a burst may run ahead a little
    for value in (single, batch[0].as_py(), batch[9].as_py()):
        stamp = ids.ulid_timestamp(value)
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
        assert before - slack <= stamp <= after + slack


def test_ulid_timestamp_rejects_garbage() -> None:
    for bad in ["", "abc", "0" * 25, "0" * 27, "01m8azhvc4zzzzzzzzzzzzzzzi", "8" + "0" * 25]:
        with pytest.raises(ValueError):
            ids.ulid_timestamp(bad)
    # Uppercase is accepted.
    value = ids.new_id()
    assert ids.ulid_timestamp(value.upper()) == ids.ulid_timestamp(value)


def test_lexicographic_order_equals_numeric_order() -> None:
    sample = [ids.new_id() for _ in range(50)] + ids.new_ids(50).to_pylist()
    sample += ["0" * 26, "7" + "z" * 25, "01" + "z" * 24, "02" + "0" * 24]
    assert sorted(sample) == sorted(sample, key=_value)
    # Arrow's own sort agrees as well.
    arr = pa.array(list(reversed(sample)), type=pa.string())
    assert arr.take(pa.compute.sort_indices(arr)).to_pylist() == sorted(sample, key=_value)


def test_compatible_with_python_ulid() -> None:
    ulid = pytest.importorskip("ulid")
    for value in [ids.new_id(), *ids.new_ids(20).to_pylist()]:
        parsed = ulid.ULID.from_str(value.upper())
        assert str(parsed).lower() == value
        assert int(parsed) == _value(value)
        assert abs(parsed.datetime - ids.ulid_timestamp(value)) < timedelta(milliseconds=1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_does_not_repeat_parent_ids() -> None:
    ids.new_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.write(w, ids.new_id().encode())
        finally:
            os._exit(0)
    os.close(w)
    parent_next = ids.new_id()
    child_next = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert ULID_RE.match(child_next)
    assert child_next != parent_next


def test_speed_one_million() -> None:
    ids.new_ids(1000)  # warm up
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        arr = ids.new_ids(1_000_000)
        timings.append(time.perf_counter() - start)
    best = min(timings)
    print(
        f"\nnew_ids(1_000_000): best {best * 1000:.1f} ms of {[round(t * 1000, 1) for t in timings]}"
    )
    assert len(arr) == 1_000_000
    assert arr[0].as_py() < arr[999_999].as_py()
    assert arr.buffers()[2].size == 26 * 1_000_000  # data buffer holds exactly the chars
    arr.validate(full=True)
    assert best < 1.0  # generous bound for slow CI; expected ~tens of ms

    start = time.perf_counter()
    for _ in range(10_000):
        ids.new_id()
    per_call = (time.perf_counter() - start) / 10_000
    print(f"new_id(): {per_call * 1e6:.2f} us per call")
