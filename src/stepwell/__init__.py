"""stepwell: run people's Python steps on data, sandboxed and exactly once.

Inside a run, the node API is importable from here (``from stepwell import
Table, State``) as well as from ``patterns``. Importing ``stepwell`` itself
stays light: the API is loaded on first use (and the typing module is not
imported: the console script's Ctrl-C handling waits for this module).
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_NODE_API = frozenset({"Table", "Stream", "State", "Parameter", "Connection", "respond_to_request"})

__all__ = sorted(_NODE_API)


def __getattr__(name: str) -> "Any":
    if name in _NODE_API:
        from stepwell.runtimes.node import api

        return getattr(api, name)
    raise AttributeError(f"module 'stepwell' has no attribute {name!r}")
