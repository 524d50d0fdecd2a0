"""Which fork-server a step's workers come from: the one with numpy and pandas
imported ahead, or the lean one without them (see ``sandbox.lazy_numpy``).

A node step whose code (its file and the app modules it imports) never
mentions numpy, pandas or data frames gets the lean fork-server, so each of its
runs forks and exits faster; every other Python step keeps them warm. A guess
that misses (numpy imported through a library) costs one slower run: the
worker reports it, and the step's next runs come from the pandas fork-server.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from pathlib import Path
from typing import Any

from stepwell.app.pyparse import parse_python

#: Words in a node's code that mean it will load numpy or pandas (``import numpy``,
#: pyarrow's ``to_numpy()``, which needs numpy loaded, ``import pandas``, libraries
#: built on numpy, ``read_dataframe()``, ``as_format="dataframe"``).
_PANDAS_WORDS = re.compile(
    r"numpy|\b(pandas|scipy|sklearn|statsmodels|matplotlib|seaborn)\b|dataframe", re.IGNORECASE
)
#: App files followed at most per node (imports of imports of ...).
_MAX_FILES = 200


def node_uses_pandas(app_root: Path, file: str) -> bool:
    """Whether node ``file`` (relative to ``app_root``), or an app module it
    imports directly or indirectly, mentions numpy, pandas or data frames."""
    return any(_PANDAS_WORDS.search(text) for _, text in _node_sources(app_root, file))


def node_files(app_root: Path, file: str) -> list[Path]:
    """Node ``file`` and the app files its imports may load, directly or not."""
    return [path for path, _ in _node_sources(app_root, file)]


def _node_sources(app_root: Path, file: str) -> tuple[tuple[Path, str], ...]:
    """(path, text) of node ``file`` and of the app files its imports may load.
    Read and parsed once per version of the node file (its modification time and
    size), however many steps, checks and runs ask; a change in an imported file
    alone is seen once the node file changes or the process restarts."""
    root = Path(app_root).resolve()
    try:
        info = os.stat(root / file)
    except OSError:
        return ()  # the run itself reports the missing file
    return _read_node_sources(root, file, info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=256)
def _read_node_sources(root: Path, file: str, _mtime_ns: int, _size: int) -> tuple[tuple[Path, str], ...]:
    sources = []
    todo, seen = [root / file], set()
    while todo and len(seen) < _MAX_FILES:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        sources.append((path, text))
        try:
            tree = parse_python(text)
        except (SyntaxError, ValueError):
            continue  # the run itself reports the error
        todo.extend(_imported_app_files(tree, path.parent, root))
    return tuple(sources)


def _imported_app_files(tree: ast.AST, folder: Path, root: Path) -> list[Path]:
    """Files under ``root`` that the imports in ``tree`` may load."""
    modules: list[list[str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.extend(alias.name.split(".") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to the importing file's folder
                base = folder
                for _ in range(node.level - 1):
                    base = base.parent
                prefix = list(base.relative_to(root).parts) if base.is_relative_to(root) else None
            else:
                prefix = []
            if prefix is None:
                continue
            module = prefix + (node.module.split(".") if node.module else [])
            modules.append(module)
            modules.extend(module + [alias.name] for alias in node.names)  # submodules
    files = []
    for parts in modules:
        if parts and parts[0] == "stepwell_app":  # the app package itself
            parts = parts[1:]
        if not parts:
            continue
        base = root.joinpath(*parts)
        files += [base.with_suffix(".py"), base / "__init__.py"]
    return [f for f in files if f.is_file()]


def step_wants_pandas(step: Any, app_root: Path) -> bool:
    """Whether ``step``'s workers should come from the fork-server with pandas."""
    if step.kind != "node":
        return True
    return node_uses_pandas(Path(app_root), step.file)


def pandas_by_step(app: Any) -> dict[str, bool]:
    """``step_wants_pandas`` of each of the app's Python steps, by name."""
    return {s.name: step_wants_pandas(s, app.root) for s in app.steps if s.kind != "sql"}


def prestart_forkservers(app: Any, wants: dict[str, bool] | None = None) -> None:
    """Start, in the background, the fork-servers the app's Python steps use
    (``wants``: ``pandas_by_step(app)``, if worked out already)."""
    from stepwell.sandbox.launcher import forkserver

    wants = pandas_by_step(app) if wants is None else wants
    for pandas in sorted(set(wants.values())):
        forkserver(pandas).prestart()
