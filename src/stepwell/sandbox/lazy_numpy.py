"""A fork-server without numpy and pandas, whose workers can still import them.

numpy and pandas make up most of a warm worker's memory (about 9 and 32 MiB of
Python objects, next to pyarrow's 12), and every fork copies the page tables of
that memory and every exit tears them down again: a fork-server that never
imports them runs each step faster, and steps that do use them import them
themselves (see ``engine.preload`` for which fork-server a step gets).

One catch: pyarrow looks for each once. It imports numpy when it is imported
itself, and sets up its numpy support (its C++ ``arrow_init_numpy``) only if
that worked; and it checks lazily whether pandas is installed (its
``_pandas_api`` shim), a check that imports pandas. The fork-server imports and
warms up pyarrow with both hidden (``hidden``), so pyarrow records "no numpy,
no pandas" instead of importing them; ``resync_pyarrow_on_import`` then makes
pyarrow take each up as soon as a worker imports it, so ``pa.array(ndarray)``,
numpy scalars in records, ``pa.array(series)`` and ``Table.from_pandas``
behave as usual from then on.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

#: ``arrow::py::arrow_init_numpy()`` in pyarrow's libarrow_python (C++ name mangling)
_INIT_NUMPY_SYMBOL = "_ZN5arrow2py16arrow_init_numpyEv"


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, names: frozenset[str]):
        self.names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None


@contextmanager
def hidden(names: Iterable[str]) -> Iterator[None]:
    """Within the block importing any of ``names`` (top-level packages) fails as
    if they were not installed."""
    finder = _Hide(frozenset(names))
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def settle_pyarrow() -> None:
    """Have pyarrow (imported within ``hidden``) check for pandas now, while it is
    hidden: its check holds a lock that ``_resync_pandas`` would wait on forever
    if the check were still to come when a worker imports pandas."""
    lib = sys.modules.get("pyarrow.lib")
    if lib is not None:
        _ = lib._pandas_api.have_pandas


def pyarrow_numpy_init() -> Callable[[], int] | None:
    """pyarrow's own numpy set-up (what importing it runs when numpy is there), or
    None when this pyarrow build does not have it where expected: numpy must then
    be imported before pyarrow is. Does not import pyarrow."""
    spec = importlib.util.find_spec("pyarrow")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for name in sorted(os.listdir(folder)):
            if not name.startswith("libarrow_python.so"):
                continue
            try:
                # PyDLL: the call holds the GIL and raises the Python error it sets
                function = getattr(ctypes.PyDLL(os.path.join(folder, name)), _INIT_NUMPY_SYMBOL)
            except (OSError, AttributeError):
                continue
            function.restype = ctypes.c_int
            function.argtypes = []
            return function
    return None


def _resync_numpy(init: Callable[[], int]) -> None:
    """Give pyarrow the numpy just imported (a no-op when pyarrow is not loaded)."""
    lib = sys.modules.get("pyarrow.lib")
    if lib is None or getattr(lib, "np", None) is not None:
        return
    try:
        init()
        lib.np = sys.modules["numpy"]
    except Exception:  # an unusable numpy: pyarrow keeps working without it
        pass


def _resync_pandas() -> None:
    """Repeat pyarrow's pandas check (a no-op when pyarrow is not loaded)."""
    lib = sys.modules.get("pyarrow.lib")
    if lib is None:
        return
    try:
        _ = lib._pandas_api.pd  # a checked access: pyarrow imports (the loaded) pandas now
    except Exception:  # an unusable pandas: pyarrow keeps working without it
        pass


class _ResyncAfter(importlib.abc.MetaPathFinder):
    """Finds package ``name`` like the finders after it, and calls ``resync`` once
    it is loaded."""

    def __init__(self, name: str, resync: Callable[[], None]):
        self.name = name
        self.resync = resync

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # one import is all it waits for
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module
        resync = self.resync

        def exec_then_resync(module: Any) -> None:
            exec_module(module)
            resync()

        loader.exec_module = exec_then_resync  # type: ignore[method-assign]
        return spec


def resync_pyarrow_on_import(numpy_init: Callable[[], int] | None) -> None:
    """After this, the first ``import numpy`` (given ``numpy_init``, from
    ``pyarrow_numpy_init``) and the first ``import pandas`` also make pyarrow see
    them."""
    if numpy_init is not None and "numpy" not in sys.modules:
        sys.meta_path.insert(0, _ResyncAfter("numpy", lambda: _resync_numpy(numpy_init)))
    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _ResyncAfter("pandas", _resync_pandas))
