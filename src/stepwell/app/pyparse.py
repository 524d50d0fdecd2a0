"""``ast.parse`` that several threads of one host may call at once.

CPython 3.11 keeps the depth counter of its AST constructor per interpreter, not
per thread: two threads building ASTs at the same moment (``stepwell serve``
loading apps and checking steps on several threads) can fail with
``SystemError: AST constructor recursion depth mismatch`` (python/cpython#106905).
The host's own parsing therefore takes turns.
"""

from __future__ import annotations

import ast
import threading

_turns = threading.Lock()


def parse_python(source: str | bytes, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse(source, filename)``, one thread at a time; raises ``SyntaxError``."""
    with _turns:
        return ast.parse(source, filename=filename)
