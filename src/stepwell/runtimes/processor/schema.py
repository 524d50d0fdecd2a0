"""A processor step's mandatory output schema: checking returned objects and
turning them into Arrow columns of fixed types.

Each field has a logical type (``int``, ``float``, ``str``, ``bool``,
``datetime``, ``date``, ``json``, ``decimal`` or ``decimal(p,s)``). Values
are collected column by column; a column whose Python types are already the
expected ones goes straight to Arrow (the fast path, no per-value Python
work); anything else is normalised value by value, which is where numpy and
pandas scalars, ``Decimal`` and datetimes are converted and where a wrong
value is reported with the row, the field, the expected and the actual type.

Rules (also in ``docs/processor.md``): ``None`` is always allowed (a null);
``int`` refuses ``bool`` and floats; ``float`` takes ints; ``str`` takes
strings only; ``decimal`` takes ``Decimal``, ints and floats (floats through
their shortest ``repr``) and refuses values that need more decimal places or
digits than the type has; ``datetime`` takes ``datetime`` (naive or aware,
but one kind per column: aware values are stored in UTC), pandas
``Timestamp`` and numpy ``datetime64``; ``date`` takes ``date`` (not
``datetime``); ``json`` takes anything JSON can hold (dates become ISO
strings, decimals numbers). A plain ``decimal`` is ``decimal(38,9)``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import reprlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from stepwell.runtimes.node.records import JSON_META, RecordError
from stepwell.store.schema import MAX_NESTING, nested_too_deep

__all__ = ["DEFAULT_DECIMAL", "OutputSchema", "SchemaField", "SchemaError", "describe_value"]

#: Precision and scale of a ``decimal`` field given without them.
DEFAULT_DECIMAL = (38, 9)

_NONE = type(None)
_INT64 = (-(2**63), 2**63 - 1)
_FAST_TYPES: dict[str, frozenset[type]] = {
    "int": frozenset({int, _NONE}),
    "float": frozenset({float, int, _NONE}),
    "str": frozenset({str, _NONE}),
    "bool": frozenset({bool, _NONE}),
    "date": frozenset({dt.date, _NONE}),
    "decimal": frozenset({decimal.Decimal, int, _NONE}),
    "datetime": frozenset({dt.datetime, _NONE}),
}

RowLabel = Callable[[int], str]


class SchemaError(RecordError):
    """Returned data does not match the output schema; the message says where and how."""


class _Mismatch(Exception):
    """One value does not fit its field (internal; becomes a SchemaError)."""

    def __init__(self, note: str = ""):
        super().__init__(note)
        self.note = note


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60


def describe_value(value: Any) -> str:
    """``<type name> <short repr>`` for error messages (bounded: the value may be
    huge, nested thousands deep, or have a broken ``__repr__``)."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:  # noqa: BLE001 - the user's own __repr__ failed
        text = "(its repr failed)"
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _numpy() -> Any:
    return sys.modules.get("numpy")


def _is_missing(value: Any) -> bool:
    """pandas' NA / NaT and numpy's NaT count as null."""
    name = type(value).__name__
    if name in ("NAType", "NaTType"):
        return True
    np = _numpy()
    return bool(np is not None and isinstance(value, np.datetime64) and np.isnat(value))


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    np = _numpy()
    if np is not None:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


@dataclass(frozen=True)
class SchemaField:
    """One output field: its name and logical type."""

    name: str
    logical: str

    @property
    def base(self) -> str:
        return "decimal" if self.logical.startswith("decimal") else self.logical

    @property
    def decimal_spec(self) -> tuple[int, int]:
        if self.logical.startswith("decimal("):
            precision, scale = self.logical[len("decimal(") : -1].split(",")
            return int(precision), int(scale)
        return DEFAULT_DECIMAL

    def describe(self) -> str:
        if self.base == "decimal":
            return "decimal({},{})".format(*self.decimal_spec)
        return self.logical


class OutputSchema:
    """The fields a statement returns, in declaration order."""

    def __init__(self, fields: Mapping[str, str]):
        if not fields:
            raise ValueError("a processor step needs a non-empty output_schema")
        self.fields = [SchemaField(str(name), str(logical)) for name, logical in fields.items()]
        self.names: tuple[str, ...] = tuple(f.name for f in self.fields)
        self.name_set = frozenset(self.names)
        #: per datetime field: True when the run's values are timezone-aware
        self._aware: dict[str, bool] = {}

    # -- objects -------------------------------------------------------------
    def object_error(self, obj: Any, label: str, inputs: Sequence[str] = ()) -> SchemaError:
        """The error for a returned item that is not a valid object (slow path);
        ``inputs``: the input columns (row mode, where returning them unchanged is fine)."""
        if not isinstance(obj, dict):
            return SchemaError(
                f"{label}: expected an object (dict) with fields {', '.join(self.names)}, "
                f"got {describe_value(obj)}"
            )
        unknown = [key for key in obj if key not in self.name_set and key not in inputs]
        if not unknown:  # only input fields besides the output ones: one came back changed
            returned = [key for key in obj if key not in self.name_set]
            return SchemaError(
                f"{label}: the input fields it returns ({', '.join(returned)}) must come back "
                f"unchanged: row mode keeps each input row as it is and adds the output_schema "
                f"fields ({', '.join(self.names)}); add a field to `output_schema:` to replace "
                f"its input value"
            )
        return SchemaError(
            f"{label}: field {unknown[0]!r} is not in the output schema (fields: "
            f"{', '.join(self.names)}); add it to `output_schema:` or leave it out"
        )

    # -- columns -------------------------------------------------------------
    def arrow_field(self, field: SchemaField, aware: bool = False) -> pa.Field:
        metadata = JSON_META if field.base == "json" else None
        return pa.field(field.name, self._arrow_type(field, aware), metadata=metadata)

    def _arrow_type(self, field: SchemaField, aware: bool) -> pa.DataType:
        base = field.base
        if base == "int":
            return pa.int64()
        if base == "float":
            return pa.float64()
        if base == "bool":
            return pa.bool_()
        if base == "date":
            return pa.date32()
        if base == "datetime":
            return pa.timestamp("us", tz="UTC") if aware else pa.timestamp("us")
        if base == "decimal":
            return pa.decimal128(*field.decimal_spec)
        return pa.string()  # str and json

    def column(self, field: SchemaField, values: list[Any], label: RowLabel) -> tuple[pa.Field, pa.Array]:
        """Check and convert one field's values (row ``i`` is described by ``label(i)``)."""
        base = field.base
        fast = _FAST_TYPES.get(base)
        if fast is not None and set(map(type, values)) <= fast:
            if base == "datetime":
                values = self._check_awareness(field, values, label)
            elif base == "int":
                values = list(values)
            try:
                aware = self._aware.get(field.name, False)
                return self.arrow_field(field, aware), pa.array(values, self._arrow_type(field, aware))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError):
                pass  # the value-by-value path below finds and names the culprit
        normalised = []
        for index, value in enumerate(values):
            try:
                normalised.append(self._normalise(field, value))
            except _Mismatch as exc:
                note = f" ({exc.note})" if exc.note else ""
                raise SchemaError(
                    f"{label(index)}, field {field.name!r}: expected {field.describe()}, got "
                    f"{describe_value(value)}{note}"
                ) from None
        if base == "datetime":
            normalised = self._check_awareness(field, normalised, label)
        aware = self._aware.get(field.name, False)
        arrow_type = self._arrow_type(field, aware)
        try:
            array = pa.array(normalised, arrow_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            for index, value in enumerate(normalised):
                try:
                    pa.array([value], arrow_type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as inner:
                    raise SchemaError(
                        f"{label(index)}, field {field.name!r}: expected {field.describe()}, got "
                        f"{describe_value(values[index])} ({inner})"
                    ) from None
            raise SchemaError(f"field {field.name!r}: {exc}") from None
        return self.arrow_field(field, aware), array

    def columns(
        self, columns: Sequence[list[Any]], label: RowLabel
    ) -> tuple[list[pa.Field], list[pa.Array]]:
        """All fields' Arrow columns from per-field value lists (in schema order)."""
        fields, arrays = [], []
        for field, values in zip(self.fields, columns, strict=True):
            arrow_field, array = self.column(field, values, label)
            fields.append(arrow_field)
            arrays.append(array)
        return fields, arrays

    # -- values --------------------------------------------------------------
    def _check_awareness(self, field: SchemaField, values: list[Any], label: RowLabel) -> list[Any]:
        expected = self._aware.get(field.name)
        for index, value in enumerate(values):
            if value is None:
                continue
            aware = value.tzinfo is not None and value.utcoffset() is not None
            if expected is None:
                expected = self._aware[field.name] = aware
            elif aware != expected:
                kinds = ("timezone-aware", "naive") if expected else ("naive", "timezone-aware")
                raise SchemaError(
                    f"{label(index)}, field {field.name!r}: expected a {kinds[0]} datetime like the "
                    f"earlier rows, got a {kinds[1]} one ({describe_value(value)}); return one "
                    f"kind per field"
                )
        return values

    def _normalise(self, field: SchemaField, value: Any) -> Any:
        if value is None or _is_missing(value):
            return None
        base = field.base
        np = _numpy()
        is_np = np is not None and isinstance(value, np.generic)
        if base == "int":
            if is_np and isinstance(value, np.integer):
                value = int(value)
            if type(value) is not int:
                raise _Mismatch()
            if not _INT64[0] <= value <= _INT64[1]:
                raise _Mismatch("outside the 64-bit integer range")
            return value
        if base == "float":
            if is_np and isinstance(value, (np.integer, np.floating)):
                return float(value)
            if type(value) in (int, float) or (isinstance(value, float) and not isinstance(value, bool)):
                return float(value)
            raise _Mismatch()
        if base == "str":
            if isinstance(value, str):
                return str.__str__(value)
            raise _Mismatch()
        if base == "bool":
            if type(value) is bool or (is_np and isinstance(value, np.bool_)):
                return bool(value)
            raise _Mismatch()
        if base == "datetime":
            return self._datetime(value, np, is_np)
        if base == "date":
            if is_np and isinstance(value, np.datetime64):
                if np.datetime_data(value.dtype)[0] != "D":
                    raise _Mismatch("a datetime64 with a time unit; use datetime for it")
                return value.astype("datetime64[D]").item()
            if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
                return value
            raise _Mismatch("use value.date() to keep only the date" if isinstance(value, dt.datetime) else "")
        if base == "decimal":
            return self._decimal(field, value, np, is_np)
        if base == "json":
            too_deep = f"it is nested more than {MAX_NESTING} levels deep; flatten it or store it as text"
            try:
                text = json.dumps(value, default=_json_default, allow_nan=False, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise _Mismatch(f"it cannot be stored as JSON: {exc}") from None
            except RecursionError:
                raise _Mismatch(too_deep) from None
            if nested_too_deep(value):  # readers could not show it
                raise _Mismatch(too_deep)
            return text
        raise _Mismatch(f"unknown type {field.logical!r}")

    @staticmethod
    def _datetime(value: Any, np: Any, is_np: bool) -> dt.datetime:
        if is_np and isinstance(value, np.datetime64):
            return value.astype("datetime64[us]").item()
        if isinstance(value, dt.datetime):
            to_py = getattr(value, "to_pydatetime", None)  # pandas.Timestamp
            if callable(to_py) and type(value) is not dt.datetime:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # dropping nanoseconds is expected
                    return to_py()
            return value
        raise _Mismatch("use datetime.combine(d, time()) for a date" if isinstance(value, dt.date) else "")

    @staticmethod
    def _decimal(field: SchemaField, value: Any, np: Any, is_np: bool) -> decimal.Decimal:
        precision, scale = field.decimal_spec
        if is_np and isinstance(value, np.integer):
            value = int(value)
        elif is_np and isinstance(value, np.floating):
            value = float(value)
        if type(value) is int:
            number = decimal.Decimal(value)
        elif type(value) is float:
            number = decimal.Decimal(repr(value))
        elif isinstance(value, decimal.Decimal):
            number = value
        else:
            raise _Mismatch()
        if not number.is_finite():
            raise _Mismatch("not a finite number")
        exponent = number.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -scale:
            quantized = number.quantize(decimal.Decimal(1).scaleb(-scale))
            if quantized != number:
                raise _Mismatch(f"more than {scale} decimal places; round it first")
            number = quantized
        integer_digits = number.adjusted() + 1 if number else 0
        if integer_digits > precision - scale:
            raise _Mismatch(f"more than {precision - scale} digits before the decimal point")
        return number
