"""A run's log: redacted, capped, written to the store in small batches."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from stepwell.store.base import LogLine, Store

#: A run keeps at most this many log lines / characters; the rest is counted, not kept.
MAX_LINES = 100_000
MAX_CHARS = 20_000_000
MAX_LINE_CHARS = 10_000
REDACTED = "***"
#: Pieces of a secret this long or longer are masked wherever they show up, in any
#: letter case (a secret printed in parts on one line, or sliced, or lowercased).
FRAGMENT_CHARS = 8


def secret_strings(value: Any) -> list[str]:
    """Every text inside a resolved secret (a string, or a connection's values),
    for the ``Redactor``. A string holding a JSON object or array (a connector's
    credentials, say) gives its values too: code parses it and prints a field."""
    if isinstance(value, str):
        if value.lstrip()[:1] in ("{", "["):
            try:
                parsed = json.loads(value)
            except ValueError:
                return [value]
            if isinstance(parsed, (dict, list)):
                return [value, *secret_strings(parsed)]
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in secret_strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in secret_strings(v)]
    # (a flag is no secret: masking "True" would hide every True in the log)
    return [str(value)] if value is not None and not isinstance(value, bool) else []


class Redactor:
    """Replaces every secret value with ``***``, wherever it shows up in text.

    A secret is found whole, escaped as ``repr``/JSON would print it, and also
    when it is broken across lines (printed piece by piece, or wrapped): line
    breaks inside an occurrence are ignored when matching, and every piece is
    masked. Any run of ``FRAGMENT_CHARS`` or more characters of a secret is
    masked too, in any letter case. ``RunLog`` feeds it the run's whole output as
    one stream, holding back the last lines while they might still be the start
    of a secret."""

    def __init__(self, secrets: Iterable[str]):
        self.values = secrets

    @property
    def values(self) -> list[str]:
        """The secret values (shorter than 4 characters are not redacted)."""
        return self._values

    @values.setter
    def values(self, secrets: Iterable[str]) -> None:
        # Longest first so a secret containing another is replaced whole.
        self._values = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        needles = set(self._values)
        for value in self._values:
            needles.add(repr(value)[1:-1])
            needles.add(json.dumps(value)[1:-1])
        self._needles = sorted((n for n in needles if len(n) >= 4), key=len, reverse=True)
        self._starts = {n[0] for n in self._needles}
        fragments = {
            value[at : at + FRAGMENT_CHARS].lower()
            for value in self._values
            if len(value) > FRAGMENT_CHARS
            for at in range(len(value) - FRAGMENT_CHARS + 1)
        }
        self._fragments = sorted(fragments)

    def __call__(self, text: str | None) -> str | None:
        if not text or not self._needles:
            return text
        if "\n" not in text and not self._fragments:
            for needle in self._needles:
                if needle in text:
                    text = text.replace(needle, REDACTED)
            return text
        masked, _ = self.mask_lines(text.split("\n"), final=True)
        return "\n".join(masked)

    def mask_lines(self, lines: list[str], final: bool) -> tuple[list[str], int]:
        """Mask secrets in consecutive ``lines`` read as one stream (line breaks
        ignored). Returns the masked lines and how many of them are safe to
        release: unless ``final``, lines that may hold the start of a secret whose
        rest has not arrived yet are not."""
        if not self._needles:
            return list(lines), len(lines)
        joined = "".join(lines)
        hidden = bytearray(len(joined))
        for needle in self._needles:
            at = joined.find(needle)
            while at != -1:
                hidden[at : at + len(needle)] = b"\x01" * len(needle)
                at = joined.find(needle, at + 1)
        folded = joined.lower()
        if len(folded) != len(joined):  # (a few letters lower to two characters)
            folded = joined
        for fragment in self._fragments:  # overlapping finds: their union is masked
            at = folded.find(fragment)
            while at != -1:
                hidden[at : at + FRAGMENT_CHARS] = b"\x01" * FRAGMENT_CHARS
                at = folded.find(fragment, at + 1)
        release = len(lines)
        if not final:
            hold_at = self._partial_start(joined)
            if hold_at is not None:
                offset = 0
                for index, line in enumerate(lines):
                    if offset + len(line) > hold_at:
                        release = index
                        break
                    offset += len(line)
        if 1 not in hidden:  # (C speed; any() would walk it in Python)
            return list(lines), release
        masked = []
        offset = 0
        for line in lines:
            marks = hidden[offset : offset + len(line)]
            offset += len(line)
            if 1 not in marks:
                masked.append(line)
                continue
            parts, previous = [], 0
            for i, flag in enumerate(marks):
                if flag and (i == 0 or not marks[i - 1]):
                    parts.append(line[previous:i] + REDACTED)
                if not flag and i > 0 and marks[i - 1]:
                    previous = i
            if not marks[-1]:
                parts.append(line[previous:])
            masked.append("".join(parts))
        return masked, release

    def _partial_start(self, text: str) -> int | None:
        """Earliest position from which ``text`` is the beginning of a secret."""
        longest = len(self._needles[0])
        for at in range(max(0, len(text) - longest + 1), len(text)):
            if text[at] in self._starts:
                tail = text[at:]
                if any(n.startswith(tail) for n in self._needles):
                    return at
        return None


class RunLog:
    def __init__(
        self,
        store: Store,
        run_id: str,
        redact: Redactor,
        on_line: Callable[[LogLine], None] | None = None,
        flush_seconds: float = 0.5,
        *,
        prompt: bool = False,
    ):
        self.store = store
        self.run_id = run_id
        self.redact = redact
        self.on_line = on_line
        self.flush_seconds = flush_seconds
        self._pending: list[LogLine] = []
        #: (level, text, time, prefix) of lines not yet released: they may end in part
        #: of a secret
        self._held: list[tuple[str, str, dt.datetime, str]] = []
        self._seq = 0
        self._chars = 0
        self._dropped = 0
        self._last_flush = time.monotonic()
        #: ``prompt``: lines reach the store ``flush_seconds`` after they came even when
        #: no more come (a Ray task's lines reach the server only through the store),
        #: written by a timer thread; the lock keeps the writes whole and in order
        self._prompt = prompt
        self._timer: threading.Timer | None = None
        self._lock = threading.RLock()

    def add(self, level: str, lines: Iterable[str], prefix: str = "") -> None:
        """Add output lines. ``prefix`` (e.g. an action step's ``[name] ``) is put in
        front of each line after redaction, so it never splits a secret printed in
        pieces over several lines."""
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            for raw in lines:
                if self._seq + len(self._held) >= MAX_LINES or self._chars >= MAX_CHARS:
                    self._dropped += 1
                    continue
                text = str(raw)
                self._chars += min(len(text), MAX_LINE_CHARS)
                self._held.append((str(level), text, now, prefix))
            self._release(final=False)
            if time.monotonic() - self._last_flush > self.flush_seconds:
                self._write()
            elif self._prompt and self._pending and self._timer is None:
                self._timer = threading.Timer(self.flush_seconds, self._timed_write)
                self._timer.daemon = True
                self._timer.start()

    def _timed_write(self) -> None:
        with self._lock:
            self._timer = None
            self._write()

    def _release(self, final: bool) -> None:
        """Redact the held lines as one stream and pass on those that are safe."""
        if not self._held:
            return
        masked, count = self.redact.mask_lines([text for _, text, _, _ in self._held], final)
        for (level, _, when, prefix), text in zip(self._held[:count], masked[:count], strict=True):
            text = prefix + text
            if len(text) > MAX_LINE_CHARS:
                text = text[:MAX_LINE_CHARS] + f"... [{len(text) - MAX_LINE_CHARS} more characters]"
            line = LogLine(self.run_id, self._seq, when, level, text)
            self._seq += 1
            self._pending.append(line)
            if self.on_line:
                self.on_line(line)
        del self._held[:count]

    def flush(self) -> None:
        """Write everything out (the run's output has ended, or a commit point)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._release(final=True)
            self._write()

    def _write(self) -> None:
        if self._dropped:
            note = (
                f"[stepwell] log limit reached ({MAX_LINES} lines or {MAX_CHARS} characters): "
                f"{self._dropped} more lines were not kept"
            )
            self._pending.append(LogLine(self.run_id, self._seq, dt.datetime.now(dt.UTC), "warn", note))
            self._seq += 1
            self._dropped = 0
        if self._pending:
            lines, self._pending = self._pending, []
            self.store.append_logs(lines)
        self._last_flush = time.monotonic()
