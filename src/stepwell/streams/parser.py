"""eKuiper stream and rule definitions, and rule SQL compiled for DuckDB.

A stream file is ``{"sql": "CREATE STREAM demo (id BIGINT, name STRING) WITH
(TYPE=\\"pyjson\\", DATASOURCE=\\"topic\\", FORMAT=\\"JSON\\", CONF_KEY=\\"k\\")"}``;
``TYPE`` names a source plugin symbol, or ``table`` (``DATASOURCE`` is then a
stepwell table whose newly committed rows feed the stream). A rule file is
``{"id": "r1", "sql": "SELECT ...", "actions": [{"<sink>": {...}}], "options": {...}}``.

Rule SQL is eKuiper's dialect (``"text"`` is a string, backticks quote
names, windows go in GROUP BY). :func:`compile_rule` parses it with sqlglot
and produces a DuckDB query over one table of events, with the window function
taken out of GROUP BY (the engine cuts events into window panes itself) and
every plugin function call replaced by a UDF call site.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CompiledRule",
    "RuleDef",
    "StreamDef",
    "StreamError",
    "WindowSpec",
    "compile_rule",
    "load_rule_file",
    "load_stream_file",
    "parse_rule",
    "parse_stream",
]

EVENTS_TABLE = "__sw_events"
WINDOW_TABLE = "__sw_window"
_UNITS_MS = {"dd": 86_400_000, "hh": 3_600_000, "mi": 60_000, "ss": 1000, "ms": 1}
_WINDOWS = {"tumblingwindow", "hoppingwindow", "slidingwindow", "countwindow", "sessionwindow"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STREAM_TYPES = {
    "bigint": "int", "float": "float", "string": "str", "boolean": "bool",
    "datetime": "datetime", "bytea": "binary", "array": "json", "struct": "json",
}


class StreamError(ValueError):
    """A stream or rule definition is invalid; the message names where and what."""


# -- streams ---------------------------------------------------------------------------


@dataclass
class StreamDef:
    """A parsed ``CREATE STREAM`` statement, or a ``CREATE TABLE`` lookup table
    (``lookup``: rules JOIN it; it is read whole, not streamed)."""

    name: str
    type: str
    datasource: str = ""
    format: str = "JSON"
    conf_key: str | None = None
    timestamp: str | None = None
    fields: list[tuple[str, str]] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    sql: str = ""
    lookup: bool = False

    @property
    def is_table(self) -> bool:
        """A stream of a stepwell table's newly committed rows."""
        return self.type.lower() == "table" and not self.lookup


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses or quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


_CREATE = re.compile(
    r"^\s*CREATE\s+(STREAM|TABLE)\s+`?([A-Za-z_][A-Za-z0-9_]*)`?\s*\((.*)\)\s*WITH\s*\((.*)\)\s*;?\s*$",
    re.I | re.S,
)
_OPTION = re.compile(r"""^\s*([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s,]+))\s*$""", re.S)


def parse_stream(sql: str, where: str = "stream") -> StreamDef:
    """Parse eKuiper's ``CREATE STREAM name (fields) WITH (OPTIONS)``, or ``CREATE
    TABLE name () WITH (TYPE="table", DATASOURCE="<stepwell table>")``: a lookup
    table rules can JOIN."""
    match = _CREATE.match(sql)
    if not match:
        raise StreamError(
            f"{where}: expected CREATE STREAM <name> (<fields>) WITH (TYPE=\"...\", "
            f"DATASOURCE=\"...\") or CREATE TABLE <name> () WITH (TYPE=\"table\", "
            f"DATASOURCE=\"<table>\"), got {sql.strip()[:80]!r}"
        )
    lookup = match.group(1).upper() == "TABLE"
    name, body, opts = match.group(2), match.group(3), match.group(4)
    fields = []
    for item in _split_top(body):
        parts = item.replace("`", "").split(None, 1)
        if len(parts) != 2:
            raise StreamError(f"{where}: field {item!r} needs a name and a type")
        type_name = parts[1].split("(")[0].strip().lower()
        if type_name not in _STREAM_TYPES:
            raise StreamError(
                f"{where}: field {parts[0]!r} has unknown type {parts[1]!r} "
                f"(use one of {', '.join(sorted(_STREAM_TYPES))})"
            )
        fields.append((parts[0], type_name))
    options: dict[str, str] = {}
    for item in _split_top(opts):
        opt = _OPTION.match(item)
        if not opt:
            raise StreamError(f"{where}: bad option {item!r}: write KEY=\"value\"")
        value = next(v for v in opt.groups()[1:] if v is not None)
        options[opt.group(1).upper()] = value
    if "TYPE" not in options:
        raise StreamError(f"{where}: stream {name!r} has no TYPE option: name a source plugin "
                          "symbol, or \"table\" to read a stepwell table")
    stream = StreamDef(
        name=name,
        type=options["TYPE"],
        datasource=options.get("DATASOURCE", ""),
        format=options.get("FORMAT", "JSON"),
        conf_key=options.get("CONF_KEY"),
        timestamp=options.get("TIMESTAMP"),
        fields=fields,
        options=options,
        sql=sql.strip(),
        lookup=lookup,
    )
    if lookup and (stream.type.lower() != "table" or not _NAME.fullmatch(stream.datasource)):
        raise StreamError(
            f"{where}: table {name!r}: lookup tables read a stepwell table: WITH "
            f"(TYPE=\"table\", DATASOURCE=\"<table name>\")"
        )
    if stream.is_table and not _NAME.fullmatch(stream.datasource):
        raise StreamError(f"{where}: stream {name!r} of TYPE \"table\" needs DATASOURCE=\"<table name>\"")
    return stream


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise StreamError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise StreamError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None


def load_stream_file(path: Path) -> StreamDef:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sql"), str):
        raise StreamError(f"{path}: a stream file is a JSON object with an \"sql\" string")
    return parse_stream(data["sql"], str(path))


# -- rules -------------------------------------------------------------------------------


@dataclass
class RuleDef:
    """An eKuiper rule: id, SQL, actions (``[(kind, props)]``) and options."""

    id: str
    sql: str
    actions: list[tuple[str, dict[str, Any]]]
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "sql": self.sql,
                "actions": [{kind: props} for kind, props in self.actions],
                "options": self.options}


def parse_rule(data: Any, where: str = "rule") -> RuleDef:
    if not isinstance(data, dict):
        raise StreamError(f"{where}: a rule is a JSON object with id, sql and actions")
    unknown = set(data) - {"id", "sql", "actions", "options", "name", "triggered", "tags"}
    if unknown:
        raise StreamError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          "(a rule has id, sql, actions and options)")
    rule_id = data.get("id")
    if not isinstance(rule_id, str) or not _NAME.fullmatch(rule_id) or len(rule_id) > 40:
        raise StreamError(f"{where}: field `id` must be a name of letters, digits and '_' "
                          f"(at most 40 characters), got {rule_id!r}")
    sql = data.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise StreamError(f"{where}: field `sql` must be the rule's SELECT statement")
    actions_in = data.get("actions")
    if not isinstance(actions_in, list) or not actions_in:
        raise StreamError(f"{where}: field `actions` must be a non-empty list such as "
                          "[{\"log\": {}}]")
    actions = []
    for index, item in enumerate(actions_in):
        if not isinstance(item, dict) or len(item) != 1:
            raise StreamError(f"{where}: actions[{index}] must be an object with one key "
                              "(the sink name), e.g. {\"log\": {}}")
        (kind, props), = item.items()
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise StreamError(f"{where}: actions[{index}].{kind} must be an object of properties")
        if kind == "table" and not _NAME.fullmatch(str(props.get("name", ""))):
            raise StreamError(f"{where}: actions[{index}].table needs \"name\": the table to write")
        actions.append((kind, props))
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise StreamError(f"{where}: field `options` must be an object")
    return RuleDef(rule_id, sql.strip(), actions, options)


def load_rule_file(path: Path) -> RuleDef:
    return parse_rule(_read_json(path), str(path))


# -- compiling rule SQL ----------------------------------------------------------------


@dataclass
class WindowSpec:
    """A window from GROUP BY: sizes in ms for time windows, in events for count windows."""

    kind: str  # tumbling | hopping | sliding | session | count
    size: int
    hop: int | None = None  # hopping: hop (ms); count: interval (events); session: max duration
    delay: int = 0  # sliding: delay (ms)


@dataclass
class FunctionSite:
    """A plugin function call found in the SQL (resolved to a UDF by the engine)."""

    udf_name: str
    symbol: str
    arity: int
    aggregate: bool
    func_id: int
    arg_nodes: list[Any]


@dataclass
class CompiledRule:
    stream: str
    stream_alias: str
    window: WindowSpec | None
    sql: str
    aggregate: bool
    functions: list[FunctionSite]
    columns: set[str]
    uses_window_bounds: bool
    #: keys the rule reads with ``meta(key)`` ("*" for ``meta(*)``); each is the
    #: column ``meta_column(key)`` of the events table
    meta_keys: set[str] = field(default_factory=set)
    #: DuckDB relation -> lookup table (``CREATE TABLE``) the rule JOINs
    lookups: dict[str, str] = field(default_factory=dict)


#: Prefix of the relations that hold the rows of a rule's lookup tables.
LOOKUP_PREFIX = "__sw_lookup__"
#: Prefix of the events table's columns that carry a source's metadata.
META_PREFIX = "__sw_meta__"


def meta_column(key: str) -> str:
    """The events table column holding ``meta(key)`` (``*``: the whole metadata map)."""
    return META_PREFIX if key == "*" else META_PREFIX + key


def _rewrite_meta_calls(tree: Any, where: str) -> set[str]:
    """Turn ``meta(key)`` / ``meta(*)`` into columns of the events table (an
    unaliased one in the SELECT list is named ``meta``, as eKuiper names it)."""
    from sqlglot import exp

    keys: set[str] = set()
    for node in list(tree.find_all(exp.Anonymous)):
        if _func_name(node) != "meta":
            continue
        args = _func_args(node)
        arg = args[0] if len(args) == 1 else None
        if isinstance(arg, exp.Star):
            key = "*"
        elif isinstance(arg, exp.Column) and not arg.table:
            key = arg.name
        elif isinstance(arg, exp.Literal) and arg.is_string:
            key = arg.this
        else:
            raise StreamError(f"{where}: meta() takes one key, e.g. meta(topic), or meta(*)")
        keys.add(key)
        column = exp.column(meta_column(key), quoted=True)
        unaliased = node.parent is tree and node.arg_key == "expressions"
        node.replace(exp.alias_(column, "meta") if unaliased else column)
    return keys


def _func_name(node: Any) -> str:
    from sqlglot import exp

    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return str(node.sql_name()).lower() if hasattr(node, "sql_name") else node.key.lower()


def _func_args(node: Any) -> list[Any]:
    from sqlglot import exp

    if isinstance(node, exp.Anonymous):
        return list(node.expressions)
    args = []
    for key in node.arg_types:
        value = node.args.get(key)
        if isinstance(value, list):
            args.extend(value)
        elif value is not None and isinstance(value, exp.Expression):
            args.append(value)
    return args


def _window(node: Any, where: str) -> WindowSpec:
    from sqlglot import exp

    name = _func_name(node)
    args = _func_args(node)

    def number(arg: Any) -> int:
        if isinstance(arg, exp.Literal) and not arg.is_string:
            return int(float(arg.this))
        raise StreamError(f"{where}: {name.upper()} arguments must be numbers, got {arg.sql()}")

    if name == "countwindow":
        if len(args) not in (1, 2):
            raise StreamError(f"{where}: COUNTWINDOW takes (count) or (count, interval)")
        size = number(args[0])
        hop = number(args[1]) if len(args) == 2 else None
        if size < 1 or (hop is not None and not 1 <= hop <= size):
            raise StreamError(f"{where}: COUNTWINDOW needs count >= 1 and 1 <= interval <= count")
        return WindowSpec("count", size, hop)
    if not args:
        raise StreamError(f"{where}: {name.upper()} needs a time unit (dd, hh, mi, ss, ms) first")
    unit = args[0].name.lower() if isinstance(args[0], exp.Column) else args[0].sql().lower()
    if unit not in _UNITS_MS:
        raise StreamError(f"{where}: {name.upper()}: unknown time unit {unit!r} (dd, hh, mi, ss, ms)")
    scale = _UNITS_MS[unit]
    values = [number(a) * scale for a in args[1:]]
    expected = {"tumblingwindow": (1,), "hoppingwindow": (2,), "slidingwindow": (1, 2),
                "sessionwindow": (2,)}[name]
    if len(values) not in expected:
        raise StreamError(f"{where}: {name.upper()} takes {expected[-1] + 1} arguments")
    if any(v <= 0 for v in values[:1]):
        raise StreamError(f"{where}: {name.upper()} sizes must be positive")
    kind = name.removesuffix("window")
    if kind == "tumbling":
        return WindowSpec("tumbling", values[0])
    if kind == "hopping":
        return WindowSpec("hopping", values[0], values[1])
    if kind == "sliding":
        return WindowSpec("sliding", values[0], delay=values[1] if len(values) > 1 else 0)
    return WindowSpec("session", values[0], values[1])


def _arg_node_json(node: Any, stream: str) -> Any:
    """eKuiper-like JSON of an argument's AST node (for ``Validate``)."""
    from sqlglot import exp

    if isinstance(node, exp.Column):
        return {"Name": node.name, "StreamName": node.table or stream}
    if isinstance(node, exp.Literal):
        return {"Val": node.this if node.is_string else float(node.this)
                if "." in node.this else int(node.this)}
    return {"Expr": node.sql()}


def compile_rule(
    sql: str,
    *,
    rule_id: str,
    is_plugin_function: Callable[[str], bool],
    is_aggregate_function: Callable[[str], bool],
    where: str = "rule",
    lookup_tables: Collection[str] = (),
) -> CompiledRule:
    """Turn eKuiper rule SQL into a DuckDB query over :data:`EVENTS_TABLE` (and the
    relations of the ``lookup_tables`` it JOINs)."""
    import sqlglot
    from sqlglot import exp

    try:
        statements = [s for s in sqlglot.parse(sql.strip().rstrip(";"), read="mysql") if s]
    except sqlglot.errors.ParseError as exc:
        raise StreamError(f"{where}: cannot parse the SQL: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1 or not isinstance(statements[0], exp.Select):
        raise StreamError(f"{where}: a rule's sql must be one SELECT statement")
    tree = statements[0]
    lookups: dict[str, str] = {}
    for join in tree.args.get("joins") or []:
        target = join.this
        if not isinstance(target, exp.Table) or target.name not in lookup_tables:
            known = ", ".join(sorted(lookup_tables)) or "none"
            raise StreamError(
                f"{where}: JOIN {target.sql()}: a rule joins its stream with lookup tables "
                f"(CREATE TABLE <name> () WITH (TYPE=\"table\", DATASOURCE=\"<table>\")); "
                f"lookup tables: {known}"
            )
        relation = LOOKUP_PREFIX + target.name
        lookups[relation] = target.name
        target.replace(exp.alias_(exp.to_table(relation), target.alias_or_name, table=True))
    tables = [t for t in tree.find_all(exp.Table) if t.name not in lookups]
    if len(tables) != 1:
        raise StreamError(f"{where}: a rule reads exactly one stream (FROM <stream>)")
    source = tables[0]
    stream = source.name
    alias = source.alias_or_name
    source.replace(exp.alias_(exp.to_table(EVENTS_TABLE), alias, table=True)
                   if source.alias else exp.alias_(exp.to_table(EVENTS_TABLE), stream, table=True))

    window = None
    group = tree.args.get("group")
    if group is not None:
        keys = list(group.expressions)
        windows = [k for k in keys if isinstance(k, exp.Func) and _func_name(k) in _WINDOWS]
        if len(windows) > 1:
            raise StreamError(f"{where}: only one window function per rule")
        if windows:
            window = _window(windows[0], where)
            keys = [k for k in keys if k is not windows[0]]
            if keys:
                group.set("expressions", keys)
            else:
                tree.set("group", None)
    elif any(isinstance(n, exp.Func) and _func_name(n) in _WINDOWS for n in tree.walk()):
        raise StreamError(f"{where}: window functions belong in GROUP BY")

    meta_keys = _rewrite_meta_calls(tree, where)
    uses_bounds = False
    for node in list(tree.find_all(exp.Func)):
        name = _func_name(node)
        if name in ("window_start", "window_end"):
            if window is None:
                raise StreamError(f"{where}: {name}() needs a window in GROUP BY")
            column = "ws" if name == "window_start" else "we"
            node.replace(exp.Subquery(this=exp.select(column).from_(WINDOW_TABLE)))
            uses_bounds = True

    sites = rewrite_plugin_calls(tree, stream, is_plugin_function, is_aggregate_function)
    aggregate_plugin = any(site.aggregate for site in sites)

    aggregate = aggregate_plugin or tree.args.get("group") is not None or any(
        isinstance(n, exp.AggFunc) for n in tree.find_all(exp.AggFunc)
    )
    if aggregate and window is None:
        raise StreamError(
            f"{where}: aggregates and GROUP BY need a window, e.g. GROUP BY TUMBLINGWINDOW(ss, 10)"
        )
    aliases = {e.alias for e in tree.expressions if isinstance(e, exp.Alias)}
    # the stream's columns (with lookups, unqualified names may be the lookup's)
    columns = {c.name for c in tree.find_all(exp.Column) if c.name not in aliases and c.name
               and (c.table == alias or (not c.table and not lookups))}  # fmt: skip
    try:
        out = tree.sql(dialect="duckdb")
    except sqlglot.errors.SqlglotError as exc:
        raise StreamError(f"{where}: cannot translate the SQL: {exc}") from None
    return CompiledRule(stream, alias, window, out, aggregate, sites, columns, uses_bounds,
                        meta_keys, lookups)


def rewrite_plugin_calls(
    tree: Any,
    stream: str,
    is_plugin_function: Callable[[str], bool],
    is_aggregate_function: Callable[[str], bool],
) -> list[FunctionSite]:
    """Replace every plugin function call in ``tree`` by a UDF call site (innermost first).

    A scalar call ``f(a)`` becomes ``CAST(CAST(sw_fn_<i>(CAST(to_json(a) AS
    VARCHAR)) AS JSON) AS VARIANT)``; an aggregate one passes ``list(a)``.
    """
    from sqlglot import exp

    calls = [n for n in tree.find_all(exp.Func) if is_plugin_function(_func_name(n))]
    calls.sort(key=lambda n: -_depth(n))
    arg_nodes = {id(n): [_arg_node_json(a, stream) for a in _func_args(n)] for n in calls}
    sites: list[FunctionSite] = []
    variant = exp.DataType.build("VARIANT", dialect="duckdb")
    for func_id, node in enumerate(calls):
        symbol = _func_name(node)
        args = _func_args(node)
        aggregate = is_aggregate_function(symbol)
        udf = f"sw_fn_{func_id}"
        wrapped = []
        for arg in args:
            value = exp.Anonymous(this="list", expressions=[arg.copy()]) if aggregate else arg.copy()
            wrapped.append(exp.cast(exp.Anonymous(this="to_json", expressions=[value]), "VARCHAR"))
        if not wrapped:
            wrapped = [exp.Literal.string("")]
        call = exp.Anonymous(this=udf, expressions=wrapped)
        sites.append(FunctionSite(udf, symbol, len(args), aggregate, func_id, arg_nodes[id(node)]))
        node.replace(exp.cast(exp.cast(call, "JSON"), variant))
    return sites


def _depth(node: Any) -> int:
    depth = 0
    while node.parent is not None:
        node = node.parent
        depth += 1
    return depth
