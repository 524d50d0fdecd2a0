"""Column types: Arrow ↔ logical types ↔ SQL types, and the widening rule.

Both backends store the same small set of *logical* types, written as strings:
``int``, ``float``, ``decimal(p,s)``, ``str``, ``bool``, ``date``,
``datetime`` (naive), ``datetime_tz`` (UTC), ``json`` and ``binary``.

Incoming Arrow data is first :func:`normalize`-d to one Arrow type per logical
type (``int64``, ``float64``, ``decimal128``, ``string``, ``bool``, ``date32``,
``timestamp[us]``, ``timestamp[us, UTC]``, ``binary``; JSON is ``string`` with
field metadata ``{b"stepwell.type": b"json"}``). Nested values (structs, lists,
maps) become JSON text. Then :func:`plan_columns` decides, column by column,
whether the table's existing type can hold the incoming type as is, must be
widened (``ALTER``), or conflicts (:class:`SchemaConflict`); and
:func:`conform` casts the data to the table's column types.

Data read back comes out in the same canonical Arrow types (see
:func:`arrow_schema` and :func:`conform_batch`).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa

from stepwell.store.base import SchemaConflict, StoreError

#: Field metadata key marking a string column as JSON text.
TYPE_KEY = b"stepwell.type"
JSON_METADATA = {TYPE_KEY: b"json"}

#: The logical type of an all-null column (Arrow ``null``); never stored.
NULL = "null"
#: Type given to a new column whose incoming values are all null.
NULL_COLUMN_TYPE = "str"
#: Largest decimal precision both backends store exactly.
MAX_DECIMAL_PRECISION = 38

#: Levels of dicts and lists a stored JSON value may have (deeper ones are refused
#: when written: Arrow's type inference and every reader recurse per level)
MAX_NESTING = 100


def nested_too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """True when ``value`` has more than ``limit`` levels of dicts and lists
    (walked without recursion, so any depth is safe to check)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False

_DECIMAL = re.compile(r"decimal\((\d+),\s*(\d+)\)\Z")
_JSON_SCALARS = frozenset({"int", "float", "str", "bool"})

_ARROW_TYPES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    "datetime": pa.timestamp("us"),
    "datetime_tz": pa.timestamp("us", tz="UTC"),
    "json": pa.string(),
    "binary": pa.binary(),
    NULL: pa.null(),
}


# -- logical type names ------------------------------------------------------


def decimal_type(precision: int, scale: int) -> str:
    return f"decimal({precision},{scale})"


def parse_decimal(logical: str) -> tuple[int, int] | None:
    """``(precision, scale)`` of a ``decimal(p,s)`` logical type, else None."""
    match = _DECIMAL.match(logical)
    return (int(match.group(1)), int(match.group(2))) if match else None


def base_type(logical: str) -> str:
    """``decimal`` for any ``decimal(p,s)``, otherwise the type itself."""
    return "decimal" if logical.startswith("decimal(") else logical


def arrow_type(logical: str) -> pa.DataType:
    """The canonical Arrow type of a logical type (unknown SQL types read as text)."""
    dec = parse_decimal(logical)
    if dec:
        return pa.decimal128(*dec)
    return _ARROW_TYPES.get(logical, pa.string())


def arrow_field(name: str, logical: str) -> pa.Field:
    metadata = JSON_METADATA if logical == "json" else None
    return pa.field(name, arrow_type(logical), metadata=metadata)


def arrow_schema(columns: Mapping[str, str]) -> pa.Schema:
    """Arrow schema for ``{column: logical type}``."""
    return pa.schema([arrow_field(name, logical) for name, logical in columns.items()])


def is_json_field(f: pa.Field) -> bool:
    return bool(f.metadata) and f.metadata.get(TYPE_KEY) == b"json"


def _is_json_extension(t: pa.DataType) -> bool:
    return isinstance(t, pa.BaseExtensionType) and t.extension_name == "arrow.json"


def _is_uuid_extension(t: pa.DataType) -> bool:
    """Arrow's UUID type, which pyarrow infers for ``uuid.UUID`` values (16 bytes each)."""
    return isinstance(t, pa.BaseExtensionType) and t.extension_name == "arrow.uuid"


def _uuid_texts(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A UUID column as the values' canonical text (``str(uuid)``): what Python code,
    SQL and other tools compare and join on, where 16 raw bytes would be opaque."""
    from uuid import UUID

    texts = [None if raw is None else str(UUID(bytes=raw))
             for chunk in column.chunks for raw in chunk.storage.to_pylist()]  # fmt: skip
    return pa.chunked_array([pa.array(texts, pa.string())], pa.string())


def _is_nested(t: pa.DataType) -> bool:
    return (
        pa.types.is_struct(t)
        or pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_map(t)
        or pa.types.is_union(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    )


def _logical_of_type(t: pa.DataType) -> str:
    """Logical type a value of Arrow type ``t`` is stored as."""
    if _is_json_extension(t):
        return "json"
    if _is_uuid_extension(t):
        return "str"
    if isinstance(t, pa.BaseExtensionType):
        return _logical_of_type(t.storage_type)
    if pa.types.is_dictionary(t):
        return _logical_of_type(t.value_type)
    if pa.types.is_null(t):
        return NULL
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_duration(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_decimal(t):
        if t.precision <= MAX_DECIMAL_PRECISION:
            return decimal_type(t.precision, t.scale)
        return "str"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "datetime_tz" if t.tz else "datetime"
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    ):
        return "binary"
    if _is_nested(t):
        return "json"
    # strings, times and anything else are stored as text
    return "str"


def logical_type(f: pa.Field) -> str:
    """Logical type of an Arrow field (JSON when marked so in its metadata)."""
    if is_json_field(f):
        return "json"
    return _logical_of_type(f.type)


_SQL_ALIASES: dict[str, str] = {
    **dict.fromkeys(
        "bigint int8 integer int4 int smallint int2 tinyint int1 hugeint int128 "
        "ubigint uinteger usmallint utinyint uhugeint long signed short".split(),
        "int",
    ),
    **dict.fromkeys(["double", "double precision", "float8", "real", "float4", "float"], "float"),
    **dict.fromkeys(
        ["varchar", "text", "character varying", "bpchar", "char", "character", "name", "string"],
        "str",
    ),
    **dict.fromkeys(["boolean", "bool", "logical"], "bool"),
    "date": "date",
    **dict.fromkeys(
        [
            "timestamp",
            "timestamp without time zone",
            "datetime",
            "timestamp_us",
            "timestamp_ms",
            "timestamp_s",
            "timestamp_ns",
        ],
        "datetime",
    ),
    **dict.fromkeys(["timestamptz", "timestamp with time zone"], "datetime_tz"),
    **dict.fromkeys(["json", "jsonb"], "json"),
    **dict.fromkeys(["blob", "bytea", "varbinary", "binary", "bytes"], "binary"),
}


def logical_from_sql(type_name: str, precision: int | None = None, scale: int | None = None) -> str:
    """Logical type of a column as the database describes it (DuckDB or PostgreSQL
    spelling). Types outside the logical set come back as ``sql:<name>``: they
    read as text and accept no writes of other types."""
    name = type_name.strip().lower()
    if name.startswith(("decimal", "numeric")):
        args = re.findall(r"\d+", name)
        if len(args) == 2:
            return decimal_type(int(args[0]), int(args[1]))
        if precision is not None:
            return decimal_type(int(precision), int(scale or 0))
        # an unconstrained numeric: values of any scale; closest logical type
        return "float"
    return _SQL_ALIASES.get(name, f"sql:{name}")


# -- normalizing incoming data ---------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def json_dumps(value: Any) -> str:
    """JSON text for a Python value (dates as ISO strings, decimals as numbers)."""
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _to_json(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Serialize every value of a column to JSON text; nulls stay null."""
    is_map = pa.types.is_map(column.type)
    texts: list[str | None] = []
    for value in column.to_pylist():
        if value is None:
            texts.append(None)
            continue
        if is_map:
            value = dict(value) if all(isinstance(k, str) for k, _ in value) else value
        texts.append(json_dumps(value))
    return pa.chunked_array([pa.array(texts, pa.string())], pa.string())


def _cast(column: pa.ChunkedArray, target: pa.DataType, *, safe: bool = True) -> pa.ChunkedArray:
    return column if column.type == target else column.cast(target, safe=safe)


def normalize_column(f: pa.Field, column: pa.ChunkedArray) -> tuple[pa.Field, pa.ChunkedArray]:
    """One column in its canonical Arrow type."""
    t = f.type
    if _is_uuid_extension(t):
        return arrow_field(f.name, "str"), _uuid_texts(column)
    if isinstance(t, pa.BaseExtensionType):
        json_ext = _is_json_extension(t)
        column = pa.chunked_array([chunk.storage for chunk in column.chunks], t.storage_type)
        inner = pa.field(f.name, t.storage_type, metadata=JSON_METADATA if json_ext else f.metadata)
        return normalize_column(inner, column)
    if pa.types.is_dictionary(t):
        return normalize_column(
            pa.field(f.name, t.value_type, metadata=f.metadata), column.cast(t.value_type)
        )
    logical = logical_type(f)
    if logical == "json":
        if _is_nested(t):
            column = _to_json(column)
        else:
            column = _cast(column, pa.string())
        return arrow_field(f.name, "json"), column
    if logical == NULL:
        return pa.field(f.name, pa.null()), column
    if pa.types.is_duration(t):
        # durations are stored as whole microseconds
        column = _cast(column, pa.duration("us"), safe=False).cast(pa.int64())
    elif pa.types.is_timestamp(t) or pa.types.is_floating(t):
        column = _cast(column, arrow_type(logical), safe=False)
    elif pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_binary_view(t):
        column = _cast(column, pa.binary())
    else:
        column = _cast(column, arrow_type(logical))
    return arrow_field(f.name, logical), column


def normalize(table: pa.Table, *, name: str | None = None) -> pa.Table:
    """``table`` with every column in its canonical Arrow type.

    Nested columns (struct, list, map, ...) become JSON text marked with field
    metadata ``{b"stepwell.type": b"json"}``, dictionaries are decoded, large and
    view types become their plain forms, integers of any width become int64,
    floats float64, timestamps microseconds (tz-aware ones in UTC), durations
    int64 microseconds, times, over-wide decimals and UUIDs text. All-null (``null``
    typed) columns are kept as they are. Raises ``StoreError`` for duplicate
    column names or values that do not fit (an unsigned integer above 2**63).
    """
    where = f"table {name!r}" if name else "data"
    names = table.column_names
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise StoreError(f"{where}: duplicate column names {dupes}; give every column its own name")
    fields, columns = [], []
    for f, column in zip(table.schema, table.columns, strict=True):
        try:
            nf, ncol = normalize_column(f, column)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(
                f"{where}, column {f.name!r}: cannot store {f.type} values: {exc}"
            ) from exc
        fields.append(nf)
        columns.append(ncol)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


# -- widening -------------------------------------------------------------------


def widen(existing: str, incoming: str) -> str | None:
    """The column type that holds both ``existing`` values and ``incoming`` ones.

    Returns ``existing`` when the incoming values can be cast into the column,
    a wider type when the column must be altered, or None on a conflict.
    """
    if incoming in (existing, NULL):
        return existing
    if existing == "str":
        return "str"  # anything can be written as text
    if existing == "json":
        return "json" if incoming in _JSON_SCALARS else None
    e_dec, i_dec = parse_decimal(existing), parse_decimal(incoming)
    if existing == "int":
        if incoming == "float":
            return "float"
        if i_dec:
            precision, scale = i_dec
            digits = max(precision - scale, 19) + scale  # every int64 must still fit
            return decimal_type(digits, scale) if digits <= MAX_DECIMAL_PRECISION else "float"
        return None
    if existing == "float":
        return "float" if incoming == "int" or i_dec else None
    if e_dec:
        if incoming in ("int", "float"):
            return existing  # cast (rounded to the column's scale); overflow conflicts
        if i_dec:
            scale = max(e_dec[1], i_dec[1])
            digits = max(e_dec[0] - e_dec[1], i_dec[0] - i_dec[1]) + scale
            return decimal_type(digits, scale) if digits <= MAX_DECIMAL_PRECISION else None
        return None
    if existing == "date":
        return "datetime" if incoming == "datetime" else None
    if existing in ("datetime", "datetime_tz"):
        return existing if incoming == "date" else None
    return None


@dataclass
class SchemaPlan:
    """What writing data with a given schema into a table takes."""

    #: final ``{column: logical type}`` of the table, in table order
    columns: dict[str, str]
    #: whether the table must be created
    create: bool = False
    #: columns to add to an existing table
    add: list[tuple[str, str]] = field(default_factory=list)
    #: existing columns whose type must be widened
    alter: list[tuple[str, str]] = field(default_factory=list)
    #: incoming column name -> the table's spelling (case-insensitive backends)
    rename: dict[str, str] = field(default_factory=dict)


def _case_clash(table: str, first: str, second: str) -> StoreError:
    return StoreError(
        f"table {table!r}: columns {first!r} and {second!r} differ only in case, and this "
        "store's column names ignore case: rename one of them"
    )


def plan_columns(
    table: str,
    existing: Mapping[str, str] | None,
    incoming: pa.Schema,
    *,
    case_insensitive: bool = False,
) -> SchemaPlan:
    """Plan writing data with (normalized) schema ``incoming`` into ``table``,
    whose columns are ``existing`` (None: the table does not exist yet).

    Raises ``SchemaConflict`` naming the first column that cannot be widened.
    """

    def key(name: str) -> str:
        return name.casefold() if case_insensitive else name

    if existing is None:
        columns: dict[str, str] = {}
        spelled: dict[str, str] = {}
        for f in incoming:
            if (other := spelled.setdefault(key(f.name), f.name)) != f.name:
                raise _case_clash(table, other, f.name)
            logical = logical_type(f)
            columns[f.name] = NULL_COLUMN_TYPE if logical == NULL else logical
        return SchemaPlan(columns=columns, create=True, add=list(columns.items()))

    plan = SchemaPlan(columns=dict(existing))
    lookup = {key(name): name for name in existing}
    seen: dict[str, str] = {}
    for f in incoming:
        k = key(f.name)
        if (other := seen.setdefault(k, f.name)) != f.name:
            raise _case_clash(table, other, f.name)
        logical = logical_type(f)
        if k not in lookup:
            new = NULL_COLUMN_TYPE if logical == NULL else logical
            plan.add.append((f.name, new))
            plan.columns[f.name] = new
            lookup[k] = f.name
            continue
        column = lookup[k]
        if column != f.name:
            plan.rename[f.name] = column
        current = plan.columns[column]
        wider = widen(current, logical)
        if wider is None:
            raise SchemaConflict(table, column, current, logical)
        if wider != current:
            plan.alter.append((column, wider))
            plan.columns[column] = wider
    return plan


# -- casting data to column types --------------------------------------------------


def _binary_to_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return column.cast(pa.string())
    except pa.ArrowInvalid:  # not UTF-8: write hex digits
        texts = [None if v is None else v.hex() for v in column.to_pylist()]
        return pa.chunked_array([pa.array(texts, pa.string())], pa.string())


def _scalars_to_json(column: pa.ChunkedArray) -> pa.ChunkedArray:
    texts = [None if v is None else json_dumps(v) for v in column.to_pylist()]
    return pa.chunked_array([pa.array(texts, pa.string())], pa.string())


def cast_column(column: pa.ChunkedArray, source: str, target: str) -> pa.ChunkedArray:
    """Cast a normalized column of logical type ``source`` to ``target``.

    Raises ``pa.ArrowInvalid`` when a value does not fit.
    """
    target_type = arrow_type(target)
    if source == target:
        return column
    if source == NULL:
        return pa.chunked_array([pa.nulls(len(column), target_type)], target_type)
    if target == "str":
        if source == "binary":
            return _binary_to_text(column)
        return _cast(column, pa.string())
    if target == "json":
        return _scalars_to_json(column)
    if target == "float":
        return _cast(column, target_type, safe=False)
    dec = parse_decimal(target)
    if dec and source == "float":
        # (imported here: workers load this module, and pyarrow.compute is a sixth
        # of a warm worker's memory, copied and torn down by every fork)
        import pyarrow.compute as pc

        column = pc.round(column, ndigits=dec[1])
    elif dec and source == "int":
        # Arrow wants room for any int64; go wide, then check the actual values
        column = column.cast(pa.decimal256(19 + dec[1], dec[1]))
    return _cast(column, target_type)


def conform(
    table: str,
    data: pa.Table,
    columns: Mapping[str, str],
    rename: Mapping[str, str] | None = None,
) -> pa.Table:
    """Normalized ``data`` renamed and cast to the table's ``columns`` types.

    A value that does not fit its column (e.g. an integer too large for a
    decimal column) raises ``SchemaConflict``.
    """
    rename = rename or {}
    fields, arrays = [], []
    for f, column in zip(data.schema, data.columns, strict=True):
        name = rename.get(f.name, f.name)
        target = columns[name]
        source = logical_type(f)
        try:
            arrays.append(cast_column(column, source, target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaConflict(table, name, target, source) from exc
        fields.append(arrow_field(name, target))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def column_values(table: str, column: str, logical: str, values: list[Any]) -> pa.Table:
    """A one-column table holding Python ``values`` as the column's type."""
    try:
        raw = pa.table({column: pa.array(values)})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StoreError(
            f"table {table!r}, column {column!r}: values of mixed types: {exc}"
        ) from exc
    normalized = normalize(raw, name=table)
    return conform(table, normalized, {column: logical})


# -- data read back -------------------------------------------------------------------


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with the types and field metadata of ``schema`` (same columns)."""
    arrays = []
    for array, f in zip(batch.columns, schema, strict=True):
        if isinstance(array.type, pa.BaseExtensionType):
            array = array.storage
        if array.type != f.type:
            array = array.cast(f.type, safe=False)
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def clean_result(table: pa.Table) -> pa.Table:
    """A query result with JSON columns as marked text and timestamps in UTC."""
    fields, arrays = [], []
    for f, column in zip(table.schema, table.columns, strict=True):
        t = f.type
        if _is_json_extension(t):
            column = pa.chunked_array([c.storage for c in column.chunks], t.storage_type)
            column, f = _cast(column, pa.string()), arrow_field(f.name, "json")
        elif pa.types.is_timestamp(t) and t.tz and t.tz != "UTC":
            target = pa.timestamp(t.unit, tz="UTC")
            column, f = column.cast(target), pa.field(f.name, target, metadata=f.metadata)
        elif pa.types.is_large_string(t) or pa.types.is_string_view(t):
            column, f = column.cast(pa.string()), f.with_type(pa.string())
        fields.append(f)
        arrays.append(column)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def jsonable(value: Any, *, binary: Callable[[bytes], str] = bytes.hex) -> Any:
    """``value`` with every leaf a JSON type, for the API, the CLI's ``--json`` and
    action results: datetimes and dates in ISO 8601, decimals as text, bytes as
    ``binary(bytes)`` (hex unless told), NaN and infinities as null."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v, binary=binary) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, binary=binary) for v in value]
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return binary(bytes(value))
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return jsonable(item(), binary=binary)
    return str(value)


def to_pylist(data: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows as dicts, with JSON columns parsed back into Python values."""
    json_columns = [f.name for f in data.schema if is_json_field(f)]
    rows = data.to_pylist()
    if json_columns:
        for row in rows:
            for name in json_columns:
                if row[name] is not None:
                    row[name] = json.loads(row[name])
    return rows
