"""A run's log: redacted, capped, written to the store in small batches."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable

from stepwell.store.base import LogLine, Store

#: A run keeps at most this many log lines / characters; the rest is counted, not kept.
MAX_LINES = 100_000
MAX_CHARS = 20_000_000
MAX_LINE_CHARS = 10_000
REDACTED = "***"


class Redactor:
    """Replaces every secret value (and any line-split fragment of one) with ``***``."""

    def __init__(self, secrets: Iterable[str]):
        # Longest first so a secret containing another is replaced whole.
        self.values = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str | None) -> str | None:
        if not text or not self.values:
            return text
        for value in self.values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


class RunLog:
    def __init__(
        self,
        store: Store,
        run_id: str,
        redact: Redactor,
        on_line: Callable[[LogLine], None] | None = None,
        flush_seconds: float = 0.5,
    ):
        self.store = store
        self.run_id = run_id
        self.redact = redact
        self.on_line = on_line
        self.flush_seconds = flush_seconds
        self._pending: list[LogLine] = []
        self._seq = 0
        self._chars = 0
        self._dropped = 0
        self._last_flush = time.monotonic()

    def add(self, level: str, lines: Iterable[str]) -> None:
        now = dt.datetime.now(dt.UTC)
        for raw in lines:
            if self._seq >= MAX_LINES or self._chars >= MAX_CHARS:
                self._dropped += 1
                continue
            text = str(raw)
            if len(text) > MAX_LINE_CHARS:
                text = text[:MAX_LINE_CHARS] + f"... [{len(text) - MAX_LINE_CHARS} more characters]"
            line = LogLine(self.run_id, self._seq, now, str(level), self.redact(text) or "")
            self._seq += 1
            self._chars += len(text)
            self._pending.append(line)
            if self.on_line:
                self.on_line(line)
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
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
