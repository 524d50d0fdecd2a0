"""``{{ }}`` expressions of action steps: a small, safe lookup language.

Action steps pass values into code through ``variables:`` (and into called
actions through ``params:``). A value is text that may hold ``{{ expr }}``
parts, evaluated with jinja2's :class:`~jinja2.sandbox.SandboxedEnvironment`
and checked beforehand so that only *lookups and literals* are possible:

- names of the context (``params``, ``steps``, ``user``, ``data``, ``error``,
  and ``item`` / ``index`` in loop parameters), attribute and item lookups on
  them (``steps.load.data``, ``params['user-id']``, ``data.0``);
- literals (strings, numbers, ``true``/``false``/``none``, lists, mappings),
  comparisons, ``and``/``or``/``not``, ``a if cond else b`` and ``~``
  (string concatenation);
- a few pure filters (``default``, ``length``, ``lower``, ``join``...) and tests
  (``is defined``, ``is none``...).

Calls, arithmetic, statements (``{% %}``), unknown filters and names starting
with ``_`` are refused when the app is loaded, with a message naming the
variable. A value that is exactly one ``{{ expr }}`` evaluates to the object
itself (a list stays a list); text around or between expressions makes the
result a string. Lookups on mappings read their keys only, never methods
(``steps.items.data`` is the step named ``items``). A missing key gives
``None``; looking further into it is an error.

Example::

    check_template("{{ steps.load.data }}", names=CONTEXT_NAMES)   # ok, or TemplateProblem
    evaluate("{{ params.ids }}", {"params": {"ids": [1, 2]}})     # -> [1, 2]
    evaluate("id-{{ params.id }}", {"params": {"id": 7}})          # -> "id-7"
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from jinja2 import TemplateSyntaxError, Undefined, UndefinedError, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

__all__ = [
    "CONTEXT_NAMES",
    "LOOP_NAMES",
    "TemplateProblem",
    "check_template",
    "check_value",
    "evaluate",
    "evaluate_text",
    "evaluate_value",
    "has_template",
]

#: Names a variable of a code or SQL step can look up.
CONTEXT_NAMES: frozenset[str] = frozenset({"params", "steps", "user", "data", "error"})
#: Names the per-item ``params:`` of a loop step can look up in addition.
LOOP_NAMES: frozenset[str] = CONTEXT_NAMES | {"item", "index"}

#: Filters that only shape values (no attribute access by name, no calls).
ALLOWED_FILTERS: frozenset[str] = frozenset({
    "default", "d", "length", "count", "lower", "upper", "trim", "string", "int", "float",
    "join", "first", "last", "list", "round", "abs", "tojson", "unique", "sort", "reverse",
    "min", "max", "sum", "capitalize", "title", "replace",
})  # fmt: skip
ALLOWED_TESTS: frozenset[str] = frozenset({
    "defined", "undefined", "none", "number", "string", "mapping", "sequence", "boolean",
    "true", "false", "integer", "float", "eq", "ne", "in",
})  # fmt: skip

_PLAIN_NODES: tuple[type[nodes.Node], ...] = (
    nodes.Output, nodes.TemplateData, nodes.Const, nodes.List, nodes.Tuple, nodes.Dict,
    nodes.Pair, nodes.Compare, nodes.Operand, nodes.And, nodes.Or, nodes.Not, nodes.CondExpr,
    nodes.Concat, nodes.Neg, nodes.Pos,
)  # fmt: skip

_WHOLE = re.compile(r"\s*\{\{(?P<expr>.*)\}\}\s*", re.S)
_MARKERS = ("{{", "{%", "{#")
#: A secret reference (``${{ secrets.x }}``, ``${{ x }}``, ``${{ connection.x }}``), the
#: same syntax as in step parameters; resolved before any ``{{ }}`` is evaluated.
SECRET_REF = re.compile(
    r"\$\{\{\s*(?:(?P<scope>secrets|connection)\s*\.\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_-]*)\s*\}\}"
)


class TemplateProblem(ValueError):
    """A ``{{ }}`` value that is not allowed or cannot be evaluated (one line)."""


class _Env(SandboxedEnvironment):
    """The sandbox, with lookups on mappings reading keys only."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Undefined):  # looking into something missing is an error
            return getattr(obj, attribute)
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                return self.undefined(obj=obj, name=attribute)
        return self.undefined(obj=obj, name=attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, Undefined):
            return obj[argument]
        if isinstance(argument, str) and argument.startswith("_"):
            return self.undefined(obj=obj, name=argument)
        if isinstance(obj, Mapping):
            try:
                return obj[argument]
            except (KeyError, TypeError):
                return self.undefined(obj=obj, name=argument)
        if isinstance(obj, (list, tuple, str)) and isinstance(argument, (int, slice)):
            try:
                return obj[argument]
            except IndexError:
                return self.undefined(obj=obj, name=argument)
        return self.undefined(obj=obj, name=argument)


@functools.lru_cache(maxsize=1)
def _env() -> _Env:
    return _Env(autoescape=False, keep_trailing_newline=True)


def has_template(text: str) -> bool:
    """Whether ``text`` holds template markup at all."""
    return any(marker in text for marker in _MARKERS)


def check_template(text: str, names: Collection[str] = CONTEXT_NAMES) -> None:
    """Raise :class:`TemplateProblem` unless ``text`` only uses allowed constructs
    and looks up only ``names``."""
    text = SECRET_REF.sub("", text)
    if not has_template(text):
        return
    try:
        tree = _env().parse(text)
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"bad template {_short(text)}: {exc.message}") from None
    for node in tree.body:
        _check_node(node, text, names)


def _check_node(node: nodes.Node, text: str, names: Collection[str]) -> None:
    where = f"in {_short(text)}"
    if isinstance(node, nodes.Name):
        if node.name not in names:
            raise TemplateProblem(
                f"unknown name {node.name!r} {where}; a template can look up "
                f"{', '.join(sorted(names))}"
            )
        return
    if isinstance(node, nodes.Getattr):
        if node.attr.startswith("_"):
            raise TemplateProblem(f"names starting with '_' cannot be looked up ({node.attr!r} {where})")
    elif isinstance(node, nodes.Getitem):
        arg = node.arg
        if isinstance(arg, nodes.Const) and isinstance(arg.value, str) and arg.value.startswith("_"):
            raise TemplateProblem(f"names starting with '_' cannot be looked up ({arg.value!r} {where})")
    elif isinstance(node, nodes.Filter):
        if node.name not in ALLOWED_FILTERS or node.dyn_args or node.dyn_kwargs:
            raise TemplateProblem(
                f"filter {node.name!r} is not allowed {where}; allowed filters: "
                f"{', '.join(sorted(ALLOWED_FILTERS))}"
            )
    elif isinstance(node, nodes.Test):
        if node.name not in ALLOWED_TESTS or node.dyn_args or node.dyn_kwargs:
            raise TemplateProblem(f"test {node.name!r} is not allowed {where}")
    elif isinstance(node, nodes.Call):
        raise TemplateProblem(
            f"calls are not allowed {where}: templates only look values up; compute in the "
            f"step's code instead"
        )
    elif isinstance(node, nodes.Stmt) and not isinstance(node, nodes.Output):
        raise TemplateProblem(
            f"statements ({{% ... %}}) are not allowed {where}: use one {{{{ expression }}}}"
        )
    elif not isinstance(node, _PLAIN_NODES):
        dashed = re.search(r"steps\.([A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)+)", text)
        if isinstance(node, nodes.Sub) and dashed:  # a step name with '-' read as a minus
            raise TemplateProblem(
                f"{text!r}: a step name with '-' cannot follow a dot; write "
                f"steps[{dashed.group(1)!r}] instead"
            )
        raise TemplateProblem(
            f"{type(node).__name__.lower()} is not allowed {where}: templates hold lookups and "
            f"literals only; compute in the step's code instead"
        )
    for child in node.iter_child_nodes():
        _check_node(child, text, names)


def check_value(value: Any, names: Collection[str] = CONTEXT_NAMES) -> None:
    """:func:`check_template` on every string inside ``value`` (lists and mappings)."""
    for text in _strings(value):
        check_template(text, names)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


@functools.lru_cache(maxsize=4096)
def _compiled(text: str) -> Callable[[Mapping[str, Any]], Any]:
    """An evaluator for ``text`` (checked separately, when the app was loaded)."""
    env = _env()
    whole = _WHOLE.fullmatch(text)
    if whole and "{{" not in whole.group("expr") and "}}" not in whole.group("expr"):
        expression = env.compile_expression(whole.group("expr").strip(), undefined_to_none=True)
        return lambda context: expression(**context)
    template = env.from_string(text)
    return lambda context: template.render(**context)


def evaluate(text: str, context: Mapping[str, Any]) -> Any:
    """The value of ``text`` in ``context`` (text without ``{{`` is returned as is).

    Raises :class:`TemplateProblem` for a lookup that cannot be made."""
    if not has_template(text):
        return text
    try:
        return _compiled(text)(context)
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"bad template {_short(text)}: {exc.message}") from None
    except (UndefinedError, SecurityError, TypeError, ValueError, LookupError) as exc:
        raise TemplateProblem(f"{_short(text)}: {exc}") from None


def secret_name(match: re.Match[str]) -> str:
    """The secret a :data:`SECRET_REF` match names (``x`` or ``connection.x``)."""
    name = match.group("name")
    return f"connection.{name}" if match.group("scope") == "connection" else name


def evaluate_text(text: str, context: Mapping[str, Any],
                  secret: Callable[[str], Any] | None = None) -> Any:  # fmt: skip
    """Like :func:`evaluate`, with ``${{ secrets.x }}`` references replaced by
    ``secret(name)`` first: a reference that is the whole text gives the secret
    itself, one inside longer text is inserted as a string (and never evaluated
    as a template)."""
    if secret is None or "${{" not in text:
        return evaluate(text, context)
    whole = SECRET_REF.fullmatch(text.strip())
    if whole:
        return secret(secret_name(whole))
    parts: list[str] = []
    position = 0
    for match in SECRET_REF.finditer(text):
        parts.append(_as_text(evaluate(text[position : match.start()], context)))
        parts.append(_as_text(secret(secret_name(match))))
        position = match.end()
    parts.append(_as_text(evaluate(text[position:], context)))
    return "".join(parts)


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def evaluate_value(value: Any, context: Mapping[str, Any],
                   secret: Callable[[str], Any] | None = None) -> Any:  # fmt: skip
    """:func:`evaluate_text` applied to every string inside ``value``."""
    if isinstance(value, str):
        return evaluate_text(value, context, secret)
    if isinstance(value, Mapping):
        return {key: evaluate_value(item, context, secret) for key, item in value.items()}
    if isinstance(value, list):
        return [evaluate_value(item, context, secret) for item in value]
    return value


def _short(text: str) -> str:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return repr(shown)
