"""Node code compiled once by the host and shipped to every run that imports it.

A worker imports its node file afresh on every run, from a read-only view of
the app, so Python could never keep the code it compiled: each run compiled
the file again (3 ms for a 700-line file, where loading compiled code takes
0.04 ms), and ``.pyc`` files written next to the sources are no help where
bytecode writing is off (``PYTHONDONTWRITEBYTECODE``, common in containers) or
the app folder is read-only. The host compiles each node file, and the app
modules it imports, when a run first needs it or the file changed since, and
puts the code in the run's ``start`` message; the worker loads it for a file
whose modification time and size still match, and compiles anything else
itself (``runtimes.node.shipped_code``). Nothing is written to the app folder.
"""

from __future__ import annotations

import importlib.util
import marshal
import os
from pathlib import Path

from stepwell.engine.preload import node_files

#: A file's compiled code: (st_mtime_ns, st_size, marshalled code object).
Entry = tuple[int, int, bytes]
#: Compiled code sent per run at most (the node file first, then its imports):
#: beyond it, a large app's workers compile what they import as before.
MAX_SHIPPED_BYTES = 2 * 1024 * 1024


class AppBytecode:
    """The compiled code of an app's node files, kept current with the files."""

    def __init__(self, app_root: Path | str):
        self._root = Path(app_root)
        self._code: dict[Path, Entry] = {}

    def for_node(self, file: str) -> dict[str, object]:
        """The ``code`` field of a start message for node ``file`` (relative to the
        app root): the compiled code of it and of the app modules it imports."""
        code, size = {}, 0
        for path in node_files(self._root, file):
            entry = self._compiled(path)
            if entry is not None and size + len(entry[2]) <= MAX_SHIPPED_BYTES:
                code[str(path)] = entry
                size += len(entry[2])
        return {"magic": importlib.util.MAGIC_NUMBER, "files": code}

    def _compiled(self, path: Path) -> Entry | None:
        try:
            before = os.stat(path)
            entry = self._code.get(path)
            if entry is not None and entry[:2] == (before.st_mtime_ns, before.st_size):
                return entry
            source = path.read_bytes()
            # optimize=0: the level workers import at (the fork-server runs without -O)
            code = compile(source, str(path), "exec", dont_inherit=True, optimize=0)
            after = os.stat(path)
        except (OSError, SyntaxError, ValueError):
            self._code.pop(path, None)
            return None  # the worker reads it itself (and reports what is wrong)
        if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size):
            return None  # edited while we read it: the worker compiles what it finds
        entry = self._code[path] = (before.st_mtime_ns, before.st_size, marshal.dumps(code))
        return entry
