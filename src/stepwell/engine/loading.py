"""`stepwell load`: a file's rows appended to a table in one committed write."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from stepwell.engine.staging import StagedRun
from stepwell.store.base import Store


def read_file(path: Path) -> pa.Table:
    """Read .csv, .jsonl/.ndjson, .json (an array of objects) or .parquet; a file
    that cannot be read as its type raises ValueError naming it."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return _read(path)
    except ValueError as exc:  # (pyarrow's ArrowInvalid and UnicodeDecodeError are ValueErrors)
        message = str(exc)
        if message.startswith(str(path)):
            raise
        raise ValueError(f"{path}: {message}") from None


def _read(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        from pyarrow import csv

        return csv.read_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        from pyarrow import json as pa_json

        return pa_json.read_json(path)
    if suffix == ".json":
        import json

        from stepwell.runtimes.node.records import records_to_arrow

        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON object or an array of objects")
        return records_to_arrow(data, path.name)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .jsonl, .json or .parquet)")


def load_file(store: Store, table: str, path: Path) -> int:
    data = read_file(Path(path))
    staged = StagedRun(store, run_id="", step="")
    try:
        rows = staged.write(table, data)
        staged.commit(positions=None, state=None)
    except BaseException:
        staged.rollback()
        raise
    return rows
