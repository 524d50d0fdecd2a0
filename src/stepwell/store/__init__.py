"""Where tables and engine bookkeeping live: ``open_store`` picks the backend.

The interface is in :mod:`stepwell.store.base`; ``DuckDBStore`` (embedded,
default) and ``PostgresStore`` implement it. Backends are imported on first
use, so PostgreSQL's driver is only loaded when a PostgreSQL URL is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepwell.store.base import (
    ID_COLUMN,
    ColumnInfo,
    ConcurrentChange,
    InvalidName,
    LogLine,
    PartitionRecord,
    RunRecord,
    SchemaConflict,
    Store,
    StoreError,
    StreamPosition,
    TableInfo,
    TableVersion,
    Transaction,
)

if TYPE_CHECKING:
    from stepwell.store.duckdb import DuckDBStore
    from stepwell.store.postgres import PostgresStore

__all__ = [
    "ID_COLUMN",
    "ColumnInfo",
    "ConcurrentChange",
    "InvalidName",
    "DuckDBStore",
    "LogLine",
    "PartitionRecord",
    "PostgresStore",
    "RunRecord",
    "SchemaConflict",
    "Store",
    "StoreError",
    "StreamPosition",
    "TableInfo",
    "TableVersion",
    "Transaction",
    "open_store",
]

#: Where the embedded store of an app lives, relative to the app folder.
DEFAULT_DUCKDB_PATH = Path(".stepwell") / "store.duckdb"
_DUCKDB_SCHEME = "duckdb://"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _duckdb_path(location: str, app_dir: Path) -> Path | str:
    if location == ":memory:":
        return location
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = Path(app_dir) / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def open_store(url: str | None, app_dir: Path) -> Store:
    """Open the store named by ``url`` for the app in ``app_dir``.

    - ``None``, ``""`` or ``"duckdb"``: the app's embedded DuckDB file,
      ``app_dir/.stepwell/store.duckdb`` (the folder is created);
    - ``duckdb:///abs/path.duckdb`` or ``duckdb://rel/path.duckdb``, or any
      path ending in ``.duckdb`` (relative paths are relative to ``app_dir``);
    - ``postgresql://…`` or ``postgres://…``: a PostgreSQL database.
    """
    from stepwell.store.duckdb import DuckDBStore

    text = (url or "").strip()
    if text in ("", "duckdb"):
        return DuckDBStore(_duckdb_path(str(DEFAULT_DUCKDB_PATH), app_dir))
    if text.startswith(_POSTGRES_SCHEMES):
        from stepwell.store.postgres import PostgresStore

        return PostgresStore(text)
    if text.startswith(_DUCKDB_SCHEME):
        location = text[len(_DUCKDB_SCHEME) :]
        if location.startswith("/"):
            location = "/" + location.lstrip("/")
        if not location:
            raise StoreError(f"store URL {url!r} names no file: use duckdb:///path/to/store.duckdb")
        return DuckDBStore(_duckdb_path(location, app_dir))
    if text.endswith(".duckdb"):
        return DuckDBStore(_duckdb_path(text, app_dir))
    raise StoreError(
        f"unknown store {url!r}: use 'duckdb' (the default), a path ending in .duckdb, "
        "duckdb:///path/to/file.duckdb, or a postgresql://user:password@host/db URL"
    )


def __getattr__(name: str) -> Any:
    if name == "DuckDBStore":
        from stepwell.store.duckdb import DuckDBStore

        return DuckDBStore
    if name == "PostgresStore":
        from stepwell.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module 'stepwell.store' has no attribute {name!r}")
