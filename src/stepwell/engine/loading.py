"""`stepwell load`: a file's rows appended to a table in one committed write."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

from stepwell.engine.staging import StagedRun
from stepwell.store.base import Store


def read_file(path: Path) -> pa.Table:
    """Read .csv, .jsonl/.ndjson, .json (an array of objects) or .parquet; a file
    that cannot be read as its type raises ValueError naming it."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a file; load its files one at a time "
                         "(.csv, .jsonl, .json or .parquet)")
    try:
        return _read(path)
    except ValueError as exc:  # (pyarrow's ArrowInvalid and UnicodeDecodeError are ValueErrors)
        message = str(exc)
        if path.suffix.lower() in (".jsonl", ".ndjson"):  # Arrow counts lines from 0
            message = re.sub(r"in row (\d+)$", lambda m: f"on line {int(m.group(1)) + 1}", message)
        if message.startswith(str(path)):
            raise
        raise ValueError(f"{path}: {message}") from None


def _read(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        from pyarrow import csv

        with path.open("rb") as head:
            if head.read(2) in (b"\xff\xfe", b"\xfe\xff"):  # what "Unicode text" exports are
                raise ValueError(f"{path}: the file is UTF-16 text; save it as UTF-8 (CSV UTF-8) "
                                 f"or convert it: `iconv -f utf-16 -t utf-8 {path.name}`")  # fmt: skip
        data = csv.read_csv(path)
        try:
            data.column_names  # noqa: B018 - the header is decoded here
        except UnicodeDecodeError:
            _refuse_non_utf8(path)
            raise
        if any(pa.types.is_binary(field.type) for field in data.schema):
            _refuse_non_utf8(path)  # Arrow keeps text it cannot decode as bytes
        return data
    if suffix in (".jsonl", ".ndjson"):
        from pyarrow import json as pa_json

        from stepwell.store.schema import MAX_NESTING

        data = pa_json.read_json(path)
        for field in data.schema:
            if _levels(field.type) > MAX_NESTING:
                raise ValueError(f"{path}: field {field.name!r} is nested more than "
                                 f"{MAX_NESTING} levels deep; flatten it first")  # fmt: skip
        return data
    if suffix == ".json":
        import json

        from stepwell.runtimes.node.records import records_to_arrow

        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON object or an array of objects")
        return records_to_arrow(data, path.stem, source=f"file {path.name!r}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .jsonl, .json or .parquet)")


def _levels(data_type: pa.DataType) -> int:
    """Levels of structs and lists in ``data_type`` (0 for a plain value)."""
    deepest, todo = 0, [(data_type, 0)]
    while todo:
        current, depth = todo.pop()
        deepest = max(deepest, depth)
        todo.extend((current.field(i).type, depth + 1) for i in range(current.num_fields))
    return deepest


def _refuse_non_utf8(path: Path) -> None:
    """Raise naming the first line of ``path`` that is not UTF-8 (if there is one)."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}: line {number} is not UTF-8 text ({exc.reason} at byte "
                    f"{exc.start}); convert the file to UTF-8 first, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`"
                ) from None


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
