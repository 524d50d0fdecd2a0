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
from stepwell.sandbox.client import HostLink, capture_descriptor_output
from stepwell.sandbox.worker import error_summary

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
    module, code = _load_module(app_root, file)
    exec(code, module.__dict__)
    return module


def _load_module(app_root: Path, file: str) -> tuple[types.ModuleType, types.CodeType]:
    """The module ``file`` becomes (registered, not yet executed) and its code."""
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
    loader = ShippedCodeLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = name.rpartition(".")[0]
    sys.modules[name] = module
    code = loader.get_code(name)
    if code is None:
        raise ImportError(f"cannot load {file}")
    return module, code


def _ready_for(message: dict[str, Any]) -> tuple[types.ModuleType, types.CodeType]:
    """Set up the app package and load the node's module (without running it)."""
    app_root = Path(message["app_root"])
    use_shipped_code(message.get("code"), message["app_root"])
    _mount_app(app_root)
    _install_aliases()
    return _load_module(app_root, message["file"])


#: what ``prepare`` made ready, and for which (app folder, file, shipped code)
_prepared: tuple[tuple[Any, ...], tuple[types.ModuleType, types.CodeType]] | None = None


def _key(message: dict[str, Any]) -> tuple[Any, ...]:
    return (message["app_root"], message["file"], message.get("code"))


def prepare(message: dict[str, Any]) -> None:
    """Get ready for the coming run while the host is still busy (committing the run
    before, say): the app package and the node's module, its code loaded but not
    run. A run whose start frame names the same file and code takes them over."""
    global _prepared
    _prepared = (_key(message), _ready_for(message))


def run(link: HostLink, start: dict[str, Any]) -> None:
    global _prepared
    prepared, _prepared = _prepared, None
    capture_descriptor_output(link)  # what subprocesses and C code print joins the log
    session = NodeSession(link, start)
    api._session = session
    if prepared is not None and prepared[0] == _key(start):
        module, code = prepared[1]
    else:
        module, code = _ready_for(start)
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            _answer_requests_in_hand(session, exc, start)
            raise
    except BaseException as exc:
        _answer_requests_in_hand(session, exc, start)
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    session.finish()


def _answer_requests_in_hand(session: NodeSession, exc: BaseException, start: dict[str, Any]) -> None:
    """The run fails with a respond webhook's row in hand: its client gets the error
    now (the host answers 502) instead of waiting for its timeout."""
    error = error_summary(exc, start.get("app_root"))
    for stream in session.streams:
        record = stream.current_record()
        key = record.get(api.REQUEST_KEY_COLUMN) if record else None
        if isinstance(key, str) and key:
            try:
                session.link.call("respond", key=key, failed=error)
            except Exception:  # the failure is reported anyway; the request times out
                pass
