"""The action runtime (UI Bakery style): chains of code, SQL and action steps.

``pool`` keeps warm sandboxed workers that run the code steps (``worker``);
``templating`` is the ``{{ }}`` lookup language of ``variables:``; ``code``
compiles step bodies; ``journal`` writes run records and logs off the request
path. The executor that runs an action as one run is
``stepwell.engine.action_executor.ActionExecutor``.
"""
