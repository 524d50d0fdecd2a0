"""Load an app folder or app file into an :class:`~stepwell.app.models.AppSpec`.

Two formats are read:

- ``stepwell.yml`` (see DESIGN.md, section 1a): every key is known, unknown
  keys are errors;
- a Patterns ``graph.yml`` (any file with a top-level ``functions:`` list, or a
  file named ``graph.yml``): ``functions`` become node/SQL steps and webhooks,
  ``stores`` become tables, ``parameter_values`` become parameters. Keys of
  that format stepwell has no use for are ignored silently; keys foreign to
  both formats are reported in ``AppSpec.warnings``. Top-level stepwell keys
  (``defaults``, ``tables``, ``actions``...) are honoured in a graph file too.

The YAML is composed into nodes first so that every key's line is known; every
problem (syntax, unknown key, bad value, missing file, duplicate name, cycle)
raises :class:`~stepwell.app.models.AppError` whose message is one line::

    app/stepwell.yml:14: steps[1].timeout: bad duration '3 parsecs' (write seconds ...)
"""

from __future__ import annotations

import ast
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from stepwell.app.actions import action_files, action_problems
from stepwell.app.models import (
    LIMIT_KEYS,
    AppError,
    AppFile,
    AppSpec,
    CommonModelSchema,
    KeyPath,
    StepSpec,
    TableSpec,
    WebhookSpec,
    format_key_path,
)
from stepwell.app.pyparse import parse_python
from stepwell.app.secrets import malformed_refs

__all__ = ["APP_FILE_NAMES", "SqlTables", "load_app", "scan_sql_tables"]

APP_FILE_NAMES: tuple[str, ...] = ("stepwell.yml", "stepwell.yaml", "graph.yml", "graph.yaml")
"""File names looked for, in this order, when ``load_app`` is given a folder."""

_GRAPH_FILE_NAMES = ("graph.yml", "graph.yaml")

# Keys of the Patterns graph.yml format that stepwell accepts and ignores.
_PATTERNS_TOP_IGNORED = frozenset(
    {
        "slug",
        "description",
        "description_file",
        "version",
        "tags",
        "exposes",
        "dashboards",
        "storages",
        "icon_url",
        "display",
        "id",
        "docs",  # markdown notes shown on the graph canvas
    }
)
_PATTERNS_FUNCTION_KEYS = frozenset(
    {
        "node_file",
        "webhook",
        "inputs",
        "outputs",
        "parameter_values",
        "parameters",
        "trigger",
        "schedule",
        "description",
    }
)
_PATTERNS_FUNCTION_IGNORED = frozenset(
    {
        "id",
        "title",
        "description_file",
        "uses",
        "chart_input",
        "markdown_file",
        "display",
        "icon_url",
    }
)
_PATTERNS_STORE_KEYS = frozenset({"table", "stream", "schema", "unique_on", "description"})
_PATTERNS_STORE_IGNORED = frozenset(
    {"id", "title", "display", "storage", "icon_url", "description_file"}
)

_TOP_LEVEL_HINTS: dict[str, str] = {
    "secrets": "secrets are never read from the app file: set STEPWELL_SECRET_<NAME> or "
    "write them to .stepwell/secrets.toml, and refer to them as ${{ secrets.<name> }}",
    "stores": "`stores:` belongs to a Patterns graph.yml; in stepwell.yml declare `tables:`",
}


# --------------------------------------------------------------------------- YAML with lines


@dataclass
class _Doc:
    """A parsed YAML document: Python data plus the line of every key and list item."""

    file: str
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def line(self, path: Iterable[str | int]) -> int | None:
        """Line of ``path``, or of its nearest enclosing key that exists."""
        key = tuple(path)
        while True:
            if key in self.lines:
                return self.lines[key]
            if not key:
                return None
            key = key[:-1]

    def error(self, path: KeyPath, problem: str, hint: str) -> AppError:
        return AppError(
            problem, file=self.file, line=self.line(path), key=format_key_path(path), hint=hint
        )

    def warn(self, path: KeyPath, text: str) -> None:
        where = f"{self.file}:{self.line(path) or 1}"
        key = format_key_path(path)
        self.warnings.append(f"{where}: {key}: {text}" if key else f"{where}: {text}")


def _yaml_error(exc: yaml.YAMLError, file: str) -> AppError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    column = f", column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"invalid YAML: {problem}" + (f", {context}" if context else "")
    hint = f"fix the YAML syntax at line {line}{column}" if line else "fix the YAML syntax"
    return AppError(text, file=file, line=line, hint=hint)


#: Values (scalars, lists and mappings) an app file may expand to, aliases included.
MAX_YAML_VALUES = 200_000


def _parse_yaml(text: str, file: str) -> _Doc:
    """Parse ``text`` into data and a key-path -> line map; duplicate keys are errors."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, file) from None
    doc = _Doc(file=file, data=None)
    if root is None:
        return doc
    constructor = yaml.constructor.SafeConstructor()
    doc.lines[()] = root.start_mark.line + 1
    built = 0

    def build(node: yaml.Node, path: KeyPath, active: frozenset[int]) -> Any:
        nonlocal built
        if id(node) in active:
            raise doc.error(path, "a YAML alias refers to itself", "remove the recursive alias")
        built += 1
        if built > MAX_YAML_VALUES:  # aliases of aliases grow exponentially ("billion laughs")
            raise doc.error(
                path[:1], f"the file expands to more than {MAX_YAML_VALUES:,} values",
                "keep data out of the app file, and repeat less through YAML aliases (`*name`)",
            )
        if isinstance(node, yaml.ScalarNode):
            try:
                return constructor.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                raise _yaml_error(exc, file) from None
        inner = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                doc.lines.setdefault(path + (index,), item.start_mark.line + 1)
                items.append(build(item, path + (index,), inner))
            return items
        if isinstance(node, yaml.MappingNode):
            try:
                constructor.flatten_mapping(node)  # resolves `<<: *anchor` merges
            except yaml.YAMLError as exc:
                raise _yaml_error(exc, file) from None
            mapping: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise AppError(
                        "a key must be a plain name, not a list or mapping",
                        file=file,
                        line=key_node.start_mark.line + 1,
                        key=format_key_path(path),
                        hint="write `name: value`",
                    )
                key = str(key_node.value)
                key_path = path + (key,)
                if key in mapping:
                    raise AppError(
                        f"duplicate key {key!r} (first on line {doc.lines.get(key_path)})",
                        file=file,
                        line=key_node.start_mark.line + 1,
                        key=format_key_path(key_path),
                        hint="remove one of them",
                    )
                doc.lines[key_path] = key_node.start_mark.line + 1
                mapping[key] = build(value_node, key_path, inner)
            return mapping
        raise doc.error(path, "unsupported YAML node", "use plain mappings, lists and values")

    doc.data = build(root, (), frozenset())
    return doc


def _read_yaml_file(path: Path, display: str) -> _Doc:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        data = path.read_bytes()
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise AppError(
            f"file is not UTF-8 text (byte {data[exc.start]:#04x} at line {line}, column {column})",
            file=display, line=line, hint="save it as UTF-8",
        ) from None
    except OSError as exc:
        raise AppError(
            f"cannot read the file: {exc.strerror or exc}", file=display, hint="check the path"
        ) from None
    return _parse_yaml(text, display)


# --------------------------------------------------------------------------- pydantic errors

_EXPECTED: dict[str, tuple[str, str]] = {
    "string_type": ("expected text", "quote the value"),
    "int_type": ("expected a whole number", "write a number such as 4"),
    "int_parsing": ("expected a whole number", "write a number such as 4"),
    "int_from_float": ("expected a whole number", "write a number such as 4"),
    "float_type": ("expected a number", "write a number such as 1.5"),
    "float_parsing": ("expected a number", "write a number such as 1.5"),
    "bool_type": ("expected true or false", "write true or false"),
    "bool_parsing": ("expected true or false", "write true or false"),
    "dict_type": ("expected a mapping", "write `key: value` pairs"),
    "model_type": ("expected a mapping", "write `key: value` pairs"),
    "model_attributes_type": ("expected a mapping", "write `key: value` pairs"),
    "list_type": ("expected a list", "write `[a, b]` or one `- item` per line"),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _strip_type(tp: Any) -> Any:
    """Unwrap Annotated/Optional/unions down to the first model, list or dict type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            preferred = [
                a
                for a in args
                if typing.get_origin(a) in (list, dict)
                or (isinstance(a, type) and issubclass(a, BaseModel))
            ]
            tp = (preferred or args)[0]
        else:
            return tp


def _model_at(model: type[BaseModel], loc: Iterable[str | int]) -> type[BaseModel] | None:
    """The model class that validates location ``loc`` inside ``model``."""
    tp: Any = model
    for part in loc:
        tp = _strip_type(tp)
        origin = typing.get_origin(tp)
        if isinstance(part, int) and origin in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            found = [f for n, f in tp.model_fields.items() if part in (n, f.alias)]
            if not found:
                return None
            tp = found[0].annotation
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _strip_type(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _describe(
    err: Mapping[str, Any], model: type[BaseModel], loc: tuple[Any, ...]
) -> tuple[str, str]:
    """(problem, hint) for one pydantic error."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "stepwell":
        return str(ctx["problem"]), str(ctx["hint"])
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        if len(loc) == 1 and key in _TOP_LEVEL_HINTS:
            return f"unknown key {key!r}", _TOP_LEVEL_HINTS[key]
        owner = _model_at(model, loc[:-1])
        allowed = owner.yaml_keys() if owner is not None and hasattr(owner, "yaml_keys") else []
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        known = getattr(owner, "UNKNOWN_KEY_HINTS", {}).get(key)
        hint += f"{known.format(key=key)}; " if known else ""
        hint += f"allowed keys: {', '.join(allowed)}" if allowed else "remove it"
        return f"unknown key {key!r}", hint
    if kind == "missing":
        name = loc[-1] if loc else "?"
        return f"missing required key {name!r}", f"add `{name}:`"
    if kind in ("literal_error", "enum"):
        expected = ctx.get("expected", "")
        return f"bad value {_short(value)}", f"use {expected}"
    if kind == "greater_than":
        return (
            f"bad value {_short(value)}: must be greater than {ctx.get('gt')}",
            "use a larger number",
        )
    if kind == "less_than_equal":
        return (
            f"bad value {_short(value)}: must be at most {ctx.get('le')}",
            "use a smaller number",
        )
    if kind in _EXPECTED:
        expected, hint = _EXPECTED[kind]
        return f"bad value {_short(value)}: {expected}", hint
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"bad value {_short(value)}: {message}", "fix the value"


def _from_pydantic(
    doc: _Doc,
    exc: ValidationError,
    base: KeyPath,
    model: type[BaseModel],
    rename: Mapping[str, str] | None = None,
) -> AppError:
    """Turn a pydantic ``ValidationError`` into one :class:`AppError` (all errors kept).

    ``base`` is where the validated object sits in the document; ``rename`` maps
    the object's own top-level field names to the document's key names when
    the object was built from differently named keys (Patterns functions).
    """
    rename = rename or {}
    base_value = _get(doc.data, base)
    found: list[AppError] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "stepwell" and ctx.get("key"):
            loc = loc + tuple(ctx["key"])
        problem, hint = _describe(err, model, tuple(err["loc"]))
        if loc and isinstance(loc[0], str) and loc[0] in rename:
            loc = (rename[loc[0]],) + loc[1:]
        # Follow `loc` through the document as far as it exists.
        path = list(base)
        node = base_value
        rest = list(loc)
        while rest:
            part = rest[0]
            if isinstance(node, dict) and isinstance(part, str) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                break
            path.append(part)
            rest.pop(0)
        line = doc.line(path)
        shown = list(path)
        if rest and (err["type"] in ("missing", "stepwell")):
            shown.extend(p for p in rest if isinstance(p, str | int))
        error = AppError(problem, file=doc.file, line=line, key=format_key_path(shown), hint=hint)
        if error.message not in seen:
            seen.add(error.message)
            found.append(error)
    first = found[0]
    return AppError(
        first.problem,
        file=first.file,
        line=first.line,
        key=first.key,
        hint=first.hint,
        errors=found,
    )


_T = TypeVar("_T", bound=BaseModel)


def _validate(
    doc: _Doc,
    model: type[_T],
    data: Any,
    base: KeyPath,
    rename: Mapping[str, str] | None = None,
    context: Mapping[str, Any] | None = None,
) -> _T:
    try:
        return model.model_validate(data, context=dict(context or {}))
    except ValidationError as exc:
        raise _from_pydantic(doc, exc, base, model, rename) from None


def _get(data: Any, path: Iterable[str | int]) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


# --------------------------------------------------------------------------- SQL table references


@dataclass
class SqlTables:
    """Tables a SQL step's query refers to."""

    reads: list[str]
    writes: list[str]
    parsed: bool
    """False when sqlglot could not parse the query and a simple scan was used."""


_TEMPLATE_TABLE = re.compile(
    r"\{\{\s*Table\(\s*(['\"])(?P<name>[^'\"]+)\1\s*"
    r"(?:,\s*(?:mode\s*=\s*)?(['\"])(?P<mode>[^'\"]*)\3\s*)?(?:,[^}]*)?\)\s*\}\}"
)
_TEMPLATE_EXPR = re.compile(r"\{\{\s*(?P<expr>[^{}\n]*?)\s*\}\}")
_TEMPLATE_BLOCK = re.compile(r"\{%.*?%\}|\{#.*?#\}", re.S)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCAN_TABLES = re.compile(r"\b(?:from|join)\s+(\"?)([A-Za-z_][A-Za-z0-9_]*)\1", re.I)
_SCAN_CTES = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s+as\s*\(", re.I)


def scan_sql_tables(
    sql: str,
    inputs: Mapping[str, str] | None = None,
    outputs: Mapping[str, str] | None = None,
) -> SqlTables:
    """Find the tables a SQL step reads and writes.

    Patterns templating is understood: ``{{ Table("x") }}`` is table ``x``
    (``{{ Table("x", "w") }}`` a table written), and a name given to
    ``Table()`` or ``{{ name }}`` that is a port of ``inputs``/``outputs`` is
    mapped to the port's table. Other ``{{ ... }}`` expressions count as
    values. Common table expressions are not tables.
    """
    inputs = inputs or {}
    outputs = outputs or {}
    reads: list[str] = []
    writes: list[str] = []

    def table(match: re.Match[str]) -> str:
        name = match.group("name")
        if (match.group("mode") or "r").lower().startswith("w"):
            writes.append(outputs.get(name, name))
            return '"__stepwell_output__"'
        return f'"{inputs.get(name, name)}"'

    def expression(match: re.Match[str]) -> str:
        expr = match.group("expr")
        if _IDENTIFIER.fullmatch(expr):
            return f'"{inputs.get(expr, expr)}"'
        return "NULL"

    text = _TEMPLATE_TABLE.sub(table, sql)
    text = _TEMPLATE_BLOCK.sub(" ", text)
    text = _TEMPLATE_EXPR.sub(expression, text)
    import sqlglot  # only apps with SQL steps pay for it
    from sqlglot import exp

    try:
        statements = [s for s in sqlglot.parse(text, read="duckdb") if s is not None]
    except sqlglot.errors.SqlglotError:
        ctes = {m.group(1).lower() for m in _SCAN_CTES.finditer(text)}
        for match in _SCAN_TABLES.finditer(text):
            name = match.group(2)
            if name.lower() not in ctes and name != "__stepwell_output__":
                reads.append(name)
        return SqlTables(list(dict.fromkeys(reads)), list(dict.fromkeys(writes)), False)
    for statement in statements:
        ctes = {cte.alias_or_name for cte in statement.find_all(exp.CTE)}
        targets: set[int] = set()
        for node in statement.find_all(exp.Insert, exp.Create):
            target = node.this
            if isinstance(target, exp.Schema):
                target = target.this
            if isinstance(target, exp.Table) and isinstance(target.this, exp.Identifier):
                targets.add(id(target))
                writes.append(outputs.get(target.name, target.name))
        refs = sorted(statement.find_all(exp.Table), key=_position)
        for ref in refs:
            if id(ref) in targets or not isinstance(ref.this, exp.Identifier):
                continue
            name = ref.name
            if not name or name == "__stepwell_output__" or (not ref.db and name in ctes):
                continue
            reads.append(f"{ref.db}.{name}" if ref.db else name)
    writes = [w for w in writes if w != "__stepwell_output__"]
    return SqlTables(list(dict.fromkeys(reads)), list(dict.fromkeys(writes)), True)


def _position(node: Any) -> int:
    """Where a table reference starts in the query text (for first-appearance order)."""
    meta = getattr(node.this, "meta", None) or {}
    start = meta.get("start")
    return start if isinstance(start, int) else 1 << 30


def scan_node_tables(
    source: str,
    inputs: Mapping[str, str] | None = None,
    outputs: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """The tables a node's code names with ``Table("name")`` (read) and
    ``Table("name", "w")`` (written): ports are table names unless the step maps
    them (``inputs``/``outputs``). Names that are not literal strings are not
    known before the node runs; a file that does not parse names none."""
    inputs = inputs or {}
    outputs = outputs or {}
    try:
        tree = parse_python(source)
    except (SyntaxError, ValueError):  # the run reports it, with its line
        return [], []
    reads: list[str] = []
    writes: list[str] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        port = node.args[0]
        if name != "Table" or not (isinstance(port, ast.Constant) and isinstance(port.value, str)):
            continue
        mode_arg = node.args[1] if len(node.args) > 1 else next(
            (k.value for k in node.keywords if k.arg == "mode"), None)  # fmt: skip
        mode = mode_arg.value if isinstance(mode_arg, ast.Constant) else "r"
        if isinstance(mode, str) and mode.lower().startswith("w"):
            writes.append(outputs.get(port.value, port.value))
        else:
            reads.append(inputs.get(port.value, port.value))
    writes = list(dict.fromkeys(writes))
    return [t for t in dict.fromkeys(reads) if t not in writes], writes


# --------------------------------------------------------------------------- loading


@dataclass
class _Parts:
    """What both formats produce before the shared checks: objects with their document paths."""

    base: AppFile
    steps: list[tuple[StepSpec, KeyPath, str]] = field(default_factory=list)
    """(step, path of its entry, key holding its code file)."""
    tables: list[tuple[TableSpec, KeyPath, str]] = field(default_factory=list)
    """(table, path of its entry, key holding its name)."""
    webhooks: list[tuple[WebhookSpec, KeyPath, str]] = field(default_factory=list)
    name_keys: dict[int, str] = field(default_factory=dict)
    """id(step) -> key holding its name (``name`` or ``node_file``)."""
    implicit_trigger: set[int] = field(default_factory=set)
    """id() of steps whose trigger comes from the graph (Patterns: upstream when they have inputs)."""


def _find_app_file(path: Path) -> Path:
    if path.is_dir():
        for name in APP_FILE_NAMES:
            candidate = path / name
            if candidate.is_file():
                return candidate
        raise AppError(
            "no stepwell.yml or graph.yml in this folder",
            file=path,
            hint="create stepwell.yml (e.g. with `stepwell init`) or pass the app file's path",
        )
    if path.is_file():
        return path
    raise AppError("no such app folder or file", file=path, hint="check the path")


def load_app(path: str | Path) -> AppSpec:
    """Load and check an app.

    ``path`` is an app folder (``stepwell.yml`` is looked for, then
    ``graph.yml``) or an app file of any name; a YAML file with a top-level
    ``functions:`` list is read as a Patterns graph. Raises :class:`AppError`
    (one-line message: file, line, key, problem, what to do) on any problem.
    """
    app_file = _find_app_file(Path(path))
    display = str(app_file)
    root = app_file.parent.resolve()
    named_yaml = app_file.suffix.lower() in (".yml", ".yaml")
    try:
        doc = _read_yaml_file(app_file, display)
    except AppError:
        if named_yaml:
            raise
        doc = None
    if doc is not None and doc.data is None:
        doc.data = {}
    if not named_yaml and (doc is None or not isinstance(doc.data, dict)):
        # a step's code or a data file passed where the app goes (`stepwell run a.py`,
        # `stepwell load data.csv TABLE APP`): its YAML errors would only confuse
        raise AppError(
            "not an app file (an app file is YAML with keys such as `steps:`)",
            file=display,
            hint="pass the app folder (the one holding stepwell.yml) or the app file, "
            "and check the order of the arguments (`stepwell COMMAND --help`)",
        )
    assert doc is not None
    if not isinstance(doc.data, dict):
        raise AppError(
            "the app file must be a mapping of keys",
            file=display,
            line=doc.line(()) or 1,
            hint="start with keys such as `title:` and `steps:`",
        )
    is_graph = "functions" in doc.data or app_file.name in _GRAPH_FILE_NAMES
    parts = _read_patterns(doc) if is_graph else _read_stepwell(doc)
    return _finish(doc, root, app_file.resolve(), "patterns" if is_graph else "stepwell", parts)


def _read_stepwell(doc: _Doc) -> _Parts:
    base = _validate(doc, AppFile, doc.data, (), context={"format": "stepwell"})
    return _stepwell_parts(base)


def _stepwell_parts(base: AppFile) -> _Parts:
    parts = _Parts(base=base)
    for index, step in enumerate(base.steps):
        parts.steps.append((step, ("steps", index), step.kind))
        parts.name_keys[id(step)] = "name"
    for index, table in enumerate(base.tables):
        parts.tables.append((table, ("tables", index), "name"))
    for index, hook in enumerate(base.webhooks):
        parts.webhooks.append((hook, ("webhooks", index), "name"))
    return parts


def _step_name_from_file(node_file: str) -> str:
    path = PurePosixPath(node_file.replace("\\", "/"))
    pieces = [p for p in path.with_suffix("").parts if p not in (".", "..", "/", "")]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(pieces))
    return name.lstrip(".-") or "step"


def _read_patterns(doc: _Doc) -> _Parts:
    data: dict[str, Any] = doc.data
    own_keys = set(AppFile.yaml_keys())
    stepwell_part: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("functions", "stores") or key in _PATTERNS_TOP_IGNORED:
            continue
        if key in own_keys:
            stepwell_part[key] = value
        else:
            doc.warn(
                (key,), f"unknown key {key!r} ignored (neither a graph.yml nor a stepwell key)"
            )
    base = _validate(doc, AppFile, stepwell_part, (), context={"format": "stepwell"})
    parts = _stepwell_parts(base)
    function_steps: list[tuple[StepSpec, KeyPath, str]] = []
    for index, entry in enumerate(_list_at(doc, "functions")):
        _read_function(doc, ("functions", index), entry, parts, function_steps)
    parts.steps = function_steps + parts.steps
    store_tables: list[tuple[TableSpec, KeyPath, str]] = []
    for index, entry in enumerate(_list_at(doc, "stores")):
        store_tables.append(_read_store(doc, ("stores", index), entry))
    parts.tables = store_tables + parts.tables
    return parts


def _list_at(doc: _Doc, key: str) -> list[Any]:
    value = doc.data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.error(
            (key,), f"`{key}` must be a list", f"write one `- ...` entry per {key[:-1]}"
        )
    return value


def _read_function(
    doc: _Doc,
    path: KeyPath,
    entry: Any,
    parts: _Parts,
    steps: list[tuple[StepSpec, KeyPath, str]],
) -> None:
    if not isinstance(entry, dict):
        raise doc.error(path, "a function must be a mapping", "write `- node_file: my_node.py`")
    honoured = set(LIMIT_KEYS)
    for key in entry:
        if key not in _PATTERNS_FUNCTION_KEYS | _PATTERNS_FUNCTION_IGNORED | honoured:
            doc.warn(
                path + (key,),
                f"unknown key {key!r} ignored (neither a graph.yml nor a stepwell key)",
            )
    if "webhook" in entry:
        if "node_file" in entry:
            raise doc.error(
                path + ("webhook",),
                "a function has either `webhook` or `node_file`, not both",
                "split it into a webhook function and a node function",
            )
        table = entry["webhook"]
        hook_data = {"name": table, "table": table, "description": entry.get("description")}
        hook = _validate(
            doc, WebhookSpec, hook_data, path, rename={"name": "webhook", "table": "webhook"}
        )
        parts.webhooks.append((hook, path, "webhook"))
        return
    if "node_file" not in entry:
        if "uses" in entry:
            doc.warn(
                path + ("uses",),
                f"component node {entry['uses']!r} is not supported by stepwell and is skipped",
            )
            return
        raise doc.error(
            path,
            "a function needs `node_file` (a .py or .sql file) or `webhook`",
            "add `node_file: my_node.py`",
        )
    node_file = entry["node_file"]
    file_path = path + ("node_file",)
    if not isinstance(node_file, str) or not node_file.strip():
        raise doc.error(
            file_path, f"bad node_file {node_file!r}", "write the path of a .py or .sql file"
        )
    node_file = node_file.strip()
    pure = PurePosixPath(node_file.replace("\\", "/"))
    suffix = pure.suffix.lower()
    if pure.name in _GRAPH_FILE_NAMES or suffix in (".yml", ".yaml"):
        raise doc.error(
            file_path,
            f"nested graphs are not supported ({node_file})",
            "copy the sub-graph's functions and stores into this graph file",
        )
    if suffix == ".json":
        # a chart node (a Vega-Lite spec over its `chart_input` table): Patterns
        # draws it in the UI; there is nothing to run
        return
    kind = {".py": "node", ".sql": "sql"}.get(suffix)
    if kind is None:
        raise doc.error(
            file_path,
            f"node_file {node_file!r} is not a .py or .sql file",
            "point it at a .py or .sql file",
        )
    step_data: dict[str, Any] = {
        "name": _step_name_from_file(node_file),
        "kind": kind,
        "file": node_file,
    }
    rename = {"name": "node_file", "kind": "node_file", "file": "node_file"}
    sources = [
        ("inputs", "inputs"),
        ("outputs", "outputs"),
        ("parameters", "parameters"),
        ("parameter_values", "parameters"),
        ("schedule", "trigger"),
        ("trigger", "trigger"),
        ("description", "description"),
        *((key, key) for key in LIMIT_KEYS),
    ]
    for source, target in sources:
        if source not in entry:
            continue
        value = entry[source]
        if target in ("inputs", "outputs") and isinstance(value, list):
            value = {name: name for name in value if isinstance(name, str)}  # older list form
        if target == "parameters" and isinstance(step_data.get("parameters"), dict):
            if isinstance(value, dict):
                value = {**step_data["parameters"], **value}
        step_data[target] = value
        rename[target] = source
    explicit_trigger = step_data.get("trigger") is not None
    step = _validate(doc, StepSpec, step_data, path, rename=rename, context={"format": "patterns"})
    steps.append((step, path, "node_file"))
    parts.name_keys[id(step)] = "node_file"
    if not explicit_trigger:
        parts.implicit_trigger.add(id(step))


def _read_store(doc: _Doc, path: KeyPath, entry: Any) -> tuple[TableSpec, KeyPath, str]:
    if not isinstance(entry, dict):
        raise doc.error(path, "a store must be a mapping", "write `- table: my_table`")
    for key in entry:
        if key not in _PATTERNS_STORE_KEYS | _PATTERNS_STORE_IGNORED:
            doc.warn(
                path + (key,),
                f"unknown key {key!r} ignored (neither a graph.yml nor a stepwell key)",
            )
    if "table" in entry and "stream" in entry:
        raise doc.error(
            path + ("stream",), "a store has either `table` or `stream`, not both", "keep `table:`"
        )
    name_key = "table" if "table" in entry else "stream"
    if name_key not in entry:
        raise doc.error(path, "a store needs `table: <name>`", "add `table: my_table`")
    table_data = {
        "name": entry[name_key],
        "schema": entry.get("schema"),
        "unique_on": entry.get("unique_on"),
        "description": entry.get("description"),
    }
    table = _validate(doc, TableSpec, table_data, path, rename={"name": name_key})
    return table, path, name_key


# --------------------------------------------------------------------------- shared checks


def _check_unique(doc: _Doc, items: list[tuple[str, KeyPath]], what: str, hint: str) -> None:
    first: dict[str, KeyPath] = {}
    for name, path in items:
        if name in first:
            raise doc.error(
                path,
                f"duplicate {what} name {name!r} (first at {format_key_path(first[name])}, "
                f"line {doc.line(first[name])})",
                hint,
            )
        first[name] = path


def _check_file(
    doc: _Doc, root: Path, relative: str, path: KeyPath, what: str, allow_dir: bool = False
) -> Path:
    target = root / relative
    try:
        inside = target.resolve().is_relative_to(root)
    except OSError:
        inside = False
    if not inside:
        raise doc.error(
            path, f"{what} {relative!r} is outside the app folder", f"move it into {root}"
        )
    exists = target.exists() if allow_dir else target.is_file()
    if not exists and target.is_dir():
        raise doc.error(path, f"{what} {relative!r} is a folder, not a file",
                        "give the path of a file inside it, or fix the path")
    if not exists:
        raise doc.error(path, f"{what} {relative!r} not found", f"create {target} or fix the path")
    return target


def _finish(doc: _Doc, root: Path, app_file: Path, fmt: str, parts: _Parts) -> AppSpec:
    base = parts.base
    step_names = [(s.name, p + (parts.name_keys[id(s)],)) for s, p, _ in parts.steps]
    _check_unique(
        doc,
        step_names,
        "step",
        "rename one of the node files (a step is named after its node_file)"
        if fmt == "patterns"
        else "give every step its own name",
    )
    _check_unique(
        doc,
        [(t.name, p + (k,)) for t, p, k in parts.tables],
        "table",
        "declare each table once",
    )
    _check_unique(
        doc,
        [(h.name, p + (k,)) for h, p, k in parts.webhooks],
        "webhook",
        "give every webhook its own name",
    )
    _check_unique(
        doc,
        [(a.name, ("actions", i, "name")) for i, a in enumerate(base.actions)],
        "action",
        "give every action its own name",
    )

    # Files on disk.
    for step, path, file_key in parts.steps:
        _check_file(doc, root, step.file, path + (file_key,), f"{step.kind} file")
    if base.requirements_file:
        _check_file(doc, root, base.requirements_file, ("requirements_file",), "requirements file")
    for relative, action_path, what in action_files(base.actions):
        _check_file(doc, root, relative, action_path, what)
    for action_path, problem, hint in action_problems(base.actions):
        raise doc.error(action_path, problem, hint)
    for a_index, action in enumerate(base.actions):
        for s_index, action_step in enumerate(action.steps):
            action_step._key_line = doc.line(("actions", a_index, "steps", s_index, "code"))
    for key, what in (("plugins", "plugin"), ("streams", "stream file"), ("rules", "rule file")):
        for index, relative in enumerate(getattr(base, key)):
            _check_file(doc, root, relative, (key, index), what, allow_dir=key == "plugins")

    # Common Model schemas.
    schema_names: dict[str, KeyPath] = {}
    for index, spec in enumerate(base.schemas):
        spec_path: KeyPath = ("schemas", index, "schema_file")
        target = _check_file(doc, root, spec.schema_file, spec_path, "schema file")
        definition = _load_schema(target, str(Path(doc.file).parent / spec.schema_file))
        if definition.name in schema_names:
            raise doc.error(
                spec_path,
                f"two schema files declare the schema {definition.name!r} "
                f"(also {format_key_path(schema_names[definition.name])})",
                "give every schema its own name",
            )
        schema_names[definition.name] = spec_path
        spec._definition = definition
    for table, path, _ in parts.tables:
        if table.schema_name and table.schema_name not in schema_names:
            known = ", ".join(schema_names) or "(none)"
            problem = f"unknown schema {table.schema_name!r}"
            hint = f"declare it under `schemas: [{{schema_file: ...}}]`; known schemas: {known}"
            if fmt == "patterns" and path[0] == "stores":
                doc.warn(path + ("schema",), f"{problem} ({hint})")
            else:
                raise doc.error(path + ("schema",), problem, hint)

    # Secret references: a malformed one would reach the step as the text written.
    for step, path, _ in parts.steps:
        values_key = "parameter_values" if fmt == "patterns" else "parameters"
        pending: list[tuple[KeyPath, Any]] = [(path + (values_key,), step.parameters),
                                              (path + ("credentials",), step.credentials)]
        while pending:
            where, value = pending.pop()
            if isinstance(value, str) and (bad := malformed_refs(value)):
                raise doc.error(
                    where, f"{bad[0]!r} is not a secret reference",
                    "write ${{ secrets.<name> }} with a name of letters, digits, '_' and '-'",
                )
            if isinstance(value, Mapping):
                pending.extend((where + (k,), v) for k, v in value.items())
            elif isinstance(value, list):
                pending.extend((where + (i,), v) for i, v in enumerate(value))

    # References between steps.
    known_steps = [s.name for s, _, _ in parts.steps]
    for step, path, _ in parts.steps:
        if step.after and step.after not in known_steps:
            raise doc.error(
                path + ("after",),
                f"no step named {step.after!r}",
                f"known steps: {', '.join(known_steps)}",
            )

    # Tables that nodes' code names (ports default to table names).
    for step, _, _ in parts.steps:
        if step.kind != "node":
            continue
        try:
            source = (root / step.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # the run reports it
            continue
        step.set_code_tables(*scan_node_tables(source, step.inputs, step.outputs))

    # Tables read by SQL steps.
    for step, path, file_key in parts.steps:
        if step.kind != "sql":
            continue
        sql_path = root / step.file
        try:
            sql_text = sql_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise doc.error(
                path + (file_key,), f"cannot read {step.file!r}: {exc}", "save it as UTF-8 text"
            ) from None
        found = scan_sql_tables(sql_text, step.inputs, step.outputs)
        if not found.parsed:
            doc.warn(
                path + (file_key,),
                f"could not parse {step.file} as SQL; its tables were found by a simple scan",
            )
        step.set_code_tables(found.reads, found.writes)

    # Patterns: a function without a trigger runs when its inputs change.
    for step, _, _ in parts.steps:
        if id(step) in parts.implicit_trigger:
            step.trigger = "upstream" if step.input_tables() else "manual"

    app = AppSpec(
        root=root,
        file=app_file,
        format=fmt,  # type: ignore[arg-type]
        warnings=doc.warnings,
        title=base.title,
        requirements_file=base.requirements_file,
        store=base.store,
        defaults=base.defaults,
        tables=[t for t, _, _ in parts.tables],
        steps=[s for s, _, _ in parts.steps],
        webhooks=[h for h, _, _ in parts.webhooks],
        actions=base.actions,
        plugins=base.plugins,
        streams=base.streams,
        rules=base.rules,
        schemas=base.schemas,
    )
    app._display_file = doc.file
    steps_key = "functions" if fmt == "patterns" else "steps"
    app._locations = {
        steps_key: (steps_key, doc.line((steps_key,))),
        "schemas": ("schemas", doc.line(("schemas",))),
    }
    for step, path, _ in parts.steps:
        app._locations[f"step:{step.name}"] = (format_key_path(path), doc.line(path))
    app.upstream_order()  # raises on cycles
    _check_sql_outputs(doc, parts, app.writers())
    _warn_unknown_reads(doc, parts, app.table_names())
    app.warnings = list(doc.warnings)  # (the model took a copy)
    return app


def _check_sql_outputs(doc: _Doc, parts: _Parts, writers: dict[str, list[str]]) -> None:
    """A SQL step replaces its output table's rows on each run: no other step or
    webhook may write that table (their rows would silently vanish)."""
    for step, path, _ in parts.steps:
        if step.kind != "sql":
            continue
        table = step.sql_output()
        others = [w.replace("webhook:", "webhook ") for w in writers.get(table, []) if w != step.name]
        if others:
            names = ", ".join(repr(o) if not o.startswith("webhook ") else o for o in others)
            raise doc.error(
                path,
                f"SQL step {step.name!r} replaces all rows of table {table!r} on each run, "
                f"but {names} also write{'s' if len(others) == 1 else ''} it: those rows "
                "would be lost",
                "give the SQL step a table of its own (`output: <name>`)",
            )


def _warn_unknown_reads(doc: _Doc, parts: _Parts, known: list[str]) -> None:
    """Warn about a node that declares its ports yet reads a table by a name that
    is neither one of them nor any table of the app: most likely a misspelling
    (the read finds nothing, and the run succeeds without data)."""
    for step, path, file_key in parts.steps:
        if step.kind != "node" or not (step.inputs or step.outputs):
            continue
        for table in step.input_tables():
            if table in known or table in step.inputs:
                continue
            close = difflib.get_close_matches(table, [*step.inputs, *known], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            doc.warn(path + (file_key,),
                     f"{step.file} reads Table({table!r}), which is not a port of the step "
                     f"nor a table of the app{hint} (a table filled by `stepwell load` "
                     "belongs under `tables:`)")  # fmt: skip


def _load_schema(path: Path, display: str) -> CommonModelSchema:
    doc = _read_yaml_file(path, display)
    if not isinstance(doc.data, dict):
        raise AppError(
            "a schema file must be a mapping",
            file=display,
            line=doc.line(()) or 1,
            hint="write `name:`, `fields:` ... as in a Common Model schema",
        )
    return _validate(doc, CommonModelSchema, doc.data, ())
