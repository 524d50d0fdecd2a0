"""What the store knows of its tables' shapes, kept between transactions.

Every run asks the store for the columns and the registration (version,
``unique_on``) of the tables it reads and writes: on DuckDB each question is a
catalog query of ~0.5 ms, asked about seven times by a processor run on a small
batch. While one process owns the store (embedded DuckDB) every change to those
shapes goes through this process's transactions, which say so
(:meth:`CatalogCache.begin_change` / :meth:`CatalogCache.end_change`); the
answers can then be kept until the next change. A store that other hosts write
too (PostgreSQL) keeps none.

A session may use the cache only if no shape change began since the session
opened, and none is in progress: a session opened earlier may hold a snapshot
from before a change that has committed since (its own answers must come from
that snapshot), and during a change committing, a new session's snapshot may
fall on either side of it.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

#: returned by :meth:`CatalogView.get` when the cache cannot answer
MISSING = object()


class CatalogCache:
    """Answers of catalog questions, cleared at every change of a table's shape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._changing = 0
        self._answers: dict[tuple[str, str], Any] = {}

    def view(self) -> CatalogView:
        """The cache as a session opened now may use it."""
        with self._lock:
            return CatalogView(self, self._generation)

    def begin_change(self) -> None:
        """A transaction is about to change a table's shape or registration: the
        cache answers nobody until :meth:`end_change`."""
        self._changed(+1)

    def end_change(self) -> None:
        """A transaction that changed shapes committed or rolled back."""
        self._changed(-1)

    def _changed(self, changing: int) -> None:
        with self._lock:
            self._changing += changing
            self._generation += 1
            self._answers.clear()

    def get(self, generation: int, key: tuple[str, str]) -> Any:
        """The answer (a copy) for a session opened at ``generation``, or :data:`MISSING`."""
        with self._lock:
            if self._changing or generation != self._generation:
                return MISSING
            answer = self._answers.get(key, MISSING)
        return answer if answer is MISSING else copy.deepcopy(answer)

    def put(self, generation: int, key: tuple[str, str], answer: Any) -> None:
        """Keep what a session opened at ``generation`` found, if still current."""
        with self._lock:
            if not self._changing and generation == self._generation:
                self._answers[key] = copy.deepcopy(answer)


class CatalogView:
    """One session's access to the cache: the generation it was opened in."""

    def __init__(self, cache: CatalogCache, generation: int):
        self._cache = cache
        self._generation = generation

    def get(self, key: tuple[str, str]) -> Any:
        return self._cache.get(self._generation, key)

    def put(self, key: tuple[str, str], answer: Any) -> None:
        self._cache.put(self._generation, key, answer)

    def begin_change(self) -> None:
        self._cache.begin_change()

    def end_change(self) -> None:
        self._cache.end_change()
