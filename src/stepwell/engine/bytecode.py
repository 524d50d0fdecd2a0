"""Compiled bytecode of the app's node files, written by the host.

A worker imports its node file afresh on every run, from a read-only view of
the app, so Python could never keep the code it compiled: each run compiled
the file again (3 ms for a 700-line file, where loading cached bytecode takes
0.04 ms). The host writes the ``__pycache__`` files Python itself would write,
where they are missing or stale; a worker's import then loads them, and still
compiles the source itself if the file changed since.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
import sys
from pathlib import Path
from typing import Any

from stepwell.engine.preload import node_files


def write_bytecode(app: Any) -> None:
    """Bring the bytecode of every node file, and of the app modules they import,
    up to date (unless bytecode writing is off: ``PYTHONDONTWRITEBYTECODE``)."""
    if sys.dont_write_bytecode:
        return
    root = Path(app.root)
    node_sources = {step.file for step in app.steps if step.kind == "node"}
    files = {path for file in node_sources for path in node_files(root, file)}
    for path in sorted(files):
        _update(path)


def _update(source: Path) -> None:
    cached = importlib.util.cache_from_source(str(source))
    try:
        if _current(source, cached):
            return
        py_compile.compile(str(source), cached, quiet=2)  # a syntax error: the run reports it
    except OSError:  # a read-only app folder: workers compile as before
        pass


def _current(source: Path, cached: str) -> bool:
    """Whether ``cached`` holds bytecode for ``source`` as it is now (the check
    Python's import makes: magic number, source mtime and size)."""
    try:
        with open(cached, "rb") as f:
            header = f.read(16)
    except OSError:
        return False
    info = os.stat(source)
    return (
        header[:4] == importlib.util.MAGIC_NUMBER
        and int.from_bytes(header[4:8], "little") == 0  # timestamp-based
        and int.from_bytes(header[8:12], "little") == int(info.st_mtime) & 0xFFFFFFFF
        and int.from_bytes(header[12:16], "little") == info.st_size & 0xFFFFFFFF
    )
