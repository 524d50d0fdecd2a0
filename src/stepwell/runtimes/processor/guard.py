"""Restricted Python for processor statements.

A processor statement is untrusted code. Before it runs, this module:

1. **checks its syntax tree** (:func:`check_tree`): annotated assignments and
   other type hints are a ``SyntaxError`` naming the line (as the product
   this runtime imitates documents); names starting with ``__``, attributes
   starting with ``_`` (except a few harmless ones such as ``__name__``) and
   the introspection attributes of frames, generators, coroutines and
   tracebacks (``f_globals``, ``gi_frame``, ``cr_frame``, ``tb_frame``, ...)
   are rejected; relative imports are rejected; ``.format`` /
   ``.format_map`` lookups are routed through a checker so that format
   strings cannot walk private attributes either;
2. **compiles it once** as the body of ``async def <statement>(INPUT_DATA,
   DATA_CHECKPOINT, log, sleep)`` with the user's own line numbers;
3. **runs it with restricted builtins** (:func:`safe_builtins`): no ``eval``,
   ``exec``, ``compile``, ``open``, ``globals``, ``locals``, ``vars``,
   ``breakpoint``, ``input``, ``help``; ``getattr``/``setattr``/``hasattr``/
   ``delattr`` refuse the names the syntax check refuses; ``__import__`` is
   an :class:`ImportGuard`;
4. **imports through an exact-name allow-list** (:class:`ImportGuard`):
   ``import a.b`` and ``from a.b import x`` need ``a.b`` itself to be listed,
   ``from a import b`` needs ``a``. Imported modules are handed out as
   read-only *views* that never expose private names, and that expose a
   module-valued attribute only when that module is allowed too: a listed
   module's own direct submodule (``np.random`` for ``numpy``, the same
   access ``from numpy import random`` gives), or a module that is itself
   listed. Everything else (``random._os``, ``json.codecs``, ``ssl.os``,
   ``datetime.sys``) is refused, as are a few submodules and names known to
   load code or reach the interpreter (``numpy.ctypeslib``,
   ``numpy.testing``, ``pandas.compat``, PyYAML's unsafe loaders, ...);
5. **hardens a few library entry points** that evaluate strings as code or
   look attributes up by user-given names (pandas ``eval``/``query`` and the
   string dispatch of ``agg``/``apply``/``transform``, PyYAML's ``python/``
   tags), and
6. **installs an audit hook** (:func:`install_audit_hook`, once per worker
   process) that refuses starting processes, signals, ``fork``, ``ctypes``,
   unpickling globals, tracing hooks, ``gc`` object walks and building code
   objects, whichever way user code reached them.

This is defence in depth inside the worker; the sandbox (namespaces,
rlimits, a read-only filesystem) is the outer boundary.
"""

from __future__ import annotations

import _string  # the C helpers behind str.format's field parsing
import ast
import builtins
import importlib
import opcode
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_ALLOWED_IMPORTS",
    "STATEMENT_PARAMETERS",
    "CompiledStatement",
    "ImportGuard",
    "attribute_blocked",
    "check_tree",
    "compile_statement",
    "install_audit_hook",
    "safe_builtins",
]

#: The modules a statement may import by default: exactly the allow-list the
#: processor's documentation gives (standard library, then third party).
DEFAULT_ALLOWED_IMPORTS: tuple[str, ...] = (
    "string",
    "math",
    "itertools",
    "random",
    "warnings",
    "base64",
    "io",
    "json",
    "xml",
    "ssl",
    "time",
    "datetime",
    "yaml",
    "httpx",
    "pandas",
    "numpy",
    "deepdiff",
    "passlib.hash",
    "jose",
    "jose.backends",
    "jose.constants",
    "jose.utils",
    "openai",
    "matplotlib",
    "matplotlib.pyplot",
)

#: The names a statement sees as its function's parameters, in order.
STATEMENT_PARAMETERS: tuple[str, ...] = ("INPUT_DATA", "DATA_CHECKPOINT", "log", "sleep")

#: Name of the compiled function (shown in tracebacks; not reachable from user code).
STATEMENT_NAME = "<statement>"

#: Dunder attributes that are plain data and may be read.
PUBLIC_DUNDERS = frozenset({"__init__", "__name__", "__doc__", "__version__"})

#: Attributes that lead from functions, generators, coroutines, frames and
#: tracebacks to the interpreter's internals (globals, builtins, code).
INTROSPECTION_ATTRS = frozenset(
    {
        "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "f_trace",
        "gi_frame", "gi_code", "gi_yieldfrom",
        "cr_frame", "cr_code", "cr_await", "cr_origin",
        "ag_frame", "ag_code", "ag_await",
        "tb_frame", "tb_next",
        "func_globals", "func_code", "im_func", "im_self",
    }
)  # fmt: skip

#: Submodules that a listed module does *not* give access to (they load native
#: code, execute strings with the caller's globals or import arbitrary modules).
#: Listing one explicitly under ``allowed_imports:`` still allows it.
NEVER_SUBMODULES = frozenset(
    {
        "numpy.ctypeslib",
        "numpy.testing",
        "numpy.f2py",
        "numpy.distutils",
        "numpy.compat",
        "pandas.compat",
        "pandas.util",
        "yaml.constructor",
        "yaml.loader",
        "yaml.cyaml",
        "matplotlib.testing",
    }
)

#: Module attributes that are never handed out, with the reason given to the user.
HIDDEN_ATTRIBUTES: dict[str, dict[str, str]] = {
    "yaml": dict.fromkeys(
        (
            "Loader", "CLoader", "FullLoader", "CFullLoader", "UnsafeLoader", "CUnsafeLoader",
            "full_load", "full_load_all", "unsafe_load", "unsafe_load_all",
        ),
        "it can construct arbitrary Python objects; use yaml.safe_load or yaml.SafeLoader",
    ),  # fmt: skip
    "io": {"FileIO": "it opens raw file descriptors; use io.open with a path, or io.BytesIO"},
}

_FORMAT_METHODS = frozenset({"format", "format_map"})
_FORMAT_HELPER = "__stepwell_format_attr__"
_MISSING: Any = object()

_IMPORT_NAME = opcode.opmap["IMPORT_NAME"]

#: Modules the interpreter's own C code imports on first use of an allowed feature
#: (``datetime.strptime`` and ``time.strptime`` need ``_strptime``).
_INTERPRETER_HELPERS = frozenset({"_strptime"})


def attribute_blocked(name: str) -> bool:
    """True for attribute names a statement may not read or write."""
    if name.startswith("_"):
        return name not in PUBLIC_DUNDERS
    return name in INTROSPECTION_ATTRS


def _plain(name: Any) -> str:
    """``name`` as an exact ``str`` (a str subclass cannot lie about its content)."""
    if type(name) is str:
        return name
    if isinstance(name, str):
        return str.__str__(name)
    raise TypeError(f"attribute name must be a string, not {type(name).__name__}")


def _refuse_attribute(name: str) -> AttributeError:
    if name in INTROSPECTION_ATTRS:
        why = "it exposes interpreter internals"
    else:
        why = "names starting with '_' are private"
    return AttributeError(f"attribute {name!r} is not accessible in a processor statement ({why})")


# -- the syntax check ------------------------------------------------------------------


class _Policy(ast.NodeVisitor):
    """Walks a statement's tree and raises ``SyntaxError`` at the first violation."""

    def __init__(self, filename: str, source: str):
        self.filename = filename
        self.lines = source.splitlines()
        self.depth = 0  # nesting of function definitions inside the statement

    def fail(self, node: ast.AST, problem: str) -> None:
        lineno = getattr(node, "lineno", 1) or 1
        offset = (getattr(node, "col_offset", 0) or 0) + 1
        text = self.lines[lineno - 1] if 0 < lineno <= len(self.lines) else None
        raise SyntaxError(problem, (self.filename, lineno, offset, text))

    def _name(self, node: ast.AST, name: str | None, what: str = "name") -> None:
        if name and name.startswith("__"):
            self.fail(node, f"the {what} {name!r} is not allowed in a processor statement "
                            f"(names starting with '__' are reserved)")

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:  # noqa: N802
        target = ast.unparse(node.target)
        fix = f"{target} = {ast.unparse(node.value)}" if node.value is not None else f"{target} = ..."
        self.fail(
            node,
            "annotated assignments (type hints) are not allowed in a processor statement: "
            f"write `{fix}` without the `: {ast.unparse(node.annotation)}` part",
        )

    def visit_arg(self, node: ast.arg) -> None:
        if node.annotation is not None:
            self.fail(node, f"type hints are not allowed in a processor statement: remove "
                            f"`: {ast.unparse(node.annotation)}` from parameter {node.arg!r}")
        self._name(node, node.arg, "parameter name")

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        returns = getattr(node, "returns", None)
        if returns is not None:
            self.fail(node, f"type hints are not allowed in a processor statement: remove "
                            f"`-> {ast.unparse(returns)}` from {getattr(node, 'name', 'lambda')}()")
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function  # noqa: N815

    def _yield(self, node: ast.Yield | ast.YieldFrom) -> None:
        if self.depth == 0:
            self.fail(node, "`yield` cannot be used in the statement itself: the statement is "
                            "the body of an async function that must `return` a list")
        self.generic_visit(node)

    visit_Yield = visit_YieldFrom = _yield  # noqa: N815

    def visit_Name(self, node: ast.Name) -> None:  # noqa: N802
        self._name(node, node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:  # noqa: N802
        if attribute_blocked(node.attr):
            self.fail(node, str(_refuse_attribute(node.attr)))
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        for alias in node.names:
            self._name(node, alias.asname)
            if alias.name.startswith("_") or "._" in alias.name:
                self.fail(node, f"private modules cannot be imported ({alias.name!r})")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        if node.level:
            self.fail(node, "relative imports are not allowed in a processor statement")
        for alias in node.names:
            if alias.name != "*" and alias.name.startswith("_"):
                self.fail(node, f"private names cannot be imported ({alias.name!r})")
            self._name(node, alias.asname)

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> None:  # noqa: N802
        for name in node.names:
            self._name(node, name)

    visit_Nonlocal = visit_Global  # noqa: N815

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:  # noqa: N802
        self._name(node, node.name)
        self.generic_visit(node)

    def visit_MatchClass(self, node: ast.MatchClass) -> None:  # noqa: N802
        for attr in node.kwd_attrs:
            if attribute_blocked(attr):
                self.fail(node, str(_refuse_attribute(attr)))
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:  # noqa: N802
        self._name(node, node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:  # noqa: N802
        self._name(node, node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:  # noqa: N802
        self._name(node, node.rest)
        self.generic_visit(node)


class _FormatRewriter(ast.NodeTransformer):
    """``x.format`` / ``x.format_map`` (loads) become a checked lookup."""

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:  # noqa: N802
        self.generic_visit(node)
        if node.attr in _FORMAT_METHODS and isinstance(node.ctx, ast.Load):
            call = ast.Call(
                func=ast.Name(id=_FORMAT_HELPER, ctx=ast.Load()),
                args=[node.value, ast.Constant(node.attr)],
                keywords=[],
            )
            return ast.copy_location(call, node)
        return node


def check_tree(source: str, filename: str) -> ast.Module:
    """Parse ``source`` and apply the statement policy; raises ``SyntaxError``."""
    tree = ast.parse(source, filename=filename, mode="exec")
    _Policy(filename, source).visit(tree)
    return tree


# -- restricted builtins ------------------------------------------------------------------

_DROPPED_BUILTINS = frozenset(
    {
        "eval", "exec", "compile", "open", "globals", "locals", "vars", "breakpoint",
        "input", "help", "exit", "quit", "copyright", "credits", "license",
    }
)  # fmt: skip


def _check_format_string(text: str) -> None:
    """Refuse replacement fields that read private or introspection attributes."""
    try:
        parsed = list(_string.formatter_parser(text))
    except ValueError:
        return  # malformed: str.format itself raises the right error
    for _literal, field, spec, _conversion in parsed:
        if field:
            try:
                _first, rest = _string.formatter_field_name_split(field)
                parts = list(rest)
            except ValueError:
                return
            for is_attribute, key in parts:
                if is_attribute and attribute_blocked(str(key)):
                    raise ValueError(
                        f"format field {{{field}}} reads attribute {key!r}, which is not "
                        f"accessible in a processor statement"
                    )
        if spec:
            _check_format_string(spec)


def _bound_format(text: str, method: str) -> Callable[..., str]:
    plain = str.__str__(text)
    if method == "format":

        def format(*args: Any, **kwargs: Any) -> str:  # noqa: A001 - mirrors str.format
            _check_format_string(plain)
            return str.format(plain, *args, **kwargs)

        return format

    def format_map(mapping: Any) -> str:
        _check_format_string(plain)
        return str.format_map(plain, mapping)

    return format_map


def _unbound_format(method: str) -> Callable[..., str]:
    def unbound(text: str, *args: Any, **kwargs: Any) -> str:
        if not isinstance(text, str):
            raise TypeError(f"str.{method}() needs a str, not {type(text).__name__}")
        return _bound_format(text, method)(*args, **kwargs)

    unbound.__name__ = method
    return unbound


def format_attr(obj: Any, name: str) -> Any:
    """``obj.format`` / ``obj.format_map`` with format strings checked for private fields."""
    if isinstance(obj, super):
        target = obj.__self__
        if isinstance(target, str):
            return _bound_format(target, name)
    if isinstance(obj, str):
        override = getattr(type(obj), name, None)
        if override is getattr(str, name):
            return _bound_format(obj, name)
        return getattr(obj, name)  # the user's own method on a str subclass
    if isinstance(obj, type) and issubclass(obj, str) and getattr(obj, name) is getattr(str, name):
        return _unbound_format(name)
    return getattr(obj, name)


def safe_getattr(obj: Any, name: Any, *default: Any) -> Any:
    """``getattr`` that refuses private and introspection attributes."""
    name = _plain(name)
    if attribute_blocked(name):
        raise _refuse_attribute(name)
    if name in _FORMAT_METHODS:
        try:
            return format_attr(obj, name)
        except AttributeError:
            if default:
                return default[0]
            raise
    return getattr(obj, name, *default)


def safe_hasattr(obj: Any, name: Any) -> bool:
    """``hasattr`` that refuses private and introspection attributes."""
    name = _plain(name)
    if attribute_blocked(name):
        raise _refuse_attribute(name)
    return hasattr(obj, name)


def safe_setattr(obj: Any, name: Any, value: Any) -> None:
    """``setattr`` that refuses private and introspection attributes."""
    name = _plain(name)
    if attribute_blocked(name):
        raise _refuse_attribute(name)
    setattr(obj, name, value)


def safe_delattr(obj: Any, name: Any) -> None:
    """``delattr`` that refuses private and introspection attributes."""
    name = _plain(name)
    if attribute_blocked(name):
        raise _refuse_attribute(name)
    delattr(obj, name)


def safe_builtins(import_guard: Callable[..., Any]) -> dict[str, Any]:
    """The builtins a statement sees: the public ones minus the dangerous ones,
    with the attribute functions wrapped and ``__import__`` guarded."""
    table = {
        name: value
        for name, value in vars(builtins).items()
        if not name.startswith("_") and name not in _DROPPED_BUILTINS
    }
    table.update(
        __build_class__=builtins.__build_class__,
        __import__=import_guard,
        getattr=safe_getattr,
        hasattr=safe_hasattr,
        setattr=safe_setattr,
        delattr=safe_delattr,
    )
    return table


# -- imports and module views ---------------------------------------------------------------

LISTED, SUBMODULE, PATH = "listed", "submodule", "path"


def _safe_formatter_class() -> type:
    """A copy of ``string.Formatter`` whose field lookups use :func:`safe_getattr`.

    A copy (not a subclass) so that ``super()`` cannot reach the unchecked original."""
    import string

    namespace = dict(vars(string))
    namespace["getattr"] = safe_getattr
    members: dict[str, Any] = {}
    for key, value in vars(string.Formatter).items():
        if isinstance(value, types.FunctionType):
            members[key] = types.FunctionType(
                value.__code__, namespace, value.__name__, value.__defaults__, value.__closure__
            )
        elif key not in ("__dict__", "__weakref__"):
            members[key] = value
    return type("Formatter", (), members)


def _io_open() -> Callable[..., Any]:
    import io

    real_open = io.open

    def open(file: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: A001 - mirrors io.open
        """``io.open`` for paths only (raw file descriptors are refused)."""
        if isinstance(file, int):
            raise PermissionError("io.open() of a file descriptor is not allowed in a processor statement")
        return real_open(file, *args, **kwargs)

    return open


#: Module attributes replaced by a safer equivalent: factories, called once per worker.
#: Module attributes a statement may set: the settings a library is configured by
#: (openai 0.28 takes its key and endpoint as module attributes), plain values only.
SETTABLE_ATTRIBUTES: dict[str, frozenset[str]] = {
    "openai": frozenset({
        "api_key", "organization", "api_base", "api_type", "api_version", "proxy",
        "verify_ssl_certs", "debug",
    }),
}  # fmt: skip

REPLACED_ATTRIBUTES: dict[str, dict[str, Callable[[], Any]]] = {
    "string": {"Formatter": _safe_formatter_class},
    "io": {"open": _io_open},
}


class ImportGuard:
    """The ``__import__`` of a statement: exact-name allow-list, module views."""

    def __init__(self, allowed: Iterable[str], *, harden_libraries: bool = True):
        self.allowed = frozenset(allowed)
        self.prefixes = frozenset(
            ".".join(name.split(".")[:depth])
            for name in self.allowed
            for depth in range(1, name.count(".") + 1)
        ) - self.allowed
        self.listing = ", ".join(sorted(self.allowed))
        self.harden_libraries = harden_libraries
        self._views: dict[tuple[str, str], Any] = {}
        self._imports: dict[tuple[Any, ...], Any] = {}
        self._replacements: dict[tuple[str, str], Any] = {}
        self._where = ""

    # -- __import__ ------------------------------------------------------------
    def __call__(
        self,
        name: str,
        globals: Any = None,  # noqa: A002 - the signature of __import__
        locals: Any = None,  # noqa: A002
        fromlist: Any = (),
        level: int = 0,
    ) -> Any:
        try:
            key = (name, tuple(fromlist) if fromlist else (), level)
            hit = self._imports.get(key)
        except TypeError:
            key, hit = None, None
        if hit is not None:
            return hit
        caller = sys._getframe(1)
        if self._implicit(caller, name, level):
            return builtins.__import__(name, globals, locals, fromlist, level)
        self._where = f"line {caller.f_lineno}: " if caller.f_code.co_filename != __file__ else ""
        result = self._import(name, tuple(fromlist or ()), level)
        if key is not None:
            self._imports[key] = result
        return result

    def _implicit(self, caller: types.FrameType, name: Any, level: int) -> bool:
        """Whether this is an import that C code called by the statement makes for its
        own use (numpy loads ``numpy._core._methods`` on an array's first ``.sum()``,
        ``datetime.strptime`` loads ``_strptime``): C code looks ``__import__`` up in
        the statement's builtins, so it comes here, though no import statement of the
        user's asked for it. Allowed for submodules of allowed packages and the
        interpreter's helpers; the module goes back to that C code, not to the user."""
        if level or not isinstance(name, str) or caller.f_code.co_filename == __file__:
            return False
        if caller.f_code.co_code[caller.f_lasti] == _IMPORT_NAME:
            return False  # an import statement of the user's
        top = name.partition(".")[0]
        return name in _INTERPRETER_HELPERS or (
            "." in name and top in sys.modules and any(a.partition(".")[0] == top for a in self.allowed)
        )

    def _line(self) -> str:
        """Where the failing import is in the statement (set on each uncached import)."""
        return self._where

    def _import(self, name: Any, fromlist: tuple[Any, ...], level: int) -> Any:
        if level:
            raise ImportError(f"{self._line()}relative imports are not allowed in a processor statement")
        if not isinstance(name, str) or name not in self.allowed:
            raise self._refused(str(name))
        module = self._load(name)
        if not fromlist:
            top = name.partition(".")[0]
            return self.view(sys.modules[top])
        for item in fromlist:
            if not isinstance(item, str) or item.startswith("_") or item == "*":
                raise ImportError(f"{self._line()}cannot import {item!r} from {name!r} in a processor statement")
            child = f"{name}.{item}"
            if child in NEVER_SUBMODULES and child not in self.allowed:
                raise ImportError(self._line() + self._never_text(child))
        builtins.__import__(name, None, None, fromlist, 0)  # imports submodules named in fromlist
        return self.view(module)

    def _never_text(self, name: str) -> str:
        return (
            f"module {name!r} is not available in processor statements (it can load native "
            f"code or run strings as code); list it under `allowed_imports:` to allow it anyway"
        )

    def _refused(self, name: str) -> ImportError:
        parents = [p for p in self.allowed if name.startswith(p + ".")]
        note = ""
        if parents:
            parent = max(parents, key=len)
            note = (
                f" ({parent!r} is allowed, but that does not allow its submodule {name!r}: "
                f"a submodule needs its own entry)"
            )
        return ImportError(
            f"{self._line()}import of module {name!r} is not allowed in a processor "
            f"statement{note}. Allowed modules: {self.listing}. To allow another module, "
            f"list it under the step's `allowed_imports:`"
        )

    def _load(self, name: str) -> types.ModuleType:
        module = sys.modules.get(name)
        if module is not None:
            return module
        failure: ModuleNotFoundError | None = None
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not exc.name or not (name == exc.name or name.startswith(exc.name + ".")):
                raise
            failure = exc
        if failure is not None or module is None:
            raise ImportError(
                f"{self._line()}module {name!r} is allowed in processor statements but is not "
                f"installed in this environment; add it to the app's requirements_file"
            )
        return module

    # -- views -----------------------------------------------------------------
    def view(self, module: types.ModuleType, kind: str | None = None) -> Any:
        """The read-only view of ``module`` handed to user code."""
        name = module.__name__
        if kind is None:
            kind = LISTED if name in self.allowed else PATH if name in self.prefixes else None
            if kind is None:
                raise ImportError(f"module {name!r} is not allowed in a processor statement")
        key = (name, kind)
        existing = self._views.get(key)
        if existing is None:
            if self.harden_libraries and name.partition(".")[0] in _HARDENERS:
                _HARDENERS[name.partition(".")[0]]()
            existing = self._views[key] = _make_view(self, module, kind)
        return existing

    def child(self, parent: types.ModuleType, kind: str, attr: str, value: types.ModuleType) -> Any:
        """The view for module ``value`` found as attribute ``attr`` of ``parent``."""
        full = getattr(value, "__name__", None)
        direct = isinstance(full, str) and full == f"{parent.__name__}.{attr}"
        if full in self.allowed:
            return self.view(value, LISTED)
        if direct and full in self.prefixes:
            return self.view(value, PATH)
        if direct and kind == LISTED and full not in NEVER_SUBMODULES:
            return self.view(value, SUBMODULE)
        if direct and full in NEVER_SUBMODULES:
            raise AttributeError(self._never_text(full))
        raise AttributeError(
            f"{parent.__name__}.{attr} is the module {full!r}, which is not allowed in a "
            f"processor statement. Allowed modules: {self.listing}; a listed module gives "
            f"access to its direct submodules only. List it under `allowed_imports:` to allow it"
        )

    def replacement(self, module: str, attr: str) -> Any:
        key = (module, attr)
        if key not in self._replacements:
            self._replacements[key] = REPLACED_ATTRIBUTES[module][attr]()
        return self._replacements[key]


def _plain_setting(value: Any) -> bool:
    if value is None or type(value) in (str, int, float, bool):
        return True
    return type(value) is dict and all(
        type(k) is str and _plain_setting(v) and not isinstance(v, dict) for k, v in value.items()
    )


def _make_view(guard: ImportGuard, module: types.ModuleType, kind: str) -> Any:
    name = module.__name__
    hidden = HIDDEN_ATTRIBUTES.get(name, {})
    replaced = REPLACED_ATTRIBUTES.get(name, {})
    cache: dict[str, Any] = {}
    paths = sorted(a for a in guard.allowed if a.startswith(name + "."))

    def resolve(attr: str) -> Any:
        hit = cache.get(attr, _MISSING)
        if hit is not _MISSING:
            return hit
        attr = _plain(attr)
        if attribute_blocked(attr) or attr == "__init__":
            raise AttributeError(f"module {name!r}: {_refuse_attribute(attr)}")
        if attr in hidden:
            raise AttributeError(f"{name}.{attr} is not available in processor statements: {hidden[attr]}")
        if attr in replaced:
            value = guard.replacement(name, attr)
        else:
            value = getattr(module, attr, _MISSING)
            if value is _MISSING:
                raise AttributeError(f"module {name!r} has no attribute {attr!r}")
            # a submodule, or what a package registers as one (passlib.hash is a proxy)
            if isinstance(value, types.ModuleType) or sys.modules.get(f"{name}.{attr}") is value:
                value = guard.child(module, kind, attr, value)
            elif kind == PATH:
                raise AttributeError(
                    f"module {name!r} is not allowed in a processor statement; only "
                    f"{', '.join(paths)} under it are (reach them as {name}.<submodule>)"
                )
        cache[attr] = value
        return value

    def public_names() -> list[str]:
        return sorted(n for n in dir(module) if not attribute_blocked(n) and n not in hidden)

    class ModuleView:
        __slots__ = ()

        def __getattribute__(self, attr: str) -> Any:
            return resolve(attr)

        def __setattr__(self, attr: str, value: Any) -> None:
            settable = SETTABLE_ATTRIBUTES.get(name, frozenset())
            if attr not in settable:
                hint = f" except for its settings {', '.join(sorted(settable))}" if settable else ""
                raise AttributeError(f"module {name!r} is read-only in a processor statement{hint}")
            if not _plain_setting(value):
                raise TypeError(f"{name}.{attr} takes a str, number, bool, None or a dict of "
                                f"those, not {type(value).__name__}")  # fmt: skip
            setattr(module, attr, value)
            cache.pop(attr, None)

        def __delattr__(self, attr: str) -> None:
            raise AttributeError(f"module {name!r} is read-only in a processor statement")

        def __repr__(self) -> str:
            return f"<module {name!r} (processor view)>"

        def __dir__(self) -> list[str]:
            return public_names()

    ModuleView.__name__ = ModuleView.__qualname__ = "module"
    return ModuleView()


# -- library hardening -------------------------------------------------------------------------

_hardened: set[str] = set()


def _check_function_names(value: Any, where: str) -> None:
    """Refuse function names given as strings that start with ``_`` (pandas looks
    such strings up as attributes of whatever object it is handed)."""
    if isinstance(value, str):
        if value.startswith("_"):
            raise ValueError(f"{where}: the function name {value!r} is not allowed in a processor "
                             f"statement (names starting with '_' are private)")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_function_names(item, where)
    elif isinstance(value, dict):
        for item in value.values():
            _check_function_names(item, where)


def _guard_method(cls: type, method: str) -> None:
    original = vars(cls).get(method)
    if not callable(original) or getattr(original, "_stepwell_guarded", False):
        return

    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        where = f"{cls.__name__}.{method}"
        if args:
            _check_function_names(args[0], where)
        for key in ("func", "arg"):
            if key in kwargs:
                _check_function_names(kwargs[key], where)
        for value in kwargs.values():  # named aggregation: new=(column, function)
            if isinstance(value, tuple) and len(value) == 2:
                _check_function_names(value[1], where)
        return original(self, *args, **kwargs)

    guarded._stepwell_guarded = True  # type: ignore[attr-defined]
    guarded.__name__ = getattr(original, "__name__", method)
    guarded.__doc__ = getattr(original, "__doc__", None)
    setattr(cls, method, guarded)


def harden_pandas() -> None:
    """Close pandas' routes from user strings to arbitrary attributes (once per process)."""
    if "pandas" in _hardened:
        return
    _hardened.add("pandas")
    import pandas as pd
    from pandas.core import apply as pd_apply
    from pandas.core.computation import expr as pd_expr
    from pandas.core.groupby import generic as pd_groupby
    from pandas.core.groupby import groupby as pd_groupby_base

    visitor = pd_expr.BaseExprVisitor
    original_attribute = visitor.visit_Attribute
    original_name = visitor.visit_Name

    def visit_attribute(self: Any, node: ast.Attribute, **kwargs: Any) -> Any:
        if attribute_blocked(node.attr):
            raise ValueError(f"{_refuse_attribute(node.attr)} (in a pandas expression)")
        return original_attribute(self, node, **kwargs)

    def visit_name(self: Any, node: ast.Name, **kwargs: Any) -> Any:
        if node.id.startswith("__"):
            raise ValueError(f"the name {node.id!r} is not allowed in a pandas expression")
        return original_name(self, node, **kwargs)

    visitor.visit_Attribute = visit_attribute  # type: ignore[method-assign]
    visitor.visit_Name = visit_name  # type: ignore[method-assign]

    original_init = pd_apply.Apply.__init__

    def apply_init(self: Any, obj: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        _check_function_names(func, type(self).__name__)
        original_init(self, obj, func, *args, **kwargs)

    pd_apply.Apply.__init__ = apply_init  # type: ignore[method-assign]

    classes: list[type] = [pd.DataFrame, pd.Series, pd_groupby_base.GroupBy,
                           pd_groupby.SeriesGroupBy, pd_groupby.DataFrameGroupBy]
    for root in classes:
        for cls in root.__mro__:
            if not cls.__module__.startswith("pandas"):
                continue
            for method in ("agg", "aggregate", "apply", "transform"):
                _guard_method(cls, method)


def harden_yaml() -> None:
    """Make PyYAML's ``python/...`` tags (which import modules and call functions)
    fail, whichever loader is used: the unsafe loaders stay reachable through
    ``yaml.YAMLObject.yaml_loader`` even though the module view hides them."""
    if "yaml" in _hardened:
        return
    _hardened.add("yaml")
    from yaml import constructor

    def refuse(self: Any, name: str, mark: Any, unsafe: bool = False) -> Any:
        raise constructor.ConstructorError(
            None, None, f"python/... tags ({name!r}) are not allowed in a processor statement", mark
        )

    constructor.FullConstructor.find_python_module = refuse  # type: ignore[method-assign]
    constructor.FullConstructor.find_python_name = refuse  # type: ignore[method-assign]
    constructor.UnsafeConstructor.find_python_module = refuse  # type: ignore[method-assign]
    constructor.UnsafeConstructor.find_python_name = refuse  # type: ignore[method-assign]


def harden_deepdiff() -> None:
    """Make deepdiff's paths (``extract``, ``Delta``) refuse the attribute names a
    statement may not use: they get and set attributes by user-given names, and
    deepdiff itself refuses only dunders (``root._module.sys`` reached ``sys``)."""
    if "deepdiff" in _hardened:
        return
    _hardened.add("deepdiff")
    from deepdiff import delta, path

    original = path.check_elem

    def check_elem(elem: Any) -> None:
        if isinstance(elem, str) and attribute_blocked(elem):
            raise ValueError(f"{_refuse_attribute(elem)} (in a deepdiff path)")
        original(elem)

    path.check_elem = check_elem  # the getters look it up here,
    delta.check_elem = check_elem  # and Delta's setters here


#: Top-level package -> the function hardening it (run before its first view is made).
_HARDENERS: dict[str, Callable[[], None]] = {
    "pandas": harden_pandas, "yaml": harden_yaml, "deepdiff": harden_deepdiff,
}  # fmt: skip


# -- the audit hook -------------------------------------------------------------------------------

_BLOCKED_EVENTS = frozenset(
    {
        "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn",
        "pickle.find_class", "sys.settrace", "sys.setprofile", "sys._current_frames",
        "code.__new__", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    }
)  # fmt: skip
_hook_installed = False


def _audit(event: str, _args: tuple[Any, ...]) -> None:
    if event in _BLOCKED_EVENTS or event.startswith("ctypes."):
        raise PermissionError(f"{event} is not allowed in a processor step")


def install_audit_hook() -> None:
    """Refuse process creation, signals, ctypes, unpickling globals, tracing and
    code-object construction for the rest of this process (worker processes only).

    ``ctypes`` is imported first so that libraries importing it later do not
    trip the hook with its start-up ``dlopen``."""
    global _hook_installed
    if _hook_installed:
        return
    import ctypes  # noqa: F401 - see the docstring

    sys.addaudithook(_audit)
    _hook_installed = True


# -- compiling a statement -------------------------------------------------------------------------


@dataclass
class CompiledStatement:
    """A statement compiled once: call ``function(INPUT_DATA, DATA_CHECKPOINT, log, sleep)``."""

    function: Callable[..., Any]
    globals: dict[str, Any]
    guard: ImportGuard


def compile_statement(
    source: str,
    filename: str,
    allowed_imports: Iterable[str] = DEFAULT_ALLOWED_IMPORTS,
    *,
    harden_libraries: bool = True,
) -> CompiledStatement:
    """Check and compile ``source`` as the body of the statement's async function.

    Raises ``SyntaxError`` (with the user's file and line) for invalid code and
    policy violations. The function's globals hold only the restricted builtins."""
    tree = check_tree(source, filename)
    body = _FormatRewriter().visit(tree).body
    if not body:
        raise SyntaxError(
            "the statement is empty: it must end with `return <list of objects>`",
            (filename, 1, 1, ""),
        )
    last_line = max(getattr(node, "end_lineno", 1) or 1 for node in body)
    function = ast.AsyncFunctionDef(
        name=STATEMENT_NAME,
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(arg=name) for name in STATEMENT_PARAMETERS],
            vararg=None,
            kwonlyargs=[],
            kw_defaults=[],
            kwarg=None,
            defaults=[],
        ),
        body=body,
        decorator_list=[],
        returns=None,
        type_comment=None,
        lineno=1,
        col_offset=0,
        end_lineno=last_line,
        end_col_offset=0,
    )
    module = ast.Module(body=[function], type_ignores=[])
    ast.fix_missing_locations(module)
    code = compile(module, filename, "exec", dont_inherit=True)
    guard = ImportGuard(allowed_imports, harden_libraries=harden_libraries)
    namespace: dict[str, Any] = {
        "__builtins__": safe_builtins(guard),
        "__name__": "stepwell_statement",
        _FORMAT_HELPER: format_attr,
    }
    holder: dict[str, Any] = {}
    exec(code, namespace, holder)  # defines the function; runs no user code
    return CompiledStatement(holder[STATEMENT_NAME], namespace, guard)
