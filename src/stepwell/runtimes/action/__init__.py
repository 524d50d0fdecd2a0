"""The action runtime (UI Bakery style): chains of code, SQL and action steps.

``host.ActionExecutor`` runs an action as one run; ``pool`` keeps warm
sandboxed workers that run the code steps (``worker``); ``templating`` is the
``{{ }}`` lookup language of ``variables:``; ``code`` compiles step bodies;
``journal`` writes run records and logs off the request path.

The names below are imported on first use, so a worker (which only needs
``worker`` and ``code``) never loads the host's side.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ActionExecutor", "ActionNotFound", "ActionResult", "InvalidInput", "StepResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stepwell.runtimes.action import host

        return getattr(host, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
