"""A fork-server without pandas, whose workers can still import it.

pandas is a third of a warm worker's memory (about 32 MiB of Python objects),
and every fork copies the page tables of that memory and every exit tears
them down again: a fork-server that never imports it runs each step faster,
and steps that do use pandas import it themselves (see ``engine.preload`` for
which fork-server a step gets).

One catch: pyarrow checks once, lazily, whether pandas is installed (its
``_pandas_api`` shim), and that check imports pandas. The fork-server warms
pyarrow up with pandas hidden (``pandas_hidden``), so the shim records "no
pandas" instead of importing it; ``resync_pyarrow_on_import`` then makes
pyarrow look again as soon as a worker imports pandas, so conversions such as
``pa.array(series)`` and ``Table.from_pandas`` behave as usual from then on.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _HidePandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None


@contextmanager
def pandas_hidden() -> Iterator[None]:
    """Within the block ``import pandas`` fails as if it were not installed."""
    finder = _HidePandas()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def _resync_pyarrow() -> None:
    """Repeat pyarrow's pandas check (a no-op when pyarrow is not loaded)."""
    lib = sys.modules.get("pyarrow.lib")
    if lib is None:
        return
    try:
        _ = lib._pandas_api.pd  # a checked access: pyarrow imports (the loaded) pandas now
    except Exception:  # an unusable pandas: pyarrow keeps working without it
        pass


class _ResyncAfterPandas(importlib.abc.MetaPathFinder):
    """Finds pandas like the finders after it, and resyncs pyarrow once it is loaded."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "pandas":
            return None
        sys.meta_path.remove(self)  # one import of pandas is all it waits for
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_resync(module: Any) -> None:
            exec_module(module)
            _resync_pyarrow()

        loader.exec_module = exec_then_resync  # type: ignore[method-assign]
        return spec


def resync_pyarrow_on_import() -> None:
    """After this, the first ``import pandas`` also makes pyarrow see pandas."""
    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _ResyncAfterPandas())
