"""The code of action steps: checking, compiling and the values it exchanges.

A code step's body is compiled as the body of a function::

    def __action_step__(data, error, params, user, *, <variables...>): <body>

with the body's own line numbers kept (the body is parsed first and wrapped
in the function node), so errors point at the user's lines. A body with a
top-level ``await`` becomes an ``async def`` run to completion. Nothing here
executes user code: the host uses it to check code, the worker to run it.
"""

from __future__ import annotations

import ast
import datetime as dt
import decimal
import io
import re
import tokenize
from collections.abc import Iterable
from types import CodeType
from typing import Any

#: The four names every code step gets, in this order.
BUILTIN_NAMES: tuple[str, ...] = ("data", "error", "params", "user")
FUNCTION_NAME = "__action_step__"

#: ``{{ x }}`` in a (non-f) string literal that looks like an action lookup.
_TEMPLATE_IN_STRING = re.compile(
    r"\{\{\s*(?:steps|params|user|ui|actions|data|error)\b[^{}]*\}\}"
)


_IMPORTS_JINJA = re.compile(r"^\s*(from|import)\s+jinja2\b", re.MULTILINE)


def template_in_code(source: str) -> tuple[int, str] | None:
    """``(line, text)`` of the first ``{{ ... }}`` meant as an action template in
    ``source``: written as code, or inside an ordinary string literal as a lookup
    of ``steps``/``params``/``user``/... (f-strings, where ``{{`` is an escaped
    brace, and jinja templates over other names are fine; in code that imports
    jinja2 every string is left alone: its templates may well use ``user`` or
    ``params``). ``None`` if there is none."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    renders_jinja = _IMPORTS_JINJA.search(source) is not None
    previous: tokenize.TokenInfo | None = None
    for token in tokens:
        if token.type == tokenize.OP and token.string == "{" and previous is not None:
            if previous.type == tokenize.OP and previous.string == "{" and previous.end == token.start:
                line = token.start[0]
                return line, _snippet(source, line, token.start[1] - 1)
        if token.type == tokenize.STRING and not renders_jinja:
            prefix = re.match(r"[A-Za-z]*", token.string)
            if prefix is not None and "f" not in prefix.group(0).lower():
                found = _TEMPLATE_IN_STRING.search(token.string)
                if found is not None:
                    line = token.start[0] + token.string.count("\n", 0, found.start())
                    return line, found.group(0)
        previous = token
    return None


def _snippet(source: str, line: int, column: int) -> str:
    text = source.splitlines()[line - 1][column:]
    end = text.find("}}")
    return text[: end + 2] if end != -1 else text[:40]


def template_problem(source: str, of: str = "") -> str | None:
    """The message for a ``{{ }}`` template inside code (``of`` follows its line
    number: `` of the code`` for code written in the app file), or ``None``."""
    found = template_in_code(source)
    if found is None:
        return None
    line, text = found
    inner = text.strip()[2:-2].strip() if text.strip().endswith("}}") else "..."
    name = re.sub(r"[^A-Za-z0-9_]", "_", inner.split(".")[-1]) or "value"
    if not name.isidentifier() or name in BUILTIN_NAMES:
        name = "value"
    return (
        f"line {line}{of}: {text} cannot be used inside Python code; declare it under the "
        f"step's `variables:` (e.g. `variables: {{{name}: \"{{{{ {inner} }}}}\"}}`) and use "
        f"`{name}` in the code"
    )


def parse_body(source: str, filename: str) -> ast.Module:
    """The body as a module AST (``return`` at top level allowed); raises SyntaxError."""
    return compile(
        source, filename, "exec",
        flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True,
    )  # fmt: skip


def _awaits(body: Iterable[ast.stmt]) -> bool:
    """Whether ``await`` (or ``async for``/``async with``) occurs outside nested functions."""
    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


def compile_step(source: str, filename: str, variables: Iterable[str] = (),
                 first_line: int = 1) -> tuple[CodeType, bool]:  # fmt: skip
    """Compile a step body into module code defining :data:`FUNCTION_NAME`.

    Returns ``(code, is_async)``. Line numbers are the body's own, shifted by
    ``first_line - 1`` (code written inside ``stepwell.yml`` reports the lines of
    that file). Raises SyntaxError with that line."""
    variables = list(variables)
    try:
        tree = parse_body(source, filename)
        if first_line > 1:
            ast.increment_lineno(tree, first_line - 1)
    except SyntaxError as exc:
        if exc.lineno and first_line > 1:
            exc.lineno += first_line - 1
            if exc.end_lineno:
                exc.end_lineno += first_line - 1
        raise
    is_async = _awaits(tree.body)
    arguments = ast.arguments(
        posonlyargs=[],
        args=[ast.arg(arg=name) for name in BUILTIN_NAMES],
        vararg=None,
        kwonlyargs=[ast.arg(arg=name) for name in variables],
        kw_defaults=[None for _ in variables],
        kwarg=None,
        defaults=[],
    )
    kind = ast.AsyncFunctionDef if is_async else ast.FunctionDef
    fields: dict[str, Any] = {
        "name": FUNCTION_NAME, "args": arguments, "body": tree.body or [ast.Pass()],
        "decorator_list": [], "returns": None,
    }  # fmt: skip
    if "type_params" in kind._fields:  # Python 3.12+
        fields["type_params"] = []
    function = kind(**fields)
    function.lineno, function.col_offset = 1, 0
    module = ast.Module(body=[function], type_ignores=[])
    ast.fix_missing_locations(module)
    try:
        return compile(module, filename, "exec", dont_inherit=True), is_async
    except SyntaxError as exc:  # found while compiling (e.g. `nonlocal`): lines already shifted
        raise exc from None


def syntax_message(exc: SyntaxError, where: str) -> str:
    """One line for a syntax error in step code: what, and at which line of ``where``."""
    line = f"{where}:{exc.lineno}" if exc.lineno else where
    text = (exc.text or "").strip()
    shown = f": {text}" if text else ""
    return f"{type(exc).__name__}: {exc.msg} (at {line}{shown})"


# -- values crossing the wire ---------------------------------------------------------

_SCALARS = (str, bool, float, bytes, dt.datetime, dt.date, decimal.Decimal)
_MAX_INT = 2**63


class NotPassable(TypeError):
    """A step result that cannot be handed on (not JSON-like data)."""


def to_wire(value: Any, _depth: int = 0) -> Any:
    """``value`` as data the wire protocol carries: dicts with string keys, lists,
    strings, numbers, booleans, None, bytes, datetimes, dates and Decimals.

    Tuples and sets become lists; pandas frames a list of row dicts; numpy
    arrays and scalars their Python values; times ISO text; timedeltas seconds.
    Anything else raises :class:`NotPassable` naming the type."""
    if _depth > 200:
        raise NotPassable("the value is nested more than 200 levels deep")
    if value is None or isinstance(value, _SCALARS):
        return value
    if isinstance(value, int):
        return value if -_MAX_INT <= value < _MAX_INT else str(value)
    if isinstance(value, dict):
        return {_key(k): to_wire(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_wire(v, _depth + 1) for v in value]
    if isinstance(value, dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    module = type(value).__module__.split(".")[0]
    if module == "pandas":
        if hasattr(value, "to_dict") and hasattr(value, "columns"):
            return to_wire(value.to_dict(orient="records"), _depth + 1)
        if hasattr(value, "tolist"):
            return to_wire(value.tolist(), _depth + 1)
        if hasattr(value, "to_pydatetime"):
            return value.to_pydatetime()
        if type(value).__name__ in ("NaTType", "NAType"):
            return None
    if module == "numpy":
        if hasattr(value, "tolist"):
            return to_wire(value.tolist(), _depth + 1)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise NotPassable(
        f"a value of type {type(value).__name__} cannot be passed on: return data "
        f"(dicts, lists, strings, numbers, booleans, None, dates)"
    )


def _key(key: Any) -> str:
    return key if isinstance(key, str) else str(key)
