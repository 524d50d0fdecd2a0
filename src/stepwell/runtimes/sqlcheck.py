"""Checking user SQL before the host runs it: one SELECT over allowed tables only
(and, for ``Table.execute_sql``, one INSERT or CREATE TABLE AS into one table)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stepwell.store.base import ID_COLUMN

#: Patterns-style templating: ``{{ Table("orders") }}`` (optionally with a mode).
_TABLE_TEMPLATE = re.compile(
    r"""\{\{\s*Table\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']\s*(?:,\s*[^)]*)?\)\s*\}\}"""
)


#: store dialect names -> sqlglot dialect names
_SQLGLOT_DIALECTS = {"postgresql": "postgres", "duckdb": "duckdb"}


def sqlglot_dialect(store_dialect: str) -> str:
    """sqlglot's name for a store's SQL dialect (``PostgreSQL`` -> ``postgres``)."""
    return _SQLGLOT_DIALECTS.get(store_dialect.lower(), store_dialect.lower())


#: Functions that read files, settings, the environment or other databases.
_DENIED_FUNCTION_PREFIXES = (
    "read_", "glob", "query", "getenv", "current_setting", "set_config", "pg_", "lo_",
    "dblink", "sniff_", "parquet_", "duckdb_", "pragma_", "which_secret", "file",
    "system", "load_", "install_", "txid_", "inet_", "version",
)


def _function_name(func: object) -> str:
    from sqlglot import exp

    if isinstance(func, exp.Anonymous):
        return str(func.name).lower()
    return func.sql_name().lower()


class SqlNotAllowed(ValueError):
    """The SQL is not a single SELECT over the tables this step may read."""


#: ``{{ x }}``: how older Patterns docs name a node's table (a Jinja variable)
_NAME_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def expand_templates(sql: str) -> str:
    """Replace ``{{ Table("x") }}`` and ``{{ x }}`` with the plain table name ``x``."""
    return _NAME_TEMPLATE.sub(lambda m: m.group(1), _TABLE_TEMPLATE.sub(lambda m: m.group(1), sql))


def template_tables(sql: str) -> list[str]:
    return _TABLE_TEMPLATE.findall(sql)


def _one_statement(sql: str, dialect: str, where: str, expected: str) -> Any:
    """The single statement in ``sql`` (templates expanded), parsed by sqlglot."""
    import sqlglot

    text = expand_templates(sql).strip().rstrip(";")
    try:
        statements = [s for s in sqlglot.parse(text, read=dialect) if s is not None]
    except sqlglot.errors.ParseError as exc:
        raise SqlNotAllowed(f"{where}: cannot parse SQL: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise SqlNotAllowed(f"{where}: expected {expected}, got {len(statements)}")
    return statements[0]


#: What a step whose SQL names a table it has not declared is told to do.
DECLARE_TABLE_ADVICE = "declare it with Table({name!r}) or list it in the step's inputs"


def restrict_select(sql: str, allowed: Mapping[str, str], dialect: str, where: str,
                    advice: str = DECLARE_TABLE_ADVICE) -> str:  # fmt: skip
    """Return ``sql`` rewritten so names in ``allowed`` (alias -> table) point at
    their tables; raise ``SqlNotAllowed`` for anything but one SELECT reading only
    those tables. ``where`` names the step or file for error messages; ``advice``
    (formatted with ``name``) says what to do about a table not in ``allowed``."""
    from sqlglot import exp

    dialect = sqlglot_dialect(dialect)
    tree = _one_statement(sql, dialect, where, "one SELECT statement")
    if not isinstance(tree, (exp.Select, exp.Union, exp.Intersect, exp.Except)):
        raise SqlNotAllowed(
            f"{where}: only SELECT queries are allowed here, not {tree.key.upper()}"
        )
    return _restrict_tables(tree, allowed, dialect, where, advice)


def tables_read(sql: str, dialect: str) -> set[str]:
    """Names of the tables a (checked) query reads, CTEs left out."""
    import sqlglot

    return tables_of(sqlglot.parse_one(sql, read=sqlglot_dialect(dialect)))


def unwritten_tables(sql: str, tables: Iterable[str], dialect: str,
                     exists: Callable[[str], bool]) -> list[str]:  # fmt: skip
    """Of ``tables``, those the (checked) query ``sql`` reads that do not exist yet:
    why it failed, in words a user can act on rather than the database's."""
    read = tables_read(sql, dialect)
    return [t for t in dict.fromkeys(tables) if t in read and not exists(t)]


def tables_of(tree: Any) -> set[str]:
    """Names of the tables a parsed query reads, CTEs left out."""
    from sqlglot import exp

    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    return {table.name for table in tree.find_all(exp.Table)} - ctes


def _restrict_tables(tree: Any, allowed: Mapping[str, str], dialect: str, where: str,
                     advice: str = DECLARE_TABLE_ADVICE) -> str:  # fmt: skip
    """``tree`` as SQL with the names in ``allowed`` pointing at their tables; refuses
    other tables, table functions and functions that reach outside them."""
    from sqlglot import exp

    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    targets = set(allowed.values())
    for func in tree.find_all(exp.Func):
        name = _function_name(func)
        if name.startswith(_DENIED_FUNCTION_PREFIXES):
            raise SqlNotAllowed(
                f"{where}: function {name}() is not allowed in step SQL (it reaches outside "
                f"the step's tables)"
            )
    for table in tree.find_all(exp.Table):
        name = table.name
        if isinstance(table.this, exp.Func) or not name:
            raise SqlNotAllowed(
                f"{where}: {table.sql(dialect=dialect)} is not allowed: steps read tables, "
                f"not table functions or files"
            )
        if table.args.get("db") or table.args.get("catalog"):
            raise SqlNotAllowed(
                f"{where}: table {table.sql(dialect=dialect)} is not allowed: only this "
                f"step's tables ({', '.join(sorted(allowed)) or 'none'}) can be read"
            )
        if name in ctes:
            continue
        if name in allowed:
            if allowed[name] != name and not table.alias:  # `port.column` still resolves
                table.set("alias", exp.TableAlias(this=exp.to_identifier(name)))
            table.set("this", exp.to_identifier(allowed[name], quoted=True))
        elif name not in targets:
            raise SqlNotAllowed(
                f"{where}: table {name!r} is not one of this step's tables "
                f"({', '.join(sorted(allowed)) or 'none'}); " + advice.format(name=name)
            )
    return tree.sql(dialect=dialect)


@dataclass
class TableStatement:
    """What ``Table.execute_sql`` runs, restricted to the step's tables: for
    ``kind`` "insert" the rows of the SELECT ``sql`` (named ``columns`` if given)
    are appended to the table, for "replace" they become its contents (a new
    version); "update" and "delete" run ``sql`` itself on the table."""

    kind: str
    sql: str
    columns: list[str]


def table_statement(
    sql: str, table: str, allowed: Mapping[str, str], dialect: str, where: str
) -> TableStatement:
    """Check that ``sql`` is one ``INSERT INTO <table> ... SELECT/VALUES`` or
    ``CREATE [OR REPLACE] TABLE <table> AS SELECT`` whose query reads only the
    tables in ``allowed`` (alias -> table); ``table`` is the one it may change."""
    from sqlglot import exp

    glot = sqlglot_dialect(dialect)
    usage = (f"use INSERT INTO {table} [(columns)] SELECT ... | VALUES ..., CREATE [OR "
             f"REPLACE] TABLE {table} AS SELECT ..., UPDATE {table} SET ... [WHERE ...] or "
             f"DELETE FROM {table} [WHERE ...]")  # fmt: skip
    tree = _one_statement(sql, glot, where, f"one statement ({usage})")
    if isinstance(tree, exp.Insert):
        kind = "insert"
    elif isinstance(tree, exp.Create) and str(tree.args.get("kind", "")).upper() == "TABLE":
        kind = "replace"
    elif isinstance(tree, (exp.Update, exp.Delete)):
        return _change_statement(tree, table, allowed, glot, where)
    else:
        raise SqlNotAllowed(f"{where}: {tree.key.upper()} statements cannot run here; {usage}")
    target = tree.this
    columns = [c.name for c in target.expressions] if isinstance(target, exp.Schema) else []
    target_table = target.this if isinstance(target, exp.Schema) else target
    name = target_table.name if isinstance(target_table, exp.Table) else ""
    if allowed.get(name, name) != table or target_table.args.get("db"):
        raise SqlNotAllowed(
            f"{where}: execute_sql may only change table {table!r} itself, not "
            f"{target_table.sql(dialect=glot)}"
        )
    source = tree.expression
    if isinstance(source, exp.Subquery):
        source = source.this
    if isinstance(source, exp.Values):
        if not columns:
            raise SqlNotAllowed(f"{where}: name the columns of the VALUES: INSERT INTO "
                                f"{table} (a, b, ...) VALUES ...")  # fmt: skip
        alias = ", ".join(exp.to_identifier(c, quoted=True).sql(dialect=glot) for c in columns)
        query = f"SELECT * FROM ({source.sql(dialect=glot)}) AS v({alias})"
    elif isinstance(source, (exp.Select, exp.Union, exp.Intersect, exp.Except)):
        query = source.sql(dialect=glot)
    else:
        raise SqlNotAllowed(f"{where}: {kind.upper()} needs a SELECT or VALUES; {usage}")
    return TableStatement(kind, restrict_select(query, allowed, dialect, where), columns)


def _change_statement(tree: Any, table: str, allowed: Mapping[str, str], dialect: str,
                      where: str) -> TableStatement:  # fmt: skip
    """An UPDATE or DELETE of ``table`` (its conditions, FROM and USING may read the
    step's tables)."""
    from sqlglot import exp

    target = tree.this
    if not isinstance(target, exp.Table) or allowed.get(target.name, target.name) != table \
            or target.args.get("db"):
        raise SqlNotAllowed(
            f"{where}: execute_sql may only change table {table!r} itself, not "
            f"{target.sql(dialect=dialect)}"
        )
    for assignment in tree.args.get("expressions") or []:  # UPDATE ... SET
        column = assignment.this if isinstance(assignment, exp.EQ) else None
        if isinstance(column, exp.Column) and column.name == ID_COLUMN:
            raise SqlNotAllowed(f"{where}: {ID_COLUMN} is set by stepwell and cannot be updated")
    kind = "update" if isinstance(tree, exp.Update) else "delete"
    return TableStatement(kind, _restrict_tables(tree, allowed, dialect, where), [])
