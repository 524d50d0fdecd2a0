"""Typed description of a stepwell app, as read from ``stepwell.yml`` or a Patterns ``graph.yml``.

The models here validate one object at a time (a step, a table, the limits...).
Cross-references between objects (duplicate names, ``after:`` targets, schema
names, files on disk, cycles) are checked by :func:`stepwell.app.loader.load_app`,
which also turns every validation error into a one-line :class:`AppError` that
names the file, the line and the key.

Validators report problems with :func:`fail`, which raises a pydantic error
carrying three pieces the loader uses to build its message: ``problem`` (what is
wrong), ``hint`` (what to do) and optionally ``key`` (the sub-key, relative to
the object being validated, where the problem sits).
"""

from __future__ import annotations

import difflib
import heapq
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stepwell.app.actions import ActionSpec
from stepwell.app.secrets import find_secret_refs

__all__ = [
    "LOGICAL_TYPES",
    "ActionSpec",
    "AppError",
    "AppFile",
    "AppSpec",
    "CommonModelSchema",
    "Limits",
    "SchemaField",
    "SchemaSpec",
    "StepKind",
    "StepSpec",
    "TableSpec",
    "WebhookSpec",
    "fail",
    "format_key_path",
    "logical_type",
    "parse_duration",
    "parse_memory",
]

StepKind = Literal["node", "sql", "processor", "connector"]
STEP_KINDS: tuple[StepKind, ...] = ("node", "sql", "processor", "connector")

KeyPath = tuple[str | int, ...]


# --------------------------------------------------------------------------- errors


def format_key_path(path: Iterable[str | int]) -> str:
    """Render a key path such as ``("steps", 2, "timeout")`` as ``steps[2].timeout``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class AppError(Exception):
    """A problem with an app file, reported as one line.

    ``str(error)`` is ``<file>:<line>: <key path>: <problem> (<hint>)``; parts
    that are unknown (no line, no key) are left out. ``errors`` holds every
    problem found at once (the message shows the first); each item is itself an
    :class:`AppError`.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        key: str | None = None,
        hint: str | None = None,
        errors: list[AppError] | None = None,
    ) -> None:
        self.problem = _one_line(problem)
        self.file = str(file) if file is not None else None
        self.line = line
        self.key = key or None
        self.hint = _one_line(hint) if hint else None
        self.errors: list[AppError] = errors if errors is not None else [self]
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one-line message (same as ``str(error)``)."""
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        elif self.line:
            where = f"line {self.line}: "
        key = f"{self.key}: " if self.key else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{key}{self.problem}{hint}"

    def __str__(self) -> str:
        return self.message


def fail(problem: str, hint: str, key: str | KeyPath | None = None) -> NoReturn:
    """Raise a validation error that the loader turns into a precise :class:`AppError`.

    ``key`` is where the problem is, relative to the object being validated
    (a key name or a path such as ``("steps", 1, "name")``).
    """
    ctx: dict[str, Any] = {"problem": problem, "hint": hint}
    if key is not None:
        ctx["key"] = (key,) if isinstance(key, str) else tuple(key)
    raise PydanticCustomError("stepwell", "{problem} ({hint})", ctx)


# --------------------------------------------------------------------------- value parsers

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)")
_NUMBER = re.compile(r"\s*\d+(?:\.\d+)?\s*")
_DURATION_HINT = 'write seconds as a number, or a duration such as "30s", "10m", "1h" or "1h30m"'
#: The longest duration (seconds) a limit may have: 100 years.
MAX_DURATION = 100 * 365 * 86400.0


def parse_duration(value: Any) -> float:
    """Parse a duration into seconds.

    Accepts plain numbers (seconds) and strings made of ``<number><unit>``
    parts, units ``ms``, ``s``, ``m``, ``h``, ``d`` (and their long forms):
    ``"30s"``, ``"10m"``, ``"1h30m"``, ``"1.5h"``, ``"90"``.
    """
    if isinstance(value, bool):
        fail(f"bad duration {value!r}", _DURATION_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        if _NUMBER.fullmatch(value):
            seconds = float(value)
        else:
            seconds = 0.0
            pos = 0
            text = value.rstrip()
            while pos < len(text):
                match = _DURATION_PART.match(text, pos)
                unit = match.group(2).lower() if match else ""
                if not match or unit not in _DURATION_UNITS:
                    fail(f"bad duration {value!r}", _DURATION_HINT)
                seconds += float(match.group(1)) * _DURATION_UNITS[unit]
                pos = match.end()
            if pos == 0:
                fail(f"bad duration {value!r}", _DURATION_HINT)
    else:
        fail(f"bad duration {value!r}", _DURATION_HINT)
    if not seconds > 0:  # (NaN too)
        fail(f"bad duration {value!r}: it must be more than zero", _DURATION_HINT)
    if seconds > MAX_DURATION:  # a deadline that far out is beyond what clocks can hold
        fail(f"bad duration {value!r}: it must be at most 100 years", _DURATION_HINT)
    return seconds


_MEMORY_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "ki": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "ti": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
#: The smallest memory limit (bytes) a worker can start with.
MIN_MEMORY = 1024**2
#: The largest memory limit (bytes): 1EiB.
MAX_MEMORY = 1024**6
_MEMORY_HINT = 'write bytes as a number, or a size such as "512MiB", "1GiB", "100MB" or "1G"'


def parse_memory(value: Any, *, what: str = "memory size",
                 least: str = "the 1MiB a worker needs") -> int:
    """Parse a memory size into bytes.

    Plain numbers are bytes. Units: ``KiB/MiB/GiB/TiB`` (and ``Ki``, ``K``,
    ``M``, ``G``, ``T``) are powers of 1024; ``KB/MB/GB/TB`` are powers of
    1000. Units are case-insensitive: ``"512MiB"``, ``"1GiB"``, ``"100MB"``,
    ``"1G"``. ``what`` and ``least`` name the size and its minimum in errors.
    """
    if isinstance(value, bool):
        fail(f"bad {what} {value!r}", _MEMORY_HINT)
    if isinstance(value, int | float):
        size = float(value)
    elif isinstance(value, str):
        match = _MEMORY.fullmatch(value)
        if not match or match.group(2).lower() not in _MEMORY_UNITS:
            fail(f"bad {what} {value!r}", _MEMORY_HINT)
        size = float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()]
    else:
        fail(f"bad {what} {value!r}", _MEMORY_HINT)
    if not size <= MAX_MEMORY:  # (NaN and infinity too) a limit's value must fit the kernel's
        fail(f"bad {what} {value!r}: it must be at most 1EiB", _MEMORY_HINT)
    if size < MIN_MEMORY:  # a worker cannot start in less (plain numbers are bytes)
        guess = f'; did you mean "{value}MiB"?' if isinstance(value, int | float) and value >= 1 else ""
        fail(f"{what} {value!r} is below {least}{guess}", _MEMORY_HINT)
    return int(size)


def parse_tmp(value: Any) -> int:
    """Parse a ``tmp`` size: a memory size (the private /tmp lives in memory) of
    1MiB at least, but not a worker's memory, so errors call it a tmp size."""
    return parse_memory(value, what="tmp size", least="the 1MiB /tmp holds at least")


def _parse_trigger(value: Any) -> str:
    hint = 'use "manual", "upstream" or a cron string such as "*/15 * * * *"'
    if value is None:
        return "manual"
    if not isinstance(value, str) or not value.strip():
        fail(f"bad trigger {value!r}", hint)
    text = " ".join(value.split())
    if text.lower() in ("manual", "upstream"):
        return text.lower()
    # imported here: croniter runs `file` on the interpreter when imported (a
    # subprocess every CLI start would pay), and only cron triggers need it
    from croniter import croniter

    try:
        valid = croniter.is_valid(text)
    except Exception:  # croniter raises on some malformed inputs instead of returning False
        valid = False
    if not valid:
        fail(f"bad trigger {value!r}: not 'manual', 'upstream' or a valid cron expression", hint)
    if problem := _cron_step_problem(text):
        fail(f"bad trigger {value!r}: {problem}", hint)
    try:
        croniter(text).get_next(float)
    except Exception:  # croniter's CroniterBadDateError: no date matches (30 February)
        fail(f"bad trigger {value!r}: no date ever matches it, so it would never run", hint)
    return text


#: the cron fields: name, lowest value, highest value (croniter's sixth: seconds)
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
                ("month", 1, 12), ("day of week", 0, 6), ("seconds", 0, 59))  # fmt: skip


def _cron_step_problem(text: str) -> str | None:
    """Why a ``/N`` step in ``text`` picks a single value (``*/99`` in the minute
    field fires at minute 0 only, once an hour), or None. croniter accepts these."""
    for field, (name, low, high) in zip(text.split(), _CRON_FIELDS, strict=False):
        for part in field.split(","):
            base, slash, step = part.partition("/")
            if not slash or not step.isdigit():
                continue
            first, dash, last = base.partition("-")
            if base == "*":
                span_low, span_high = low, high
            elif first.isdigit() and (not dash or last.isdigit()):
                span_low, span_high = int(first), int(last) if dash else high
            else:  # names (mon-fri/2): croniter's own rules
                continue
            if int(step) > span_high - span_low:
                return (f"step /{step} in the {name} field covers no more than its first "
                        f"value ({span_low}); steps must be smaller than the range they divide")  # fmt: skip
    return None


LOGICAL_TYPES: tuple[str, ...] = (
    "int",
    "float",
    "str",
    "bool",
    "datetime",
    "date",
    "json",
    "decimal",
)
"""Logical column types. ``decimal`` may carry precision and scale: ``decimal(12,2)``."""

_TYPE_ALIASES: dict[str, str] = {
    **dict.fromkeys(
        ["int", "integer", "bigint", "biginteger", "smallint", "long", "int32", "int64"], "int"
    ),
    **dict.fromkeys(["float", "double", "real", "float32", "float64", "number"], "float"),
    **dict.fromkeys(["str", "text", "string", "varchar", "unicode", "char", "uuid"], "str"),
    **dict.fromkeys(["bool", "boolean"], "bool"),
    **dict.fromkeys(["datetime", "timestamp", "timestamptz"], "datetime"),
    "date": "date",
    **dict.fromkeys(["json", "jsonb", "dict", "list", "object", "array"], "json"),
}
_DECIMAL = re.compile(r"(?:decimal|numeric)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?", re.I)


def logical_type(type_name: str) -> str | None:
    """Map a type name (``Integer``, ``Text``, ``Decimal(12,2)``, ``float``...) to a logical type.

    Returns one of :data:`LOGICAL_TYPES`, ``"decimal(p,s)"`` for a decimal
    with precision, or ``None`` when the name is not recognised.
    """
    text = type_name.strip()
    match = _DECIMAL.fullmatch(text)
    if match:
        if match.group(1) is None:
            return "decimal"
        precision = int(match.group(1))
        scale = int(match.group(2) or 0)
        if precision < 1 or scale > precision:
            return None
        return f"decimal({precision},{scale})"
    return _TYPE_ALIASES.get(text.lower().replace(" ", "").replace("_", ""))


def _output_type(value: Any) -> str:
    hint = f"use one of {', '.join(LOGICAL_TYPES)} or decimal(p,s)"
    if isinstance(value, str) and value.lower().startswith("decimal(") and ")" not in value:
        # YAML's flow style {y: decimal(12,2)} splits at the comma
        hint = 'quote it inside { }: {y: "decimal(12,2)"}, or write the schema one field per line'
    if not isinstance(value, str) or logical_type(value) is None:
        fail(f"unknown type {value!r}", hint)
    return logical_type(value) or ""


_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STEP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _table_name(value: str) -> str:
    if not _TABLE_NAME.fullmatch(value):
        fail(
            f"bad table name {value!r}",
            "use letters, digits and '_', not starting with a digit",
        )
    if re.search(r"__v[0-9]+\Z", value):  # the store keeps old versions under these names
        fail(f"bad table name {value!r}", "names ending in __v<number> are kept for a "
             "table's earlier versions; rename the table")
    return value


def _step_name(value: str) -> str:
    if not _STEP_NAME.fullmatch(value):
        fail(
            f"bad step name {value!r}",
            "use letters, digits, '_', '-' and '.', starting with a letter, digit or '_'",
        )
    return value


def _none_to_empty_list(value: Any) -> Any:
    return [] if value is None else value


def _none_to_empty_dict(value: Any) -> Any:
    return {} if value is None else value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; accepts ``"30s"``, ``"10m"``, ``"1h30m"`` or a number."""
MemorySize = Annotated[int, BeforeValidator(parse_memory)]
"""Bytes; accepts ``"512MiB"``, ``"1GiB"``, ``"100MB"``, ``"1G"`` or a number."""
TmpSize = Annotated[int, BeforeValidator(parse_tmp)]
"""A ``MemorySize`` for ``tmp`` (its errors call it a tmp size)."""
TableName = Annotated[str, AfterValidator(_table_name)]
StepName = Annotated[str, AfterValidator(_step_name)]
LogicalType = Annotated[str, BeforeValidator(_output_type)]
PositiveInt = Annotated[int, Field(gt=0, le=2**31 - 1)]  # (a larger count overflows a limit)


class _Model(BaseModel):
    """Base of the app-file models: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @classmethod
    def yaml_keys(cls) -> list[str]:
        """The keys this object accepts in the app file."""
        return [field.alias or name for name, field in cls.model_fields.items()]


# --------------------------------------------------------------------------- limits

LIMIT_KEYS: tuple[str, ...] = ("timeout", "memory", "cpu", "processes", "network", "tmp")


class Limits(_Model):
    """Resource limits of a run. ``None`` means "not set here" (the engine's default applies)."""

    timeout: Duration | None = None
    """Wall-clock limit in seconds."""
    memory: MemorySize | None = None
    """Address-space limit in bytes."""
    cpu: Duration | None = None
    """CPU-time limit in seconds."""
    processes: PositiveInt | None = None
    """Maximum number of processes/threads the step may start."""
    network: bool | None = None
    """Whether the step may use the network."""
    tmp: TmpSize | None = None
    """Bytes the step's private ``/tmp`` may hold (it lives in memory)."""

    def merged(self, override: Limits) -> Limits:
        """These limits with every value set in ``override`` replacing ours."""
        return self.model_copy(update=override.model_dump(exclude_none=True))


# --------------------------------------------------------------------------- tables, webhooks, actions


class TableSpec(_Model):
    """A declared table (``tables:`` in stepwell.yml, ``stores:`` in graph.yml)."""

    name: TableName
    unique_on: list[str] | None = None
    schema_name: str | None = Field(default=None, alias="schema")
    """Name of a declared Common Model schema (key ``schema`` in the app file)."""
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `tables: [messages, enriched]` is short for `- name: messages` ...
        return {"name": data} if isinstance(data, str) else data

    @field_validator("unique_on", mode="before")
    @classmethod
    def _unique_on_str(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class WebhookSpec(_Model):
    """An HTTP endpoint whose POSTed bodies become rows of ``table``."""

    name: StepName
    table: TableName
    token: str | None = None
    """Optional bearer token required by this webhook."""
    description: str | None = None
    respond: bool = False
    """Ingest and respond: the request waits until a step answers its row with
    ``respond_to_request(row["patterns_request_key"], payload)``."""
    respond_timeout: Duration = 30.0
    """How long such a request waits for its answer."""


# --------------------------------------------------------------------------- schemas


class SchemaField(BaseModel):
    """One field of a Common Model schema."""

    model_config = ConfigDict(extra="allow")

    type: str
    """The type as written in the schema file (``Integer``, ``Decimal(12,2)``...)."""
    description: str | None = None
    logical: str = ""
    """The logical type: int, str, float, bool, date, datetime, decimal(p,s) or json."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `fields: {id: Integer}` is short for `fields: {id: {type: Integer}}`
        return {"type": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _resolve(self) -> SchemaField:
        resolved = logical_type(self.type)
        if resolved is None:
            hint = "use Integer, Text, Float, Boolean, Date, DateTime, Decimal(p,s) or Json"
            if "(" in self.type and ")" not in self.type:  # {type: Decimal(12,2)}: YAML split it
                hint = "quote it, as in {type: 'Decimal(12,2)'}: in YAML's {...} a comma ends the value"
            fail(f"unknown field type {self.type!r}", hint, "type")
        if resolved == "decimal":
            resolved = "decimal(18,3)"
        self.logical = resolved
        return self


class CommonModelSchema(BaseModel):
    """A Patterns Common Model schema file (``schemas/Name.yml``).

    Keys of that format stepwell does not use are ignored.
    """

    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    unique_on: list[str] = Field(default_factory=list)
    field_roles: dict[str, Any] = Field(default_factory=dict)
    immutable: bool = False
    fields: dict[str, SchemaField] = Field(default_factory=dict)

    @field_validator("unique_on", mode="before")
    @classmethod
    def _unique_on(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("field_roles", "fields", mode="before")
    @classmethod
    def _empty_mapping(cls, value: Any) -> Any:
        return _none_to_empty_dict(value)

    @model_validator(mode="after")
    def _check_references(self) -> CommonModelSchema:
        for index, field in enumerate(self.unique_on):
            if field not in self.fields:
                fail(
                    f"unique_on names {field!r}, which is not a field of the schema",
                    f"add it under `fields:` or use one of: {', '.join(self.fields) or '(none)'}",
                    ("unique_on", index),
                )
        for role, value in self.field_roles.items():
            names = value if isinstance(value, list) else [value]
            for field in names:
                if isinstance(field, str) and field not in self.fields:
                    fail(
                        f"field role {role} names {field!r}, which is not a field of the schema",
                        f"use one of: {', '.join(self.fields) or '(none)'}",
                        ("field_roles", role),
                    )
        return self

    @property
    def stream_order(self) -> str | None:
        """The field streams of its tables go by when no order is named: the
        ``strictly_monotonic_ordering`` role, else ``created_ordering``."""
        for role in ("strictly_monotonic_ordering", "created_ordering"):
            value = self.field_roles.get(role)
            names = value if isinstance(value, list) else [value]
            if names and isinstance(names[0], str):
                return names[0]
        return None

    @property
    def logical_types(self) -> dict[str, str]:
        """Field name -> logical type (int, str, float, bool, date, datetime, decimal(p,s), json).

        A ``Decimal`` written without precision becomes ``decimal(18,3)``.
        """
        return {name: field.logical for name, field in self.fields.items()}


class SchemaSpec(_Model):
    """A ``schemas:`` entry: the path of a Common Model schema file, relative to the app."""

    schema_file: str
    _definition: CommonModelSchema | None = PrivateAttr(default=None)

    @property
    def definition(self) -> CommonModelSchema | None:
        """The parsed schema file (set by the loader)."""
        return self._definition


# --------------------------------------------------------------------------- steps

_STYLE_KEYS: dict[str, tuple[StepKind, ...]] = {
    "inputs": ("node", "sql"),
    "outputs": ("node", "sql"),
    "mode": ("processor",),
    "input": ("processor",),
    "after": ("processor",),
    "output": ("processor", "connector", "sql"),
    "output_schema": ("processor",),
    "checkpoint_column": ("processor",),
    "allowed_imports": ("processor",),
    "credentials": ("connector",),
    "parser": ("connector",),
    "parallelism": ("connector",),
}
"""Step keys that only some styles accept."""

_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _styles_text(kinds: tuple[StepKind, ...]) -> str:
    names = [f"{kind} steps" for kind in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class StepSpec(_Model):
    """One step of the app.

    In ``stepwell.yml`` the style and the code file come from exactly one of the
    keys ``node:``, ``sql:``, ``processor:`` or ``connector:``; they end up in
    :attr:`kind` and :attr:`file` (a path relative to the app folder).
    """

    name: StepName
    kind: StepKind
    file: str
    description: str | None = None
    inputs: dict[str, TableName] = Field(default_factory=dict)
    """Port name -> table read by a node or SQL step."""
    outputs: dict[str, TableName] = Field(default_factory=dict)
    """Port name -> table written by a node or SQL step."""
    parameters: dict[str, Any] = Field(default_factory=dict)
    trigger: Annotated[str, BeforeValidator(_parse_trigger)] = "manual"
    """``manual``, ``upstream`` or a cron expression."""

    # per-step limits, overriding the app's `defaults`
    timeout: Duration | None = None
    memory: MemorySize | None = None
    cpu: Duration | None = None
    processes: PositiveInt | None = None
    network: bool | None = None
    tmp: TmpSize | None = None

    # processor (Integray style)
    mode: Literal["row", "bulk"] | None = None
    """Processor only; ``row`` when not given."""
    input: TableName | None = None
    after: StepName | None = None
    output: TableName | None = None
    output_schema: dict[str, LogicalType] | None = None
    checkpoint_column: str | None = None
    allowed_imports: list[str] | None = None

    # connector (Ascend style)
    credentials: str | dict[str, Any] | None = None
    parser: Literal["csv", "jsonl", "parquet"] | None = None
    parallelism: PositiveInt | None = None

    # tables the step's code names (a SQL step's query, a node's Table() calls)
    _code_reads: list[str] = PrivateAttr(default_factory=list)
    _code_writes: list[str] = PrivateAttr(default_factory=list)

    STYLE_KEYS: ClassVar[dict[str, tuple[StepKind, ...]]] = _STYLE_KEYS

    @classmethod
    def yaml_keys(cls) -> list[str]:
        """Keys accepted for a step in stepwell.yml."""
        keys = [name for name in cls.model_fields if name not in ("kind", "file")]
        return [*STEP_KINDS, *keys]

    @model_validator(mode="before")
    @classmethod
    def _style_key(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        present = [kind for kind in STEP_KINDS if kind in data]
        from_app_file = (info.context or {}).get("format") == "stepwell"
        if len(present) > 1:
            fail(
                f"a step has exactly one style key, found {', '.join(present)}",
                f"keep one of {', '.join(present)} and move the other into its own step",
                present[1],
            )
        if present:
            for key in ("kind", "file"):
                if key in data:
                    fail(
                        f"unknown key {key!r}",
                        f"the `{present[0]}:` key already names the style and the file",
                        key,
                    )
            kind = present[0]
            path = data[kind]
            if not isinstance(path, str) or not path.strip():
                fail(
                    f"`{kind}:` must be the path of a file, got {path!r}",
                    f"write e.g. `{kind}: {_EXAMPLE_FILES[kind]}`",
                    kind,
                )
            data = {k: v for k, v in data.items() if k != kind}
            data["kind"] = kind
            data["file"] = path.strip()
        elif from_app_file or "kind" not in data:
            unexpected = [key for key in ("kind", "file") if key in data]
            if from_app_file and unexpected:
                fail(
                    f"unknown key {unexpected[0]!r}",
                    "name the style and the file with one of node:, sql:, processor:, connector:",
                    unexpected[0],
                )
            fail(
                "a step needs one of the keys node:, sql:, processor: or connector:",
                "add e.g. `node: my_step.py` naming the step's code file",
            )
        kind = data.get("kind")
        if kind in STEP_KINDS:
            for key, kinds in _STYLE_KEYS.items():
                if key in data and data[key] is not None and kind not in kinds:
                    fail(
                        f"`{key}` cannot be used on a {kind} step",
                        f"`{key}` is accepted by {_styles_text(kinds)} only; remove it",
                        key,
                    )
            if "input" in data and "after" in data:
                fail(
                    "`input` and `after` cannot be used together",
                    "read either a table (`input:`) or the previous step's output (`after:`)",
                    "after",
                )
            if kind == "processor":
                for key, example in (
                    ("output", "output: my_table"),
                    ("output_schema", "output_schema: {id: int, score: float}"),
                ):
                    if data.get(key) is None or data.get(key) in ({}, ""):
                        fail(
                            f"a processor step needs a non-empty `{key}`",
                            f"add e.g. `{example}`",
                            key,
                        )
        return data

    @field_validator("inputs", "outputs", "parameters", mode="before")
    @classmethod
    def _mapping_or_empty(cls, value: Any) -> Any:
        return _none_to_empty_dict(value)

    @field_validator("allowed_imports")
    @classmethod
    def _module_names(cls, value: list[str] | None) -> list[str] | None:
        for index, name in enumerate(value or []):
            if not _MODULE_NAME.fullmatch(name):
                fail(
                    f"bad module name {name!r}",
                    "list importable module names such as `json` or `xml.etree`",
                    (index,),
                )
        return value

    @model_validator(mode="after")
    def _defaults(self) -> StepSpec:
        if self.kind == "processor" and self.mode is None:
            self.mode = "row"
        if self.after is not None and self.after == self.name:
            fail(
                "a step cannot run after itself",
                "name the step whose output it reads",
                "after",
            )
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def secrets(self) -> list[str]:
        """Secrets referenced by the parameters and credentials, sorted.

        Plain references (``${{ secrets.x }}``, ``${{ x }}``) are listed as
        ``x``; connection references as ``connection.x``.
        """
        return sorted(find_secret_refs([self.parameters, self.credentials]))

    @property
    def limits(self) -> Limits:
        """The limits set on this step itself (unset ones are ``None``)."""
        return Limits(**{key: getattr(self, key) for key in LIMIT_KEYS})

    def effective_limits(self, defaults: Limits | None = None) -> Limits:
        """The app's ``defaults`` with every limit set on this step replacing them."""
        return (defaults or Limits()).merged(self.limits)

    @property
    def sql_tables(self) -> list[str]:
        """Tables read by a SQL step's query (filled in by the loader)."""
        return list(self._code_reads) if self.kind == "sql" else []

    def set_code_tables(self, reads: list[str], writes: list[str]) -> None:
        """Record the tables the step's code names (the loader scans it): reads that
        are not outputs of the step count as inputs."""
        self._code_reads = [t for t in reads if t not in self.output_tables()]
        self._code_writes = writes

    def input_tables(self) -> list[str]:
        """Tables this step reads: ``inputs``, ``input`` and those its code names (a
        SQL step's query, a node's ``Table("name")`` calls)."""
        tables = [*self.inputs.values(), *([self.input] if self.input else []), *self._code_reads]
        return list(dict.fromkeys(tables))

    def output_tables(self) -> list[str]:
        """Tables this step writes: ``outputs`` and ``output`` (a SQL step: the table
        its result replaces)."""
        tables = [
            *self.outputs.values(),
            *([self.output] if self.output else []),
            *([self.sql_output()] if self.kind == "sql" else []),
            *self._code_writes,
        ]
        return list(dict.fromkeys(tables))

    def sql_output(self) -> str:
        """The table a SQL step's result replaces on each run: ``output:``, else its
        only declared output, else a table named after the step."""
        if self.output:
            return self.output
        outputs = list(self.outputs.values())
        return outputs[0] if len(outputs) == 1 else self.name


_EXAMPLE_FILES: dict[str, str] = {
    "node": "enrich.py",
    "sql": "total.sql",
    "processor": "score.py",
    "connector": "files_connector.py",
}


# --------------------------------------------------------------------------- the app


class AppFile(_Model):
    """The content of ``stepwell.yml`` (every key optional, unknown keys rejected)."""

    title: str | None = None
    requirements_file: str | None = None
    store: str | None = None
    """``duckdb`` (default) or a ``postgresql://`` URL."""
    defaults: Limits = Field(default_factory=Limits)
    tables: list[TableSpec] = Field(default_factory=list)
    steps: list[StepSpec] = Field(default_factory=list)
    webhooks: list[WebhookSpec] = Field(default_factory=list)
    actions: list[ActionSpec] = Field(default_factory=list)
    plugins: list[str] = Field(default_factory=list)
    """eKuiper portable plugin folders or zip files."""
    streams: list[str] = Field(default_factory=list)
    """eKuiper stream definition files."""
    rules: list[str] = Field(default_factory=list)
    """eKuiper rule files."""
    schemas: list[SchemaSpec] = Field(default_factory=list)

    @field_validator(
        "tables",
        "steps",
        "webhooks",
        "actions",
        "plugins",
        "streams",
        "rules",
        "schemas",
        mode="before",
    )
    @classmethod
    def _list_or_empty(cls, value: Any) -> Any:
        return _none_to_empty_list(value)

    @field_validator("defaults", mode="before")
    @classmethod
    def _defaults_or_empty(cls, value: Any) -> Any:
        return _none_to_empty_dict(value)

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is None or value == "duckdb":
            return value
        if value.startswith(("postgresql://", "postgres://")):
            return value
        fail(
            f"bad store {value!r}",
            "use `duckdb` or a `postgresql://user@host/db` URL",
        )


class AppSpec(AppFile):
    """A loaded app: the app file's content plus where it lives.

    Built by :func:`stepwell.app.loader.load_app`, which has checked names,
    files and references; ``warnings`` lists keys it ignored.
    """

    root: Path
    """The app folder (absolute)."""
    file: Path
    """The app file (absolute)."""
    format: Literal["stepwell", "patterns"] = "stepwell"
    warnings: list[str] = Field(default_factory=list)

    _locations: dict[str, tuple[str, int | None]] = PrivateAttr(default_factory=dict)
    _display_file: str | None = PrivateAttr(default=None)

    # -- lookups

    @property
    def requirements_path(self) -> Path | None:
        """Absolute path of the requirements file, if any."""
        return self.root / self.requirements_file if self.requirements_file else None

    def _error(self, problem: str, hint: str, key: str, line: int | None = None) -> AppError:
        return AppError(
            problem, file=self._display_file or self.file, line=line, key=key, hint=hint
        )

    def _steps_key(self) -> str:
        return "functions" if self.format == "patterns" else "steps"

    def step(self, name: str) -> StepSpec:
        """The step called ``name``; :class:`AppError` listing the known steps otherwise."""
        for step in self.steps:
            if step.name == name:
                return step
        names = [step.name for step in self.steps]
        close = difflib.get_close_matches(name, names, n=1)
        key = self._steps_key()
        raise self._error(
            f"no step named {name!r}",
            (f"did you mean {close[0]!r}? " if close else "")
            + f"known steps: {', '.join(names) or '(none)'}",
            key,
            self._locations.get(key, (key, None))[1],
        )

    def common_schema(self, name: str) -> CommonModelSchema:
        """The declared Common Model schema called ``name``."""
        for spec in self.schemas:
            if spec.definition is not None and spec.definition.name == name:
                return spec.definition
        known = ", ".join(s.definition.name for s in self.schemas if s.definition) or "(none)"
        raise self._error(
            f"no schema named {name!r}",
            f"declare it under `schemas:`; known schemas: {known}",
            "schemas",
            self._locations.get("schemas", ("schemas", None))[1],
        )

    def table_names(self) -> list[str]:
        """Declared tables, then every table named by steps and webhooks, without repeats."""
        names = [table.name for table in self.tables]
        for step in self.steps:
            names.extend(step.inputs.values())
            names.extend(step.outputs.values())
            names.extend(t for t in (step.input, step.output) if t)
            names.extend(step._code_writes)
        names.extend(webhook.table for webhook in self.webhooks)
        return list(dict.fromkeys(names))

    def writers(self) -> dict[str, list[str]]:
        """Table -> names of the steps (and webhooks, as ``webhook:<name>``) that write it."""
        result: dict[str, list[str]] = {}
        for step in self.steps:
            for table in step.output_tables():
                result.setdefault(table, []).append(step.name)
        for webhook in self.webhooks:
            result.setdefault(webhook.table, []).append(f"webhook:{webhook.name}")
        return result

    def upstream_edges(self) -> dict[str, list[str]]:
        """Step -> the steps that must run before it (writers of its inputs, its ``after:``)."""
        writers: dict[str, list[str]] = {}
        for step in self.steps:
            for table in step.output_tables():
                writers.setdefault(table, []).append(step.name)
        edges: dict[str, list[str]] = {}
        for step in self.steps:
            before: list[str] = []
            for table in step.input_tables():
                before.extend(w for w in writers.get(table, []) if w != step.name)
            if step.after:
                before.append(step.after)
            edges[step.name] = list(dict.fromkeys(before))
        return edges

    def downstream(self, name: str) -> list[str]:
        """Steps that read what step ``name`` writes (or run ``after:`` it), in app order."""
        self.step(name)
        return [step for step, before in self.upstream_edges().items() if name in before]

    def upstream_order(self) -> list[StepSpec]:
        """All steps, each after the steps it depends on; ties keep the app file's order.

        A step depends on every step that writes a table it reads (node
        ``inputs``, processor ``input``, tables of a SQL step's query) and on
        its ``after:`` step. A cycle raises :class:`AppError` naming its steps.
        """
        position = {step.name: index for index, step in enumerate(self.steps)}
        edges = {
            name: [b for b in before if b in position]
            for name, before in self.upstream_edges().items()
        }
        waiting = {name: len(before) for name, before in edges.items()}
        after_me: dict[str, list[str]] = {name: [] for name in edges}
        for name, before in edges.items():
            for other in before:
                after_me[other].append(name)
        ready = [position[name] for name, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order: list[StepSpec] = []
        while ready:
            step = self.steps[heapq.heappop(ready)]
            order.append(step)
            for nxt in after_me[step.name]:
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    heapq.heappush(ready, position[nxt])
        if len(order) < len(self.steps):
            stuck = {name for name, count in waiting.items() if count > 0}
            cycle = _find_cycle(edges, stuck, position)
            first = cycle[0]
            key, line = self._locations.get(f"step:{first}", (self._steps_key(), None))
            raise self._error(
                f"steps form a cycle: {' -> '.join([*cycle, first])}",
                "a step cannot depend, directly or through other steps, on a table it writes; "
                "change an input, output or `after:` so the chain ends",
                key,
                line,
            )
        return order


def _find_cycle(
    edges: Mapping[str, list[str]], stuck: set[str], position: Mapping[str, int]
) -> list[str]:
    """One cycle among ``stuck`` steps, in run order, starting with the earliest declared."""
    start = min(stuck, key=position.__getitem__)
    # Walk "depends on" edges inside the stuck set until a step repeats.
    path: list[str] = [start]
    seen = {start: 0}
    current = start
    while True:
        candidates = sorted((b for b in edges[current] if b in stuck), key=position.__getitem__)
        current = candidates[0]
        if current in seen:
            cycle = path[seen[current] :]
            break
        seen[current] = len(path)
        path.append(current)
    cycle.reverse()  # dependency order: writer before reader
    pivot = cycle.index(min(cycle, key=position.__getitem__))
    return cycle[pivot:] + cycle[:pivot]
