"""Turning user records into Arrow, with errors that name the row and field."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import pyarrow as pa

#: Field metadata marking a text column that holds JSON documents.
JSON_META = {b"stepwell.type": b"json"}


class RecordError(ValueError):
    """A written record cannot be stored; the message names table, row and field."""


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")  # as the store's JSON has them
    if type(value).__str__ is object.__str__ and type(value).__repr__ is object.__repr__:
        # str() would store '<Foo object at 0x…>', which says nothing and reads back as text
        raise TypeError(f"a value of type {type(value).__name__} cannot be stored in JSON")
    return str(value)


def _json_texts(name: str, values: list[Any], where: str, first_row: int) -> list[str | None]:
    """Each nested value as JSON text; a value JSON cannot hold raises RecordError."""
    texts: list[str | None] = []
    for index, value in enumerate(values):
        try:
            texts.append(None if value is None else json.dumps(
                value, default=_json_default, allow_nan=False))
        except ValueError as exc:  # NaN and infinities (JSON has no such numbers), cycles
            problem = ("the value holds NaN or an infinity, which JSON cannot; write None instead"
                       if "float" in str(exc) else f"the value cannot be stored as JSON: {exc}")
        except TypeError as exc:
            problem = (f"{exc} (inside a dict or list); convert it to str, int, float, bool, "
                       "datetime, date, Decimal, dict or list")
        else:
            continue
        raise RecordError(f"{where}, row {first_row + index}, field {name!r}: {problem}") from None
    return texts


def _column(name: str, values: list[Any], where: str, first_row: int) -> pa.Array | tuple:
    """Convert one column; nested values become JSON text, conflicts raise RecordError
    (``where`` names the table, or the file, in messages)."""
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, (dict, list, tuple)):
        from stepwell.store.schema import MAX_NESTING, nested_too_deep

        for index, value in enumerate(values):
            if nested_too_deep(value):
                raise RecordError(
                    f"{where}, row {first_row + index}, field {name!r}: the value is "
                    f"nested more than {MAX_NESTING} levels deep; flatten it or store it as text"
                )
        return pa.array(_json_texts(name, values, where, first_row), pa.string()), True
    try:
        return pa.array(values), False
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, UnicodeError) as exc:
        first_type = type(sample)
        for index, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
                raise RecordError(
                    f"{where}, row {first_row + index}, field {name!r}: the integer "
                    f"{value} is outside the 64-bit range a column holds; store it as str or Decimal"
                ) from None
            problem = _unstorable(value)
            if problem:
                raise RecordError(
                    f"{where}, row {first_row + index}, field {name!r}: {problem}"
                ) from None
            try:
                pa.array([value])
            except Exception:
                raise RecordError(
                    f"{where}, row {first_row + index}, field {name!r}: a value of "
                    f"type {type(value).__name__} cannot be stored; convert it to str, int, "
                    f"float, bool, datetime, date, Decimal, dict or list"
                ) from None
            if type(value) is not first_type and not (
                isinstance(value, (int, float)) and isinstance(sample, (int, float))
            ):
                raise RecordError(
                    f"{where}, row {first_row + index}, field {name!r}: got "
                    f"{type(value).__name__} {value!r:.60} but earlier rows have "
                    f"{first_type.__name__}; write one type per field"
                ) from None
        raise RecordError(f"{where}, field {name!r}: {exc}") from None


def _unstorable(value: Any) -> str | None:
    """Why a value of a storable type still cannot be stored, if it cannot."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"the text is not valid Unicode ({exc.reason} at position {exc.start}, e.g. "
                    "bytes decoded with errors='surrogateescape'); clean it first, e.g. "
                    "text.encode('utf-8', 'replace').decode()")  # fmt: skip
    if isinstance(value, Decimal) and not value.is_finite():
        return f"Decimal {value} is not a number a column can hold; write None, or a float"
    return None


def records_to_arrow(
    records: list[dict[str, Any]], table: str, first_row: int = 0, *, source: str | None = None
) -> pa.Table:
    """Build an Arrow table from dict records (missing keys become NULL). Errors name
    ``table``, or ``source`` (e.g. the file the records come from) when given."""
    where = source or f"table {table!r}"
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RecordError(
                f"{where}, row {first_row + index}: expected a dict (one record), "
                f"got {type(record).__name__} {record!r:.60}"
            )
    first = records[0].keys() if records else {}.keys()
    value_types = set(map(type, itertools.chain.from_iterable(map(dict.values, records))))
    # from_pylist takes its columns from the first record: only when no later one has
    # more, and no value is a dict or list (those become JSON text below; Arrow would
    # infer a struct type per level of nesting first, at a cost that explodes with depth)
    flat = not any(issubclass(t, (dict, list, tuple)) for t in value_types)
    if flat and all(record.keys() <= first for record in records):
        try:
            result = pa.Table.from_pylist(records)
            if not any(pa.types.is_nested(f.type) for f in result.schema):
                return result
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, UnicodeError):
            pass  # told apart column by column below
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    arrays, fields = [], []
    for name in names:
        array, is_json = _column(name, [r.get(name) for r in records], where, first_row)
        arrays.append(array)
        fields.append(pa.field(str(name), array.type, metadata=JSON_META if is_json else None))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def to_records(data: Any) -> Iterable[dict[str, Any]] | pa.Table:
    """Normalise what a user passes to append/upsert: a dict, a list of dicts, or a
    DataFrame / Arrow table (returned as an Arrow table)."""
    if isinstance(data, dict):
        return [dict(data)]
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if type(data).__name__ == "DataFrame" and hasattr(data, "to_dict"):
        try:
            return pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            # a column Arrow cannot type as a whole (dicts and lists of mixed shapes,
            # mixed types): row by row, as records go (mixed shapes become JSON)
            return data.astype(object).where(data.notna(), None).to_dict("records")
    if isinstance(data, (list, tuple)) or hasattr(data, "__iter__"):
        return [dict(r) if isinstance(r, dict) else r for r in data]
    raise RecordError(
        f"cannot write a {type(data).__name__}; pass a dict, a list of dicts or a DataFrame"
    )
