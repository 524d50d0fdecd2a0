"""`stepwell serve`: the scheduler, the worker pool and the HTTP API in one process.

The public surface is small:

- :func:`stepwell.server.app.create_app` builds the FastAPI application over a
  :class:`~stepwell.server.context.ServerContext` (app, store, scheduler);
- :class:`stepwell.server.serve.Serving` runs it on uvicorn, writes
  ``APP/.stepwell/server.json`` while it runs and shuts down gracefully;
- :class:`stepwell.server.client.ServerClient` is the httpx client other CLI
  commands use while a server runs for their app (DESIGN section 7a).

Routes live in ``stepwell.server.routes``, one router per resource; a new
resource adds a module there and an entry in ``routes.ROUTERS``. The web UI is
static files in ``stepwell/server/ui/`` (no build step), served under ``/ui/``
by ``routes.ui``.
"""
