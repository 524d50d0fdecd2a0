"""The connector contract: which functions a connector file defines, what
``list_objects`` may yield, and what ``infer_schema`` may return.

Everything here runs inside the worker (it calls user code) and raises
:class:`ConnectorError` with a message naming the offending function, object
or value, so the run's error tells the user what to change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: The read interfaces a connector may implement (exactly one of them).
READ_FUNCTIONS = ("read_bytes", "read_pandas_dataframe", "read_spark_dataframe", "read_arrow")
#: Parsers available to ``read_bytes``.
PARSERS = ("csv", "jsonl", "parquet")
#: Prefixes nested deeper than this are taken for a cycle in the listing.
MAX_DEPTH = 1000


class ConnectorError(Exception):
    """The connector file, or something its functions returned, breaks the contract."""


@dataclass
class ConnectorFunctions:
    """The functions of one connector file."""

    context: Callable[..., Any]
    list_objects: Callable[..., Any]
    read_name: str
    read: Callable[..., Any]
    infer_schema: Callable[..., Any] | None


def _functions_in(namespace: Mapping[str, Any]) -> list[str]:
    return sorted(
        name
        for name, value in namespace.items()
        if not name.startswith("_") and inspect.isfunction(value)
    )


def find_functions(namespace: Mapping[str, Any], file: str) -> ConnectorFunctions:
    """Pick the connector functions out of the module namespace of ``file``."""
    defined = _functions_in(namespace)
    found_text = ", ".join(defined) if defined else "no functions"

    def required(name: str, signature: str) -> Callable[..., Any]:
        value = namespace.get(name)
        if value is None:
            raise ConnectorError(
                f"connector {file} does not define `{signature}` (found: {found_text})"
            )
        if not callable(value):
            raise ConnectorError(
                f"connector {file}: `{name}` is a {type(value).__name__}, not a function "
                f"(define `def {signature}: ...`)"
            )
        return value

    context = required("context", "context(credentials)")
    list_objects = required("list_objects", "list_objects(context, metadata)")
    readers = [name for name in READ_FUNCTIONS if callable(namespace.get(name))]
    if not readers:
        near = [name for name in defined if name.startswith("read")]
        hint = (
            f"; {', '.join(near)} {'is' if len(near) == 1 else 'are'} not one of them"
            if near
            else ""
        )
        raise ConnectorError(
            f"connector {file} defines no read function: define exactly one of "
            f"{', '.join(READ_FUNCTIONS)} (found: {found_text}){hint}"
        )
    if len(readers) > 1:
        raise ConnectorError(
            f"connector {file} defines {len(readers)} read functions ({', '.join(readers)}): "
            "keep exactly one"
        )
    infer = namespace.get("infer_schema")
    if infer is not None and not callable(infer):
        raise ConnectorError(
            f"connector {file}: `infer_schema` is a {type(infer).__name__}, not a function"
        )
    return ConnectorFunctions(context, list_objects, readers[0], namespace[readers[0]], infer)


# -- listing -----------------------------------------------------------------------


def _where(parent: Mapping[str, Any] | None) -> str:
    return "at the root" if parent is None else f"under prefix {parent.get('name')!r}"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_object(obj: Any, parent: Mapping[str, Any] | None) -> tuple[str, str | None, bool]:
    """``(name, fingerprint, is_prefix)`` of one yielded object, or ConnectorError."""
    where = _where(parent)
    if not isinstance(obj, Mapping):
        raise ConnectorError(
            f"list_objects ({where}) yielded a {type(obj).__name__} {_short(obj)}: yield dicts "
            "like {'name': ..., 'fingerprint': ..., 'is_prefix': False}"
        )
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ConnectorError(
            f"list_objects ({where}) yielded an object whose 'name' is "
            f"{'missing' if 'name' not in obj else _short(name)}; every object needs a "
            f"non-empty string name: {_short(dict(obj))}"
        )
    is_prefix = obj.get("is_prefix", False)
    if not isinstance(is_prefix, bool):
        raise ConnectorError(
            f"object {name!r} ({where}): 'is_prefix' must be True or False, got {_short(is_prefix)}"
        )
    fingerprint = obj.get("fingerprint")
    if fingerprint is None and is_prefix:
        return name, None, True
    if not isinstance(fingerprint, str):
        got = "no fingerprint" if "fingerprint" not in obj else (
            f"{type(fingerprint).__name__} {_short(fingerprint)}"
        )
        raise ConnectorError(
            f"object {name!r} ({where}): 'fingerprint' must be a string, got {got} "
            "(e.g. str() of a modification time or a content hash)"
        )
    return name, fingerprint, is_prefix


@dataclass
class Listed:
    """One object of a listing: a leaf, a prefix listed in turn, or a prefix
    skipped because its fingerprint is one the host says it has read in full."""

    obj: dict[str, Any]
    #: name of the prefix it was listed under (None: the root)
    parent: str | None
    kind: str  # leaf | prefix | skipped


def walk_listing(
    list_objects: Callable[..., Any], context: Any, skip: Mapping[str, str] | None = None
) -> Iterator[Listed]:
    """Call ``list_objects(context, None)``, then again for every prefix it yields
    (depth first, in yield order), and yield the validated objects. A prefix whose
    fingerprint is ``skip[name]`` is not listed again (its subtree is unchanged).

    Leaf names must be unique (a fingerprint is compared only with the last one
    of the same name); a prefix listed twice is a cycle. Every error names the
    object and where it was listed.
    """
    skip = skip or {}
    leaf_where: dict[str, str] = {}
    prefixes: set[str] = set()
    stack: list[tuple[Mapping[str, Any] | None, Iterator[Any]]] = [
        (None, _listing(list_objects, context, None))
    ]
    while stack:
        parent, items = stack[-1]
        try:
            obj = next(items)
        except StopIteration:
            stack.pop()
            continue
        name, fingerprint, is_prefix = check_object(obj, parent)
        where = _where(parent)
        if is_prefix:
            if name in prefixes:
                raise ConnectorError(
                    f"prefix {name!r} ({where}) was listed twice: the prefixes form a cycle "
                    "or repeat; list each prefix once"
                )
            if len(stack) >= MAX_DEPTH:
                raise ConnectorError(
                    f"prefix {name!r} ({where}) is nested {MAX_DEPTH} levels deep: the "
                    "listing looks like an endless recursion"
                )
            prefixes.add(name)
            parent_name = parent.get("name") if parent is not None else None
            if fingerprint is not None and skip.get(name) == fingerprint:
                yield Listed(dict(obj), parent_name, "skipped")
                continue
            yield Listed(dict(obj), parent_name, "prefix")
            stack.append((obj, _listing(list_objects, context, obj)))
            continue
        if name in leaf_where:
            raise ConnectorError(
                f"object {name!r} was listed twice ({leaf_where[name]} and {where}): "
                "names identify partitions and must be unique"
            )
        assert fingerprint is not None
        # two leaves may share a fingerprint (a content hash of two equal files, a
        # timestamp of files that arrived together): each is compared with its own
        leaf_where[name] = where
        yield Listed(dict(obj), parent.get("name") if parent is not None else None, "leaf")


def _listing(
    list_objects: Callable[..., Any], context: Any, metadata: Mapping[str, Any] | None
) -> Iterator[Any]:
    result = list_objects(context, metadata)
    if result is None:
        raise ConnectorError(
            f"list_objects ({_where(metadata)}) returned None: it must yield dicts "
            "(or return a list of them)"
        )
    if isinstance(result, Mapping | str | bytes):
        raise ConnectorError(
            f"list_objects ({_where(metadata)}) returned a {type(result).__name__}: it must "
            "yield dicts (or return a list of them), one per object"
        )
    try:
        return iter(result)
    except TypeError:
        raise ConnectorError(
            f"list_objects ({_where(metadata)}) returned a {type(result).__name__}, which is "
            "not iterable: it must yield dicts (or return a list of them)"
        ) from None


# -- infer_schema --------------------------------------------------------------------


def call_infer_schema(
    infer: Callable[..., Any], context: Any, spark: Callable[[], Any]
) -> Any:
    """Call ``infer_schema`` with the arguments its signature asks for: none,
    ``(context)``, ``(context, metadata)`` or ``(spark, context, metadata)``
    (``metadata`` is None: the schema is the whole table's). ``spark`` makes the
    local SparkSession on demand."""
    try:
        params = [
            p
            for p in inspect.signature(infer).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params]
    if names and names[0] == "spark":
        args: list[Any] = [SparkOnUse(spark), context, None][: len(names)]
    else:
        args = [context, None, None][: len(names)]
    return infer(*args)


class SparkOnUse:
    """Stands in for the SparkSession until the code uses it: starting one takes
    seconds, and an ``infer_schema(spark, ...)`` that returns a ``StructType``
    never needs it."""

    def __init__(self, make: Callable[[], Any]):
        self._make = make

    def __getattr__(self, name: str) -> Any:
        return getattr(self._make(), name)


def to_arrow_schema(value: Any) -> Any:
    """The Arrow schema described by what ``infer_schema`` returned: an Arrow
    schema or table, a PySpark ``StructType`` or DataFrame, a pandas DataFrame,
    or a mapping of column name to an Arrow type or a logical type name
    (``int``, ``float``, ``str``, ``bool``, ``date``, ``datetime``, ...)."""
    import pyarrow as pa

    if isinstance(value, pa.Schema):
        return value
    if isinstance(value, pa.Table | pa.RecordBatch):
        return value.schema
    kind = type(value).__name__
    module = type(value).__module__ or ""
    if module.startswith("pyspark") and kind == "StructType":
        return _spark_schema(value)
    if module.startswith("pyspark") and hasattr(value, "schema") and hasattr(value, "toPandas"):
        return _spark_schema(value.schema)
    if module.startswith("pandas") and kind == "DataFrame":
        # an empty object column has no type of its own: take it for text
        schema = pa.Schema.from_pandas(value, preserve_index=False).remove_metadata()
        return pa.schema(
            [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in schema]
        )
    if isinstance(value, Mapping):
        from stepwell.store import schema as sch

        fields = []
        for name, type_ in value.items():
            if isinstance(type_, pa.DataType):
                fields.append(pa.field(str(name), type_))
            elif isinstance(type_, str):
                logical = _TYPE_ALIASES.get(type_.strip().lower(), type_.strip().lower())
                if logical in _LOGICAL_TYPES or sch.parse_decimal(logical):
                    fields.append(sch.arrow_field(str(name), logical))
                else:
                    raise ConnectorError(
                        f"infer_schema: column {name!r} has unknown type {type_!r} (use int, "
                        "float, str, bool, date, datetime, datetime_tz, decimal(p,s), json, "
                        "binary, or a pyarrow type)"
                    )
            else:
                raise ConnectorError(
                    f"infer_schema: column {name!r} has type {_short(type_)}; use a type name "
                    "or a pyarrow type"
                )
        return pa.schema(fields)
    raise ConnectorError(
        f"infer_schema returned a {kind}: return a PySpark StructType or DataFrame, a pandas "
        "DataFrame, a pyarrow Schema, or a mapping of column names to types"
    )


_LOGICAL_TYPES = frozenset(
    {"int", "float", "str", "bool", "date", "datetime", "datetime_tz", "json", "binary"}
)
_TYPE_ALIASES = {
    "integer": "int",
    "bigint": "int",
    "double": "float",
    "string": "str",
    "text": "str",
    "boolean": "bool",
    "timestamp": "datetime",
}


def _spark_schema(struct: Any) -> Any:
    from pyspark.sql.pandas.types import to_arrow_schema as spark_to_arrow

    return spark_to_arrow(struct)
