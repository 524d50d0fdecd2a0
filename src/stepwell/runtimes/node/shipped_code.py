"""Worker side of ``engine.bytecode``: import app files from the code the host
compiled, for each file still as it was when the host compiled it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import marshal
import os
import sys
from collections.abc import Callable
from types import CodeType
from typing import Any

#: path -> [st_mtime_ns, st_size, marshalled code] of this run's app files
_shipped: dict[str, Any] = {}
#: app folders whose imports go through ``ShippedCodeLoader`` already
_hooked: set[str] = set()


class ShippedCodeLoader(importlib.machinery.SourceFileLoader):
    """A source file loader that takes the host's compiled code when the file's
    modification time and size still match, and compiles the file otherwise."""

    def get_code(self, fullname: str) -> CodeType | None:
        entry = _shipped.get(self.path)
        if entry is not None:
            try:
                info = os.stat(self.path)
            except OSError:
                info = None
            if info is not None and [info.st_mtime_ns, info.st_size] == list(entry[:2]):
                return marshal.loads(entry[2])
        return super().get_code(fullname)


def use_shipped_code(shipped: dict[str, Any] | None, app_root: str) -> None:
    """Load app files under ``app_root`` through ``ShippedCodeLoader``, with the
    ``code`` field of the run's start message (ignored if from another Python)."""
    if not shipped or shipped.get("magic") != importlib.util.MAGIC_NUMBER:
        return
    _shipped.update(shipped.get("files") or {})
    prefix = app_root.rstrip("/") + "/"
    if prefix not in _hooked:
        _hooked.add(prefix)
        sys.path_hooks.insert(0, _app_path_hook(prefix))


def _app_path_hook(prefix: str) -> Callable[[str], importlib.machinery.FileFinder]:
    details = [
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
        (ShippedCodeLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
    ]

    def hook(path: str) -> importlib.machinery.FileFinder:
        if not (path + "/").startswith(prefix):
            raise ImportError("not an app folder")  # the next hook takes it
        return importlib.machinery.FileFinder(path, *details)

    return hook
