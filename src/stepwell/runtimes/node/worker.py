"""Worker-side entry point of a node run: import the node file as a module."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from stepwell.runtimes.node import api
from stepwell.runtimes.node.session import NodeSession
from stepwell.runtimes.node.shipped_code import ShippedCodeLoader, use_shipped_code
from stepwell.sandbox.client import HostLink

#: Synthetic package the app folder is mounted as, so ``from . import common`` works.
APP_PACKAGE = "stepwell_app"


def _mount_app(app_root: Path) -> None:
    package = types.ModuleType(APP_PACKAGE)
    package.__path__ = [str(app_root)]
    package.__package__ = APP_PACKAGE
    init = app_root / "__init__.py"
    package.__file__ = str(init) if init.exists() else None
    sys.modules[APP_PACKAGE] = package
    # Last on the path: an app file named like a stdlib module must not shadow it.
    if str(app_root) not in sys.path:
        sys.path.append(str(app_root))


def _install_aliases() -> None:
    """``import patterns`` gives the node API (unmodified Patterns nodes)."""
    sys.modules["patterns"] = api


def run_module(app_root: Path, file: str) -> types.ModuleType:
    """Execute ``file`` (relative to the app root) as a module of the app package."""
    path = (app_root / file).resolve()
    parts = list(path.relative_to(app_root).with_suffix("").parts)
    # Import parent folders as subpackages first (namespace packages work too).
    for depth in range(1, len(parts)):
        name = ".".join([APP_PACKAGE, *parts[:depth]])
        if name not in sys.modules:
            sub = types.ModuleType(name)
            sub.__path__ = [str(app_root.joinpath(*parts[:depth]))]
            sys.modules[name] = sub
    name = ".".join([APP_PACKAGE, *parts])
    spec = importlib.util.spec_from_file_location(name, path, loader=ShippedCodeLoader(name, str(path)))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = name.rpartition(".")[0]
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(link: HostLink, start: dict[str, Any]) -> None:
    session = NodeSession(link, start)
    api._session = session
    app_root = Path(start["app_root"])
    use_shipped_code(start.get("code"), start["app_root"])
    _mount_app(app_root)
    _install_aliases()
    try:
        run_module(app_root, start["file"])
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    sys.stdout.flush()
    sys.stderr.flush()
    session.finish()
